"""paged_attention_reference pinned by hand: the formula on cases small enough to work out on paper."""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings

from kernels import paged_attention_reference

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))
SOME = settings(max_examples=max(6, settings.default.max_examples // 2))
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)

# ---------------------------------------------------------------------------------------------------------
# The reference, by hand.


def _one_seq(keys, values, q, **kw):
    """Single sequence, single kv head, page size 1: keys/values [n, D], q [H, D]."""
    keys = np.asarray(keys, np.float32)[:, None, None, :]
    values = np.asarray(values, np.float32)[:, None, None, :]
    n = keys.shape[0]
    bt = np.arange(max(n, 1), dtype=np.int32)[None]
    if n == 0:
        keys = values = np.zeros((1, 1, 1, np.shape(q)[-1]), np.float32)
    q = np.asarray(q, np.float32)[None]
    return paged_attention_reference(q, keys, values, np.array([n], np.int32), bt, **kw)[0]


def test_reference_two_keys_by_hand():
    # logits = [0·1, 1·1] = [0, 1]; weights = [1, e] / (1 + e); out = (1·1 + 3·e) / (1 + e)
    out = _one_seq([[0.0], [1.0]], [[1.0], [3.0]], [[1.0]], scale=1.0)
    assert out[0, 0] == pytest.approx((1 + 3 * math.e) / (1 + math.e), rel=1e-6)


def test_reference_soft_cap_then_alibi_then_window_by_hand():
    # D = 1, scale 1: raw logits q·k = [4, 2, 0] at positions j = 0, 1, 2; the query is at p = 2.
    # soft cap 2: 2·tanh([2, 1, 0]); ALiBi slope 0.5: + 0.5·(j − 2) = [−1, −0.5, 0];
    # window 2 keeps j ∈ {1, 2}. Weights ∝ exp([2·tanh(1) − 0.5, 0]).
    out = _one_seq(
        [[4.0], [2.0], [0.0]],
        [[100.0], [10.0], [20.0]],
        [[1.0]],
        scale=1.0,
        soft_cap=2.0,
        alibi_slopes=np.array([0.5], np.float32),
        sliding_window=2,
    )
    l1, l2 = 2 * math.tanh(1.0) - 0.5, 0.0
    w1 = math.exp(l1) / (math.exp(l1) + math.exp(l2))
    assert out[0, 0] == pytest.approx(10.0 * w1 + 20.0 * (1 - w1), rel=1e-6)


def test_reference_empty_sequence_is_zero():
    out = _one_seq(np.zeros((0, 2)), np.zeros((0, 2)), [[1.0, 2.0]])
    assert np.array_equal(out, np.zeros((1, 2)))


def test_reference_gqa_head_mapping_and_causal_prefill():
    # H = 2 query heads share K = 1 kv head. Two queries (q_lens = 2) at positions 0 and 1 of 2 tokens:
    # the first sees only key 0, so its output is value 0 exactly, for both heads.
    k = np.array([[[[1.0]]], [[[2.0]]]], np.float32)  # [P=2, S=1, K=1, D=1]
    v = np.array([[[[5.0]]], [[[7.0]]]], np.float32)
    q = np.ones((2, 2, 1), np.float32)
    out = paged_attention_reference(
        q,
        k,
        v,
        np.array([2], np.int32),
        np.array([[0, 1]], np.int32),
        q_lens=np.array([2], np.int32),
        scale=1.0,
    )
    assert np.array_equal(out[0], [[5.0], [5.0]])
    w = math.exp(2) / (math.exp(1) + math.exp(2))
    np.testing.assert_allclose(out[1], [[5 * (1 - w) + 7 * w]] * 2, rtol=1e-6)
