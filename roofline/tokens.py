"""The token-cost model: per-layer kernel costs -> step time -> tokens/s -> $ per million tokens.

For one forward step of a decoder at batch B (sequences) and context L (tokens in each sequence's KV cache,
the new one included), every component of every layer gets an analytic `Cost` (FLOPs and main-memory
bytes), and its time on a chip is its roofline bound:

    t_component = max(flops / chips / peak_flops[compute_dtype], bytes_per_chip / bandwidth)
    step_s      = Σ_components count × t_component + comm_s
    tokens/s    = B / step_s (decode; prefill processes B·L tokens per step)
    $/Mtok      = price_per_hour × chips / (tokens/s × 3600) × 1e6

Layout: chips = tp × ep. Attention, the dense MLPs, the router and lm_head are tensor parallel over tp chips
(Megatron-style: column- then row-parallel, so two all-reduces per layer), replicated over ep groups that
each take B / ep of the sequences; MoE experts are split over the ep groups (and tensor parallel inside
each). So a chip reads 1/tp of the dense weights, 1/chips of the experts and of the KV cache, and does
1/chips of the FLOPs. The default is tp = chips, ep = 1; then bytes_per_chip = bytes / chips.

Communication (comm_s), from each chip's link (`Chip.link_bandwidth` B per direction, `link_latency` α):
- tp > 1: per layer, two ring all-reduces (after attention and after the MLP or MoE) of the group's
  activations, S = (tokens / ep) × hidden × 2 bytes: α + 2 (tp − 1) / tp × S / B each.
- ep > 1, per MoE layer: two all-to-alls (dispatch to the experts' chips and combine back), each chip
  scattering S = (tokens / ep) × top_k × hidden × 2 bytes: α + (ep − 1) / ep × S / B each.
Not modelled: overlap of collectives with compute, lm_head's logit gather, the embedding, replication of
kv heads when tp exceeds them (the estimate notes it), and topology beyond one switch or torus (one node).

A `tp` given explicitly must split the model (`check_tensor_parallel`): the query heads, the kv heads
(each chip holds a whole number of them, or tp is a multiple of them and each is replicated tp / K times),
and the FFN width of the dense MLPs and of each expert. A tp derived from `chips` or from the memory
footprint that cannot is kept, with a note that says so.

Components, per layer unless said: "qkv_proj" (q, k, v projections; MLA's q_a, q_b, kv_a, kv_b),
"attention" (over the KV cache), "o_proj", "mlp" (dense SwiGLU layers), "moe_router", "moe_experts"
(routed and shared), and "lm_head" (once per step). `measured` replaces any component's analytic time by
a measured one (seconds per occurrence, on one chip).

Assumptions, each a deliberate simplification:
- Every component is bound by one roof; there is no overlap between components, no launch overhead, no
  scheduler, sampling, embedding lookup or norm cost. The result is an upper bound on throughput.
- Activations are bf16 and read/written once per matmul; weights are read once per step.
- Weight formats: "fp32" (4 bytes; for CPU measurements), "bf16" (2 bytes), "int8" (1 byte + one fp16
  scale per output column), "int4" (½ byte + per group of `group_size` inputs and per output column an
  fp16 scale and a 4-bit zero point, as GPTQ/AWQ checkpoints store them; `group_size=None` is
  per-channel). Quantized weights are computed in
  `compute_dtype` (bf16 by default: W4A16 / W8A16). The router, the embedding and lm_head stay bf16, as
  quantizers leave them.
- KV formats: "bf16", "fp8" (one scale per tensor), "int8" (one fp16 scale per token and kv head), and
  "fp32" (for CPU measurements, where float32 pages run the native decode kernel).
- MoE at decode: each of the B tokens picks top_k of E experts independently and uniformly, so
  E·(1 − (1 − k/E)^B) distinct experts are read on average; shared experts are always read.
- MLA (DeepSeek-V3) decodes with the up-projections absorbed: attention reads kv_lora_rank +
  qk_rope_head_dim values per cached token, shared by all heads; prefill runs it unabsorbed.
- Several chips split the work as the layout above says; a chip without link figures (the host) gets no
  communication cost, and the estimate says so.
- Memory: weights (all layers, embedding and lm_head) plus the KV cache of B sequences of L tokens must
  fit in `mem_fraction` of the chips' memory (per chip, under the layout); otherwise the smallest
  power-of-two chip count that fits is used (or, with `chips`, `tp` or `ep` given, the estimate says it
  does not fit and how many chips, all tensor parallel, would).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from roofline.counters import Cost, itemsize
from roofline.hardware import Chip, get_chip
from roofline.models import MODELS, ModelShape, get_model

WEIGHT_FORMATS = ("bf16", "int8", "int4", "fp32")
KV_FORMATS = ("bf16", "fp8", "int8", "fp32")
PHASES = ("decode", "prefill")
COMPONENTS = ("qkv_proj", "attention", "o_proj", "mlp", "moe_router", "moe_experts", "lm_head")
ACT_BYTES = 2  # bf16 activations


def _check_choice(arg: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {arg}={value!r}; valid choices: {', '.join(map(str, choices))}")


def _check_positive(arg: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg}={value!r} must be an integer >= 1")


def weight_bytes(k: int, n: int, fmt: str, group_size: int | None = 128) -> float:
    """Bytes of a [K, N] weight matrix stored in `fmt` (scales and zero points included)."""
    _check_choice("weights", fmt, WEIGHT_FORMATS)
    if fmt == "fp32":
        return 4.0 * k * n
    if fmt == "bf16":
        return 2.0 * k * n
    if fmt == "int8":
        return k * n + 2.0 * n
    groups = 1 if group_size is None else math.ceil(k / group_size)
    return 0.5 * k * n + groups * n * (2.0 + 0.5)


def kv_bytes_per_token(model: ModelShape, kv: str = "bf16") -> float:
    """KV-cache bytes one token occupies in one layer."""
    _check_choice("kv", kv, KV_FORMATS)
    if model.is_mla:
        values = model.kv_lora_rank + model.qk_rope_head_dim
        heads = 1
    else:
        values = 2 * model.kv_heads * model.head_dim
        heads = 2 * model.kv_heads
    size = values * itemsize(kv)
    if kv == "int8":
        size += heads * 2.0  # fp16 scale per token and head (and per k/v)
    return size


def _swiglu_weight_bytes(h: int, f: int, fmt: str, group_size: int | None) -> float:
    """Bytes of one SwiGLU MLP's weights: gate and up [h, 2f] and down [f, h]."""
    return weight_bytes(h, 2 * f, fmt, group_size) + weight_bytes(f, h, fmt, group_size)


def _matmul(m: int, k: int, n: int, fmt: str, group_size: int | None) -> Cost:
    return Cost(
        flops=2.0 * m * k * n,
        bytes_read=weight_bytes(k, n, fmt, group_size) + m * k * ACT_BYTES,
        bytes_written=m * n * ACT_BYTES,
    )


def expected_experts_touched(tokens: int, experts: int, top_k: int) -> float:
    """Mean number of distinct experts hit when each token picks top_k of E uniformly at random."""
    if experts == 0:
        return 0.0
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def _attention(model: ModelShape, batch: int, context: int, phase: str, kv: str) -> Cost:
    kv_tok = kv_bytes_per_token(model, kv)
    if model.is_mla and phase == "decode":
        d_qk, d_v = model.kv_lora_rank + model.qk_rope_head_dim, model.kv_lora_rank
    elif model.is_mla:
        d_qk, d_v = model.qk_nope_head_dim + model.qk_rope_head_dim, model.v_head_dim
    else:
        d_qk = d_v = model.head_dim
    q_len = 1 if phase == "decode" else context
    # Query i of the last q_len positions attends to context - q_len + i + 1 keys (causal).
    pairs = q_len * (context - q_len) + q_len * (q_len + 1) / 2
    scores = batch * model.heads * pairs
    new_tokens = batch * q_len
    return Cost(
        flops=scores * (2.0 * d_qk + 2.0 * d_v + 5.0),
        bytes_read=batch * context * kv_tok + new_tokens * model.heads * d_qk * ACT_BYTES,
        bytes_written=new_tokens * (kv_tok + model.heads * d_v * ACT_BYTES),
        transcendentals=scores,
    )


@dataclasses.dataclass(frozen=True)
class Component:
    """One kernel of the step: its cost per occurrence and how many times a step runs it."""

    name: str
    cost: Cost
    count: int
    weight_bytes: float = 0.0  # the part of cost.bytes_read that is weights (split by tensor parallelism)


def step_components(
    model: ModelShape,
    *,
    batch: int,
    context: int,
    phase: str = "decode",
    weights: str = "bf16",
    group_size: int | None = 128,
    kv: str = "bf16",
) -> list[Component]:
    """The analytic costs of one step's kernels (see the module docstring for the assumptions)."""
    _check_positive("batch", batch)
    _check_positive("context", context)
    _check_choice("phase", phase, PHASES)
    _check_choice("weights", weights, WEIGHT_FORMATS)
    _check_choice("kv", kv, KV_FORMATS)
    if group_size is not None:
        _check_positive("group_size", group_size)
    tokens = batch if phase == "decode" else batch * context
    shapes = model.linear_shapes()

    def mm(k: int, n: int, fmt: str = weights) -> Cost:
        return _matmul(tokens, k, n, fmt, group_size)

    out_name = "o"
    qkv = Cost(0.0, 0.0, 0.0)
    qkv_weights = 0.0
    for name, (k, n) in shapes.items():
        if name != out_name:
            qkv = qkv + mm(k, n)
            qkv_weights += weight_bytes(k, n, weights, group_size)
    comps = [
        Component("qkv_proj", qkv, model.layers, qkv_weights),
        Component("attention", _attention(model, batch, context, phase, kv), model.layers),
        Component(
            "o_proj",
            mm(*shapes[out_name]),
            model.layers,
            weight_bytes(*shapes[out_name], weights, group_size),
        ),
    ]
    dense_layers = model.layers - model.moe_layers
    if dense_layers:
        h, f = model.hidden, model.ffn
        mlp_weights = _swiglu_weight_bytes(h, f, weights, group_size)
        comps.append(Component("mlp", mm(h, 2 * f) + mm(f, h), dense_layers, mlp_weights))
    if model.moe_layers:
        h, f = model.hidden, model.moe_ffn
        router_weights = weight_bytes(h, model.experts, "bf16")
        comps.append(Component("moe_router", mm(h, model.experts, "bf16"), model.moe_layers, router_weights))
        touched = expected_experts_touched(tokens, model.experts, model.top_k) + model.shared_experts
        routed = tokens * (model.top_k + model.shared_experts)  # token-expert pairs
        expert_weights = touched * _swiglu_weight_bytes(h, f, weights, group_size)
        experts = Cost(
            flops=2.0 * routed * 3 * h * f,
            bytes_read=expert_weights + routed * (h + f) * ACT_BYTES,
            bytes_written=routed * (2 * f + h) * ACT_BYTES,
        )
        comps.append(Component("moe_experts", experts, model.moe_layers, expert_weights))
    lm_tokens = batch  # only the last position of each sequence is decoded into logits
    lm_head = _matmul(lm_tokens, model.hidden, model.vocab, "bf16", None)
    comps.append(Component("lm_head", lm_head, 1, weight_bytes(model.hidden, model.vocab, "bf16", None)))
    return comps


@dataclasses.dataclass(frozen=True)
class Footprint:
    weight_bytes: float  # all weights, experts included
    kv_bytes: float
    expert_bytes: float = 0.0  # the MoE experts' share of weight_bytes (split over all chips, also with ep)

    @property
    def total(self) -> float:
        return self.weight_bytes + self.kv_bytes


def memory_footprint(
    model: ModelShape,
    *,
    batch: int,
    context: int,
    weights: str = "bf16",
    group_size: int | None = 128,
    kv: str = "bf16",
) -> Footprint:
    """Bytes of all weights (embedding and lm_head in bf16) and of the KV cache of batch × context tokens."""
    _check_positive("batch", batch)
    _check_positive("context", context)
    linear = sum(weight_bytes(k, n, weights, group_size) for k, n in model.linear_shapes().values())
    dense_layers = model.layers - model.moe_layers
    mlp = _swiglu_weight_bytes(model.hidden, model.ffn, weights, group_size)
    expert = _swiglu_weight_bytes(model.hidden, model.moe_ffn, weights, group_size)
    moe = (model.experts + model.shared_experts) * expert + weight_bytes(model.hidden, model.experts, "bf16")
    embed = model.vocab * model.hidden * ACT_BYTES * (1 if model.tied_embeddings else 2)
    total_w = model.layers * linear + dense_layers * mlp + model.moe_layers * moe + embed
    kv_total = batch * context * model.layers * kv_bytes_per_token(model, kv)
    experts = model.moe_layers * (model.experts + model.shared_experts) * expert
    return Footprint(weight_bytes=total_w, kv_bytes=kv_total, expert_bytes=experts)


def chips_needed(footprint: Footprint, chip: Chip, mem_fraction: float = 0.9) -> int:
    """Smallest power-of-two number of chips whose usable memory holds the footprint."""
    if not 0 < mem_fraction <= 1:
        raise ValueError(f"mem_fraction={mem_fraction} must be in (0, 1]")
    usable = chip.memory * mem_fraction
    n = 1
    while n * usable < footprint.total:
        n *= 2
    return n


@dataclasses.dataclass(frozen=True)
class ComponentTime:
    name: str
    count: int
    cost: Cost  # per occurrence, whole (not split across chips)
    bound_s: float  # roofline time per occurrence on one chip
    time_s: float  # time used: measured if given, else bound_s
    measured: bool
    bound: str  # "compute" or "memory"
    chip_s: float = (
        0.0  # per occurrence on each chip of the layout (time_s / chips under pure tensor parallel)
    )

    @property
    def step_share_s(self) -> float:
        """Seconds this component adds to the step on one chip (all its occurrences)."""
        return self.count * self.time_s


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective in a step: a tensor-parallel all-reduce or an expert-parallel all-to-all."""

    name: str  # "tp_all_reduce" or "ep_all_to_all"
    count: int  # occurrences per step
    group: int  # chips taking part in each
    bytes: float  # all-reduce: the buffer each chip holds; all-to-all: the buffer each chip scatters
    seconds: float  # per occurrence

    @property
    def step_s(self) -> float:
        return self.count * self.seconds


def ring_all_reduce_s(nbytes: float, group: int, chip: Chip) -> float:
    """Seconds to all-reduce an `nbytes` buffer over `group` chips with a ring:

        latency + 2 (p − 1) / p × nbytes / link_bandwidth

    (a reduce-scatter then an all-gather, each moving (p − 1)/p of the buffer through every chip's link
    in each direction at once). 0 for one chip.
    """
    _check_positive("group", group)
    if group == 1:
        return 0.0
    _check_interconnect(chip)
    return chip.link_latency + 2.0 * (group - 1) / group * nbytes / chip.link_bandwidth


def all_to_all_s(nbytes: float, group: int, chip: Chip) -> float:
    """Seconds for an all-to-all over `group` chips where each chip scatters an `nbytes` buffer evenly:

        latency + (p − 1) / p × nbytes / link_bandwidth

    ((p − 1)/p of it leaves the chip; every chip sends and receives at once through a switch or a fully
    connected fabric). 0 for one chip.
    """
    _check_positive("group", group)
    if group == 1:
        return 0.0
    _check_interconnect(chip)
    return chip.link_latency + (group - 1) / group * nbytes / chip.link_bandwidth


def _check_interconnect(chip: Chip) -> None:
    if not chip.has_interconnect:
        raise ValueError(f"chip {chip.name!r} has no interconnect figures (link bandwidth and latency)")


def step_collectives(
    model: ModelShape, *, batch: int, context: int, phase: str, tp: int, ep: int, chip: Chip
) -> list[Collective]:
    """The collectives of one step under a (tp, ep) layout (see the module docstring)."""
    tokens = batch if phase == "decode" else batch * context
    out = []
    if tp > 1:
        nbytes = tokens / ep * model.hidden * ACT_BYTES
        out.append(
            Collective("tp_all_reduce", 2 * model.layers, tp, nbytes, ring_all_reduce_s(nbytes, tp, chip))
        )
    if ep > 1 and model.moe_layers:
        nbytes = tokens / ep * model.top_k * model.hidden * ACT_BYTES
        out.append(
            Collective("ep_all_to_all", 2 * model.moe_layers, ep, nbytes, all_to_all_s(nbytes, ep, chip))
        )
    return out


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    model: str
    chip: str
    chips: int
    batch: int
    context: int
    phase: str
    weights: str
    kv: str
    compute_dtype: str
    components: tuple[ComponentTime, ...]
    step_s: float  # Σ components per chip + comm_s
    tokens_per_s: float
    usd_per_mtok: float | None
    footprint: Footprint
    fits: bool
    notes: tuple[str, ...]
    chips_needed: int  # the fewest chips (a power of two) whose usable memory holds the footprint
    tp: int = 1  # tensor-parallel degree (attention, dense MLPs, router, lm_head; inside each expert)
    ep: int = 1  # expert-parallel degree (MoE experts split over ep groups of tp chips)
    comm_s: float = 0.0  # seconds per step in collectives (included in step_s)
    collectives: tuple[Collective, ...] = ()
    price_per_hour: float | None = None  # the USD per chip-hour usd_per_mtok used (None: no price known)
    memory_per_chip: float = 0.0  # bytes each chip holds under the layout (what `fits` compares)

    @property
    def dominant_bound(self) -> str:
        """ "memory", "compute" or "comm": what sets most of the step time."""
        if self.comm_s >= 0.5 * self.step_s:
            return "comm"
        memory = sum(c.count * c.chip_s for c in self.components if c.bound == "memory")
        return "memory" if memory >= 0.5 * sum(c.count * c.chip_s for c in self.components) else "compute"


def usd_per_mtok(price_per_hour: float, chips: int, tokens_per_s: float) -> float:
    """$ per million tokens = price per chip-hour × chips / (tokens/s × 3600) × 1e6."""
    return price_per_hour * chips / (tokens_per_s * 3600.0) * 1e6


def tensor_parallel_problem(model: ModelShape, tp: int) -> str | None:
    """Why `tp` chips cannot split `model` tensor parallel, or None when they can.

    The query heads must split evenly; so must the kv heads, or tp must be a multiple of them (each kv head
    then replicated tp / K times; MLA's latent cache is shared by all heads and not split); the FFN width of
    the dense MLPs and of each expert must split evenly.
    """
    _check_positive("tp", tp)
    problems = []
    if model.heads % tp:
        problems.append(f"its {model.heads} query heads do not split evenly over {tp} chips")
    k = model.kv_heads
    if not model.is_mla and k % tp and tp % k:
        problems.append(
            f"its {k} kv heads neither split evenly over {tp} chips nor replicate evenly onto them "
            f"(tp must divide {k} or be a multiple of it)"
        )
    if model.layers > model.moe_layers and model.ffn % tp:
        problems.append(f"its FFN width {model.ffn} does not split evenly over {tp} chips")
    if model.moe_layers and model.moe_ffn % tp:
        problems.append(f"its expert FFN width {model.moe_ffn} does not split evenly over {tp} chips")
    return "; ".join(problems) or None


def valid_tensor_parallel(model: ModelShape) -> list[int]:
    """Every tp that splits `model` (`tensor_parallel_problem` is None), up to its query heads."""
    return [t for t in range(1, model.heads + 1) if tensor_parallel_problem(model, t) is None]


def check_tensor_parallel(model: ModelShape, tp: int) -> None:
    """Raise ValueError, with the reason and the tp values that work, when `tp` cannot split `model`."""
    problem = tensor_parallel_problem(model, tp)
    if problem is not None:
        valid = ", ".join(map(str, valid_tensor_parallel(model)))
        raise ValueError(f"tp={tp} cannot split {model.name}: {problem}; tp values that can: {valid}")


def _resolve(model: ModelShape | str, chip: Chip | str) -> tuple[ModelShape, Chip]:
    """`estimate`'s model and chip, given as objects or by their catalogue names."""
    if isinstance(model, str):
        model = get_model(model)
    elif not isinstance(model, ModelShape):
        raise TypeError(
            f"model must be a ModelShape or a model name ({', '.join(MODELS)}); got {type(model).__name__}"
        )
    if isinstance(chip, str):
        chip = get_chip(chip)
    elif not isinstance(chip, Chip):
        raise TypeError(
            f"chip must be a Chip or a chip name (roofline.CHIPS, or 'host'); got {type(chip).__name__}"
        )
    return model, chip


def _layout(
    model: ModelShape, chips: int | None, tp: int | None, ep: int | None, needed: int
) -> tuple[int, int, int]:
    """(chips, tp, ep) from what was given; chips = tp × ep."""
    for arg, value in (("chips", chips), ("tp", tp), ("ep", ep)):
        if value is not None:
            _check_positive(arg, value)
    if ep is not None and ep > 1 and not model.is_moe:
        raise ValueError(f"ep={ep}: expert parallelism needs an MoE model; {model.name} has no experts")
    if ep is not None and ep > 1 and model.experts % ep:
        raise ValueError(f"ep={ep} must divide the number of routed experts ({model.experts})")
    if tp is not None:
        check_tensor_parallel(model, tp)
    ep = ep or 1
    if chips is None:
        chips = tp * ep if tp is not None else max(needed, ep)
    if chips % ep:
        raise ValueError(f"ep={ep} must divide chips={chips}")
    if tp is None:
        tp = chips // ep
    if tp * ep != chips:
        raise ValueError(f"tp={tp} × ep={ep} must equal chips={chips}")
    return chips, tp, ep


def estimate(
    model: ModelShape | str,
    chip: Chip | str,
    *,
    batch: int,
    context: int,
    phase: str = "decode",
    weights: str = "bf16",
    group_size: int | None = 128,
    kv: str = "bf16",
    compute_dtype: str = "bf16",
    chips: int | None = None,
    tp: int | None = None,
    ep: int | None = None,
    mem_fraction: float = 0.9,
    measured: Mapping[str, float] | None = None,
) -> StepEstimate:
    """Step time, tokens/s and $/Mtok of `model` on `chip` (see the module docstring).

    `model` and `chip` are objects or catalogue names ("llama-3-70b", "h100-sxm"; "host" measures this
    machine). Layout: `chips` = `tp` × `ep`. By default every chip is tensor parallel (tp = chips, ep = 1);
    `chips` defaults to tp × ep when tp is given, else to the fewest (a power of two) that hold the model.
    A `tp` given that cannot split the model's heads or FFN width raises (`check_tensor_parallel`).
    """
    model, chip = _resolve(model, chip)
    comps = step_components(
        model, batch=batch, context=context, phase=phase, weights=weights, group_size=group_size, kv=kv
    )
    measured = dict(measured or {})
    for name, seconds in measured.items():
        _check_choice("measured component", name, [c.name for c in comps])
        if not seconds > 0:
            raise ValueError(f"measured[{name!r}]={seconds} must be a positive number of seconds")
    peak = chip.peak(compute_dtype)  # raises with the chip's dtypes when it has no such peak
    foot = memory_footprint(
        model, batch=batch, context=context, weights=weights, group_size=group_size, kv=kv
    )
    needed = chips_needed(foot, chip, mem_fraction)
    chips, tp, ep = _layout(model, chips, tp, ep, needed)
    notes = []
    # Per chip: the experts split over all chips, everything else over the tp chips of its group, and the
    # KV cache over all chips (sequences over the ep groups, heads over tp).
    dense_w = foot.weight_bytes - foot.expert_bytes
    per_chip = dense_w / tp + foot.expert_bytes / chips + foot.kv_bytes / chips
    fits = per_chip <= chip.memory * mem_fraction
    if not fits:
        notes.append(
            f"does not fit: {per_chip / 1e9:.1f} GB per chip needed, {chip.memory / 1e9:.0f} GB × "
            f"{mem_fraction} usable; {needed} chips (all tensor parallel) would fit"
        )
    times = []
    for c in comps:
        bound_s = c.cost.time_bound(chip, compute_dtype)
        t = measured.get(c.name, bound_s)
        if c.name in measured:
            chip_s = t / chips
        else:
            w_split = chips if c.name == "moe_experts" else tp
            chip_bytes = c.weight_bytes / w_split + (c.cost.bytes - c.weight_bytes) / chips
            chip_s = max(c.cost.flops / chips / peak, chip_bytes / chip.bandwidth)
        times.append(
            ComponentTime(
                c.name,
                c.count,
                c.cost,
                bound_s,
                t,
                c.name in measured,
                c.cost.bound(chip, compute_dtype),
                chip_s,
            )
        )
    if ep > 1 and batch < ep:
        notes.append(
            f"batch={batch} < ep={ep}: {ep - batch} of {ep} expert-parallel groups have no sequence to "
            "attend for; the even split assumed here flatters this layout"
        )
    problem = tensor_parallel_problem(model, tp)
    if problem is not None:
        notes.append(
            f"tp={tp} cannot split {model.name} ({problem}); the even split assumed here flatters it"
        )
    elif not model.is_mla and tp > model.kv_heads:
        notes.append(
            f"tp={tp} > {model.kv_heads} kv heads: each kv head is replicated on {tp // model.kv_heads} "
            "chips, which the KV bytes per chip here do not count"
        )
    collectives: list[Collective] = []
    if chips > 1:
        layout = f"{tp}-way tensor parallel" + (f" × {ep}-way expert parallel" if ep > 1 else "")
        if chip.has_interconnect:
            collectives = step_collectives(
                model, batch=batch, context=context, phase=phase, tp=tp, ep=ep, chip=chip
            )
            notes.append(f"{layout}; collectives over {chip.link}")
        else:
            who = "hosts" if chip.name == "host" else f"{chip.name} chips"
            notes.append(
                f"{layout}; communication ignored: {chip.name} has no interconnect figures, so the {chips} "
                f"{who} are assumed to exchange data for free (an optimistic bound)"
            )
    comm_s = sum(c.step_s for c in collectives)
    step_s = sum(t.count * t.chip_s for t in times) + comm_s
    tokens = batch if phase == "decode" else batch * context
    tps = tokens / step_s
    price = None if chip.price_per_hour is None else usd_per_mtok(chip.price_per_hour, chips, tps)
    return StepEstimate(
        model=model.name,
        chip=chip.name,
        chips=chips,
        batch=batch,
        context=context,
        phase=phase,
        weights=weights,
        kv=kv,
        compute_dtype=compute_dtype,
        components=tuple(times),
        step_s=step_s,
        tokens_per_s=tps,
        usd_per_mtok=price,
        footprint=foot,
        fits=fits,
        notes=tuple(notes),
        chips_needed=needed,
        tp=tp,
        ep=ep,
        comm_s=comm_s,
        collectives=tuple(collectives),
        price_per_hour=chip.price_per_hour,
        memory_per_chip=per_chip,
    )
