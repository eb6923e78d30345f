"""The CPU-native INT4 matmul kernel (kernels/cpu, through XLA's FFI) beyond the shared suite: its scalar
fallback against its SIMD path, shapes off its SIMD tiles, gradients, vmap and unsupported weights. Needs the
built library; skipped with the reason otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import cpu, int4_matmul, int4_matmul_reference
from tests.kernels.int4_matmul.cases import K, N, make_weight
from tests.tolerances import NATIVE_INT4_NERR, normalized_error

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))
needs_lib = pytest.mark.skipif(not cpu.available(), reason=f"CPU-native library not available: {cpu.load()}")


def _lowered_text(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


INT4_VARIANTS = {
    "asym_g64": {},
    "sym": {"sym": True},
    "g32": {"group_size": 32},
    "g128": {"group_size": 128},
    "per_channel": {"group_size": -1},
    "act_order": {"act_order": True},
    "act_scales": {"act_scales": True},
    "act_order_scales_sym": {"act_order": True, "act_scales": True, "sym": True},
    "bits3": {"bits": 3},
}


def check_int4(x, qw, **kw):
    expected = int4_matmul_reference(np.asarray(x), qw).astype(np.float64)
    out = int4_matmul(jnp.asarray(x), qw, impl="cpu_native", **kw)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert normalized_error(out, expected) <= NATIVE_INT4_NERR


@needs_lib
@pytest.mark.parametrize("variant", sorted(INT4_VARIANTS))
@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_int4_every_variant(variant, m):
    qw = make_weight(m, **INT4_VARIANTS[variant])
    x = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
    check_int4(x, qw)


@needs_lib
@pytest.mark.parametrize("m,k,n", [(1, 128, 16), (2, 256, 200), (5, 512, 64), (17, 256, 136), (64, 128, 272)])
@FEW
@given(seed=st.integers(0, 2**31), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_int4_shapes_and_values(m, k, n, seed, scale):
    """Column counts off the 16/64-wide SIMD tiles exercise the scalar tails; M spans both paths."""
    qw = make_weight(seed, k=k, n=n, group_size=32)
    x = (np.random.default_rng(seed).standard_normal((m, k)) * scale).astype(np.float32)
    check_int4(x, qw)


@needs_lib
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("asym", [True, False])
def test_int4_scalar_fallback_matches_simd(m, asym):
    rng = np.random.default_rng(m)
    k, n, g = 256, 80, 64
    packed = jnp.asarray(rng.integers(0, 256, (k // 2, n), dtype=np.uint8))
    scales = jnp.asarray(rng.uniform(0.5, 2.0, (k // g, n)).astype(np.float32))
    zeros = jnp.asarray(rng.integers(0, 16, (k // g, n), dtype=np.uint8)) if asym else None
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    outs = [
        jax.jit(
            lambda x, s=s: cpu.int4_matmul_native(x, packed, scales, zeros, group_size=g, sym_zero=8, simd=s)
        )(x)
        for s in (True, False)
    ]
    assert normalized_error(outs[1], np.asarray(outs[0], np.float64)) <= NATIVE_INT4_NERR


@needs_lib
@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_int4_low_precision_x(dtype):
    qw = make_weight(1)
    x = np.random.default_rng(2).standard_normal((4, K)).astype(dtype)
    expected = int4_matmul_reference(np.asarray(x, np.float32), qw).astype(np.float64)
    out = int4_matmul(jnp.asarray(x), qw, impl="cpu_native")
    assert out.dtype == x.dtype
    assert normalized_error(out, expected) <= 1e-2


@needs_lib
def test_int4_grad_and_vmap_through_native():
    qw = make_weight(3, act_order=True)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((5, K)).astype(np.float32))
    dy = rng.standard_normal((5, N)).astype(np.float32)
    for impl in ("auto", "cpu_native"):
        dx = jax.grad(lambda x, impl=impl: jnp.sum(int4_matmul(x, qw, impl=impl) * dy))(x)
        assert normalized_error(dx, dy.astype(np.float64) @ np.asarray(qw.dequantize(), np.float64).T) <= 1e-5
    ws = [make_weight(s) for s in (5, 6)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ws)
    xs = jnp.asarray(rng.standard_normal((2, 3, K)).astype(np.float32))
    out = jax.vmap(lambda x, w: int4_matmul(x, w, impl="cpu_native"))(xs, stacked)
    for i, w in enumerate(ws):
        expected = int4_matmul_reference(np.asarray(xs[i]), w).astype(np.float64)
        assert normalized_error(out[i], expected) <= NATIVE_INT4_NERR


@needs_lib
def test_int4_unsupported_weight_and_bad_shapes():
    qw8 = make_weight(0, bits=8)
    x = jnp.ones((1, K), jnp.float32)
    with pytest.raises(ValueError, match="bits=8"):
        int4_matmul(x, qw8, impl="cpu_native")
    # "auto" quietly keeps such weights on XLA.
    assert "tokenlab_int4_matmul" not in _lowered_text(lambda x: int4_matmul(x, qw8), x)
    # The handler checks its operands itself and names them.
    bad = jax.jit(
        lambda x: cpu.int4_matmul_native(
            x, jnp.zeros((10, 16), jnp.uint8), jnp.ones((2, 16), jnp.float32), None, group_size=8, sym_zero=8
        )
    )
    with pytest.raises(Exception, match=r"tokenlab_int4_matmul: packed has 10 rows; expected K/2 = 8"):
        bad(jnp.ones((1, 16), jnp.float32)).block_until_ready()
