"""MoE routers: top-k (Mixtral, Qwen3-MoE, Switch), DeepSeek-V3's grouped sigmoid router, expert choice,
and the auxiliary losses; each with its NumPy reference. Conventions in the `kernels.moe` docstring."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SCORINGS = ("softmax", "sigmoid")
_RENORM_EPS = 1e-20


def _is_concrete(a: Any) -> bool:
    return not isinstance(a, jax.core.Tracer)


def validate_route_inputs(
    logits: Any,
    *,
    top_k: int,
    scoring: str = "softmax",
    bias: Any = None,
    n_group: int | None = None,
    topk_group: int | None = None,
) -> None:
    """Static checks for `route` (and NaN logits when the values are concrete)."""
    shape = tuple(logits.shape)
    if len(shape) != 2:
        raise ValueError(f"logits.shape={shape} must be [T, E]")
    num_experts = shape[1]
    if num_experts < 1:
        raise ValueError(f"logits.shape={shape} needs at least one expert")
    if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be an int in [1, E={num_experts}]")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} must be one of {SCORINGS}")
    if bias is not None and tuple(bias.shape) != (num_experts,):
        raise ValueError(f"bias.shape={tuple(bias.shape)} must be (E,)=({num_experts},)")
    if (n_group is None) != (topk_group is None):
        raise ValueError(f"n_group={n_group} and topk_group={topk_group} must be given together")
    if n_group is not None:
        if n_group < 1 or num_experts % n_group:
            raise ValueError(f"n_group={n_group} must divide the number of experts E={num_experts}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(
                f"top_k={top_k} exceeds the {topk_group * (num_experts // n_group)} experts of "
                f"topk_group={topk_group} groups of {num_experts // n_group}"
            )
    if _is_concrete(logits) and np.isnan(np.asarray(logits, dtype=np.float32)).any():
        raise ValueError("logits contain NaN")
    if bias is not None and _is_concrete(bias) and np.isnan(np.asarray(bias, dtype=np.float32)).any():
        raise ValueError("bias contains NaN")


def validate_routing(weights: Any, expert_ids: Any, num_experts: int, num_tokens: int | None) -> None:
    ids_shape = tuple(expert_ids.shape)
    if len(ids_shape) != 2 or ids_shape[1] < 1:
        raise ValueError(f"expert_ids.shape={ids_shape} must be [T, k] with k >= 1")
    if num_tokens is not None and ids_shape[0] != num_tokens:
        raise ValueError(f"expert_ids.shape={ids_shape} must have T={num_tokens} rows")
    if weights is not None and tuple(weights.shape) != ids_shape:
        raise ValueError(f"weights.shape={tuple(weights.shape)} must equal expert_ids.shape={ids_shape}")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"expert_ids.dtype={expert_ids.dtype} must be an integer type")
    if _is_concrete(expert_ids) and ids_shape[0] * ids_shape[1]:
        ids = np.asarray(expert_ids)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_ids hold values in [{lo}, {hi}], outside [0, E={num_experts})")


def _np_order_desc(values: np.ndarray) -> np.ndarray:
    """Indices of a 1-D array, best first, the lower index first among equals."""
    return np.lexsort((np.arange(values.size), -values))


def route_reference(
    logits: Any,
    *,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: Any = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """`route` in float64 NumPy, one token at a time. Returns (weights [T, k] float64, ids [T, k] int32)."""
    logits = np.asarray(logits)
    validate_route_inputs(
        logits, top_k=top_k, scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group
    )
    z = logits.astype(np.float64)
    num_tokens, num_experts = z.shape
    weights = np.zeros((num_tokens, top_k))
    ids = np.zeros((num_tokens, top_k), dtype=np.int32)
    for t in range(num_tokens):
        if scoring == "softmax":
            e = np.exp(z[t] - z[t].max())
            scores = e / e.sum()
        else:
            scores = 1.0 / (1.0 + np.exp(-z[t]))
        choice = scores + (0.0 if bias is None else np.asarray(bias, dtype=np.float64))
        if n_group is not None:
            size = num_experts // n_group
            group_score = np.array(
                [
                    np.sort(choice[g * size : (g + 1) * size])[::-1][: min(2, size)].sum()
                    for g in range(n_group)
                ]
            )
            kept = _np_order_desc(group_score)[:topk_group]
            allowed = np.zeros(num_experts, dtype=bool)
            for g in kept:
                allowed[g * size : (g + 1) * size] = True
            choice = np.where(allowed, choice, -np.inf)
        chosen = _np_order_desc(choice)[:top_k]
        w = scores[chosen]
        if renormalize:
            w = w / (w.sum() + _RENORM_EPS)
        weights[t] = w * routed_scaling_factor
        ids[t] = chosen
    return weights, ids


def route_expert_choice_reference(
    logits: Any, *, capacity: int | None = None, capacity_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """`route_expert_choice` in float64 NumPy: (weights [E, C] float64, token_ids [E, C] int32)."""
    logits = np.asarray(logits)
    _, num_experts, cap = _expert_choice_capacity(logits, capacity, capacity_factor)
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    scores = e / e.sum(axis=1, keepdims=True)
    weights = np.zeros((num_experts, cap))
    tokens = np.zeros((num_experts, cap), dtype=np.int32)
    for ex in range(num_experts):
        chosen = _np_order_desc(scores[:, ex])[:cap]
        weights[ex], tokens[ex] = scores[chosen, ex], chosen
    return weights, tokens


# --------------------------------------------------------------------------------------------------
# routers: JAX


def _topk_lower_id(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k along the last axis, best first, the lower index first among equal values."""
    neg = -values + 0.0  # + 0.0 turns -0.0 into +0.0 so that the two compare equal in the sort
    iota = lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    neg_sorted, idx = lax.sort((neg, iota), dimension=values.ndim - 1, num_keys=2)
    return -neg_sorted[..., :k], idx[..., :k]


@functools.partial(
    jax.jit,
    static_argnames=("top_k", "scoring", "renormalize", "n_group", "topk_group", "routed_scaling_factor"),
)
def _route(logits, bias, *, top_k, scoring, renormalize, n_group, topk_group, routed_scaling_factor):
    z = logits.astype(jnp.float32)
    scores = jax.nn.softmax(z, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(z)
    choice = lax.stop_gradient(scores if bias is None else scores + bias.astype(jnp.float32))
    num_tokens, num_experts = z.shape
    if n_group is not None:
        size = num_experts // n_group
        grouped = choice.reshape(num_tokens, n_group, size)
        best, _ = _topk_lower_id(grouped, min(2, size))
        _, kept = _topk_lower_id(best.sum(-1), topk_group)
        allowed = jnp.zeros((num_tokens, n_group), bool).at[jnp.arange(num_tokens)[:, None], kept].set(True)
        allowed = jnp.repeat(allowed, size, axis=1)
        choice = jnp.where(allowed, choice, -jnp.inf)
    _, ids = _topk_lower_id(choice, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdims=True) + _RENORM_EPS)
    return weights * jnp.float32(routed_scaling_factor), ids


def route(
    logits: jax.Array,
    *,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: jax.Array | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Token-choice top-k routing. logits: [T, E] -> (weights [T, k] float32, expert_ids [T, k] int32).

    scoring: "softmax" over experts or elementwise "sigmoid". bias: [E], added to the scores for the
    selection only. n_group/topk_group: group-limited selection (DeepSeek-V3). renormalize: divide the
    chosen scores by their sum (+1e-20). The weights are multiplied by routed_scaling_factor last.
    Differentiable with respect to logits through the weights (the selection is piecewise constant).
    """
    validate_route_inputs(
        logits, top_k=top_k, scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group
    )
    return _route(
        logits,
        bias,
        top_k=int(top_k),
        scoring=scoring,
        renormalize=bool(renormalize),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(routed_scaling_factor),
    )


def _expert_choice_capacity(
    logits: Any, capacity: int | None, capacity_factor: float
) -> tuple[int, int, int]:
    shape = tuple(logits.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"logits.shape={shape} must be [T, E] with T, E >= 1")
    num_tokens, num_experts = shape
    if capacity is None:
        if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
            raise ValueError(f"capacity_factor={capacity_factor} must be a positive number")
        capacity = max(1, math.ceil(capacity_factor * num_tokens / num_experts - 1e-9))
    if not 1 <= capacity <= num_tokens:
        raise ValueError(f"capacity={capacity} must be in [1, T={num_tokens}]")
    if _is_concrete(logits) and np.isnan(np.asarray(logits, dtype=np.float32)).any():
        raise ValueError("logits contain NaN")
    return num_tokens, num_experts, int(capacity)


def route_expert_choice(
    logits: jax.Array, *, capacity: int | None = None, capacity_factor: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Expert-choice routing. logits: [T, E] -> (weights [E, C] float32, token_ids [E, C] int32).

    Scores are the softmax over experts of each token; expert e takes the C tokens with the highest
    score for e (lower token id first among equals), C = capacity or max(1, ceil(capacity_factor·T/E)).
    A token may be taken by several experts or by none. The layer output is
    y[token_ids[e, c]] += weights[e, c] · FFN_e(x[token_ids[e, c]]).
    """
    _, _, cap = _expert_choice_capacity(logits, capacity, capacity_factor)
    return _route_expert_choice(logits, capacity=cap)


@functools.partial(jax.jit, static_argnames=("capacity",))
def _route_expert_choice(logits, *, capacity):
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, tokens = _topk_lower_id(lax.stop_gradient(scores).T, capacity)
    return jnp.take_along_axis(scores.T, tokens, axis=-1), tokens


def load_balancing_loss(logits: jax.Array, expert_ids: jax.Array) -> jax.Array:
    """Switch auxiliary loss E · Σ_i f_i · P_i -> float32 scalar; 1.0 when perfectly balanced.

    f_i: fraction of the T·k assignments routed to expert i (not differentiable); P_i: mean over tokens
    of softmax(logits)[:, i] (differentiable). HF Mixtral's version equals top_k times this value.
    """
    if len(logits.shape) != 2:
        raise ValueError(f"logits.shape={tuple(logits.shape)} must be [T, E]")
    validate_routing(None, expert_ids, logits.shape[1], logits.shape[0])
    return _load_balancing_loss(logits, expert_ids)


@jax.jit
def _load_balancing_loss(logits, expert_ids):
    num_experts = logits.shape[1]
    counts = jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(1.0)
    frac = counts / expert_ids.size
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).mean(0)
    return num_experts * jnp.sum(frac * prob)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits[t])² -> float32 scalar."""
    if len(logits.shape) != 2:
        raise ValueError(f"logits.shape={tuple(logits.shape)} must be [T, E]")
    return _router_z_loss(logits)


@jax.jit
def _router_z_loss(logits):
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


# --------------------------------------------------------------------------------------------------
# dispatch / combine
