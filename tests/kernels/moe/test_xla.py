"""The XLA strategies of moe_ffn (grouped, bucketed, ragged, batched, dense) beyond the shared suite:
every strategy against the reference, gradients, export for every backend, cost, bad input, quantized
experts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels import targets
from kernels.moe import (
    dispatch_plan,
    load_balancing_loss,
    moe_ffn,
    moe_ffn_cost,
    moe_ffn_reference,
    route,
    route_expert_choice,
    route_reference,
    router_z_loss,
)
from kernels.moe.xla import Config
from tests.kernels.moe.cases import (
    FEW,
    PATTERNS,
    QD,
    QF,
    STRATEGIES,
    D,
    E,
    F,
    T,
    check_ffn,
    make_routing,
    make_weights,
    make_x,
    quantized_experts,
    small_blocks,
)
from tests.tolerances import (
    DIRECTIONAL_GRAD_RTOL,
    NATIVE_INT4_NERR,
    normalized_error,
    tolerance,
)

# ---------------------------------------------------------------------------------------------------------
# The FFN strategies against the reference.


# Every strategy on the base case; the CPU strategies across every routing pattern and k; the full cross
# with --full.
DROPLESS_CASES = sorted(
    {(impl, "random", 2) for impl in (*STRATEGIES, "auto")}
    | {(impl, p, k) for impl in ("grouped", "bucketed") for p in PATTERNS for k in (1, 2, 6)}
) + [
    pytest.param(impl, p, k, marks=pytest.mark.slow)
    for impl in ("ragged", "batched", "dense", "auto")
    for p in PATTERNS
    for k in (1, 2, 6)
    if (p, k) != ("random", 2)
]


@pytest.mark.parametrize("impl,pattern,k", DROPLESS_CASES)
def test_ffn_dropless_matches_reference(impl, pattern, k):
    w, ids = make_routing(k, k, pattern=pattern)
    check_ffn(make_x(k), w, ids, make_weights(k), impl)


@pytest.mark.parametrize("impl", (*STRATEGIES, "auto"))
@pytest.mark.parametrize("prio", ["choice", "token", "weight"])
def test_ffn_with_capacity_matches_reference(impl, prio):
    w, ids = make_routing(3, 2)
    ids[:8, 0] = 5  # overload expert 5 so that capacity bites
    check_ffn(make_x(3), w, ids, make_weights(3), impl, cf=1.0, prio=prio)


@FEW
@given(
    ids=st.lists(st.integers(0, E - 1), min_size=T * 2, max_size=T * 2).map(
        lambda v: np.array(v, np.int32).reshape(T, 2)
    ),
    cf=st.sampled_from([None, 0.5, 1.25]),
)
def test_ffn_grouped_matches_reference_on_arbitrary_ids(ids, cf):
    # Arbitrary ids, duplicates within a token included: the reference adds both.
    w = np.linspace(0.2, 1.0, T * 2, dtype=np.float32).reshape(T, 2)
    check_ffn(make_x(7), w, ids, make_weights(7), "grouped", cf=cf)
    check_ffn(make_x(7), w, ids, make_weights(7), "auto", cf=cf)


def test_bucket_capacities_and_fallback():
    from kernels.moe.xla import _bucket_capacities

    assert _bucket_capacities(512, 8, 8) == [64, 72, 80, 88, 96, 104, 112, 128]
    assert _bucket_capacities(16, 8, 8) == [8]
    # Past the largest bucket the grouped loop takes over: 12 of 16 assignments on expert 0.
    w, ids = make_routing(9, 2)
    ids[:12, 0] = 0
    ids[:12, 1] = 1
    check_ffn(make_x(9), w, ids, make_weights(9), "bucketed")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ffn_low_precision_against_reference(dtype):
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

    w, ids = make_routing(4, 2)
    ws = tuple(a.astype(dtype) for a in make_weights(4))
    check_ffn(make_x(4).astype(dtype), w, ids, ws, "grouped")


def test_ffn_from_the_routers_end_to_end():
    x = make_x(5)
    logits = x @ np.random.default_rng(5).standard_normal((D, E)).astype(np.float32)
    ws = make_weights(5)
    w, ids = route(logits, top_k=2)
    check_ffn(x, np.asarray(w), np.asarray(ids), ws, "auto")
    w, ids = route(logits, top_k=6, scoring="sigmoid", n_group=4, topk_group=3, routed_scaling_factor=2.5)
    check_ffn(x, np.asarray(w), np.asarray(ids), ws, "auto")


# ---------------------------------------------------------------------------------------------------------
# Gradients.


def _loss(x, w, wg, wu, wd, ids, impl, cf):
    y = moe_ffn(x, w, ids, wg, wu, wd, impl=impl, capacity_factor=cf, config=small_blocks(impl))
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))


def _loss_reference(x, w, wg, wu, wd, ids, cf):
    y = moe_ffn_reference(x, w, ids, wg, wu, wd, capacity_factor=cf)
    return np.sum(y * np.cos(np.arange(y.size, dtype=np.float64).reshape(y.shape)))


@pytest.mark.parametrize("impl,cf", [("grouped", None), ("ragged", None), ("auto", None), ("auto", 0.75)])
def test_gradients_match_finite_differences_of_reference(impl, cf):
    w, ids = make_routing(11, 2, pattern="empty_experts")
    args = [make_x(11), w, *make_weights(11)]
    grads = jax.grad(_loss, argnums=(0, 1, 2, 3, 4))(*args, ids, impl, cf)
    rng = np.random.default_rng(0)
    eps = 1e-4
    for i, g in enumerate(grads):
        v = rng.standard_normal(args[i].shape)
        plus = [a.astype(np.float64) for a in args]
        minus = [a.astype(np.float64) for a in args]
        plus[i] = plus[i] + eps * v
        minus[i] = minus[i] - eps * v
        fd = (_loss_reference(*plus, ids, cf) - _loss_reference(*minus, ids, cf)) / (2 * eps)
        got = float(np.sum(np.asarray(g, np.float64) * v))
        assert got == pytest.approx(fd, rel=DIRECTIONAL_GRAD_RTOL), f"argument {i}"
    # Experts 3..7 receive no token: exact zero gradients.
    for g in grads[2:]:
        assert not np.asarray(g)[3:].any()


@pytest.mark.parametrize("impl", ["grouped", "bucketed", "ragged", "batched"])
def test_gradients_match_dense_autodiff(impl):
    w, ids = make_routing(12, 6)
    args = [make_x(12), w, *make_weights(12)]
    want = jax.grad(_loss, argnums=(0, 1, 2, 3, 4))(*args, ids, "dense", None)
    got = jax.grad(_loss, argnums=(0, 1, 2, 3, 4))(*args, ids, impl, None)
    for a, b in zip(got, want, strict=True):
        assert normalized_error(a, b) <= tolerance(np.float32).nerr


@pytest.mark.parametrize("impl", STRATEGIES)
def test_an_unused_expert_touches_no_output_in_any_strategy(impl):
    w, ids = make_routing(16, 2, pattern="empty_experts")  # experts 3.. receive no token
    x, clean = make_x(16), make_weights(16)
    poisoned = tuple(np.where(np.arange(E)[:, None, None] >= 3, np.float32(np.inf), a) for a in clean)
    y = moe_ffn(x, w, ids, *poisoned, impl=impl)
    assert normalized_error(y, moe_ffn_reference(x, w, ids, *clean)) <= tolerance(np.float32).nerr


@pytest.mark.parametrize("impl", ["ragged", "xla"])
def test_vmap_and_its_gradient_through_ragged_dot(impl):
    """`lax.ragged_dot` does not batch over shared experts (JAX: "ragged_dot vmap over any dim but 0 - NYI"):
    under vmap the ragged strategy runs once per batch element, forward and backward; "xla" holds the ragged
    strategy in its non-CPU branch, which vmap batches too."""
    w, ids = make_routing(17, 2, t=2 * T)
    xb, wb, ib = make_x(17, t=2 * T).reshape(2, T, D), w.reshape(2, T, 2), ids.reshape(2, T, 2)
    ws = make_weights(17)

    def loss(xb, wb, wg, impl, batched):
        if batched:
            y = jax.vmap(lambda x, w, i: moe_ffn(x, w, i, wg, *ws[1:], impl=impl))(xb, wb, ib)
        else:
            y = jnp.stack([moe_ffn(xb[b], wb[b], ib[b], wg, *ws[1:], impl=impl) for b in range(2)])
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))

    got = jax.grad(loss, argnums=(0, 1, 2))(xb, wb, ws[0], impl, True)
    want = jax.grad(loss, argnums=(0, 1, 2))(xb, wb, ws[0], "dense", False)
    for a, b in zip(got, want, strict=True):
        assert normalized_error(a, b) <= tolerance(np.float32).nerr


def test_gradient_reaches_router_logits():
    x = make_x(13)
    logits = jnp.asarray(x @ np.random.default_rng(13).standard_normal((D, E)).astype(np.float32))
    ws = make_weights(13)

    def loss(logits):
        w, ids = route(logits, top_k=2)
        return jnp.sum(moe_ffn(x, w, ids, *ws) ** 2)

    def loss_reference(logits):
        w, ids = route_reference(logits, top_k=2)
        return np.sum(moe_ffn_reference(x, w, ids, *ws) ** 2), ids

    g = np.asarray(jax.grad(loss)(logits), np.float64)
    v = np.random.default_rng(1).standard_normal(g.shape)
    eps = 1e-5
    (plus, ids_plus), (minus, ids_minus) = (loss_reference(np.float64(logits) + s * eps * v) for s in (1, -1))
    np.testing.assert_array_equal(ids_plus, ids_minus)  # the same selection on both sides
    assert float(np.sum(g * v)) == pytest.approx((plus - minus) / (2 * eps), rel=DIRECTIONAL_GRAD_RTOL)


# ---------------------------------------------------------------------------------------------------------
# Every backend.

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("cf", [None, 1.25])
def test_moe_ffn_exports_for_every_backend(cf):
    f = functools.partial(moe_ffn, impl="xla", capacity_factor=cf)
    args = (
        _sds((T, D), jnp.float32),
        _sds((T, 2), jnp.float32),
        _sds((T, 2), jnp.int32),
        _sds((E, D, F), jnp.float32),
        _sds((E, D, F), jnp.float32),
        _sds((E, F, D), jnp.float32),
    )
    exported = jax.export.export(jax.jit(f), platforms=PLATFORMS)(*args)
    assert exported.platforms == PLATFORMS


def test_routers_export_for_every_backend():
    logits = _sds((T, E), jnp.float32)
    bias = _sds((E,), jnp.float32)

    def ds(logits, bias):
        return route(logits, top_k=2, scoring="sigmoid", bias=bias, n_group=4, topk_group=2)

    for f, args in (
        (functools.partial(route, top_k=2), (logits,)),
        (ds, (logits, bias)),
        (functools.partial(route_expert_choice, capacity=4), (logits,)),
        (lambda lg: load_balancing_loss(lg, jnp.zeros((T, 2), jnp.int32)), (logits,)),
        (router_z_loss, (logits,)),
    ):
        jax.export.export(jax.jit(f), platforms=PLATFORMS)(*args)


def test_gradient_exports_for_every_backend():
    def loss(x, w, wg, wu, wd, ids):
        return jnp.sum(moe_ffn(x, w, ids, wg, wu, wd, impl="xla") ** 2)

    args = (
        _sds((T, D), jnp.float32),
        _sds((T, 2), jnp.float32),
        _sds((E, D, F), jnp.float32),
        _sds((E, D, F), jnp.float32),
        _sds((E, F, D), jnp.float32),
        _sds((T, 2), jnp.int32),
    )
    jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=PLATFORMS)(*args)


# ---------------------------------------------------------------------------------------------------------
# Cost.


def test_moe_ffn_cost_counts():
    c = moe_ffn_cost(4, 8, 2, 16, 32, experts_touched=3)
    assert c.flops == 4 * 2 * (3 * 2 * 16 * 32 + 3 * 32 + 2 * 16)
    assert c.bytes_read == 3 * 3 * 16 * 32 * 4 + 4 * 16 * 4 + 4 * 2 * 8
    assert c.bytes_written == 4 * 16 * 4
    # Default: the expected number of distinct experts under uniform routing.
    assert (
        moe_ffn_cost(1, 8, 2, 16, 32).bytes_read
        == moe_ffn_cost(1, 8, 2, 16, 32, experts_touched=2).bytes_read
    )


def test_moe_ffn_bad_input():
    x, (wg, wu, wd) = make_x(0), make_weights(0)
    w, ids = make_routing(0, 2)
    with pytest.raises(ValueError, match=r"w_up.shape=\(8, 32, 47\)"):
        moe_ffn(x, w, ids, wg, wu[..., :47], wd)
    with pytest.raises(ValueError, match=r"w_down.shape=\(8, 47, 32\)"):
        moe_ffn(x, w, ids, wg, wu, wd[:, :47])
    with pytest.raises(ValueError, match=r"w_gate.shape=\(8, 31, 48\)"):
        moe_ffn(x, w, ids, wg[:, :31], wu, wd)
    bad = ids.copy()
    bad[3, 1] = 8
    with pytest.raises(ValueError, match=r"expert_ids hold values in \[0, 8\]"):
        moe_ffn(x, w, bad, wg, wu, wd)
    bad[3, 1] = -1
    with pytest.raises(ValueError, match="expert_ids"):
        moe_ffn_reference(x, w, bad, wg, wu, wd)
    with pytest.raises(ValueError, match=r"weights.shape=\(16, 1\)"):
        moe_ffn(x, w[:, :1], ids, wg, wu, wd)
    with pytest.raises(ValueError, match="capacity_factor=0"):
        moe_ffn(x, w, ids, wg, wu, wd, capacity_factor=0)
    with pytest.raises(ValueError, match="impl='cuda'"):
        moe_ffn(x, w, ids, wg, wu, wd, impl="cuda")
    with pytest.raises(ValueError, match="drop_priority='random'"):
        moe_ffn(x, w, ids, wg, wu, wd, drop_priority="random")
    with pytest.raises(ValueError, match="block_rows=12"):
        moe_ffn(x, w, ids, wg, wu, wd, config=Config(block_rows=12))
    with pytest.raises(ValueError, match="capacity=0"):
        dispatch_plan(ids, E, capacity=0)
    with pytest.raises(ValueError, match="capacity=9"):
        route_expert_choice(np.zeros((8, 2), np.float32), capacity=9)


# --------------------------------------------------------------------------------------------------
# Quantized (Int4Weight) experts, against the dequantized reference.


@pytest.mark.parametrize("impl", ["auto", "grouped", "batched", "dense"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_quantized_experts_match_the_dequantized_reference(impl, pattern):
    ws = quantized_experts(0)
    w, ids = make_routing(1, 2, pattern=pattern)
    check_ffn(make_x(2, d=QD), w, ids, ws, impl)


def test_quantized_experts_with_capacity_and_large_k():
    ws = quantized_experts(3)
    w, ids = make_routing(4, 6)
    check_ffn(make_x(5, d=QD), w, ids, ws, "auto", cf=0.75)


def test_quantized_experts_gradient_reaches_x_and_routing_weights():
    ws = quantized_experts(6)
    w, ids = make_routing(7, 2, pattern="empty_experts")
    x = make_x(8, d=QD)

    cot = np.random.default_rng(9).standard_normal((T, QD)).astype(np.float32)

    def loss(x, w, impl):
        return jnp.sum(cot * moe_ffn(x, w, ids, *ws, impl=impl, config=small_blocks(impl)))

    got = jax.grad(loss, argnums=(0, 1))(x, w, "grouped")
    want = jax.grad(loss, argnums=(0, 1))(x, w, "dense")  # plain autodiff through dequantized weights
    for g, r in zip(got, want, strict=True):
        # "grouped" runs int4_matmul, whose CPU-native path is held to the native tolerance.
        assert normalized_error(g, r) <= NATIVE_INT4_NERR


def test_quantized_experts_scales_get_the_dense_gradient(impl="grouped"):
    """The float fields of Int4Weight experts are differentiable as in int4_matmul: the grouped loop and the
    batched einsum agree with autodiff through the dequantized experts; experts without rows get zeros."""
    ws = quantized_experts(10)
    w, ids = make_routing(11, 2, pattern="empty_experts")  # experts 3.. receive no token
    x = make_x(12, d=QD)
    cot = np.random.default_rng(13).standard_normal((T, QD)).astype(np.float32)

    def loss(scales, impl):
        experts = [type(e).tree_unflatten(e.tree_flatten()[1], (e.packed, s, e.zeros, e.perm, e.act_scales))
                   for e, s in zip(ws, scales, strict=True)]  # fmt: skip
        return jnp.sum(cot * moe_ffn(x, w, ids, *experts, impl=impl, config=small_blocks(impl)))

    scales = [e.scales for e in ws]
    got = jax.grad(loss)(scales, impl)
    want = jax.grad(loss)(scales, "dense")
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype and np.abs(np.asarray(r, np.float64)).max() > 0
        assert normalized_error(g, r) <= tolerance(g.dtype).nerr
        assert not np.asarray(g)[3:].any()


def test_quantized_experts_bad_input():
    wg, wu, wd = quantized_experts(9)
    w, ids = make_routing(1, 2)
    x = make_x(2, d=QD)
    with pytest.raises(ValueError, match="impl='ragged' does not take Int4Weight experts"):
        moe_ffn(x, w, ids, wg, wu, wd, impl="ragged")
    with pytest.raises(ValueError, match="all be Int4Weight stacks"):
        moe_ffn(x, w, ids, wg, wu, np.zeros((E, QF, QD), np.float32))
    with pytest.raises(ValueError, match="w_down is"):
        moe_ffn(x, w, ids, wg, wu, wg)
    with pytest.raises(ValueError, match="x has d=32"):
        moe_ffn(make_x(2), w, ids, wg, wu, wd)


def test_quantized_experts_lower_for_every_backend():
    from kernels import cpu

    ws = quantized_experts(10)
    w, ids = make_routing(1, 2)
    # The CPU branch may call the native INT4 kernel: allow its custom call in the serialized module.
    # The quantized experts run int4_matmul with impl="auto": the native CPU kernel on cpu and the Pallas
    # (Triton) kernel on cuda/rocm, both custom calls that export only when allowed.
    targets.export(
        lambda x, w, ids, *ws: moe_ffn(x, w, ids, *ws),
        make_x(2, d=QD), w, ids, *ws,
        platforms=("cpu", "cuda", "rocm", "tpu"),
        disabled_checks=(*cpu.TARGETS, "__gpu$xla.gpu.triton"),
    )  # fmt: skip


@pytest.mark.parametrize("impl", (*STRATEGIES, "auto"))
@pytest.mark.parametrize("cf", [None, 4.0])  # 4.0: capacity mode with a capacity that keeps every assignment
def test_out_of_range_expert_ids_are_dropped_under_jit_by_every_strategy(impl, cf):
    from tests.kernels.moe.test_shared import _out_of_range_case

    x, w, bad, ws, _ = _out_of_range_case()
    dropped = (bad < 0) | (bad >= E)
    expected = moe_ffn_reference(
        x, np.where(dropped, 0.0, w), np.where(dropped, 0, bad), *ws, capacity_factor=cf
    )
    y = jax.jit(lambda x, w, ids: moe_ffn(x, w, ids, *ws, impl=impl, capacity_factor=cf))(x, w, bad)
    assert normalized_error(y, expected) <= tolerance(x.dtype).nerr
