"""MoE dispatch and combine: the identity property, capacity and drop priorities by hand."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kernels.moe import (
    combine,
    dispatch,
    dispatch_plan,
)
from tests.kernels.moe.cases import (
    SOME,
    make_x,
)
from tests.tolerances import (
    assert_close,
)

# ---------------------------------------------------------------------------------------------------------
# Dispatch and combine.

IDS_T8K2 = st.lists(st.integers(0, 3), min_size=16, max_size=16).map(
    lambda v: np.array(v, np.int32).reshape(8, 2)
)


@SOME
@given(ids=IDS_T8K2, layout_align=st.sampled_from([("packed", 1), ("packed", 4), ("padded", 1)]))
def test_combine_of_dispatch_is_identity(ids, layout_align):
    layout, align = layout_align
    x = make_x(0, t=8, d=4)
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
    x = make_x(1, t=4, d=3)
    xs, plan = dispatch(x, ids, 2, capacity=3, layout="padded")
    assert xs.shape == (6, 3)
    np.testing.assert_array_equal(np.asarray(xs)[:3], x[:3])
    np.testing.assert_array_equal(np.asarray(xs)[3:], 0)
    y = combine(xs, np.ones((4, 1), np.float32), plan)
    assert_close(y, np.concatenate([x[:3], np.zeros((1, 3), np.float32)]), np.float32)
