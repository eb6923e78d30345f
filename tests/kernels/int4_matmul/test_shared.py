"""The INT4 matmul suite every implementation faces (`kernels.available_impls("int4_matmul")`).

Each test id names the implementation; weights an implementation does not take (the native kernel reads
the 4-bit container: bits 3 and 4) are skipped with the reason.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from kernels.int4_matmul import int4_matmul, int4_matmul_reference
from quant.format import dequantize_reference
from tests.kernels import suite
from tests.kernels.int4_matmul.cases import (
    VARIANTS,
    K,
    N,
    check,
    make_weight,
    nerr_bound,
    skip_unsupported,
    with_float_fields,
)
from tests.kernels.suite import for_each_impl, property_for_each_impl
from tests.tolerances import normalized_error, tolerance

OP = "int4_matmul"
SEED = st.integers(0, 2**31)
FEW = 6


@pytest.mark.parametrize("m", [1, 3, 40])
@property_for_each_impl(OP, FEW, seed=SEED)
def test_base_case(impl, m, seed):
    x = np.random.default_rng(seed + 1).standard_normal((m, K)).astype(np.float32)
    check(x, make_weight(seed), impl)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@property_for_each_impl(OP, FEW, seed=SEED)
def test_weight_variants(impl, variant, seed):
    x = np.random.default_rng(seed + 1).standard_normal((4, K)).astype(np.float32)
    check(x, make_weight(seed, **VARIANTS[variant]), impl)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
@property_for_each_impl(OP, FEW, seed=SEED)
def test_low_precision_activations(impl, dtype, seed):
    x = np.random.default_rng(seed + 1).standard_normal((2, K)).astype(dtype)
    check(x, make_weight(seed), impl)


@for_each_impl(OP)
def test_leading_axes_and_jit(impl):
    qw = make_weight(0)
    x = np.random.default_rng(1).standard_normal((2, 3, K)).astype(np.float32)
    fn = (
        (lambda x, w: int4_matmul(x, w, impl=impl))
        if suite.eager(OP, impl)
        else jax.jit(lambda x, w: int4_matmul(x, w, impl=impl))
    )
    out = fn(x, qw)
    assert out.shape == (2, 3, N)
    expected = int4_matmul_reference(x.reshape(6, K), qw).reshape(2, 3, N)
    assert normalized_error_ok(out, expected, impl)


def normalized_error_ok(out, expected, impl):
    return normalized_error(out, np.asarray(expected, np.float64)) <= nerr_bound(impl, np.float32)


@for_each_impl(OP)
def test_vmap_over_stacked_expert_weights(impl):
    if suite.eager(OP, impl):
        pytest.skip("the reference runs eagerly: it cannot be vmapped")
    experts = [make_weight(i) for i in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *experts)
    x = np.random.default_rng(9).standard_normal((3, 5, K)).astype(np.float32)
    out = jax.vmap(lambda xe, we: int4_matmul(xe, we, impl=impl))(x, stacked)
    for e in range(3):
        assert normalized_error_ok(out[e], int4_matmul_reference(x[e], experts[e]), impl)


@pytest.mark.parametrize("variant", ["g128", "act_order_and_scales"])
@for_each_impl(OP)
def test_grad_with_respect_to_x(impl, variant):
    if suite.eager(OP, impl):
        pytest.skip("the reference runs eagerly: it cannot be differentiated")
    qw = make_weight(3, **VARIANTS[variant])
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, K)).astype(np.float32)
    skip_unsupported(impl, x, qw)
    dy = rng.standard_normal((5, N)).astype(np.float32)
    dx = jax.grad(lambda x: jnp.sum(int4_matmul(x, qw, impl=impl) * dy))(jnp.asarray(x))
    w = np.asarray(qw.dequantize(), np.float64)
    assert normalized_error_ok(dx, dy.astype(np.float64) @ w.T, "xla")


def float_field_grads_by_hand(x, dy, qw):
    """float64: ds[g, n] = Σ_m Σ_{r∈g} dy[m, n] x̃[m, r] (q[r, n] − z[g, n]) with x̃ = (x / a)[:, perm], and
    da[k] = −Σ_{m, n} dy[m, n] x[m, k] W_eff[k, n] / a[k] (W_eff = the dequantized weight, 1/a folded in)."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    a = np.ones(K) if qw.act_scales is None else np.asarray(qw.act_scales, np.float64)
    xt = x / a
    if qw.perm is not None:
        xt = xt[:, np.asarray(qw.perm)]
    g, gs = qw.num_groups, qw.group_size
    codes = np.asarray(qw.codes(), np.float64).reshape(g, gs, N)
    z = np.asarray(qw.zero_points(), np.float64)[:, None, :]
    t = (xt.T @ dy).reshape(g, gs, N)  # Σ_m x̃[m, r] dy[m, n]
    ds = (t * (codes - z)).sum(1)
    da = -np.einsum("mn,mk,kn->k", dy, x, dequantize_reference(qw)) / a
    return ds, da


@pytest.mark.parametrize("variant", ["g128", "act_order_and_scales"])
@for_each_impl(OP)
def test_grad_with_respect_to_scales_and_act_scales(impl, variant):
    """The float fields of an Int4Weight are differentiable on every implementation (not silently zero):
    against the gradient by hand, a central difference of the reference, and impl="dense"."""
    if suite.eager(OP, impl):
        pytest.skip("the reference runs eagerly: it cannot be differentiated")
    kw = dict(VARIANTS[variant])
    kw["act_scales"] = True
    qw = make_weight(5, **kw)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, K)).astype(np.float32)
    skip_unsupported(impl, x, qw)
    dy = rng.standard_normal((3, N)).astype(np.float32)

    def loss(scales, act_scales, impl):
        return jnp.sum(int4_matmul(jnp.asarray(x), with_float_fields(qw, scales, act_scales), impl=impl) * dy)

    ds, da = jax.grad(loss, argnums=(0, 1))(qw.scales, qw.act_scales, impl)
    ds_hand, da_hand = float_field_grads_by_hand(x, dy, qw)
    assert np.abs(ds_hand).max() > 0 and np.abs(da_hand).max() > 0
    assert ds.dtype == qw.scales.dtype and da.dtype == qw.act_scales.dtype  # the scales are float16 here
    s_tol, a_tol = tolerance(ds.dtype).nerr, tolerance(da.dtype).nerr
    assert normalized_error(ds, ds_hand) <= s_tol
    assert normalized_error(da, da_hand) <= a_tol
    ds_dense, da_dense = jax.grad(loss, argnums=(0, 1))(qw.scales, qw.act_scales, "dense")
    assert normalized_error(ds, ds_dense) <= s_tol
    assert normalized_error(da, da_dense) <= a_tol
    # y is linear in the scales, so a central difference of the reference is exact up to rounding.
    v = rng.standard_normal(ds.shape).astype(np.float32)
    eps = 0.25

    def ref_loss(scales):
        return float(np.sum(int4_matmul_reference(x, with_float_fields(qw, scales, qw.act_scales)) * dy))

    scales = np.asarray(qw.scales)
    fd = (ref_loss(scales + eps * v) - ref_loss(scales - eps * v)) / (2 * eps)
    assert fd == pytest.approx(float(np.sum(np.asarray(ds, np.float64) * v)), rel=s_tol)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@for_each_impl(OP)
def test_no_rows_give_the_empty_result(impl, lead):
    qw = make_weight(0)
    x = np.zeros((*lead, K), np.float32)
    out = int4_matmul(x, qw, impl=impl)
    assert out.shape == (*lead, N) and out.dtype == x.dtype
    if not suite.eager(OP, impl):
        assert jax.jit(lambda x: int4_matmul(x, qw, impl=impl))(x).shape == (*lead, N)


@pytest.mark.parametrize(
    "x,w,match",
    [
        (np.zeros((2, K + 1), np.float32), "w", f"last dimension {K + 1} must equal the weight's K={K}"),
        (np.zeros((2, K), np.int32), "w", "x.dtype=int32"),
        (np.zeros((2, K), np.float32), np.zeros((K, N)), "must be a quant.Int4Weight"),
    ],
)
@for_each_impl(OP)
def test_bad_input(impl, x, w, match):
    w = make_weight(0) if isinstance(w, str) else w
    with pytest.raises(ValueError, match=match):
        int4_matmul(x, w, impl=impl)


def test_unknown_impl_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"impl='tinygemm' is not an implementation of int4_matmul.*'dequant'"
    ):
        int4_matmul(np.zeros((2, K), np.float32), make_weight(0), impl="tinygemm")


def test_reference_impl_refuses_tracing():
    qw = make_weight(0)
    with pytest.raises(ValueError, match="impl='reference' runs the NumPy reference"):
        jax.jit(lambda x: int4_matmul(x, qw, impl="reference"))(jnp.zeros((2, K)))
