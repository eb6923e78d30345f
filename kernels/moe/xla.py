"""Mixture-of-experts: routers, dispatch/combine, and the SwiGLU expert FFN.

Formula. A router turns logits [T, E] into k (weight, expert) pairs per token; the MoE FFN is

    y[t] = Σ_j weights[t, j] · FFN_{expert_ids[t, j]}(x[t])
    FFN_e(v) = (silu(v · w_gate[e]) ⊙ (v · w_up[e])) · w_down[e]          (SwiGLU, no biases)

with a dropped assignment (capacity mode) contributing zero.

Axis legend: `T` tokens, `E` experts, `k` experts per token (top_k), `A = T·k` assignments, `d` model
width, `f` expert hidden width, `G` expert groups, `C` capacity (rows per expert), `R` rows of a
dispatched buffer.

Layouts.
    logits: [T, E] any float          weights: [T, k] float32        expert_ids: [T, k] int32
    x: [T, d] float32|bfloat16|float16
    w_gate, w_up: [E, d, f]           w_down: [E, f, d]               (same float dtype as x)
An assignment is the pair (t, j); its flat index is t·k + j.

Routers (`route`), matching the released models:
- Mixtral: softmax over E, top-k, renormalize (= softmax over the k chosen logits).
- Qwen3-MoE: the same; `renormalize` is the config's `norm_topk_prob` (the released 30B-A3B sets it, the
  config class defaults to False).
- DeepSeek-V3: sigmoid scores; `bias` (e_score_correction_bias) is added for *selection only*; experts
  are split into `n_group` contiguous groups, a group scores the sum of its two best biased scores
  (its one score when groups hold a single expert),
  only the best `topk_group` groups stay eligible (the others are masked with -inf, so a negative
  biased score in an eligible group still beats a masked one; HF transformers masks with 0.0, which
  differs exactly there); weights are the *unbiased* scores of the chosen experts, renormalized by
  (sum + 1e-20) and multiplied by `routed_scaling_factor`.
- Switch Transformer: top_k=1, renormalize=False (the weight is the top softmax probability).
- Expert choice (Zhou et al. 2022, `route_expert_choice`): each expert takes its C best tokens by
  softmax-over-experts score.
Ties: the lower expert id wins everywhere (the lower group id for groups, the lower token id in expert
choice). Selection sorts on the explicit key (-score, id), so this does not depend on a backend's
top_k; -0.0 is canonicalized to +0.0 first. Experts are returned best first.

Auxiliary losses: `load_balancing_loss` = E · Σ_i f_i · P_i (Switch), with f_i the fraction of the T·k
assignments sent to expert i (so a perfectly balanced router scores 1 for every k; HF Mixtral's
`load_balancing_loss_func` counts fractions of tokens and equals k times this) and P_i the mean
softmax probability of expert i; `router_z_loss` = mean_t logsumexp(logits[t])² (ST-MoE).

Dispatch (MegaBlocks-style, dropless by default). Assignments are ordered by drop priority, stably
sorted by expert, and each gets a row in a dispatched buffer xs: [R, d]:
- layout "packed": expert groups back to back, each padded to a multiple of `row_align` rows
  (R = A + E·(row_align - 1));
- layout "padded": expert e owns rows [e·C, (e+1)·C) (R = E·C), i.e. xs.reshape(E, C, d) is the
  batched-matmul operand.
Padding rows read token T, i.e. zeros. With a capacity C, an expert keeps only its first C
assignments in priority order; `drop_priority`:
- "choice" (default, GShard/Switch): every token's first choice before any second choice, and so on;
  within one choice rank, earlier tokens first;
- "token": earlier tokens first, all of a token's choices together;
- "weight": higher routing weight first (batch-prioritized routing, Riquelme et al. 2021), ties by
  choice rank then token.
`moe_ffn(capacity_factor=cf)` uses C = max(1, ceil(cf · T · k / E)) (`expert_capacity`).

FFN strategies (`impl`):
- "grouped": packed layout; a loop over the non-empty experts, each expert's rows in blocks of
  `block_rows` plus a binary decomposition of the remainder down to `row_align` rows, every block a
  plain dense GEMM chain. Work ∝ rows actually routed; fastest on the CPU. Its gradient is a
  custom VJP that runs the same loop backwards (empty experts get exact zero gradients).
- "bucketed": dropless "batched" at the smallest of a few static capacities (the balanced load
  T·k/E times BUCKET_FACTORS, 1 to 2, rounded up to row_align) that holds the busiest expert, picked
  at run time by `lax.switch`; "grouped" when even 2x the balanced load is exceeded. No weight copies
  near balance; work ∝ E · capacity.
- "ragged": `jax.lax.ragged_dot` on the packed layout: the grouped GEMM of GPUs and TPUs (on the CPU
  it computes every expert on every row).
- "batched": padded layout, one batched einsum over [E, C, d]; the capacity-mode strategy everywhere
  (dropless it needs C = A, E times the work: a test oracle).
- "dense": every expert on every token, masked: the simplest formulation, a test oracle.
- "xla" / "auto": with a capacity, "batched"; dropless, "ragged" on GPU/TPU and on the CPU "bucketed"
  for E <= BUCKETED_MAX_EXPERTS (few large experts: XLA on the CPU copies a dynamically indexed
  expert's weights before its GEMM, which costs more than padding rows) and "grouped" for more (many
  small experts), chosen at lowering by `jax.lax.platform_dependent` so one jitted function exports
  for cpu, cuda, rocm and tpu.
Quantized experts: w_gate, w_up and w_down may each be a stack of `quant.Int4Weight` (leaves with a
leading expert axis, e.g. `jax.tree.map(jnp.stack, *experts)`); every expert matmul then runs through
`kernels.int4_matmul`. "auto"/"xla" use "grouped" on every backend (only the experts that have rows are
read; with a capacity, "batched", vmapped over experts); "dense" dequantizes every expert first (an
oracle). "bucketed" and "ragged" need float weights and refuse. The experts are frozen: gradients reach
x and the routing weights. `moe_ffn_reference` compares against the dequantized experts.

Sources: HF transformers MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, DeepseekV3TopkRouter;
DeepSeek-V3 technical report (arXiv 2412.19437) §2.1.2; Switch Transformers (arXiv 2101.03961);
ST-MoE (arXiv 2202.08906) for the z-loss; GShard (arXiv 2006.16668) for capacity; expert choice
(arXiv 2202.09368); MegaBlocks (arXiv 2211.15841) for dropless sort/gather/scatter.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels.int4_matmul import int4_matmul, zero_cotangent
from quant.format import Int4Weight, codes_per_byte, dequantize_reference
from roofline.counters import Cost, itemsize

__all__ = [
    "DispatchPlan",
    "combine",
    "dequantize_experts",
    "dispatch",
    "dispatch_plan",
    "expert_capacity",
    "load_balancing_loss",
    "moe_ffn",
    "moe_ffn_cost",
    "moe_ffn_reference",
    "route",
    "route_expert_choice",
    "route_expert_choice_reference",
    "route_reference",
    "router_z_loss",
    "validate_moe_ffn_inputs",
    "validate_route_inputs",
]

SCORINGS = ("softmax", "sigmoid")
DROP_PRIORITIES = ("choice", "token", "weight")
LAYOUTS = ("packed", "padded")
IMPLS = ("auto", "xla", "grouped", "bucketed", "ragged", "batched", "dense")
# Strategies that take stacks of Int4Weight experts (ragged_dot and the bucketed switch need float weights).
QUANTIZED_IMPLS = ("auto", "xla", "grouped", "batched", "dense")
_RENORM_EPS = 1e-20


# --------------------------------------------------------------------------------------------------
# validation


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


def _validate_routing(weights: Any, expert_ids: Any, num_experts: int, num_tokens: int | None) -> None:
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


def _validate_capacity_args(capacity: int | None, drop_priority: str) -> None:
    if capacity is not None and (not isinstance(capacity, (int, np.integer)) or capacity < 1):
        raise ValueError(f"capacity={capacity} must be a positive int or None")
    if drop_priority not in DROP_PRIORITIES:
        raise ValueError(f"drop_priority={drop_priority!r} must be one of {DROP_PRIORITIES}")


def validate_moe_ffn_inputs(
    x: Any,
    weights: Any,
    expert_ids: Any,
    w_gate: Any,
    w_up: Any,
    w_down: Any,
    *,
    capacity_factor: float | None = None,
    drop_priority: str = "choice",
    impl: str = "auto",
) -> None:
    """Static checks for `moe_ffn`/`moe_ffn_reference` (and expert id range when concrete)."""
    if len(x.shape) != 2:
        raise ValueError(f"x.shape={tuple(x.shape)} must be [T, d]")
    num_tokens = x.shape[0]
    quantized = [isinstance(w, Int4Weight) for w in (w_gate, w_up, w_down)]
    if any(quantized):
        if not all(quantized):
            raise ValueError("w_gate, w_up and w_down must all be Int4Weight stacks, or all float arrays")
        _validate_quantized_experts(x, w_gate, w_up, w_down)
        num_experts = _expert_dims(w_gate)[0]
        if impl not in QUANTIZED_IMPLS:
            raise ValueError(f"impl={impl!r} does not take Int4Weight experts; use one of {QUANTIZED_IMPLS}")
    else:
        _validate_float_experts(x, w_gate, w_up, w_down)
        num_experts = w_gate.shape[0]
    _validate_routing(weights, expert_ids, num_experts, num_tokens)
    if capacity_factor is not None and not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor={capacity_factor} must be a positive number or None")
    _validate_capacity_args(None, drop_priority)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")


def _validate_float_experts(x: Any, w_gate: Any, w_up: Any, w_down: Any) -> None:
    d = x.shape[1]
    if len(w_gate.shape) != 3:
        raise ValueError(f"w_gate.shape={tuple(w_gate.shape)} must be [E, d, f]")
    num_experts, dg, f = w_gate.shape
    if dg != d:
        raise ValueError(f"w_gate.shape={tuple(w_gate.shape)} must be [E, d={d}, f]")
    if tuple(w_up.shape) != tuple(w_gate.shape):
        raise ValueError(f"w_up.shape={tuple(w_up.shape)} must equal w_gate.shape={tuple(w_gate.shape)}")
    if tuple(w_down.shape) != (num_experts, f, d):
        raise ValueError(f"w_down.shape={tuple(w_down.shape)} must be [E, f, d]=({num_experts}, {f}, {d})")
    for name, a in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={a.dtype} must be a floating type")
    if not (w_gate.dtype == w_up.dtype == w_down.dtype):
        raise ValueError(f"w_gate/w_up/w_down dtypes {w_gate.dtype}/{w_up.dtype}/{w_down.dtype} must match")


def _expert_dims(w: Int4Weight) -> tuple[int, int, int]:
    """(E, K, N) of a stack of Int4Weight experts (leaves with a leading expert axis)."""
    if w.packed.ndim != 3:
        raise ValueError(f"an Int4Weight expert stack needs packed [E, R, N]; got {tuple(w.packed.shape)}")
    e, r, n = w.packed.shape
    return e, r * codes_per_byte(w.bits), n


def _validate_quantized_experts(x: Any, w_gate: Int4Weight, w_up: Int4Weight, w_down: Int4Weight) -> None:
    d = x.shape[1]
    e, dg, f = _expert_dims(w_gate)
    if dg != d:
        raise ValueError(f"w_gate is [E, {dg}, f] but x has d={d}")
    if _expert_dims(w_up) != (e, d, f):
        raise ValueError(f"w_up is {list(_expert_dims(w_up))}; it must match w_gate's [E, d, f]={[e, d, f]}")
    if _expert_dims(w_down) != (e, f, d):
        raise ValueError(f"w_down is {list(_expert_dims(w_down))}; it must be [E, f, d]={[e, f, d]}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x.dtype={x.dtype} must be a floating type")


def _num_experts(w: Any) -> int:
    return _expert_dims(w)[0] if isinstance(w, Int4Weight) else w.shape[0]


def _expert(w: Any, e: Any) -> Any:
    """Expert e of a stack: an array slice, or an Int4Weight built from its leaves' slices."""
    return jax.tree.map(lambda a: a[e], w)


def dequantize_experts(w: Int4Weight) -> np.ndarray:
    """Layout bridge: a stack of Int4Weight experts -> float64 [E, K, N] (the format's own oracle)."""
    return np.stack([dequantize_reference(_expert(w, e)) for e in range(_expert_dims(w)[0])])


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Rows per expert in capacity mode: max(1, ceil(capacity_factor · T · k / E))."""
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor={capacity_factor} must be a positive number")
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts - 1e-9))


# --------------------------------------------------------------------------------------------------
# routers: NumPy references


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
    _validate_routing(None, expert_ids, logits.shape[1], logits.shape[0])
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
    _validate_routing(weights, expert_ids, num_experts, None)
    _validate_capacity_args(capacity, drop_priority)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if not isinstance(row_align, (int, np.integer)) or row_align < 1:
        raise ValueError(f"row_align={row_align} must be a positive int")
    if layout == "padded" and row_align != 1:
        raise ValueError(f"row_align={row_align} applies to layout='packed' only")
    return _dispatch_plan(
        expert_ids,
        weights,
        num_experts=int(num_experts),
        capacity=capacity,
        drop_priority=drop_priority,
        layout=layout,
        row_align=int(row_align),
    )


def _dispatch_plan(
    expert_ids, weights, *, num_experts, capacity, drop_priority, layout, row_align, min_rows=0
):
    # min_rows: a lower bound on R, so that static-size blocks always fit in the buffer.
    num_tokens, top_k = expert_ids.shape
    num_assign = num_tokens * top_k
    ids = expert_ids.reshape(-1).astype(jnp.int32)
    flat = jnp.arange(num_assign, dtype=jnp.int32)
    # Sort by (expert, priority...): a stable lexicographic sort, so ranks within an expert follow the
    # drop priority exactly.
    keys = _priority_keys(
        expert_ids, lax.stop_gradient(weights) if weights is not None else None, drop_priority
    )
    *_, order = lax.sort((ids, *keys, flat), num_keys=1 + len(keys))
    sorted_ids = ids[order]
    counts = jnp.zeros((num_experts,), jnp.int32).at[ids].add(1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(num_assign, dtype=jnp.int32) - starts[sorted_ids]
    rank = jnp.zeros((num_assign,), jnp.int32).at[order].set(rank_sorted)
    cap = num_assign if capacity is None else int(capacity)
    keep = rank < cap
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


def _gather_rows(x, row_token):
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
    return _gather_rows(x, plan.row_token), plan


def combine(ys: jax.Array, weights: jax.Array, plan: DispatchPlan) -> jax.Array:
    """ys: [R, d] expert outputs, weights: [T, k] -> y [T, d] = Σ_j weights[t, j] · ys[position[t, j]].

    Dropped assignments read zero. Accumulates in float32 and returns ys.dtype.
    """
    if tuple(weights.shape) != tuple(plan.position.shape):
        raise ValueError(f"weights.shape={tuple(weights.shape)} must equal {tuple(plan.position.shape)}")
    if ys.shape[0] != plan.row_token.shape[0]:
        raise ValueError(f"ys.shape={tuple(ys.shape)} must have R={plan.row_token.shape[0]} rows")
    return _combine(ys, weights, plan.position)


def _combine(ys, weights, position):
    rows = jnp.take(ys, position, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    return jnp.einsum("tk,tkd->td", weights.astype(jnp.float32), rows).astype(ys.dtype)


# --------------------------------------------------------------------------------------------------
# the expert FFN: NumPy reference


def _np_keep_mask(weights, expert_ids, num_experts, capacity, drop_priority) -> np.ndarray:
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


def moe_ffn_reference(
    x: Any,
    weights: Any,
    expert_ids: Any,
    w_gate: Any,
    w_up: Any,
    w_down: Any,
    *,
    capacity_factor: float | None = None,
    drop_priority: str = "choice",
    compute_dtype: Any = np.float64,
) -> np.ndarray:
    """The MoE FFN as a NumPy loop over experts, in compute_dtype (float64 by default) -> y [T, d]."""
    x, weights, expert_ids = np.asarray(x), np.asarray(weights), np.asarray(expert_ids)
    if isinstance(w_gate, Int4Weight):  # quantized experts: compare against the dequantized weights
        validate_moe_ffn_inputs(
            x,
            weights,
            expert_ids,
            w_gate,
            w_up,
            w_down,
            capacity_factor=capacity_factor,
            drop_priority=drop_priority,
        )
        w_gate, w_up, w_down = (dequantize_experts(w) for w in (w_gate, w_up, w_down))
    w_gate, w_up, w_down = np.asarray(w_gate), np.asarray(w_up), np.asarray(w_down)
    validate_moe_ffn_inputs(
        x,
        weights,
        expert_ids,
        w_gate,
        w_up,
        w_down,
        capacity_factor=capacity_factor,
        drop_priority=drop_priority,
    )
    num_tokens, top_k = expert_ids.shape
    num_experts = w_gate.shape[0]
    capacity = None
    if capacity_factor is not None:
        capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
    keep = _np_keep_mask(weights, expert_ids, num_experts, capacity, drop_priority)
    xc = x.astype(compute_dtype)
    y = np.zeros((num_tokens, x.shape[1]), dtype=compute_dtype)
    for e in range(num_experts):
        tok, slot = np.nonzero((expert_ids == e) & keep)
        if tok.size == 0:
            continue
        v = xc[tok]
        g = v @ w_gate[e].astype(compute_dtype)
        h = g / (1.0 + np.exp(-g)) * (v @ w_up[e].astype(compute_dtype))
        out = h @ w_down[e].astype(compute_dtype)
        np.add.at(y, tok, weights[tok, slot].astype(compute_dtype)[:, None] * out)
    return y


# --------------------------------------------------------------------------------------------------
# the expert FFN: JAX strategies


def _swiglu(v, wg, wu, wd):
    """One expert on a block of rows v: [n, d] -> [n, d] float32 (float32 accumulation)."""
    if isinstance(wg, Int4Weight):
        v = v.astype(jnp.float32)
        h = jax.nn.silu(int4_matmul(v, wg)) * int4_matmul(v, wu)
        return int4_matmul(h, wd)
    g = jnp.dot(v, wg, preferred_element_type=jnp.float32)
    u = jnp.dot(v, wu, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(wd.dtype)
    return jnp.dot(h, wd, preferred_element_type=jnp.float32)


def _block_sizes(block_rows: int, row_align: int) -> list[int]:
    """Remainder block sizes, largest first: block_rows/2, block_rows/4, ..., row_align."""
    sizes, s = [], block_rows // 2
    while s >= row_align:
        sizes.append(s)
        s //= 2
    return sizes


def _for_each_block(sizes, offsets, row_align, block_rows, init, expert_init, block_fn, expert_done):
    """Drive a loop over the non-empty experts and their row blocks (static block sizes).

    For expert e with padded size p (a multiple of row_align): p // block_rows full blocks, then the
    binary decomposition of the remainder. block_fn(state, local, e, row0, n) -> (state, local) with a
    static n; expert_init(e) -> local; expert_done(state, local, e) -> state.
    """
    num_experts = sizes.shape[0]
    padded = (sizes + row_align - 1) // row_align * row_align
    active = jnp.nonzero(sizes > 0, size=num_experts, fill_value=0)[0].astype(jnp.int32)
    n_active = jnp.sum(sizes > 0).astype(jnp.int32)

    def per_expert(i, state):
        e = active[i]
        off, p = offsets[e], padded[e]
        local = expert_init(e)
        n_full = p // block_rows

        def full(j, carry):
            return block_fn(*carry, e, off + j * block_rows, block_rows)

        state, local = lax.fori_loop(0, n_full, full, (state, local))
        row = off + n_full * block_rows
        rem = p - n_full * block_rows
        for n in _block_sizes(block_rows, row_align):

            def take(carry, row=row, n=n):
                return block_fn(*carry, e, row, n)

            state, local = lax.cond((rem & n) != 0, take, lambda carry: carry, (state, local))
            row = row + jnp.where((rem & n) != 0, n, 0)
        return expert_done(state, local, e)

    return lax.fori_loop(0, n_active, per_expert, init)


def _grouped_fwd_impl(xs, sizes, offsets, wg, wu, wd, row_align, block_rows):
    out0 = jnp.zeros(xs.shape, jnp.float32)

    def expert_init(e):
        return (_expert(wg, e), _expert(wu, e), _expert(wd, e))

    def block_fn(out, w, e, row0, n):
        v = lax.dynamic_slice_in_dim(xs, row0, n)
        return lax.dynamic_update_slice_in_dim(out, _swiglu(v, *w), row0, 0), w

    return _for_each_block(
        sizes, offsets, row_align, block_rows, out0, expert_init, block_fn, lambda out, w, e: out
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _grouped_ffn(xs, sizes, offsets, wg, wu, wd, row_align, block_rows):
    return _grouped_fwd_impl(xs, sizes, offsets, wg, wu, wd, row_align, block_rows)


def _grouped_ffn_fwd(xs, sizes, offsets, wg, wu, wd, row_align, block_rows):
    out = _grouped_fwd_impl(xs, sizes, offsets, wg, wu, wd, row_align, block_rows)
    return out, (xs, sizes, offsets, wg, wu, wd)


def _grouped_ffn_bwd(row_align, block_rows, res, d_out):
    xs, sizes, offsets, wg, wu, wd = res
    f32 = jnp.float32
    init = (
        jnp.zeros(xs.shape, f32),
        jnp.zeros(wg.shape, f32),
        jnp.zeros(wu.shape, f32),
        jnp.zeros(wd.shape, f32),
    )

    def expert_init(e):
        w = (wg[e], wu[e], wd[e])
        acc = (jnp.zeros(wg.shape[1:], f32), jnp.zeros(wu.shape[1:], f32), jnp.zeros(wd.shape[1:], f32))
        return w, acc

    def block_fn(state, local, e, row0, n):
        dxs, dwg, dwu, dwd = state
        w, acc = local
        v = lax.dynamic_slice_in_dim(xs, row0, n)
        dy = lax.dynamic_slice_in_dim(d_out, row0, n)
        _, vjp = jax.vjp(_swiglu, v, *w)
        dv, *dw = vjp(dy)
        dxs = lax.dynamic_update_slice_in_dim(dxs, dv.astype(f32), row0, 0)
        acc = tuple(a + b.astype(f32) for a, b in zip(acc, dw, strict=True))
        return (dxs, dwg, dwu, dwd), (w, acc)

    def expert_done(state, local, e):
        dxs, *dws = state
        _, acc = local
        dws = [lax.dynamic_update_index_in_dim(dw, a, e, 0) for dw, a in zip(dws, acc, strict=True)]
        return (dxs, *dws)

    dxs, dwg, dwu, dwd = _for_each_block(
        sizes, offsets, row_align, block_rows, init, expert_init, block_fn, expert_done
    )
    return (
        dxs.astype(xs.dtype),
        None,
        None,
        dwg.astype(wg.dtype),
        dwu.astype(wu.dtype),
        dwd.astype(wd.dtype),
    )


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _grouped_ffn_quantized(xs, sizes, offsets, wg, wu, wd, row_align, block_rows):
    return _grouped_fwd_impl(xs, sizes, offsets, wg, wu, wd, row_align, block_rows)


def _grouped_ffn_quantized_fwd(xs, sizes, offsets, wg, wu, wd, row_align, block_rows):
    out = _grouped_fwd_impl(xs, sizes, offsets, wg, wu, wd, row_align, block_rows)
    return out, (xs, sizes, offsets, wg, wu, wd)


def _grouped_ffn_quantized_bwd(row_align, block_rows, res, d_out):
    """Quantized experts are frozen: the gradient reaches the rows (and, through combine, the routing
    weights and x), never the codes or scales."""
    xs, sizes, offsets, wg, wu, wd = res

    def expert_init(e):
        return (_expert(wg, e), _expert(wu, e), _expert(wd, e))

    def block_fn(dxs, w, e, row0, n):
        v = lax.dynamic_slice_in_dim(xs, row0, n)
        dy = lax.dynamic_slice_in_dim(d_out, row0, n)
        _, vjp = jax.vjp(lambda v: _swiglu(v, *w), v)
        (dv,) = vjp(dy)
        return lax.dynamic_update_slice_in_dim(dxs, dv.astype(jnp.float32), row0, 0), w

    dxs = _for_each_block(
        sizes, offsets, row_align, block_rows, jnp.zeros(xs.shape, jnp.float32), expert_init, block_fn,
        lambda dxs, w, e: dxs,
    )  # fmt: skip
    return (dxs.astype(xs.dtype), None, None, *(zero_cotangent(w) for w in (wg, wu, wd)))


_grouped_ffn_quantized.defvjp(_grouped_ffn_quantized_fwd, _grouped_ffn_quantized_bwd)


def _ffn_grouped(x, weights, expert_ids, wg, wu, wd, capacity, drop_priority, row_align, block_rows):
    plan = _dispatch_plan(
        expert_ids,
        weights,
        num_experts=_num_experts(wg),
        capacity=capacity,
        drop_priority=drop_priority,
        layout="packed",
        row_align=row_align,
        min_rows=block_rows,  # every block, a static size, must fit in the buffer
    )
    xs = _gather_rows(x, plan.row_token)
    ffn = _grouped_ffn_quantized if isinstance(wg, Int4Weight) else _grouped_ffn
    ys = ffn(xs, plan.group_sizes, plan.group_offsets, wg, wu, wd, row_align, block_rows)
    return _combine(ys, weights, plan.position).astype(x.dtype)


# Fine steps near balance, where realistic routing lands; past 2x the grouped loop is cheaper on the CPU.
BUCKET_FACTORS = (1.0, 1.0625, 1.125, 1.1875, 1.25, 1.3125, 1.375, 1.5, 1.625, 1.75, 2.0)
# "auto" on the CPU: the bucketed batched einsum for few, large experts (a weight copy per expert, which
# the grouped loop pays, costs more than padding rows); the grouped loop for many small experts.
BUCKETED_MAX_EXPERTS = 16


def _bucket_capacities(num_assign: int, num_experts: int, row_align: int) -> list[int]:
    """Static capacities for the "bucketed" strategy: the balanced load times BUCKET_FACTORS, rounded up
    to row_align, capped at num_assign, without repeats."""
    caps = []
    for s in BUCKET_FACTORS:
        c = math.ceil(num_assign / num_experts * s - 1e-9)
        c = min(num_assign, -(-c // row_align) * row_align)
        if c not in caps:
            caps.append(c)
    return caps


def _ffn_bucketed(x, weights, expert_ids, wg, wu, wd, drop_priority, row_align, block_rows):
    """Dropless: the batched einsum at the smallest static capacity that holds the busiest expert, or
    the grouped loop when none does. No weight copies while the routing is near balance."""
    num_experts = wg.shape[0]
    caps = _bucket_capacities(expert_ids.size, num_experts, row_align)
    counts = jnp.zeros((num_experts,), jnp.int32).at[expert_ids.reshape(-1)].add(1)
    index = jnp.sum(jnp.asarray(caps, jnp.int32) < jnp.max(counts))
    branches = [functools.partial(_ffn_batched, capacity=c, drop_priority=drop_priority) for c in caps] + [
        functools.partial(
            _ffn_grouped,
            capacity=None,
            drop_priority=drop_priority,
            row_align=row_align,
            block_rows=block_rows,
        )
    ]
    return lax.switch(index, branches, x, weights, expert_ids, wg, wu, wd)


def _ffn_ragged(x, weights, expert_ids, wg, wu, wd, capacity, drop_priority):
    plan = _dispatch_plan(
        expert_ids,
        weights,
        num_experts=wg.shape[0],
        capacity=capacity,
        drop_priority=drop_priority,
        layout="packed",
        row_align=1,
    )
    xs = _gather_rows(x, plan.row_token)
    sizes = plan.group_sizes
    g = lax.ragged_dot(xs, wg, sizes, preferred_element_type=jnp.float32)
    u = lax.ragged_dot(xs, wu, sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(wd.dtype)
    ys = lax.ragged_dot(h, wd, sizes, preferred_element_type=jnp.float32)
    return _combine(ys, weights, plan.position).astype(x.dtype)


def _ffn_batched(x, weights, expert_ids, wg, wu, wd, capacity, drop_priority):
    num_tokens, top_k = expert_ids.shape
    num_experts = _num_experts(wg)
    cap = num_tokens * top_k if capacity is None else capacity
    plan = _dispatch_plan(
        expert_ids,
        weights,
        num_experts=num_experts,
        capacity=cap,
        drop_priority=drop_priority,
        layout="padded",
        row_align=1,
    )
    xs = _gather_rows(x, plan.row_token).reshape(num_experts, cap, -1)
    if isinstance(wg, Int4Weight):
        ys = jax.vmap(_swiglu)(xs, wg, wu, wd)
        return _combine(ys.reshape(num_experts * cap, -1), weights, plan.position).astype(x.dtype)
    g = jnp.einsum("ecd,edf->ecf", xs, wg, preferred_element_type=jnp.float32)
    u = jnp.einsum("ecd,edf->ecf", xs, wu, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(wd.dtype)
    ys = jnp.einsum("ecf,efd->ecd", h, wd, preferred_element_type=jnp.float32)
    return _combine(ys.reshape(num_experts * cap, -1), weights, plan.position).astype(x.dtype)


def _ffn_dense(x, weights, expert_ids, wg, wu, wd, capacity, drop_priority):
    if isinstance(wg, Int4Weight):
        wg, wu, wd = (jax.vmap(lambda w: w.dequantize())(w) for w in (wg, wu, wd))
    num_experts = wg.shape[0]
    plan = _dispatch_plan(
        expert_ids,
        weights,
        num_experts=num_experts,
        capacity=capacity,
        drop_priority=drop_priority,
        layout="packed",
        row_align=1,
    )
    keep = plan.position < plan.row_token.shape[0]
    g = jnp.einsum("td,edf->etf", x, wg, preferred_element_type=jnp.float32)
    u = jnp.einsum("td,edf->etf", x, wu, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(wd.dtype)
    out = jnp.einsum("etf,efd->etd", h, wd, preferred_element_type=jnp.float32)
    onehot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)  # [T, k, E]
    gate = jnp.einsum("tk,tke->et", jnp.where(keep, weights.astype(jnp.float32), 0.0), onehot)
    return jnp.einsum("et,etd->td", gate, out).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("capacity", "drop_priority", "impl", "row_align", "block_rows"))
def _moe_ffn(x, weights, expert_ids, wg, wu, wd, *, capacity, drop_priority, impl, row_align, block_rows):
    args = (x, weights, expert_ids.astype(jnp.int32), wg, wu, wd)
    common = dict(capacity=capacity, drop_priority=drop_priority)
    grouped = functools.partial(_ffn_grouped, row_align=row_align, block_rows=block_rows, **common)
    ragged = functools.partial(_ffn_ragged, **common)
    bucketed = functools.partial(
        _ffn_bucketed, drop_priority=drop_priority, row_align=row_align, block_rows=block_rows
    )
    if impl == "bucketed" and capacity is not None:
        impl = "batched"
    if isinstance(wg, Int4Weight) and impl in ("auto", "xla"):
        # Quantized experts on every backend: the grouped loop reads only the experts that have rows.
        impl = "batched" if capacity is not None else "grouped"
    if impl in ("auto", "xla"):
        if capacity is not None:
            return _ffn_batched(*args, **common)
        cpu = bucketed if wg.shape[0] <= BUCKETED_MAX_EXPERTS else grouped
        return lax.platform_dependent(*args, cpu=cpu, default=ragged)
    if impl == "grouped":
        return grouped(*args)
    if impl == "bucketed":
        return bucketed(*args)
    if impl == "ragged":
        return ragged(*args)
    if impl == "batched":
        return _ffn_batched(*args, **common)
    return _ffn_dense(*args, **common)


def moe_ffn(
    x: jax.Array,
    weights: jax.Array,
    expert_ids: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    capacity_factor: float | None = None,
    drop_priority: str = "choice",
    impl: str = "auto",
    row_align: int = 8,
    block_rows: int = 64,
) -> jax.Array:
    """The SwiGLU MoE FFN: x [T, d] -> y [T, d] (x.dtype), dropless unless capacity_factor is given.

    weights: [T, k] float, expert_ids: [T, k] int, w_gate/w_up: [E, d, f], w_down: [E, f, d].
    capacity_factor: C = expert_capacity(T, E, k, capacity_factor) rows per expert; assignments past
    C in drop_priority order ("choice", "token" or "weight") contribute zero. impl: see the module
    docstring. row_align/block_rows (powers of two, row_align <= block_rows): the "grouped" strategy's
    row granularity and largest block. Differentiable with respect to x, weights and the expert
    weights; empty experts get zero gradients.
    """
    validate_moe_ffn_inputs(
        x, weights, expert_ids, w_gate, w_up, w_down, capacity_factor=capacity_factor,
        drop_priority=drop_priority, impl=impl,
    )  # fmt: skip
    for name, v in (("row_align", row_align), ("block_rows", block_rows)):
        if not isinstance(v, (int, np.integer)) or v < 1 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two")
    if row_align > block_rows:
        raise ValueError(f"row_align={row_align} must not exceed block_rows={block_rows}")
    num_tokens, top_k = expert_ids.shape
    capacity = None
    if capacity_factor is not None:
        capacity = expert_capacity(num_tokens, _num_experts(w_gate), top_k, capacity_factor)
    return _moe_ffn(
        x,
        weights,
        expert_ids,
        w_gate,
        w_up,
        w_down,
        capacity=capacity,
        drop_priority=drop_priority,
        impl=impl,
        row_align=int(row_align),
        block_rows=int(block_rows),
    )


# --------------------------------------------------------------------------------------------------
# cost


def moe_ffn_cost(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    d_model: int,
    d_ff: int,
    *,
    dtype: Any = "fp32",
    w_dtype: Any = None,
    experts_touched: float | None = None,
) -> Cost:
    """What the dropless MoE FFN must do at the least.

    FLOPs: three GEMMs of 2·d·f per assignment (T·k of them), plus silu and the gate product (3 per
    hidden element: sigmoid's multiply-add and two multiplies) and the weighted combine (2·d per
    assignment); one exp per hidden element. Bytes: the weights of the experts actually read
    (experts_touched, default the expectation under uniform routing E·(1 - (1 - k/E)^T)), x read once,
    the routing (weights float32 + ids int32) read once, y written once.
    """
    for name, v in (
        ("num_tokens", num_tokens),
        ("num_experts", num_experts),
        ("top_k", top_k),
        ("d_model", d_model),
        ("d_ff", d_ff),
    ):
        if v < 1:
            raise ValueError(f"{name}={v} must be at least 1")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must not exceed num_experts={num_experts}")
    w_dtype = dtype if w_dtype is None else w_dtype
    if experts_touched is None:
        experts_touched = num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)
    if not 0 <= experts_touched <= num_experts:
        raise ValueError(f"experts_touched={experts_touched} must be in [0, num_experts={num_experts}]")
    assign = num_tokens * top_k
    flops = assign * (3 * 2.0 * d_model * d_ff + 3.0 * d_ff + 2.0 * d_model)
    weight_bytes = experts_touched * 3 * d_model * d_ff * itemsize(w_dtype)
    act_bytes = num_tokens * d_model * itemsize(dtype) + assign * 8
    return Cost(
        flops=flops,
        bytes_read=weight_bytes + act_bytes,
        bytes_written=num_tokens * d_model * itemsize(dtype),
        transcendentals=float(assign * d_ff),
    )
