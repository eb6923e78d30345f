"""The XLA strategies of int4_matmul ("codes", "dequant", "dense") beyond the shared suite: each strategy
against the reference, the gradient through each, export to every backend, and the cost against XLA's."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.int4_matmul import int4_matmul, int4_matmul_cost, int4_matmul_reference
from roofline import compare_with_xla
from tests.kernels.int4_matmul.cases import VARIANTS, K, N, check, make_weight, with_float_fields
from tests.tolerances import COST_FLOPS_RTOL, normalized_error, tolerance

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))
STRATEGIES = ["codes", "dequant", "dense"]


@pytest.mark.parametrize("impl", STRATEGIES)
@pytest.mark.parametrize("m", [1, 3, 40])
@FEW
@given(seed=st.integers(0, 2**31))
def test_base_case(impl, m, seed):
    x = np.random.default_rng(seed + 1).standard_normal((m, K)).astype(np.float32)
    check(x, make_weight(seed), impl)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("impl", ["codes", "dequant"])
@FEW
@given(seed=st.integers(0, 2**31))
def test_weight_variants(variant, impl, seed):
    x = np.random.default_rng(seed + 1).standard_normal((4, K)).astype(np.float32)
    check(x, make_weight(seed, **VARIANTS[variant]), impl)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
@pytest.mark.parametrize("impl", ["codes", "dequant"])
@FEW
@given(seed=st.integers(0, 2**31))
def test_low_precision_activations(dtype, impl, seed):
    x = np.random.default_rng(seed + 1).standard_normal((2, K)).astype(dtype)
    check(x, make_weight(seed), impl)


def test_vmap_over_stacked_expert_weights():
    experts = [make_weight(i) for i in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *experts)
    x = np.random.default_rng(9).standard_normal((3, 5, K)).astype(np.float32)
    for impl in ("codes", "dequant"):
        out = jax.vmap(lambda xe, we, impl=impl: int4_matmul(xe, we, impl=impl))(x, stacked)
        for e in range(3):
            assert normalized_error(out[e], int4_matmul_reference(x[e], experts[e])) <= 1e-5


@pytest.mark.parametrize("impl", ["codes", "dequant", "dense"])
@pytest.mark.parametrize("variant", ["g128", "act_order_and_scales"])
def test_grad_with_respect_to_x(impl, variant):
    qw = make_weight(3, **VARIANTS[variant])
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, K)).astype(np.float32)
    dy = rng.standard_normal((5, N)).astype(np.float32)
    dx = jax.grad(lambda x: jnp.sum(int4_matmul(x, qw, impl=impl) * dy))(jnp.asarray(x))
    w = np.asarray(qw.dequantize(), np.float64)
    assert normalized_error(dx, dy.astype(np.float64) @ w.T) <= 1e-5


@pytest.mark.parametrize("impl", ["codes", "dequant"])
@pytest.mark.parametrize("variant,k", [("g32", K), ("per_channel", 1024), ("bits3", K)])
def test_grad_with_respect_to_scales_every_block_shape(impl, variant, k):
    """Blocks holding several groups (g32), several blocks per group (a 1024-row group: 512-row blocks), and
    3-bit codes, for both strategies: the scales' gradient against the one by hand."""
    qw = make_weight(8, k=k, **VARIANTS[variant])
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, k)).astype(np.float32)
    dy = rng.standard_normal((4, N)).astype(np.float32)
    ds = jax.grad(lambda s: jnp.sum(int4_matmul(x, with_float_fields(qw, s, None), impl=impl) * dy))(
        qw.scales
    )
    g, gs = qw.num_groups, qw.group_size
    codes = np.asarray(qw.codes(), np.float64).reshape(g, gs, N)
    z = np.asarray(qw.zero_points(), np.float64)[:, None, :]
    ds_hand = ((x.astype(np.float64).T @ dy).reshape(g, gs, N) * (codes - z)).sum(1)
    assert normalized_error(ds, ds_hand) <= tolerance(ds.dtype).nerr


def test_lowers_for_every_backend():
    qw = make_weight(0, act_order=True, act_scales=True)
    spec = jax.ShapeDtypeStruct
    for m, impl in ((1, "codes"), (64, "dequant")):
        jax.export.export(
            jax.jit(lambda x, w, impl=impl: int4_matmul(x, w, impl=impl)),
            platforms=("cpu", "cuda", "rocm", "tpu"),
        )(spec((m, K), jnp.float32), qw)


def test_cost_counts_packed_bytes_and_matches_xla_flops():
    m, k, n, g = 256, 512, 256, 128
    cost = int4_matmul_cost(m, k, n, group_size=g)
    assert cost.bytes_read == k * n / 2 + (k // g) * n * (4 + 1) + m * k * 4
    assert cost.flops == 2 * m * k * n
    qw = make_weight(0, group_size=g, k=k, n=n)
    # One block covers K (one loop trip, which XLA counts once); dequantizing adds ~2 FLOPs per weight,
    # under 1% of 2·M FLOPs per weight at M = 256.
    cmp = compare_with_xla(cost, lambda x, w: int4_matmul(x, w, impl="dequant"), jnp.zeros((m, k)), qw)
    assert cmp.flops_ratio == pytest.approx(1.0, rel=COST_FLOPS_RTOL)


@pytest.mark.parametrize("impl", ["codes", "dequant"])
def test_awq_weights_keep_the_deinterleave_out_of_the_gpu_dot(impl):
    """XLA's GPU GEMM fusion aborted on `(x / act_scales)[:, 0::2]` fused into a dot operand (INT4 with AWQ
    scales, K=256, N=96, g64). The XLA path deinterleaves x once behind an optimization barrier; on a GPU the
    shared suite's act_scales case compiles this very program."""
    qw = make_weight(0, act_scales=True)
    x = jax.ShapeDtypeStruct((4, K), jnp.float32)
    traced = jax.jit(lambda x: int4_matmul(x, qw, impl=impl)).trace(x)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    strided = re.findall(r"(%\S+) = stablehlo\.slice %\S+ \[[^\]]*:2\]", text)
    assert len(strided) == 2  # the even and odd columns, taken once
    barrier = next(line for line in text.split("\n") if "stablehlo.optimization_barrier" in line)
    assert all(name in barrier for name in strided)  # ... and fed only to the barrier
    assert text.index("stablehlo.while") > text.index("stablehlo.optimization_barrier")
