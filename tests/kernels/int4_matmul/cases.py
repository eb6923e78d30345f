"""Cases for the INT4 matmul suites: quantized weights in every variant, and the check of one implementation
against the dequantized reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.int4_matmul import int4_matmul, int4_matmul_reference
from quant import Int4Weight, quantize_rtn
from tests.kernels import suite
from tests.tolerances import NATIVE_INT4_NERR, normalized_error, tolerance

K, N = 256, 96
VARIANTS = {
    "g32": {"group_size": 32},
    "g128": {"group_size": 128},
    "per_channel": {"group_size": -1},
    "sym": {"sym": True},
    "act_order": {"act_order": True},
    "act_scales": {"act_scales": True},
    "act_order_and_scales": {"act_order": True, "act_scales": True, "sym": True},
    "bits3": {"bits": 3},
    "bits2": {"bits": 2},
    "bits8": {"bits": 8},
}


def make_weight(seed, *, group_size=64, sym=False, act_order=False, act_scales=False, bits=4, k=K, n=N):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    qw = quantize_rtn(w, bits=bits, group_size=group_size, sym=sym)
    if not (act_order or act_scales):
        return qw
    gs = qw.group_size
    g_idx = rng.permutation(np.repeat(np.arange(k // gs), gs)) if act_order else None
    scales = rng.uniform(0.25, 4.0, k).astype(np.float32) if act_scales else None
    return Int4Weight.from_codes(
        qw.codes_in_input_order(),
        qw.scales,
        qw.zeros,
        bits=bits,
        group_size=gs,
        g_idx=g_idx,
        act_scales=scales,
    )


def with_float_fields(qw, scales, act_scales):
    """qw with its float fields replaced (traced values welcome): the leaves a gradient can reach."""
    aux = qw.tree_flatten()[1]
    return type(qw).tree_unflatten(aux, (qw.packed, scales, qw.zeros, qw.perm, act_scales))


def unsupported(impl, x, qw):
    """Why `impl` does not serve this weight (None when it does)."""
    return suite.unsupported("int4_matmul", impl, x, qw)


def skip_unsupported(impl, x, qw):
    reason = unsupported(impl, x, qw)
    if reason is not None:
        pytest.skip(f"impl={impl!r} does not serve {reason}")


def nerr_bound(impl, dtype):
    """The native kernel's float32 bound is its own (it sums in a different order, in registers)."""
    if impl == "cpu_native" and np.dtype(dtype) == np.float32:
        return NATIVE_INT4_NERR
    return tolerance(dtype).nerr


def check(x, qw, impl):
    skip_unsupported(impl, x, qw)
    expected = int4_matmul_reference(np.asarray(x), qw)
    out = int4_matmul(jnp.asarray(x), qw, impl=impl)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert normalized_error(out, expected.astype(np.float64)) <= nerr_bound(impl, x.dtype)
