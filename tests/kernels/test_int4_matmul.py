"""int4_matmul: every strategy and weight variant against the dequantized reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.int4_matmul import int4_matmul, int4_matmul_cost, int4_matmul_reference
from quant import Int4Weight, quantize_rtn
from roofline import compare_with_xla
from tests.tolerances import COST_FLOPS_RTOL, normalized_error, tolerance

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))
STRATEGIES = ["codes", "dequant", "dense", "auto"]
K, N = 256, 96


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


def check(x, qw, impl):
    expected = int4_matmul_reference(np.asarray(x), qw)
    out = int4_matmul(jnp.asarray(x), qw, impl=impl)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert normalized_error(out, expected.astype(np.float64)) <= tolerance(x.dtype).nerr


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


@pytest.mark.parametrize("impl", STRATEGIES)
@pytest.mark.parametrize("m", [1, 3, 40])
@FEW
@given(seed=st.integers(0, 2**31))
def test_base_case(impl, m, seed):
    x = np.random.default_rng(seed + 1).standard_normal((m, K)).astype(np.float32)
    check(x, make_weight(seed), impl)


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


def test_leading_axes_and_jit():
    qw = make_weight(0)
    x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    out = jax.jit(int4_matmul)(x, qw)
    assert out.shape == (2, 3, N)
    assert normalized_error(out, int4_matmul_reference(x.reshape(6, K), qw).reshape(2, 3, N)) <= 1e-5


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


@pytest.mark.parametrize(
    "x,w,kw,match",
    [
        (np.zeros((2, K + 1), np.float32), "w", {}, f"last dimension {K + 1} must equal the weight's K={K}"),
        (np.zeros((2, K), np.int32), "w", {}, "x.dtype=int32"),
        (np.zeros((2, K), np.float32), np.zeros((K, N)), {}, "must be a quant.Int4Weight"),
        (np.zeros((2, K), np.float32), "w", {"impl": "tinygemm"}, "impl='tinygemm'"),
    ],
)
def test_bad_input(x, w, kw, match):
    w = make_weight(0) if isinstance(w, str) else w
    with pytest.raises(ValueError, match=match):
        int4_matmul(x, w, **kw)
