"""moe_ffn_reference pinned by hand."""

import numpy as np

from kernels.moe import (
    moe_ffn_reference,
)

# ---------------------------------------------------------------------------------------------------------
# The FFN reference, by hand.


def test_reference_one_expert_by_hand():
    # d = f = 1: FFN(v) = silu(v·a)·(v·b)·c.
    x = np.array([[1.0], [2.0]], np.float32)
    wg, wu, wd = (np.array([[[a]], [[2 * a]]], np.float32) for a in (1.0, 3.0, 0.5))
    ids = np.array([[1], [0]], np.int32)
    w = np.array([[0.5], [2.0]], np.float32)

    def silu(v):
        return v / (1 + np.exp(-v))

    want = [0.5 * silu(1.0 * 2) * (1.0 * 6) * 1.0, 2.0 * silu(2.0) * 6.0 * 0.5]
    np.testing.assert_allclose(moe_ffn_reference(x, w, ids, wg, wu, wd)[:, 0], want, rtol=1e-12)
    # Capacity 1 per expert with both on expert 0: the second token is dropped.
    ids0 = np.zeros((2, 1), np.int32)
    y = moe_ffn_reference(x, w, ids0, wg, wu, wd, capacity_factor=1.0)
    assert y[1, 0] == 0.0 and y[0, 0] != 0.0
