"""MoE dispatch and combine (MegaBlocks-style, dropless by default): the dispatch plan, the gathered
rows and the weighted scatter back; capacity and drop priorities. Conventions in the `kernels.moe`
docstring."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels.moe.routing import validate_routing

DROP_PRIORITIES = ("choice", "token", "weight")
LAYOUTS = ("packed", "padded")


def validate_capacity_args(capacity: int | None, drop_priority: str) -> None:
    if capacity is not None and (not isinstance(capacity, (int, np.integer)) or capacity < 1):
        raise ValueError(f"capacity={capacity} must be a positive int or None")
    if drop_priority not in DROP_PRIORITIES:
        raise ValueError(f"drop_priority={drop_priority!r} must be one of {DROP_PRIORITIES}")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Rows per expert in capacity mode: max(1, ceil(capacity_factor · T · k / E))."""
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor={capacity_factor} must be a positive number")
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts - 1e-9))


# --------------------------------------------------------------------------------------------------
# routers: NumPy references


class DispatchPlan(NamedTuple):
    """Where every assignment goes in a dispatched buffer xs: [R, d] (a pytree of int32 arrays).

    position: [T, k] row of assignment (t, j) in xs, or R when it was dropped (the inverse permutation).
    row_token: [R] token read by each row, or T for a padding row (the forward permutation).
    group_sizes: [E] rows kept per expert.  group_offsets: [E] first row of each expert's group.
    """

    position: jax.Array
    row_token: jax.Array
    group_sizes: jax.Array
    group_offsets: jax.Array


def _priority_keys(expert_ids, weights, drop_priority):
    num_tokens, top_k = expert_ids.shape
    tok = lax.broadcasted_iota(jnp.int32, (num_tokens, top_k), 0).reshape(-1)
    choice = lax.broadcasted_iota(jnp.int32, (num_tokens, top_k), 1).reshape(-1)
    if drop_priority == "token":
        return (tok, choice)
    if drop_priority == "choice":
        return (choice, tok)
    if weights is None:
        raise ValueError("drop_priority='weight' needs the routing weights")
    return (-weights.reshape(-1).astype(jnp.float32) + 0.0, choice, tok)


def _packed_rows(num_assign: int, num_experts: int, capacity: int | None, row_align: int) -> int:
    kept = num_assign if capacity is None else min(num_assign, num_experts * capacity)
    return kept + num_experts * (row_align - 1)


def dispatch_plan(
    expert_ids: jax.Array,
    num_experts: int,
    *,
    weights: jax.Array | None = None,
    capacity: int | None = None,
    drop_priority: str = "choice",
    layout: str = "packed",
    row_align: int = 1,
) -> DispatchPlan:
    """Sort the assignments expert_ids: [T, k] by expert (stable in drop-priority order) into rows.

    capacity: keep at most this many assignments per expert (None: dropless). layout "packed" (groups
    back to back, each padded to a multiple of row_align, R = kept + E·(row_align-1)) or "padded"
    (expert e owns rows [e·C, (e+1)·C), R = E·C, C = capacity or T·k). weights: [T, k], needed only by
    drop_priority="weight". Traceable; the sizes of every output are static.
    """
    validate_routing(weights, expert_ids, num_experts, None)
    validate_capacity_args(capacity, drop_priority)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if not isinstance(row_align, (int, np.integer)) or row_align < 1:
        raise ValueError(f"row_align={row_align} must be a positive int")
    if layout == "padded" and row_align != 1:
        raise ValueError(f"row_align={row_align} applies to layout='packed' only")
    return plan_rows(
        expert_ids,
        weights,
        num_experts=int(num_experts),
        capacity=capacity,
        drop_priority=drop_priority,
        layout=layout,
        row_align=int(row_align),
    )


def plan_rows(expert_ids, weights, *, num_experts, capacity, drop_priority, layout, row_align, min_rows=0):
    # min_rows: a lower bound on R, so that static-size blocks always fit in the buffer.
    num_tokens, top_k = expert_ids.shape
    num_assign = num_tokens * top_k
    ids = expert_ids.reshape(-1).astype(jnp.int32)
    # An id outside [0, E) (possible only under jit, where values cannot be checked) is dropped like a
    # capacity drop: it sorts after every expert, in a bucket E that is never kept.
    valid = (ids >= 0) & (ids < num_experts)
    ids = jnp.where(valid, ids, num_experts)
    flat = jnp.arange(num_assign, dtype=jnp.int32)
    # Sort by (expert, priority...): a stable lexicographic sort, so ranks within an expert follow the
    # drop priority exactly.
    keys = _priority_keys(
        expert_ids, lax.stop_gradient(weights) if weights is not None else None, drop_priority
    )
    *_, order = lax.sort((ids, *keys, flat), num_keys=1 + len(keys))
    sorted_ids = ids[order]
    counts_all = jnp.zeros((num_experts + 1,), jnp.int32).at[ids].add(1)
    starts = jnp.cumsum(counts_all) - counts_all
    counts = counts_all[:num_experts]
    rank_sorted = jnp.arange(num_assign, dtype=jnp.int32) - starts[sorted_ids]
    rank = jnp.zeros((num_assign,), jnp.int32).at[order].set(rank_sorted)
    cap = num_assign if capacity is None else int(capacity)
    keep = (rank < cap) & valid
    ids = jnp.minimum(ids, num_experts - 1)  # in range for the offsets gather; dropped rows are not placed
    sizes = jnp.minimum(counts, cap)
    if layout == "padded":
        rows = num_experts * cap
        offsets = jnp.arange(num_experts, dtype=jnp.int32) * cap
    else:
        rows = max(
            min_rows, _packed_rows(num_assign, num_experts, None if capacity is None else cap, row_align)
        )
        padded = (sizes + row_align - 1) // row_align * row_align
        offsets = (jnp.cumsum(padded) - padded).astype(jnp.int32)
    position = jnp.where(keep, offsets[ids] + rank, rows).astype(jnp.int32)
    row_token = jnp.full((rows,), num_tokens, jnp.int32).at[position].set(flat // top_k, mode="drop")
    return DispatchPlan(position.reshape(num_tokens, top_k), row_token, sizes.astype(jnp.int32), offsets)


def gather_rows(x, row_token):
    return jnp.take(x, row_token, axis=0, mode="fill", fill_value=0)


def dispatch(
    x: jax.Array,
    expert_ids: jax.Array,
    num_experts: int,
    **plan_kwargs: Any,
) -> tuple[jax.Array, DispatchPlan]:
    """x: [T, d] -> (xs [R, d] rows grouped by expert, plan). plan_kwargs as for `dispatch_plan`."""
    if len(x.shape) != 2 or x.shape[0] != expert_ids.shape[0]:
        raise ValueError(f"x.shape={tuple(x.shape)} must be [T={expert_ids.shape[0]}, d]")
    plan = dispatch_plan(expert_ids, num_experts, **plan_kwargs)
    return gather_rows(x, plan.row_token), plan


def combine(ys: jax.Array, weights: jax.Array, plan: DispatchPlan) -> jax.Array:
    """ys: [R, d] expert outputs, weights: [T, k] -> y [T, d] = Σ_j weights[t, j] · ys[position[t, j]].

    Dropped assignments read zero. Accumulates in float32 and returns ys.dtype.
    """
    if tuple(weights.shape) != tuple(plan.position.shape):
        raise ValueError(f"weights.shape={tuple(weights.shape)} must equal {tuple(plan.position.shape)}")
    if ys.shape[0] != plan.row_token.shape[0]:
        raise ValueError(f"ys.shape={tuple(ys.shape)} must have R={plan.row_token.shape[0]} rows")
    return combine_rows(ys, weights, plan.position)


def combine_rows(ys, weights, position):
    rows = jnp.take(ys, position, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    return jnp.einsum("tk,tkd->td", weights.astype(jnp.float32), rows).astype(ys.dtype)


# --------------------------------------------------------------------------------------------------
# the expert FFN: NumPy reference


def keep_mask_reference(weights, expert_ids, num_experts, capacity, drop_priority) -> np.ndarray:
    num_tokens, top_k = expert_ids.shape
    keep = np.ones((num_tokens, top_k), dtype=bool)
    if capacity is None:
        return keep
    pairs = [(t, j) for t in range(num_tokens) for j in range(top_k)]
    if drop_priority == "choice":
        pairs.sort(key=lambda p: (p[1], p[0]))
    elif drop_priority == "weight":
        pairs.sort(key=lambda p: (-float(weights[p]), p[1], p[0]))
    taken = np.zeros(num_experts, dtype=int)
    for t, j in pairs:
        e = expert_ids[t, j]
        keep[t, j] = taken[e] < capacity
        taken[e] += 1
    return keep


def expert_dims(w: Any) -> tuple[int, int, int]:
    """(E, K, N) of an expert stack: a float array [E, K, N] or a stack of `quant.Int4Weight` experts."""
    from quant.format import Int4Weight, codes_per_byte

    if isinstance(w, Int4Weight):
        e, r, n = w.packed.shape
        return e, r * codes_per_byte(w.bits), n
    return tuple(w.shape)


def check_grouped_operands(xs: Any, group_sizes: Any, wg: Any, wu: Any, wd: Any) -> None:
    """The grouped FFN's operands, as every grouped-GEMM backend takes them: xs [A, d] rows sorted by expert,
    group_sizes [E] integers (concrete ones non-negative and summing to at most A), w_gate and w_up [E, d, f],
    w_down [E, f, d]; a ValueError naming the argument otherwise."""
    _dims = expert_dims
    if len(xs.shape) != 2:
        raise ValueError(f"xs.shape={tuple(xs.shape)} must be [A, d]")
    e, d, f = _dims(wg)
    if xs.shape[1] != d:
        raise ValueError(f"xs.shape={tuple(xs.shape)} must be [A, d={d}] to match w_gate [E, d, f]")
    if _dims(wu) != (e, d, f):
        raise ValueError(f"w_up is {list(_dims(wu))}; it must match w_gate's [E, d, f]={[e, d, f]}")
    if _dims(wd) != (e, f, d):
        raise ValueError(f"w_down is {list(_dims(wd))}; it must be [E, f, d]={[e, f, d]}")
    if tuple(group_sizes.shape) != (e,):
        raise ValueError(f"group_sizes.shape={tuple(group_sizes.shape)} must be (E,)=({e},)")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes.dtype={group_sizes.dtype} must be an integer type")
    if isinstance(group_sizes, (np.ndarray, jax.Array)) and not isinstance(group_sizes, jax.core.Tracer):
        sizes = np.asarray(group_sizes)
        if sizes.size and (sizes.min() < 0 or sizes.sum() > xs.shape[0]):
            raise ValueError(
                f"group_sizes={sizes.tolist()} must be non-negative with a sum <= A={xs.shape[0]} rows"
            )
