"""int4_matmul_reference pinned by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.int4_matmul import int4_matmul, int4_matmul_reference
from quant import Int4Weight


def test_reference_by_hand():
    # K=2, N=1, one group: scale 0.5, zero 8, codes [9, 6] -> w = [0.5, -1.0]; x = [2, 3] -> y = 1 - 3 = -2.
    qw = Int4Weight.from_codes(
        np.array([[9], [6]]), np.array([[0.5]], np.float32), np.array([[8]]), group_size=2
    )
    assert int4_matmul_reference(np.array([[2.0, 3.0]], np.float32), qw)[0, 0] == -2.0
    assert float(int4_matmul(jnp.array([[2.0, 3.0]]), qw, impl="codes")[0, 0]) == -2.0


def test_reference_applies_act_order_and_act_scales_by_hand():
    # Codes in input order [9, 6]; g_idx puts channel 0 in group 1 (scale 0.5) and channel 1 in group 0
    # (scale 1.0); AWQ scales a = [2, 0.5]. W_eff = s·(q − z) / a = [0.5·1 / 2, 1.0·(−2) / 0.5] = [0.25, −4];
    # x = [2, 3] -> 0.5 − 12 = −11.5
    qw = Int4Weight.from_codes(
        np.array([[9], [6]]),
        np.array([[1.0], [0.5]], np.float32),
        np.array([[8], [8]]),
        group_size=1,
        g_idx=np.array([1, 0]),
        act_scales=np.array([2.0, 0.5], np.float32),
    )
    x = np.array([[2.0, 3.0]], np.float32)
    assert int4_matmul_reference(x, qw)[0, 0] == pytest.approx(-11.5)
    for impl in ("codes", "dequant", "dense"):
        assert float(int4_matmul(jnp.asarray(x), qw, impl=impl)[0, 0]) == pytest.approx(-11.5)
