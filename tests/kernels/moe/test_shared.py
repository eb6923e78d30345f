"""The MoE FFN suite every implementation faces (`kernels.available_impls("moe_ffn")`).

Each test id names the implementation. Routing patterns, capacity, low precision, quantized experts,
gradients against the dense formulation's autodiff, and bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.moe import moe_ffn, moe_ffn_reference
from tests.kernels import suite
from tests.kernels.moe.cases import (
    PATTERNS,
    QD,
    D,
    T,
    check_ffn,
    make_routing,
    make_weights,
    make_x,
    quantized_experts,
)
from tests.kernels.suite import for_each_impl
from tests.tolerances import DIRECTIONAL_GRAD_RTOL, normalized_error, tolerance

OP = "moe_ffn"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 2])
@for_each_impl(OP)
def test_dropless_matches_reference(impl, pattern, k):
    w, ids = make_routing(k, k, pattern=pattern)
    check_ffn(make_x(k), w, ids, make_weights(k), impl)


@pytest.mark.parametrize("prio", ["choice", "weight"])
@for_each_impl(OP)
def test_capacity_matches_reference(impl, prio):
    w, ids = make_routing(3, 2)
    ids[:8, 0] = 5  # overload expert 5 so that capacity bites
    check_ffn(make_x(3), w, ids, make_weights(3), impl, cf=1.0, prio=prio)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@for_each_impl(OP)
def test_low_precision_against_reference(impl, dtype):
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

    w, ids = make_routing(4, 2)
    ws = tuple(a.astype(dtype) for a in make_weights(4))
    check_ffn(make_x(4).astype(dtype), w, ids, ws, impl)


@pytest.mark.parametrize("pattern", ["random", "empty_experts"])
@for_each_impl(OP)
def test_quantized_experts_match_the_dequantized_reference(impl, pattern):
    ws = quantized_experts(0)
    w, ids = make_routing(1, 2, pattern=pattern)
    check_ffn(make_x(2, d=QD), w, ids, ws, impl)


@for_each_impl(OP)
def test_gradients_match_dense_autodiff(impl):
    if suite.eager(OP, impl):
        pytest.skip("the reference runs eagerly: it cannot be differentiated")
    x, ws = make_x(6), make_weights(6)
    w, ids = make_routing(6, 2, pattern="empty_experts")
    cot = np.random.default_rng(7).standard_normal(x.shape).astype(np.float32)

    def loss(x, w, wg, wu, wd, impl):
        return jnp.sum(cot * moe_ffn(x, w, ids, wg, wu, wd, impl=impl))

    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, *ws, impl)
    want = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, *ws, "dense")
    for g, r in zip(got, want, strict=True):
        assert normalized_error(g, r) <= DIRECTIONAL_GRAD_RTOL


@for_each_impl(OP)
def test_bad_input_names_the_argument(impl):
    x, (wg, wu, wd) = make_x(0), make_weights(0)
    w, ids = make_routing(0, 2)
    with pytest.raises(ValueError, match=r"w_up.shape=\(8, 32, 47\)"):
        moe_ffn(x, w, ids, wg, wu[..., :47], wd, impl=impl)
    bad = ids.copy()
    bad[3, 1] = 8
    with pytest.raises(ValueError, match=r"expert_ids hold values in \[0, 8\]"):
        moe_ffn(x, w, bad, wg, wu, wd, impl=impl)
    with pytest.raises(ValueError, match=r"weights.shape=\(16, 1\)"):
        moe_ffn(x, w[:, :1], ids, wg, wu, wd, impl=impl)


def test_unknown_impl_lists_the_valid_ones():
    x, ws = make_x(0), make_weights(0)
    w, ids = make_routing(0, 2)
    with pytest.raises(ValueError, match=r"impl='cuda' is not an implementation of moe_ffn.*'grouped'"):
        moe_ffn(x, w, ids, *ws, impl="cuda")


def test_reference_impl_refuses_tracing():
    x, ws = make_x(0), make_weights(0)
    w, ids = make_routing(0, 2)
    with pytest.raises(ValueError, match="impl='reference' runs the NumPy reference"):
        jax.jit(lambda x: moe_ffn(x, w, ids, *ws, impl="reference"))(x)
    assert T == x.shape[0]


def _out_of_range_case():
    x, ws = make_x(11), make_weights(11)
    w, ids = make_routing(11, 2)
    bad = ids.copy()
    bad[2, 0], bad[5, 1], bad[9, 0] = 8, -1, 1000  # E = 8
    dropped = (bad < 0) | (bad >= 8)
    # The documented behaviour: the assignment contributes zero, like a capacity drop.
    expected = moe_ffn_reference(x, np.where(dropped, 0.0, w), np.where(dropped, 0, bad), *ws)
    return x, w, bad, ws, expected


@for_each_impl(OP)
def test_out_of_range_expert_ids_are_dropped_under_jit(impl):
    if suite.eager(OP, impl):
        pytest.skip("the reference runs eagerly and rejects the ids (test_bad_input_names_the_argument)")
    x, w, bad, ws, expected = _out_of_range_case()
    y = jax.jit(lambda x, w, ids: moe_ffn(x, w, ids, *ws, impl=impl))(x, w, bad)
    assert normalized_error(y, expected) <= tolerance(x.dtype).nerr


@for_each_impl(OP)
def test_dtype_rule(impl):
    """x float32|bfloat16|float16, float experts of x's dtype, output in x's dtype; nothing else silently."""
    x, ws = make_x(0), make_weights(0)
    w, ids = make_routing(0, 2)
    with pytest.raises(ValueError, match=r"x.dtype=float64 must be one of float32, bfloat16, float16"):
        moe_ffn(x.astype(np.float64), w, ids, *(a.astype(np.float64) for a in ws), impl=impl)
    with pytest.raises(ValueError, match=r"w_gate.dtype=float32 must equal x.dtype=bfloat16"):
        moe_ffn(jnp.asarray(x, jnp.bfloat16), w, ids, *ws, impl=impl)


@pytest.mark.parametrize("value", [np.inf, np.nan])
@for_each_impl(OP)
def test_an_unused_expert_touches_no_output(impl, value):
    """Inf or NaN in the weights of experts no token is routed to reaches nothing (as for unused KV slots)."""
    w, ids = make_routing(14, 2, pattern="empty_experts")  # experts 3.. receive no token
    x, clean = make_x(14), make_weights(14)
    poisoned = tuple(a.copy() for a in clean)
    for a in poisoned:
        a[3:] = value
    reason = suite.unsupported(OP, impl, x, w, ids, *poisoned)
    if reason is not None:
        pytest.skip(f"impl={impl!r} does not serve {reason}")
    y = moe_ffn(x, w, ids, *poisoned, impl=impl)
    assert np.isfinite(np.asarray(y)).all()
    expected = moe_ffn_reference(x, w, ids, *clean)
    assert normalized_error(y, expected) <= tolerance(x.dtype).nerr
    if value == np.inf and not suite.eager(OP, impl):  # nor the gradients of x and the weights
        gx, gw = jax.grad(lambda x, w: jnp.sum(moe_ffn(x, w, ids, *poisoned, impl=impl)), argnums=(0, 1))(
            x, w
        )
        assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gw)).all()


@pytest.mark.parametrize("cf", [None, 1.0])
@for_each_impl(OP)
def test_no_tokens_give_the_empty_result(impl, cf):
    """T = 0 (an empty batch in a serving loop) returns [0, d], eagerly and under jit."""
    ws = make_weights(0)
    x, w, ids = np.zeros((0, D), np.float32), np.zeros((0, 2), np.float32), np.zeros((0, 2), np.int32)
    y = moe_ffn(x, w, ids, *ws, capacity_factor=cf, impl=impl)
    assert y.shape == (0, D) and y.dtype == x.dtype
    if not suite.eager(OP, impl):
        y = jax.jit(lambda x, w, ids: moe_ffn(x, w, ids, *ws, capacity_factor=cf, impl=impl))(x, w, ids)
        assert y.shape == (0, D)


@for_each_impl(OP)
def test_vmap_over_batches_of_tokens(impl):
    """`jax.vmap` over a leading batch of (x, weights, expert_ids) with shared experts (gradients under vmap:
    tests/kernels/moe/test_xla.py)."""
    if suite.eager(OP, impl):
        pytest.skip("the reference runs eagerly: it cannot be vmapped")
    w, ids = make_routing(15, 2, t=2 * T)
    x, ws = make_x(15, t=2 * T), make_weights(15)
    xb, wb, ib = x.reshape(2, T, D), w.reshape(2, T, 2), ids.reshape(2, T, 2)

    def layer(x, w, ids, wg):
        return moe_ffn(x, w, ids, wg, *ws[1:], impl=impl)

    y = jax.vmap(layer, in_axes=(0, 0, 0, None))(xb, wb, ib, ws[0])
    for b in range(2):
        assert normalized_error(y[b], moe_ffn_reference(xb[b], wb[b], ib[b], *ws)) <= tolerance(x.dtype).nerr
