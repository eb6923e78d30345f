"""Round-to-nearest on GPTQ's min-max grid: hand-worked cases, the float64 reference, the half-step bound."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import quant
from tests.tolerances import QUANT_TIE_WIDTH, assert_close, tolerance

SHAPES = [(16, 8), (64, 24)]
GROUPS = [8, 16, -1]


def _column(values):
    return np.array(values, np.float32)[:, None]


def test_rtn_asymmetric_hand_worked():
    # xmin=-1, xmax=2: scale = 3/15 = 0.2, zero = round(1/0.2) = 5.
    w = _column([-1.0, 0.62, 2.0, 0.25])
    qw = quant.quantize_rtn(w, group_size=4, scale_dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(qw.codes())[:, 0], [0, 8, 15, 6])
    assert_close(qw.scales, [[0.2]], np.float32)
    np.testing.assert_array_equal(np.asarray(qw.zeros), [[5]])
    assert_close(qw.dequantize()[:, 0], [-1.0, 0.6, 2.0, 0.2], np.float32)


def test_rtn_symmetric_hand_worked():
    # max |w| = 3: scale = 6/15 = 0.4, zero 8; the largest weight lands on 7.5 steps and clips to 15.
    w = _column([-0.8, 0.5, 3.0, 0.1])
    qw = quant.quantize_rtn(w, group_size=4, sym=True, scale_dtype=np.float32)
    assert qw.zeros is None
    np.testing.assert_array_equal(np.asarray(qw.codes())[:, 0], [6, 9, 15, 8])
    assert_close(qw.dequantize()[:, 0], [-0.8, 0.4, 2.8, 0.0], np.float32)


def test_rtn_symmetric_nonnegative_group_keeps_the_reference_quirk():
    # No negative weight: xmin stays 0, so scale = 3/15 = 0.2 with zero 8 and the top half clips at 1.4.
    w = _column([0.0, 1.5, 3.0, 0.6])
    qw = quant.quantize_rtn(w, group_size=4, sym=True, scale_dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(qw.codes())[:, 0], [8, 15, 15, 11])
    assert_close(qw.dequantize()[:, 0], [0.0, 1.4, 1.4, 0.6], np.float32)


def test_rtn_all_zero_group_gets_a_unit_grid():
    qw = quant.quantize_rtn(np.zeros((4, 2), np.float32), group_size=4, scale_dtype=np.float32)
    assert_close(qw.scales, np.full((1, 2), 2 / 15), np.float32)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), 0.0)


def test_rtn_float16_scale_is_rounded_before_the_codes():
    # The float32 scale 0.2 is not a float16 value: it is rounded up to 0.2000732421875 = 0.2 + 2^-13 · 0.6,
    # and the zero point and codes are those of the rounded grid: zero = round(1 / 0.20007) = 5.
    w = _column([-1.0, 0.62, 2.0, 0.25])
    qw = quant.quantize_rtn(w, group_size=4)
    assert qw.scales.dtype == np.float16
    assert float(qw.scales[0, 0]) == 0.2000732421875
    np.testing.assert_array_equal(np.asarray(qw.codes())[:, 0], [0, 8, 15, 6])
    np.testing.assert_array_equal(np.asarray(qw.zeros), [[5]])
    # The weight is exactly the float16 scale times (code - zero): what a float16 checkpoint holds.
    expected = np.float64(np.float16(0.2000732421875)) * (np.array([0, 8, 15, 6]) - 5)
    np.testing.assert_array_equal(np.asarray(qw.dequantize(), np.float64)[:, 0], expected)


def test_rtn_float16_scale_rounds_up_where_float16_is_subnormal():
    # A range of 1.335e-6 over 15 steps is a scale of 8.9e-8, between the float16 subnormals 5.96e-8 and
    # 1.19e-7. Rounded to nearest (5.96e-8) the grid would cover only 2/3 of the range and the ends would
    # clip by 2.2e-7; rounded up (1.19e-7) every weight is within half a step.
    w = _column([-6.675e-7, 6.675e-7, 1e-7, 0.0])
    qw = quant.quantize_rtn(w, group_size=4)
    step = float(qw.scales[0, 0])
    assert step == float(np.nextafter(np.float16(6e-8), np.float16(1)))
    assert np.max(np.abs(np.asarray(qw.dequantize())[:, 0] - w[:, 0])) <= step / 2


def test_rtn_scale_that_overflows_float16_is_an_error():
    w = _column([-1e6, 1e6, 0.0, 3.0])
    with pytest.raises(ValueError, match=r"largest float16.*scale_dtype=np.float32"):
        quant.quantize_rtn(w, group_size=4)
    qw = quant.quantize_rtn(w, group_size=4, scale_dtype=np.float32)
    assert qw.scales.dtype == np.float32


@pytest.mark.parametrize("scale_dtype", [np.int8, "bfloat16", None, "half-precision"])
def test_rtn_bad_scale_dtype(scale_dtype):
    with pytest.raises(ValueError, match="scale_dtype="):
        quant.quantize_rtn(np.ones((8, 4), np.float32), group_size=8, scale_dtype=scale_dtype)


def _straddling(scales, ref_scales, scale_dtype):
    """(group, column) pairs whose float32 and float64 scales round to adjacent `scale_dtype` values.

    Near a value of `scale_dtype`, the float32 and float64 scales of the same weights may fall on either
    side of it; the rounded scales are then one step apart, and with them the zero point and the codes.
    Everywhere else the rounded scales agree exactly. Returns a boolean mask [G, N].
    """
    a = np.asarray(scales).astype(scale_dtype)
    b = np.asarray(ref_scales).astype(scale_dtype)
    assert np.array_equal(np.asarray(ref_scales, np.float64), b.astype(np.float64))  # the reference rounded
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    differ = a != b
    assert np.all(np.nextafter(lo, np.asarray(np.inf, scale_dtype))[differ] == hi[differ])
    return differ


def _assert_codes_match_up_to_ties(codes, ref_codes, w, scales, group_size, skip=None):
    """Codes equal the float64 reference except where x / scale sits on a rounding tie (or in `skip`,
    a [K, N] mask of entries whose grids differ)."""
    k = w.shape[0]
    ratio = np.asarray(w, np.float64) / np.repeat(np.asarray(scales, np.float64), group_size or k, axis=0)
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < QUANT_TIE_WIDTH
    skip = np.zeros(ratio.shape, bool) if skip is None else skip
    diff = (np.asarray(codes, np.int64) != ref_codes) & ~skip
    assert not np.any(diff & ~near_tie)
    assert np.all(np.abs(np.asarray(codes, np.int64) - ref_codes)[diff] == 1)


@given(
    shape=st.sampled_from(SHAPES),
    group=st.sampled_from(GROUPS),
    sym=st.booleans(),
    bits=st.sampled_from([4, 2, 8]),
    scale_dtype=st.sampled_from([np.float16, np.float32]),
    seed=st.integers(0, 2**31),
)
def test_rtn_matches_reference_and_half_step_bound(shape, group, sym, bits, scale_dtype, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
    kw = {"bits": bits, "group_size": group, "sym": sym, "scale_dtype": scale_dtype}
    qw = quant.quantize_rtn(w, **kw)
    codes, scales, zeros = quant.rtn_reference(w, **kw)
    assert qw.scales.dtype == scale_dtype
    gs = shape[0] if group == -1 else group
    if scale_dtype == np.float16:
        straddling = _straddling(qw.scales, scales, scale_dtype)
        same = ~straddling
        np.testing.assert_array_equal(np.asarray(qw.scales, np.float64)[same], scales[same])
    else:
        straddling = np.zeros(scales.shape, bool)
        assert_close(qw.scales, scales, np.float32)
    _assert_codes_match_up_to_ties(qw.codes(), codes, w, scales, gs, skip=np.repeat(straddling, gs, axis=0))
    if not sym:
        np.testing.assert_array_equal(np.asarray(qw.zeros)[~straddling], zeros[~straddling])
    # Inside the clip range the error is at most half a step (of the weight's own, rounded grid).
    deq = np.asarray(qw.dequantize(), np.float64)
    step = np.repeat(np.asarray(qw.scales, np.float64), gs, axis=0)
    zero = np.repeat(np.asarray(qw.zero_points(), np.float64), gs, axis=0)
    x = w / step + zero
    inside = (x >= 0) & (x <= 2**bits - 1)
    # Float32 arithmetic adds rounding relative to the weights' own magnitude on top of the half step.
    rtol = tolerance(np.float32).rtol
    bound = step / 2 * (1 + rtol) + np.abs(w) * rtol
    assert np.all(np.abs(deq - w)[inside] <= bound[inside])


@pytest.mark.parametrize(
    "w, kwargs, match",
    [
        (np.zeros((4,), np.float32), {}, "2-D"),
        (np.zeros((2, 4, 4), np.float32), {}, "2-D"),
        (np.zeros((12, 4), np.float32), {"group_size": 8}, "not divisible by group_size"),
        (np.zeros((6, 4), np.float32), {"group_size": -1, "bits": 2}, "packing factor"),
        (np.zeros((8, 4), np.float32), {"bits": 5}, "bits=5"),
        (np.zeros((8, 4), np.float32), {"group_size": 0}, "group_size=0"),
        (np.zeros((8, 4), np.int32), {"group_size": 8}, "floating point"),
        (np.full((8, 4), np.nan, np.float32), {"group_size": 8}, "NaN"),
        (np.full((8, 4), np.inf, np.float32), {"group_size": 8}, "NaN or Inf"),
    ],
)
def test_rtn_bad_input(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant.quantize_rtn(w, **kwargs)
