"""MoE: routers against hand-worked cases and each family's published formula, dispatch/combine, the FFN
strategies against the NumPy reference, gradients, export for every backend, and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.moe import (
    combine,
    dispatch,
    dispatch_plan,
    expert_capacity,
    load_balancing_loss,
    moe_ffn,
    moe_ffn_cost,
    moe_ffn_reference,
    route,
    route_expert_choice,
    route_expert_choice_reference,
    route_reference,
    router_z_loss,
)
from tests.tolerances import (
    DIRECTIONAL_GRAD_RTOL,
    NATIVE_INT4_NERR,
    assert_close,
    normalized_error,
    tolerance,
)

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))
SOME = settings(max_examples=max(6, settings.default.max_examples // 2))

T, E, D, F = 16, 8, 32, 48
IMPLS = ("grouped", "bucketed", "ragged", "batched", "dense")
SMALL_BLOCKS = dict(row_align=2, block_rows=8)  # exercises full blocks and every remainder size


def _weights(seed, e=E, d=D, f=F, dtype=np.float32):
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(d)
    return (
        (rng.standard_normal((e, d, f)) * scale).astype(dtype),
        (rng.standard_normal((e, d, f)) * scale).astype(dtype),
        (rng.standard_normal((e, f, d)) * scale).astype(dtype),
    )


def _x(seed, t=T, d=D, dtype=np.float32):
    return np.random.default_rng(seed + 1000).standard_normal((t, d)).astype(dtype)


# Logit values with many exact ties (and ±0).
TIE_VALUES = st.sampled_from([-2.0, -0.5, -0.0, 0.0, 0.5, 1.0, 3.0])


def _logits(t, e):
    return st.lists(TIE_VALUES, min_size=t * e, max_size=t * e).map(
        lambda v: np.array(v, np.float32).reshape(t, e)
    )


# ---------------------------------------------------------------------------------------------------------
# Routers, by hand.


def test_softmax_top2_renormalized_by_hand():
    w, ids = route(np.array([[1.0, 2.0, 3.0, 0.0]], np.float32), top_k=2)
    assert ids.tolist() == [[2, 1]]
    np.testing.assert_allclose(w, [[np.e / (np.e + 1), 1 / (np.e + 1)]], rtol=1e-6)


def test_ties_lower_expert_wins_including_signed_zero():
    _, ids = route(np.array([[1.0, 1.0, 1.0, 0.0]], np.float32), top_k=2)
    assert ids.tolist() == [[0, 1]]
    _, ids = route(np.array([[0.0, -0.0, 0.0]], np.float32), top_k=3, scoring="sigmoid")
    assert ids.tolist() == [[0, 1, 2]]
    _, ids = route(np.array([[-0.0, 0.0]], np.float32), top_k=1)
    assert ids.tolist() == [[0]]


def test_qwen3_without_norm_topk_prob_keeps_softmax_probabilities():
    logits = np.array([[2.0, 0.0, 1.0, -1.0]], np.float32)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    w, ids = route(logits, top_k=2, renormalize=False)
    assert ids.tolist() == [[0, 2]]
    np.testing.assert_allclose(w[0], p[[0, 2]], rtol=1e-6)


def test_switch_top1_weight_is_the_top_probability():
    logits = np.array([[0.0, np.log(3.0)]], np.float32)
    w, ids = route(logits, top_k=1, renormalize=False)
    assert ids.tolist() == [[1]]
    np.testing.assert_allclose(w, [[0.75]], rtol=1e-6)


def test_deepseek_masked_groups_lose_to_negative_biased_scores():
    # All sigmoid scores are 0.5; the bias makes every selection score negative. Groups of two:
    # choice = [-.5 -.4 | -1.5 -1.5 | -.3 -.35 | -2.5 -2.5]; group sums -.9, -3, -.65, -5 -> keep g2, g0.
    # With -inf masking the 3 experts come from {0, 1, 4, 5}; masking with 0.0 would pick 2, 3, 6 first.
    bias = np.array([-1.0, -0.9, -2.0, -2.0, -0.8, -0.85, -3.0, -3.0], np.float32)
    kw = dict(top_k=3, scoring="sigmoid", bias=bias, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    w, ids = route(np.zeros((1, 8), np.float32), **kw)
    assert ids.tolist() == [[4, 5, 1]]
    np.testing.assert_allclose(w, [[2.5 / 3] * 3], rtol=1e-6)
    w_ref, ids_ref = route_reference(np.zeros((1, 8), np.float32), **kw)
    assert ids_ref.tolist() == [[4, 5, 1]]
    np.testing.assert_allclose(w_ref, w, rtol=1e-6)


def test_group_ties_lower_group_wins():
    # Two groups with equal scores: group 0 is kept.
    _w, ids = route(np.zeros((1, 4), np.float32), top_k=2, scoring="sigmoid", n_group=2, topk_group=1)
    assert ids.tolist() == [[0, 1]]


# ---------------------------------------------------------------------------------------------------------
# Routers against each family's published formula (written independently of kernels.moe).


def _softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _topk_idx(s, k):
    # A stable argsort of -s, with -0.0 folded into +0.0: the lower index wins ties.
    return np.argsort(-(s + 0.0), axis=-1, kind="stable")[..., :k]


def _mixtral(logits, k):  # softmax, top-k, divide by the sum of the chosen probabilities
    p = _softmax(logits)
    idx = _topk_idx(p, k)
    w = np.take_along_axis(p, idx, -1)
    return w / w.sum(-1, keepdims=True), idx


def _qwen3(logits, k, norm_topk_prob):
    p = _softmax(logits)
    idx = _topk_idx(p, k)
    w = np.take_along_axis(p, idx, -1)
    return (w / w.sum(-1, keepdims=True) if norm_topk_prob else w), idx


def _deepseek_v3(logits, bias, k, n_group, topk_group, scale):
    s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    choice = s + bias
    t, e = choice.shape
    grouped = np.sort(choice.reshape(t, n_group, e // n_group), axis=-1)[..., ::-1]
    group_scores = grouped[..., :2].sum(-1)
    gidx = _topk_idx(group_scores, topk_group)
    mask = np.zeros((t, n_group), bool)
    np.put_along_axis(mask, gidx, True, -1)
    choice = np.where(np.repeat(mask, e // n_group, axis=1), choice, -np.inf)
    idx = _topk_idx(choice, k)
    w = np.take_along_axis(s, idx, -1)
    return w / (w.sum(-1, keepdims=True) + 1e-20) * scale, idx


def _check_router(got, want):
    (w, ids), (w_want, ids_want) = got, want
    np.testing.assert_array_equal(np.asarray(ids), ids_want)
    assert_close(w, w_want, np.float32)


@SOME
@given(logits=_logits(6, 8), k=st.sampled_from([1, 2, 6]))
def test_mixtral_router_matches_formula(logits, k):
    want = _mixtral(logits, k)
    _check_router(route(logits, top_k=k), want)
    _check_router(route_reference(logits, top_k=k), want)


@SOME
@given(logits=_logits(6, 8), norm=st.booleans())
def test_qwen3_router_matches_formula(logits, norm):
    want = _qwen3(logits, 2, norm)
    _check_router(route(logits, top_k=2, renormalize=norm), want)
    _check_router(route_reference(logits, top_k=2, renormalize=norm), want)


@SOME
@given(logits=_logits(6, 8), bias=_logits(1, 8), groups=st.sampled_from([(4, 2, 3), (2, 1, 2), (4, 3, 6)]))
def test_deepseek_v3_router_matches_formula(logits, bias, groups):
    n_group, topk_group, k = groups
    bias = bias[0] - 1.5  # mostly negative biased scores
    kw = dict(scoring="sigmoid", bias=bias, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5)
    want = _deepseek_v3(logits, bias.astype(np.float64), k, n_group, topk_group, 2.5)
    _check_router(route(logits, top_k=k, **kw), want)
    _check_router(route_reference(logits, top_k=k, **kw), want)


@SOME
@given(logits=_logits(6, 8))
def test_switch_router_matches_formula(logits):
    p = _softmax(logits)
    idx = _topk_idx(p, 1)
    _check_router(route(logits, top_k=1, renormalize=False), (np.take_along_axis(p, idx, -1), idx))


@SOME
@given(
    logits=st.lists(st.floats(-4, 4, width=32), min_size=96, max_size=96).map(
        lambda v: np.array(v, np.float32).reshape(12, 8)
    ),
    k=st.sampled_from([1, 2, 5]),
    scoring=st.sampled_from(["softmax", "sigmoid"]),
    scale=st.sampled_from([1.0, 2.5]),
)
def test_every_token_routed_k_distinct_times_and_weights_sum(logits, k, scoring, scale):
    w, ids = route(logits, top_k=k, scoring=scoring, routed_scaling_factor=scale)
    ids = np.asarray(ids)
    assert ids.dtype == np.int32 and np.asarray(w).dtype == np.float32
    assert all(len(set(row)) == k for row in ids.tolist())
    assert ((ids >= 0) & (ids < 8)).all()
    np.testing.assert_allclose(np.asarray(w).sum(-1), scale, rtol=tolerance(np.float32).rtol)


# ---------------------------------------------------------------------------------------------------------
# Expert choice and the auxiliary losses.


def test_expert_choice_by_hand():
    # Token 0 prefers expert 0, tokens 1 and 2 are tied for expert 1: the lower token wins.
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
    w, tok = route_expert_choice(logits, capacity=1)
    assert tok.tolist() == [[0], [1]]
    np.testing.assert_allclose(w, [[np.e**2 / (np.e**2 + 1)], [np.e / (np.e + 1)]], rtol=1e-6)


@SOME
@given(logits=_logits(12, 4), cf=st.sampled_from([0.5, 1.0, 2.0]))
def test_expert_choice_matches_reference(logits, cf):
    w, tok = route_expert_choice(logits, capacity_factor=cf)
    w_ref, tok_ref = route_expert_choice_reference(logits, capacity_factor=cf)
    assert tok.shape == (4, expert_capacity(12, 4, 1, cf))
    np.testing.assert_array_equal(np.asarray(tok), tok_ref)
    assert_close(w, w_ref, np.float32)


def test_load_balancing_loss_is_one_when_balanced_and_e_when_collapsed():
    logits = np.zeros((8, 4), np.float32)
    balanced = np.array([[i % 4, (i + 1) % 4] for i in range(8)], np.int32)
    assert float(load_balancing_loss(logits, balanced)) == pytest.approx(1.0, rel=1e-6)
    # Everything on expert 0 with probability ~1 there: E · 1 · 1.
    collapsed_logits = np.tile(np.array([[50.0, 0.0, 0.0, 0.0]], np.float32), (8, 1))
    loss = load_balancing_loss(collapsed_logits, np.zeros((8, 1), np.int32))
    assert float(loss) == pytest.approx(4.0, rel=1e-6)


def test_load_balancing_loss_by_hand_and_gradient_flows_through_probabilities():
    logits = np.array([[np.log(3.0), 0.0], [0.0, 0.0]], np.float32)  # P = [(0.75 + 0.5)/2, (0.25 + 0.5)/2]
    ids = np.array([[0], [0]], np.int32)  # f = [1, 0]
    assert float(load_balancing_loss(logits, ids)) == pytest.approx(2 * 0.625, rel=1e-6)
    g = jax.grad(load_balancing_loss)(jnp.asarray(logits), ids)
    assert np.abs(np.asarray(g)).sum() > 0


def test_router_z_loss_by_hand():
    assert float(router_z_loss(np.zeros((3, 4), np.float32))) == pytest.approx(np.log(4.0) ** 2, rel=1e-6)
    logits = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    want = (np.log(2.0) ** 2 + (1 + np.log(2.0)) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Dispatch and combine.

IDS_T8K2 = st.lists(st.integers(0, 3), min_size=16, max_size=16).map(
    lambda v: np.array(v, np.int32).reshape(8, 2)
)


@SOME
@given(ids=IDS_T8K2, layout_align=st.sampled_from([("packed", 1), ("packed", 4), ("padded", 1)]))
def test_combine_of_dispatch_is_identity(ids, layout_align):
    layout, align = layout_align
    x = _x(0, t=8, d=4)
    xs, plan = dispatch(x, ids, 4, layout=layout, row_align=align)
    y = combine(xs, np.full((8, 2), 0.5, np.float32), plan)
    assert_close(y, x, np.float32)
    # The plan itself: sizes are the histogram, each group holds its expert's tokens, and position
    # inverts row_token.
    counts = np.bincount(ids.ravel(), minlength=4)
    np.testing.assert_array_equal(plan.group_sizes, counts)
    pos, row_tok = np.asarray(plan.position), np.asarray(plan.row_token)
    np.testing.assert_array_equal(row_tok[pos], np.repeat(np.arange(8), 2).reshape(8, 2))
    for e in range(4):
        off, n = int(plan.group_offsets[e]), int(plan.group_sizes[e])
        assert sorted(row_tok[off : off + n].tolist()) == sorted(np.nonzero(ids == e)[0].tolist())
    assert (row_tok[np.setdiff1d(np.arange(row_tok.size), pos.ravel())] == 8).all()


def test_dispatch_capacity_and_drop_priorities_by_hand():
    # Expert 0 is chosen by (t0, j1), (t1, j0), (t2, j0), (t2, j1) cannot happen twice; capacity 2.
    ids = np.array([[1, 0], [0, 1], [0, 2]], np.int32)
    w = np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]], np.float32)
    kept = {}
    for prio in ("choice", "token", "weight"):
        plan = dispatch_plan(ids, 3, weights=w, capacity=2, drop_priority=prio)
        kept[prio] = (np.asarray(plan.position) < plan.row_token.shape[0]).tolist()
    # choice: first choices (t1, t2) before t0's second choice -> (t0, j1) dropped.
    assert kept["choice"] == [[True, False], [True, True], [True, True]]
    # token: t0 then t1 -> (t2, j0) dropped.
    assert kept["token"] == [[True, True], [True, True], [False, True]]
    # weight: 0.9 (t2), 0.4 (t0) beat 0.3 (t1) -> (t1, j0) dropped.
    assert kept["weight"] == [[True, True], [False, True], [True, True]]


def test_combine_drops_to_zero_and_padded_layout_is_batched():
    ids = np.zeros((4, 1), np.int32)
    x = _x(1, t=4, d=3)
    xs, plan = dispatch(x, ids, 2, capacity=3, layout="padded")
    assert xs.shape == (6, 3)
    np.testing.assert_array_equal(np.asarray(xs)[:3], x[:3])
    np.testing.assert_array_equal(np.asarray(xs)[3:], 0)
    y = combine(xs, np.ones((4, 1), np.float32), plan)
    assert_close(y, np.concatenate([x[:3], np.zeros((1, 3), np.float32)]), np.float32)


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


# ---------------------------------------------------------------------------------------------------------
# The FFN strategies against the reference.


def _routing(seed, k, e=E, t=T, pattern="random"):
    rng = np.random.default_rng(seed)
    if pattern == "one_expert":
        ids = np.tile(np.arange(k, dtype=np.int32), (t, 1))  # every token on experts 0..k-1
    elif pattern == "empty_experts":
        ids = np.stack([rng.permutation(k + 1)[:k] for _ in range(t)]).astype(np.int32)  # experts > k unused
    else:
        ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    return w, ids


def _check_ffn(x, w, ids, ws, impl, cf=None, prio="choice"):
    y = moe_ffn(x, w, ids, *ws, impl=impl, capacity_factor=cf, drop_priority=prio, **SMALL_BLOCKS)
    ref = moe_ffn_reference(x, w, ids, *ws, capacity_factor=cf, drop_priority=prio)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert normalized_error(y, ref) <= tolerance(x.dtype).nerr


PATTERNS = ("random", "one_expert", "empty_experts")
# Every strategy on the base case; the CPU strategies across every routing pattern and k; the full cross
# with --full.
DROPLESS_CASES = sorted(
    {(impl, "random", 2) for impl in (*IMPLS, "auto")}
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
    w, ids = _routing(k, k, pattern=pattern)
    _check_ffn(_x(k), w, ids, _weights(k), impl)


@pytest.mark.parametrize("impl", (*IMPLS, "auto"))
@pytest.mark.parametrize("prio", ["choice", "token", "weight"])
def test_ffn_with_capacity_matches_reference(impl, prio):
    w, ids = _routing(3, 2)
    ids[:8, 0] = 5  # overload expert 5 so that capacity bites
    _check_ffn(_x(3), w, ids, _weights(3), impl, cf=1.0, prio=prio)


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
    _check_ffn(_x(7), w, ids, _weights(7), "grouped", cf=cf)
    _check_ffn(_x(7), w, ids, _weights(7), "auto", cf=cf)


def test_bucket_capacities_and_fallback():
    from kernels.moe import _bucket_capacities

    assert _bucket_capacities(512, 8, 8) == [64, 72, 80, 88, 96, 104, 112, 128]
    assert _bucket_capacities(16, 8, 8) == [8]
    # Past the largest bucket the grouped loop takes over: 12 of 16 assignments on expert 0.
    w, ids = _routing(9, 2)
    ids[:12, 0] = 0
    ids[:12, 1] = 1
    _check_ffn(_x(9), w, ids, _weights(9), "bucketed")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ffn_low_precision_against_reference(dtype):
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

    w, ids = _routing(4, 2)
    ws = tuple(a.astype(dtype) for a in _weights(4))
    _check_ffn(_x(4).astype(dtype), w, ids, ws, "grouped")


def test_ffn_from_the_routers_end_to_end():
    x = _x(5)
    logits = x @ np.random.default_rng(5).standard_normal((D, E)).astype(np.float32)
    ws = _weights(5)
    w, ids = route(logits, top_k=2)
    _check_ffn(x, np.asarray(w), np.asarray(ids), ws, "auto")
    w, ids = route(logits, top_k=6, scoring="sigmoid", n_group=4, topk_group=3, routed_scaling_factor=2.5)
    _check_ffn(x, np.asarray(w), np.asarray(ids), ws, "auto")


# ---------------------------------------------------------------------------------------------------------
# Gradients.


def _loss(x, w, wg, wu, wd, ids, impl, cf):
    y = moe_ffn(x, w, ids, wg, wu, wd, impl=impl, capacity_factor=cf, **SMALL_BLOCKS)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))


def _loss_reference(x, w, wg, wu, wd, ids, cf):
    y = moe_ffn_reference(x, w, ids, wg, wu, wd, capacity_factor=cf)
    return np.sum(y * np.cos(np.arange(y.size, dtype=np.float64).reshape(y.shape)))


@pytest.mark.parametrize("impl,cf", [("grouped", None), ("ragged", None), ("auto", None), ("auto", 0.75)])
def test_gradients_match_finite_differences_of_reference(impl, cf):
    w, ids = _routing(11, 2, pattern="empty_experts")
    args = [_x(11), w, *_weights(11)]
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
    w, ids = _routing(12, 6)
    args = [_x(12), w, *_weights(12)]
    want = jax.grad(_loss, argnums=(0, 1, 2, 3, 4))(*args, ids, "dense", None)
    got = jax.grad(_loss, argnums=(0, 1, 2, 3, 4))(*args, ids, impl, None)
    for a, b in zip(got, want, strict=True):
        assert normalized_error(a, b) <= tolerance(np.float32).nerr


def test_gradient_reaches_router_logits():
    x = _x(13)
    logits = jnp.asarray(x @ np.random.default_rng(13).standard_normal((D, E)).astype(np.float32))
    ws = _weights(13)

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


# ---------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(top_k=0), "top_k=0"),
        (dict(top_k=9), "top_k=9"),
        (dict(top_k=2, n_group=3, topk_group=1), "n_group=3"),
        (dict(top_k=2, n_group=4, topk_group=5), "topk_group=5"),
        (dict(top_k=2, n_group=4), "n_group=4 and topk_group=None"),
        (dict(top_k=5, n_group=4, topk_group=2), "top_k=5"),
        (dict(top_k=2, scoring="relu"), "scoring='relu'"),
        (dict(top_k=2, bias=np.zeros(7, np.float32)), r"bias.shape=\(7,\)"),
    ],
)
def test_route_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        route(np.zeros((2, 8), np.float32), **kw)


def test_nan_logits_rejected():
    logits = np.zeros((2, 4), np.float32)
    logits[1, 2] = np.nan
    for fn in (
        lambda: route(logits, top_k=1),
        lambda: route_reference(logits, top_k=1),
        lambda: route_expert_choice(logits, capacity=1),
    ):
        with pytest.raises(ValueError, match="logits contain NaN"):
            fn()


def test_moe_ffn_bad_input():
    x, (wg, wu, wd) = _x(0), _weights(0)
    w, ids = _routing(0, 2)
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
    with pytest.raises(ValueError, match="impl='pallas'"):
        moe_ffn(x, w, ids, wg, wu, wd, impl="pallas")
    with pytest.raises(ValueError, match="drop_priority='random'"):
        moe_ffn(x, w, ids, wg, wu, wd, drop_priority="random")
    with pytest.raises(ValueError, match="block_rows=12"):
        moe_ffn(x, w, ids, wg, wu, wd, block_rows=12)
    with pytest.raises(ValueError, match="capacity=0"):
        dispatch_plan(ids, E, capacity=0)
    with pytest.raises(ValueError, match="capacity=9"):
        route_expert_choice(np.zeros((8, 2), np.float32), capacity=9)


# --------------------------------------------------------------------------------------------------
# Quantized (Int4Weight) experts, against the dequantized reference.

QD, QF = 64, 128  # K of every expert matmul must hold whole groups of 32


def _quantized_experts(seed, e=E):
    from quant import quantize_rtn

    rng = np.random.default_rng(seed)

    def stack(k, n):
        ws = [quantize_rtn(rng.standard_normal((k, n)).astype(np.float32), group_size=32) for _ in range(e)]
        return jax.tree.map(lambda *a: jnp.stack(a), *ws)

    return stack(QD, QF), stack(QD, QF), stack(QF, QD)


@pytest.mark.parametrize("impl", ["auto", "grouped", "batched", "dense"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_quantized_experts_match_the_dequantized_reference(impl, pattern):
    ws = _quantized_experts(0)
    w, ids = _routing(1, 2, pattern=pattern)
    _check_ffn(_x(2, d=QD), w, ids, ws, impl)


def test_quantized_experts_with_capacity_and_large_k():
    ws = _quantized_experts(3)
    w, ids = _routing(4, 6)
    _check_ffn(_x(5, d=QD), w, ids, ws, "auto", cf=0.75)


def test_quantized_experts_gradient_reaches_x_and_routing_weights():
    ws = _quantized_experts(6)
    w, ids = _routing(7, 2, pattern="empty_experts")
    x = _x(8, d=QD)

    cot = np.random.default_rng(9).standard_normal((T, QD)).astype(np.float32)

    def loss(x, w, impl):
        return jnp.sum(cot * moe_ffn(x, w, ids, *ws, impl=impl, **SMALL_BLOCKS))

    got = jax.grad(loss, argnums=(0, 1))(x, w, "grouped")
    want = jax.grad(loss, argnums=(0, 1))(x, w, "dense")  # plain autodiff through dequantized weights
    for g, r in zip(got, want, strict=True):
        # "grouped" runs int4_matmul, whose CPU-native path is held to the native tolerance.
        assert normalized_error(g, r) <= NATIVE_INT4_NERR


def test_quantized_experts_bad_input():
    wg, wu, wd = _quantized_experts(9)
    w, ids = _routing(1, 2)
    x = _x(2, d=QD)
    with pytest.raises(ValueError, match="impl='ragged' does not take Int4Weight experts"):
        moe_ffn(x, w, ids, wg, wu, wd, impl="ragged")
    with pytest.raises(ValueError, match="all be Int4Weight stacks"):
        moe_ffn(x, w, ids, wg, wu, np.zeros((E, QF, QD), np.float32))
    with pytest.raises(ValueError, match="w_down is"):
        moe_ffn(x, w, ids, wg, wu, wg)
    with pytest.raises(ValueError, match="x has d=32"):
        moe_ffn(_x(2), w, ids, wg, wu, wd)


def test_quantized_experts_lower_for_every_backend():
    from kernels import cpu

    ws = _quantized_experts(10)
    w, ids = _routing(1, 2)
    # The CPU branch may call the native INT4 kernel: allow its custom call in the serialized module.
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in cpu.TARGETS]
    jax.export.export(
        jax.jit(lambda x, w, ids, *ws: moe_ffn(x, w, ids, *ws)),
        platforms=("cpu", "cuda", "rocm", "tpu"),
        disabled_checks=checks,
    )(_x(2, d=QD), w, ids, *ws)
