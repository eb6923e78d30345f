"""MoE routers: hand-worked cases, each family's published formula, expert choice, the auxiliary losses,
and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels.moe import (
    expert_capacity,
    load_balancing_loss,
    route,
    route_expert_choice,
    route_expert_choice_reference,
    route_reference,
    router_z_loss,
)
from tests.kernels.moe.cases import (
    SOME,
    logits_strategy,
)
from tests.tolerances import (
    assert_close,
    tolerance,
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
@given(logits=logits_strategy(6, 8), k=st.sampled_from([1, 2, 6]))
def test_mixtral_router_matches_formula(logits, k):
    want = _mixtral(logits, k)
    _check_router(route(logits, top_k=k), want)
    _check_router(route_reference(logits, top_k=k), want)


@SOME
@given(logits=logits_strategy(6, 8), norm=st.booleans())
def test_qwen3_router_matches_formula(logits, norm):
    want = _qwen3(logits, 2, norm)
    _check_router(route(logits, top_k=2, renormalize=norm), want)
    _check_router(route_reference(logits, top_k=2, renormalize=norm), want)


@SOME
@given(
    logits=logits_strategy(6, 8),
    bias=logits_strategy(1, 8),
    groups=st.sampled_from([(4, 2, 3), (2, 1, 2), (4, 3, 6)]),
)
def test_deepseek_v3_router_matches_formula(logits, bias, groups):
    n_group, topk_group, k = groups
    bias = bias[0] - 1.5  # mostly negative biased scores
    kw = dict(scoring="sigmoid", bias=bias, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5)
    want = _deepseek_v3(logits, bias.astype(np.float64), k, n_group, topk_group, 2.5)
    _check_router(route(logits, top_k=k, **kw), want)
    _check_router(route_reference(logits, top_k=k, **kw), want)


@SOME
@given(logits=logits_strategy(6, 8))
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
@given(logits=logits_strategy(12, 4), cf=st.sampled_from([0.5, 1.0, 2.0]))
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
