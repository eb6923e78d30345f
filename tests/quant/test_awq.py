"""AWQ: hand-worked scales and searches, the float64 reference, outlier channels against RTN, shared scales,
folding into the producing norm or linear, and bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quant
from tests.tolerances import (
    AWQ_OVER_RTN_OUTPUT_ERROR,
    AWQ_VS_REFERENCE_ERROR_RTOL,
    assert_close,
    normalized_error,
    tolerance,
)


def _output_error(x, w, w_eff):
    """Squared output error ||x W - x W_eff||² in float64."""
    x, w, w_eff = (np.asarray(a, np.float64) for a in (x, w, w_eff))
    return float(np.sum((x @ w - x @ w_eff) ** 2))


def outlier_inputs(rng, n, k, outliers=8):
    """Correlated activations with a few input channels 10-20x larger, as in transformer layers."""
    r = max(2, k // 8)
    x = rng.standard_normal((n, r)) @ rng.standard_normal((r, k)) / np.sqrt(r) + 0.1 * rng.standard_normal(
        (n, k)
    )
    x[:, rng.choice(k, outliers, replace=False)] *= rng.uniform(10, 20, outliers)
    return x.astype(np.float32)


# -- the scales, by hand ----------------------------------------------------------------------------------


def test_act_scales_hand_worked():
    # m^0.5 = [1, 2]; normalized by sqrt(max * min) = sqrt(2).
    assert_close(quant.awq_act_scales(np.array([1.0, 4.0]), 0.5), [2**-0.5, 2**0.5], np.float64)
    assert_close(quant.awq_act_scales(np.array([1.0, 4.0]), 0.0), [1.0, 1.0], np.float64)


def test_act_scales_zero_channel_is_floored():
    # The zero channel is raised to 1e-4 * 8: m^0.5 = [0.02828, 1.414, 2.828], / sqrt(0.08) -> [0.1, 5, 10].
    assert_close(quant.awq_act_scales(np.array([0.0, 2.0, 8.0]), 0.5), [0.1, 5.0, 10.0], np.float64)
    assert_close(quant.awq_act_scales(np.zeros(4), 0.7), np.ones(4), np.float64)


def test_awq_uniform_activation_magnitudes_is_rtn():
    # Every channel has mean |x| = 1, so every candidate s is 1 and AWQ without clip is RTN exactly.
    rng = np.random.default_rng(0)
    x = np.sign(rng.standard_normal((64, 32))).astype(np.float32)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    qw = quant.awq_quantize(w, x, group_size=16, clip=False)
    rtn = quant.quantize_rtn(w, group_size=16)
    np.testing.assert_array_equal(np.asarray(qw.act_scales), np.ones(32, np.float32))
    np.testing.assert_array_equal(np.asarray(qw.codes()), np.asarray(rtn.codes()))
    assert_close(qw.dequantize(), rtn.dequantize(), np.float32)


def test_awq_hand_worked_single_active_channel():
    # One column, weights [0.13, 1.5] (all >= 0, so the grid is [0, max] with zero 0), and only channel 0
    # is active. RTN: scale 1.5 / 15 = 0.1, 0.13 -> code 1 -> 0.1, so each output is off by 0.03.
    # AWQ scales channel 0 up (s0 / s1 = 1e4^α): at α = 0.2 the ratio is 10, W·s = [1.3, 1.5] / sqrt(10),
    # scale 0.1 / sqrt(10), and 0.13 lands exactly on code 13: the active channel is represented exactly.
    # float32 scales: the grid by hand (float16 would round 0.1 / sqrt(10) up).
    w = np.array([[0.13], [1.5]], np.float32)
    x = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    rtn = quant.quantize_rtn(w, group_size=2, scale_dtype=np.float32)
    assert_close(x @ np.asarray(rtn.dequantize()), [[0.1], [-0.1]], np.float32)
    for clip in (False, True):
        qw = quant.awq_quantize(w, x, group_size=2, clip=clip, scale_dtype=np.float32)
        s = np.asarray(qw.act_scales)
        assert s[0] > s[1] > 0
        assert_close(x @ np.asarray(qw.dequantize()), x @ w, np.float32)


def test_awq_clip_shrinks_heavy_tailed_groups():
    # Activations of equal magnitude (random signs: s = 1, and the Gram matrix is nearly diagonal) and
    # Laplace-distributed weights: a few large weights stretch each min-max range, so shrinking the range
    # and clipping them costs less than the coarser grid costs every other weight.
    rng = np.random.default_rng(2)
    x = np.sign(rng.standard_normal((512, 256))).astype(np.float32)
    w = rng.laplace(size=(256, 32)).astype(np.float32)
    no_clip = quant.awq_quantize(w, x, group_size=128, clip=False)
    clipped = quant.awq_quantize(w, x, group_size=128, clip=True)
    shrunk = np.asarray(clipped.scales) < np.asarray(no_clip.scales) * (1 - tolerance(np.float32).rtol)
    assert shrunk.mean() > 0.5
    assert np.all(np.asarray(clipped.scales) <= np.asarray(no_clip.scales) * (1 + tolerance(np.float32).rtol))
    assert _output_error(x, w, clipped.dequantize()) < _output_error(x, w, no_clip.dequantize())


# -- against the float64 reference --------------------------------------------------------------------------


@settings(max_examples=12)
@given(seed=st.integers(0, 2**31 - 1), group_size=st.sampled_from([16, -1]), clip=st.booleans())
def test_awq_matches_reference(seed, group_size, clip):
    # Asymmetric grids only: on the symmetric grid the largest weight of a column sits exactly on a
    # rounding tie (±7.5 steps), which float32 and float64 break differently by a whole step.
    sym = False
    shape = (32, 8)
    rng = np.random.default_rng(seed)
    k, n = shape
    x = outlier_inputs(rng, 48, k, outliers=3)
    w = rng.standard_normal((k, n)).astype(np.float32)
    qw = quant.awq_quantize(w, x, group_size=group_size, grid=10, clip=clip, sym=sym)
    codes, scales, zeros, s = quant.awq_reference(w, x, group_size=group_size, grid=10, clip=clip, sym=sym)
    gs = k if group_size == -1 else group_size
    w_ref = scales[np.arange(k) // gs] * (codes - zeros[np.arange(k) // gs]) / s[:, None]
    # A float32 search may break a near-tie between candidates differently; what matters is the error.
    e_jax, e_ref = _output_error(x, w, qw.dequantize()), _output_error(x, w, w_ref)
    assert e_jax <= e_ref * (1 + AWQ_VS_REFERENCE_ERROR_RTOL)
    if not clip:
        # α = 0 is RTN, so the scale search alone never loses to RTN on its own calibration set.
        rtn = quant.quantize_rtn(w, group_size=group_size, sym=sym)
        assert e_ref <= _output_error(x, w, rtn.dequantize()) * (1 + AWQ_VS_REFERENCE_ERROR_RTOL)


def test_awq_matches_reference_exactly_on_a_fixed_case():
    rng = np.random.default_rng(7)
    x = outlier_inputs(rng, 64, 64, outliers=4)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    qw = quant.awq_quantize(w, x, group_size=32)
    codes, scales, zeros, s = quant.awq_reference(w, x, group_size=32)
    assert_close(qw.act_scales, s, np.float32)
    np.testing.assert_array_equal(np.asarray(qw.codes_in_input_order()), codes)
    assert_close(qw.scales, scales, np.float32)
    np.testing.assert_array_equal(np.asarray(qw.zeros), zeros)


def test_dequantize_folds_the_scales_in():
    rng = np.random.default_rng(1)
    x = outlier_inputs(rng, 64, 64)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    qw = quant.awq_quantize(w, x, group_size=32)
    assert qw.act_scales is not None and qw.act_scales.shape == (64,)
    # The layer computes (x / s) @ Q(W s): the same as x @ dequantize().
    k = np.arange(64)
    w_q = np.asarray(qw.scales)[k // 32] * (
        np.asarray(qw.codes(), np.float64) - np.asarray(qw.zeros)[k // 32]
    )
    y = (x / np.asarray(qw.act_scales)[None, :]) @ w_q
    assert normalized_error(x @ np.asarray(qw.dequantize()), y) <= tolerance(np.float32).nerr
    assert_close(qw.dequantize(), quant.dequantize_reference(qw), np.float32)


# -- the point of it: outlier channels -----------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [128, -1])
def test_awq_beats_rtn_with_outlier_channels(group_size):
    rng = np.random.default_rng(3)
    k, n = 256, 96
    x_cal = outlier_inputs(rng, 512, k)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    # Held-out activations from the same channels (same outliers): re-draw only the sample.
    x_test = x_cal[rng.permutation(512)[:256]] * rng.uniform(0.8, 1.2, (256, 1)).astype(np.float32)
    awq = quant.awq_quantize(w, x_cal, group_size=group_size)
    rtn = quant.quantize_rtn(w, group_size=group_size)
    e_awq = _output_error(x_test, w, awq.dequantize())
    e_rtn = _output_error(x_test, w, rtn.dequantize())
    assert np.sqrt(e_awq / e_rtn) <= AWQ_OVER_RTN_OUTPUT_ERROR


def test_zero_activation_channels_give_finite_scales():
    rng = np.random.default_rng(4)
    x = outlier_inputs(rng, 32, 64)
    x[:, [0, 5, 63]] = 0.0
    w = rng.standard_normal((64, 8)).astype(np.float32)
    for xs in (x, np.zeros_like(x)):
        qw = quant.awq_quantize(w, xs, group_size=32)
        s = np.asarray(qw.act_scales)
        assert np.all(np.isfinite(s)) and np.all(s > 0)
        assert np.all(np.isfinite(np.asarray(qw.dequantize())))
    np.testing.assert_array_equal(
        np.asarray(quant.awq_quantize(w, np.zeros_like(x), group_size=32).act_scales), 1
    )


# -- shared scales and folding -------------------------------------------------------------------------------


def _layer_norm(h, gamma, beta, eps=1e-12):
    h = np.asarray(h, np.float64)
    mu = h.mean(axis=-1, keepdims=True)
    return (h - mu) / np.sqrt(h.var(axis=-1, keepdims=True) + eps) * gamma + beta


def test_shared_scales_quantize_each_layer_of_the_concatenation():
    rng = np.random.default_rng(5)
    x = outlier_inputs(rng, 64, 64)
    ws = [rng.standard_normal((64, n)).astype(np.float32) for n in (16, 8, 24)]
    shared = quant.awq_quantize_shared(ws, x, group_size=32)
    whole = quant.awq_quantize(np.concatenate(ws, axis=1), x, group_size=32)
    cols = np.cumsum([0, 16, 8, 24])
    for i, qw in enumerate(shared):
        np.testing.assert_array_equal(np.asarray(qw.act_scales), np.asarray(whole.act_scales))
        assert_close(qw.dequantize(), np.asarray(whole.dequantize())[:, cols[i] : cols[i + 1]], np.float32)
    single = quant.awq_quantize_shared([ws[0]], x, group_size=32)[0]
    assert_close(single.dequantize(), quant.awq_quantize(ws[0], x, group_size=32).dequantize(), np.float32)


def test_fold_into_norm_computes_the_same_function():
    # A pre-LN block: y = LN(h) γ + β feeds q, k and v only, so s folds into γ and β.
    rng = np.random.default_rng(6)
    h = rng.standard_normal((40, 64)).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    gamma[[3, 9]] *= 15  # outlier channels after the norm, as in real models
    beta = (0.1 * rng.standard_normal(64)).astype(np.float32)
    y = _layer_norm(h, gamma, beta)
    ws = [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(3)]
    qws = quant.awq_quantize_shared(ws, y.astype(np.float32), group_size=32)
    g2, b2, folded = quant.fold_scales_into_norm(gamma, beta, qws)
    assert all(qw.act_scales is None for qw in folded)
    y2 = _layer_norm(h, g2, b2)
    for qw, fw in zip(qws, folded, strict=True):
        # Unfolded: (y / s) @ Q(W s), which is y @ dequantize(); folded: y2 @ Q(W s).
        unfolded = y @ np.asarray(qw.dequantize(), np.float64)
        assert (
            normalized_error(y2 @ np.asarray(fw.dequantize(), np.float64), unfolded)
            <= tolerance(np.float32).nerr
        )


def test_fold_into_linear_through_attention_computes_the_same_function():
    # value -> softmax(QKᵀ) V -> attention-output: the path is linear per channel, so o's s folds into v.
    rng = np.random.default_rng(8)
    t, e = 12, 64
    y = rng.standard_normal((t, e)).astype(np.float32)
    p = rng.uniform(size=(t, t))
    p /= p.sum(axis=1, keepdims=True)
    wv, bv = rng.standard_normal((e, e)).astype(np.float32), rng.standard_normal(e).astype(np.float32)
    wo = rng.standard_normal((e, 32)).astype(np.float32)
    qv = quant.quantize_rtn(wv, group_size=32)
    ctx = p @ (y @ np.asarray(qv.dequantize(), np.float64) + bv)
    ctx[:, :4] *= 20
    qo = quant.awq_quantize(wo, ctx.astype(np.float32), group_size=32)
    unfolded = ctx @ np.asarray(qo.dequantize(), np.float64)
    qv2, bv2, (qo2,) = quant.fold_scales_into_linear(qv, bv, [qo])
    assert qo2.act_scales is None
    # Re-run the path with the folded value layer: the context comes out divided by s.
    ctx2 = p @ (y @ np.asarray(qv2.dequantize(), np.float64) + bv2)
    ctx2[:, :4] *= 20
    folded = ctx2 @ np.asarray(qo2.dequantize(), np.float64)
    assert normalized_error(folded, unfolded) <= tolerance(np.float32).nerr


def test_fold_refuses_unshared_or_missing_scales():
    rng = np.random.default_rng(9)
    x = outlier_inputs(rng, 32, 32, outliers=2)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    a = quant.awq_quantize(w, x, group_size=16)
    b = quant.awq_quantize(w, x * np.linspace(1, 5, 32, dtype=np.float32), group_size=16)
    with pytest.raises(ValueError, match=r"qws\[1\]"):
        quant.fold_scales_into_norm(np.ones(32), np.zeros(32), [a, b])
    with pytest.raises(ValueError, match="act_scales"):
        quant.fold_scales_into_norm(np.ones(32), np.zeros(32), [quant.quantize_rtn(w, group_size=16)])
    with pytest.raises(ValueError, match="gamma"):
        quant.fold_scales_into_norm(np.ones(16), np.zeros(32), [a])
    with pytest.raises(ValueError, match="N=8"):
        quant.fold_scales_into_linear(
            quant.quantize_rtn(np.ones((16, 8), np.float32), group_size=16), None, [a]
        )


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_input():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    bad_w = w.copy()
    bad_w[3, 2] = np.nan
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        quant.awq_quantize(bad_w, x, group_size=16)
    for bad in (np.nan, np.inf):
        bad_x = x.copy()
        bad_x[1, 1] = bad
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            quant.awq_quantize(w, bad_x, group_size=16)
    with pytest.raises(ValueError, match=r"x has width 16 .* K=32"):
        quant.awq_quantize(w, x[:, :16], group_size=16)
    with pytest.raises(ValueError, match="x is an empty calibration set"):
        quant.awq_quantize(w, x[:0], group_size=16)
    with pytest.raises(ValueError, match="x must be"):
        quant.awq_quantize(w, x[0], group_size=16)
    with pytest.raises(ValueError, match="grid=0"):
        quant.awq_quantize(w, x, group_size=16, grid=0)
    with pytest.raises(ValueError, match="group_size=12"):
        quant.awq_quantize(w, x, group_size=12)
    with pytest.raises(ValueError, match=r"ws\[1\] contains NaN"):
        quant.awq_quantize_shared([w, bad_w], x, group_size=16)
    with pytest.raises(ValueError, match="ws must be a non-empty sequence"):
        quant.awq_quantize_shared([], x, group_size=16)
