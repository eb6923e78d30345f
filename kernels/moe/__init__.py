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
Expert ids outside [0, E): an eager call raises a ValueError naming them; under `jax.jit`, where values
cannot be checked, every strategy (and every implementation) drops such an assignment: it contributes zero,
like a capacity drop, and takes no expert's capacity.

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
  it computes every expert on every row, with masked rows, so the weights of experts without rows are
  zeroed first: 0 · Inf would otherwise reach every output). Under `jax.vmap` it runs once per batch
  element (JAX cannot batch `ragged_dot` over shared experts).
- "batched": padded layout, one batched einsum over [E, C, d]; the capacity-mode strategy everywhere
  (dropless it needs C = A, E times the work: a test oracle).
- "dense": every expert on every token, each output selected (not multiplied by a zero gate) for the
  tokens routed to it: the simplest formulation, a test oracle.
- "xla": with a capacity, "batched"; dropless, on the CPU "bucketed" for E <= BUCKETED_MAX_EXPERTS (few
  large experts: XLA on the CPU copies a dynamically indexed expert's weights before its GEMM, which costs
  more than padding rows) and "grouped" for more (many small experts); on a TPU "grouped"
  (`kernels.moe.xla.TPU_STRATEGY`: XLA's TPU `ragged_dot` computes every expert on every row by default,
  and "bucketed" compiles 5-9x slower there); on GPUs "ragged". bf16/f16 `ragged_dot`s
  ask for DEFAULT precision (HIGHEST only for float32 operands), which XLA's Mosaic ragged-dot kernel on
  TPUs needs.
- "cpu_native" (cpu_native.py): the grouped plan with its forward in the native C++ kernel
  (kernels/cpu/moe_ffn*.cc: each touched expert's weights read in place) and the grouped loop's backward;
  float32 x and experts, CPU only.
- "pallas_triton" (pallas_triton.py): the Pallas Triton grouped GEMMs for GPUs (interpreted on the CPU);
  "pallas" is the platform's Pallas kernel.
- "auto": the registry's per-platform choice at lowering: on the CPU "cpu_native" for float32 dropless
  calls where `kernels.cpu.fast_enough("moe_ffn")` (on AVX2 up to NATIVE_MAX_TOKENS tokens, where it was
  measured to win), on cuda/rocm the Pallas kernel for the experts it takes; otherwise "xla".
The strategies are the XLA path's `Config(strategy=...)` (`kernels.moe.xla.Config`, with the grouped loop's
`row_align` and `block_rows`); each strategy's name is also an `impl`.
Quantized experts: w_gate, w_up and w_down may each be a stack of `quant.Int4Weight` (leaves with a
leading expert axis, e.g. `jax.tree.map(jnp.stack, *experts)`); every expert matmul then runs through
`kernels.int4_matmul`. "auto"/"xla" use "grouped" on every backend (only the experts that have rows are
read; with a capacity, "batched", vmapped over experts); "dense" dequantizes every expert first (an
oracle). "bucketed" and "ragged" need float weights and refuse. Gradients reach x, the routing weights and
each expert's float fields (scales, act_scales) through int4_matmul's VJP (the Pallas kernel keeps its
quantized experts frozen: zero gradient for them). `moe_ffn_reference` compares against the dequantized
experts.

Modules: routing.py (routers, losses, their references), dispatch.py (plan, dispatch, combine, capacity),
reference.py (validation and the NumPy FFN reference), xla.py (the strategies above), cpu_native.py (the
native forward), pallas_triton.py (the GPU kernels); `impl="reference"` runs the NumPy reference through
`moe_ffn` (eagerly).

Sources: HF transformers MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, DeepseekV3TopkRouter;
DeepSeek-V3 technical report (arXiv 2412.19437) §2.1.2; Switch Transformers (arXiv 2101.03961);
ST-MoE (arXiv 2202.08906) for the z-loss; GShard (arXiv 2006.16668) for capacity; expert choice
(arXiv 2202.09368); MegaBlocks (arXiv 2211.15841) for dropless sort/gather/scatter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kernels import registry
from kernels.cost import Cost, itemsize
from kernels.moe.dispatch import (
    DROP_PRIORITIES,
    LAYOUTS,
    DispatchPlan,
    combine,
    dispatch,
    dispatch_plan,
    expert_capacity,
)
from kernels.moe.reference import (
    FLOAT_ONLY_IMPLS,
    dequantize_experts,
    moe_ffn_reference,
    validate_moe_ffn_inputs,
)
from kernels.moe.routing import (
    SCORINGS,
    load_balancing_loss,
    route,
    route_expert_choice,
    route_expert_choice_reference,
    route_reference,
    router_z_loss,
    validate_route_inputs,
)
from kernels.moe.xla import BUCKET_FACTORS, BUCKETED_MAX_EXPERTS

__all__ = [
    "BUCKETED_MAX_EXPERTS",
    "BUCKET_FACTORS",
    "DROP_PRIORITIES",
    "FLOAT_ONLY_IMPLS",
    "LAYOUTS",
    "SCORINGS",
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
    config: Any = None,
) -> jax.Array:
    """The SwiGLU MoE FFN: x [T, d] -> y [T, d] (x.dtype), dropless unless capacity_factor is given.

    weights: [T, k] float, expert_ids: [T, k] int, w_gate/w_up: [E, d, f], w_down: [E, f, d].
    capacity_factor: C = expert_capacity(T, E, k, capacity_factor) rows per expert; assignments past
    C in drop_priority order ("choice", "token" or "weight") contribute zero. impl: see the module
    docstring. config: the Config of the implementation it tunes (`kernels.moe.xla.Config(strategy,
    row_align, block_rows)`, `...cpu_native.Config`, `...pallas_triton.Config(block_m, block_n, block_k)`).
    Differentiable with respect to x, weights, float expert weights and Int4Weight experts' scales (reverse
    mode; not in the Pallas kernel); empty experts get zero gradients and touch no output. Vmappable over x,
    weights and expert_ids. T = 0 gives the empty result.
    """
    validate_moe_ffn_inputs(
        x, weights, expert_ids, w_gate, w_up, w_down, capacity_factor=capacity_factor,
        drop_priority=drop_priority, impl=impl,
    )  # fmt: skip
    if x.shape[0] == 0:  # no tokens (normal in a serving loop): the empty result, whatever the implementation
        return jnp.zeros(x.shape, x.dtype)
    return registry.dispatch(
        "moe_ffn", impl, x, weights, expert_ids, w_gate, w_up, w_down,
        capacity_factor=capacity_factor, drop_priority=drop_priority, config=config,
    )  # fmt: skip


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
