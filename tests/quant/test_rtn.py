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
    qw = quant.quantize_rtn(w, group_size=4)
    np.testing.assert_array_equal(np.asarray(qw.codes())[:, 0], [0, 8, 15, 6])
    assert_close(qw.scales, [[0.2]], np.float32)
    np.testing.assert_array_equal(np.asarray(qw.zeros), [[5]])
    assert_close(qw.dequantize()[:, 0], [-1.0, 0.6, 2.0, 0.2], np.float32)


def test_rtn_symmetric_hand_worked():
    # max |w| = 3: scale = 6/15 = 0.4, zero 8; the largest weight lands on 7.5 steps and clips to 15.
    w = _column([-0.8, 0.5, 3.0, 0.1])
    qw = quant.quantize_rtn(w, group_size=4, sym=True)
    assert qw.zeros is None
    np.testing.assert_array_equal(np.asarray(qw.codes())[:, 0], [6, 9, 15, 8])
    assert_close(qw.dequantize()[:, 0], [-0.8, 0.4, 2.8, 0.0], np.float32)


def test_rtn_symmetric_nonnegative_group_keeps_the_reference_quirk():
    # No negative weight: xmin stays 0, so scale = 3/15 = 0.2 with zero 8 and the top half clips at 1.4.
    w = _column([0.0, 1.5, 3.0, 0.6])
    qw = quant.quantize_rtn(w, group_size=4, sym=True)
    np.testing.assert_array_equal(np.asarray(qw.codes())[:, 0], [8, 15, 15, 11])
    assert_close(qw.dequantize()[:, 0], [0.0, 1.4, 1.4, 0.6], np.float32)


def test_rtn_all_zero_group_gets_a_unit_grid():
    qw = quant.quantize_rtn(np.zeros((4, 2), np.float32), group_size=4)
    assert_close(qw.scales, np.full((1, 2), 2 / 15), np.float32)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), 0.0)


def _assert_codes_match_up_to_ties(codes, ref_codes, w, scales, group_size):
    """Codes equal the float64 reference except where x / scale sits on a rounding tie."""
    k = w.shape[0]
    ratio = np.asarray(w, np.float64) / np.repeat(np.asarray(scales, np.float64), group_size or k, axis=0)
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < QUANT_TIE_WIDTH
    diff = np.asarray(codes, np.int64) != ref_codes
    assert not np.any(diff & ~near_tie)
    assert np.all(np.abs(np.asarray(codes, np.int64) - ref_codes)[diff] == 1)


@given(
    shape=st.sampled_from(SHAPES),
    group=st.sampled_from(GROUPS),
    sym=st.booleans(),
    bits=st.sampled_from([4, 2, 8]),
    seed=st.integers(0, 2**31),
)
def test_rtn_matches_reference_and_half_step_bound(shape, group, sym, bits, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
    qw = quant.quantize_rtn(w, bits=bits, group_size=group, sym=sym)
    codes, scales, zeros = quant.rtn_reference(w, bits=bits, group_size=group, sym=sym)
    gs = shape[0] if group == -1 else group
    _assert_codes_match_up_to_ties(qw.codes(), codes, w, scales, gs)
    assert_close(qw.scales, scales, np.float32)
    if not sym:
        np.testing.assert_array_equal(np.asarray(qw.zeros), zeros)
    # Inside the clip range the error is at most half a step.
    deq = np.asarray(qw.dequantize(), np.float64)
    step = np.repeat(scales, gs, axis=0)
    zero = np.repeat(zeros, gs, axis=0)
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
