"""Measured token cost: run the lab's kernels at one decoder layer's shapes on this device, then price them.

For a model, batch B and context L, every component of `roofline.tokens.step_components` is run with real
kernels on the default JAX device, at the shapes of one layer, with random data of the right structure:
- qkv_proj, o_proj, mlp, lm_head: the layer's matmuls through `kernels.int4_matmul` (int4, group 128),
  or a float matmul. bf16 weights are stored in bf16 ([N, K], PyTorch's layout). On a GPU or TPU they run
  as native bf16 dots (bf16 activations, float32 accumulation), and int4 weights see bf16 activations
  (W4A16). On the CPU they are computed in float32: a fused multiply-reduce per row for up to 8 rows,
  blocks of K converted to float32 beyond (XLA's bf16 dots on the CPU are far slower than float32 ones and
  would flatter int4), with float32 activations; "fp32" stores float32 everywhere.
  The router and lm_head stay in bf16 storage whatever the weight format, as in the analytic model.
- attention: `kernels.paged_attention` over a paged cache holding L tokens per sequence, on shuffled pages
  (page size 16), KV in the chosen format. MLA (DeepSeek-V3) is measured as one shared kv head of
  kv_lora_rank + qk_rope_head_dim dims, with values of the same width (the kernel's V and K share D).
- moe_router / moe_experts: a router matmul and `kernels.route`, then `kernels.moe_ffn`, with logits
  drawn like a trained router's (a per-expert popularity offset makes some experts busier than others).
  int4 experts are stacks of Int4Weight (moe_ffn runs them through int4_matmul); for bf16 weights the
  experts are bf16 on a GPU or TPU and float32 on the CPU.
Each component's `Measurement.impls` entry names the kernel and the implementation it ran, e.g.
"int4_matmul[xla]": `kernels.registry.auto_impl` asked with the very arguments the component passes to
the kernel (the registry's one `impl="auto"` decision; nothing here re-derives it). Plain dots are
"dot[xla, ...]".
Each component is timed with `roofline.timing.time_fn`, rotating copies of its weights so that they come
from memory, not cache. The step is Σ count × measured time (one layer's time × layers), so a model
too large for this machine is still measured: only one layer's weights are ever allocated, and the
result says so.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from roofline.hardware import Chip
from roofline.models import ModelShape
from roofline.timing import time_fn
from roofline.tokens import StepEstimate, estimate, memory_footprint, step_components

MEASURE_WEIGHTS = ("fp32", "bf16", "int4")
PAGE_SIZE = 16
GROUP_SIZE = 128
# Rotate weight copies until the set is this large, so each call reads its weights from memory.
ROTATION_BYTES = 256 << 20
# Stop with a clear error rather than allocate more than this for one component's inputs.
MAX_COMPONENT_BYTES = 8 << 30
_BF16_BLOCK_K = 512
# Up to this many rows, a bf16 matmul is one fused multiply-reduce per row (see _bf16_matmul).
_BF16_REDUCE_MAX_ROWS = 8


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _progress(step: int, total: int, label: str, stream=None) -> None:
    """Step `step` of `total` (now running `label`) on `stream` (stderr): a bar redrawn in place with `\r`
    on a terminal; one plain line per step otherwise, so logs and CI output hold no carriage returns."""
    stream = stream or sys.stderr
    if not _isatty(stream):
        stream.write(f"[{step}/{total}] {label}\n")
        stream.flush()
        return
    width = 30
    done = int(width * step / total)
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {label:<24}")
    if step == total:
        stream.write("\n")
    stream.flush()


def _bf16_matmul(x: jax.Array, w_t: jax.Array) -> jax.Array:
    """x [M, K] float32 @ W, with W stored transposed as w_t [N, K] bfloat16 (PyTorch's layout).

    XLA on the CPU converts bf16 to float32 at ~1.5 GB/s when it writes the float32 copy, but at full
    bandwidth when the conversion fuses into a reduction. So for a few rows each output row is a
    multiply-reduce along K (the contiguous axis); for more rows, one block of K is converted at a time
    and multiplied in a dot.
    """
    n, k = w_t.shape
    if x.shape[0] <= _BF16_REDUCE_MAX_ROWS:
        return jnp.stack([jnp.sum(w_t.astype(jnp.float32) * row[None, :], axis=-1) for row in x])
    bk = math.gcd(k, _BF16_BLOCK_K)
    xb = x.reshape(x.shape[0], k // bk, bk).transpose(1, 0, 2)
    wb = w_t.reshape(n, k // bk, bk).transpose(1, 0, 2)  # [K/bk, N, bk]

    def body(acc, xs):
        xk, wk = xs
        return acc + xk @ wk.astype(jnp.float32).T, None

    acc, _ = jax.lax.scan(body, jnp.zeros((x.shape[0], n), jnp.float32), (xb, wb))
    return acc


def _make_weight(k: int, n: int, fmt: str, rng: np.random.Generator) -> Any:
    from quant import Int4Weight

    if fmt == "int4":
        codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
        g = k // GROUP_SIZE if k % GROUP_SIZE == 0 else 1
        gs = GROUP_SIZE if k % GROUP_SIZE == 0 else k
        return Int4Weight(
            jnp.asarray(codes[0::2] | (codes[1::2] << 4)),
            jnp.asarray(rng.uniform(0.5, 1.5, (g, n)).astype(np.float32) / math.sqrt(k)),
            jnp.asarray(rng.integers(6, 10, (g, n), dtype=np.uint8)),
            group_size=gs,
        )
    if fmt == "bf16":  # stored transposed, [N, K]
        return jnp.asarray(rng.standard_normal((n, k), dtype=np.float32) / math.sqrt(k), jnp.bfloat16)
    return jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) / math.sqrt(k))


def _stack(ws: list) -> Any:
    return jax.tree.map(lambda *a: jnp.stack(a), *ws)


def _matmul_any(x: jax.Array, w: Any, native_bf16: bool) -> jax.Array:
    """x [M, K] @ w: an Int4Weight, a bf16 [N, K] (transposed) or a float32 [K, N] matrix."""
    from kernels import int4_matmul

    if not isinstance(w, jax.Array):
        return int4_matmul(x, w)
    if w.dtype == jnp.bfloat16 and native_bf16:
        return jnp.dot(x.astype(jnp.bfloat16), w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    if w.dtype == jnp.bfloat16:
        return _bf16_matmul(x, w)
    return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)


def on_accelerator() -> bool:
    """Whether the default device is a GPU or TPU (bf16 then runs as native dots)."""
    return jax.devices()[0].platform != "cpu"


def _kernel(op: str, *args: Any, **kwargs: Any) -> str:
    """`op[impl]`: the implementation `impl="auto"` runs for these arguments, as the registry decides it."""
    from kernels.registry import auto_impl

    return f"{op}[{auto_impl(op, *args, **kwargs)}]"


def _matmul_impl(x: Any, w: Any, native_bf16: bool) -> str:
    """What `_matmul_any(x, w, native_bf16)` runs: the INT4 kernel, or a plain dot."""
    if not isinstance(w, jax.Array):
        return _kernel("int4_matmul", x, w)
    if w.dtype == jnp.bfloat16:
        return "dot[xla, bf16]" if native_bf16 else "dot[xla, bf16 in float32 blocks]"
    return "dot[xla, fp32]"


def _joined(labels: list[str]) -> str:
    """One label for a component of several calls: each distinct kernel[impl] once, in call order."""
    return " + ".join(dict.fromkeys(labels))


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Case:
    """One component's jitted function and its inputs; weights are rotated, activations shared. `impl` names
    the kernel and implementation each call runs, e.g. "int4_matmul[xla]"."""

    fn: Callable
    weights: Any
    activations: tuple
    impl: str = ""


def _time_case(case: Case, min_time_s: float) -> float:
    nbytes = _nbytes(case.weights)
    copies = max(1, min(8, math.ceil(ROTATION_BYTES / max(nbytes, 1))))
    sets = []
    for i in range(copies):
        w = case.weights if i == 0 else jax.tree.map(jnp.copy, case.weights)
        sets.append((w, *case.activations))
    return time_fn(case.fn, input_sets=sets, min_time_s=min_time_s, min_repeats=3).median_s


def _cases(
    model: ModelShape,
    batch: int,
    context: int,
    weights: str,
    kv: str,
    rng: np.random.Generator,
    native_bf16: bool = False,
) -> dict[str, Callable[[], Case]]:
    """Builders (called one at a time, so one component's data is alive at once) per component."""
    from kernels import moe_ffn, paged_attention, route

    h = model.hidden
    act = jnp.bfloat16 if native_bf16 and weights != "fp32" else jnp.float32

    def _matmul(a: jax.Array, w: Any) -> jax.Array:
        return _matmul_any(a, w, native_bf16)

    def _impl(a: Any, w: Any) -> str:
        return _matmul_impl(a, w, native_bf16)

    def activations(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), act)

    x = activations(batch, h)
    shapes = model.linear_shapes()

    def qkv() -> Case:
        ws = [_make_weight(k, n, weights, rng) for name, (k, n) in shapes.items() if name != "o"]
        xs = tuple(activations(batch, k) for name, (k, _) in shapes.items() if name != "o")
        return Case(
            jax.jit(lambda ws, *xs: [_matmul(a, w) for a, w in zip(xs, ws, strict=True)]),
            ws,
            xs,
            _joined([_impl(a, w) for a, w in zip(xs, ws, strict=True)]),
        )

    def o_proj() -> Case:
        k, n = shapes["o"]
        w, a = _make_weight(k, n, weights, rng), activations(batch, k)
        return Case(jax.jit(lambda w, a: _matmul(a, w)), w, (a,), _impl(a, w))

    def mlp() -> Case:
        f = model.ffn
        ws = (_make_weight(h, 2 * f, weights, rng), _make_weight(f, h, weights, rng))

        def hidden(ws, x):
            gu = _matmul(x, ws[0])
            return jax.nn.silu(gu[:, :f]) * gu[:, f:]

        def fn(ws, x):
            return _matmul(hidden(ws, x), ws[1])

        impl = _joined([_impl(x, ws[0]), _impl(jax.eval_shape(hidden, ws, x), ws[1])])
        return Case(jax.jit(fn), ws, (x,), impl)

    def attention() -> Case:
        if model.is_mla:
            heads, kv_heads, d = model.heads, 1, model.kv_lora_rank + model.qk_rope_head_dim
        else:
            heads, kv_heads, d = model.heads, model.kv_heads, model.head_dim
        pages_per_seq = -(-context // PAGE_SIZE)
        num_pages = batch * pages_per_seq
        dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn, "int8": jnp.int8}[kv]
        shape = (num_pages, PAGE_SIZE, kv_heads, d)
        if kv in ("fp32", "bf16"):
            pages = tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype) for _ in range(2))
            scales = {}
            q_dtype = dtype
        else:
            pages = tuple(
                jnp.asarray(rng.integers(-100, 100, shape).astype(np.float32), dtype) for _ in range(2)
            )
            s = jnp.asarray(rng.uniform(0.005, 0.02, shape[:3]).astype(np.float32))
            scales = {"k_scale": s, "v_scale": s}
            q_dtype = jnp.float32
        bt = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq).astype(np.int32))
        lens = jnp.full((batch,), context, jnp.int32)
        q = jnp.asarray(rng.standard_normal((batch, heads, d), dtype=np.float32), q_dtype)

        def fn(kv_pages, q, lens, bt):
            return paged_attention(q, kv_pages[0], kv_pages[1], lens, bt, **kv_pages[2])

        impl = _kernel("paged_attention", q, pages[0], pages[1], lens, bt, **scales)
        return Case(jax.jit(fn), (*pages, scales), (q, lens, bt), impl)

    def router_logits(xr: jax.Array, wr: jax.Array, popularity: jax.Array) -> jax.Array:
        return _matmul(xr, wr) + popularity

    def route_kw() -> dict[str, Any]:
        if model.name.startswith("deepseek"):
            return {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}
        return {"renormalize": True}

    # A trained router's skew: each expert's popularity offset, fixed per layer.
    popularity = jnp.asarray(rng.standard_normal(max(model.experts, 1)).astype(np.float32))

    def moe_router() -> Case:
        wr = _make_weight(h, model.experts, "bf16", rng)

        def fn(wr, x):
            return route(router_logits(x, wr, popularity), top_k=model.top_k, **route_kw())

        return Case(jax.jit(fn), wr, (x,), f"{_impl(x, wr)} + route[xla]")

    def moe_experts() -> Case:
        e, f = model.experts + model.shared_experts, model.moe_ffn
        per_weight = 0.52 if weights == "int4" else 2.0 if act == jnp.bfloat16 else 4.0
        need = 3 * e * h * f * per_weight
        if need > MAX_COMPONENT_BYTES:
            raise ValueError(
                f"moe_experts: one layer's experts take {need / 2**30:.1f} GiB as stored here, more than the "
                f"{MAX_COMPONENT_BYTES / 2**30:.0f} GiB this measurement allows; measure a smaller model"
            )
        if weights == "int4":
            ws = tuple(
                _stack([_make_weight(k, n, "int4", rng) for _ in range(e)])
                for k, n in ((h, f), (h, f), (f, h))
            )
        else:
            expert_dtype = act if weights == "bf16" else jnp.float32
            ws = tuple(
                jnp.asarray(rng.standard_normal(s, dtype=np.float32) / math.sqrt(s[1]), expert_dtype)
                for s in ((e, h, f), (e, h, f), (e, f, h))
            )
        logits = router_logits(x, _make_weight(h, model.experts, "bf16", rng), popularity)
        rw, ids = route(logits, top_k=model.top_k, **route_kw())
        if model.shared_experts:  # shared experts see every token with weight 1
            shared = jnp.arange(model.experts, e, dtype=jnp.int32)[None].repeat(batch, 0)
            ids = jnp.concatenate([ids, shared], axis=1)
            rw = jnp.concatenate([rw, jnp.ones(shared.shape, jnp.float32)], axis=1)

        def fn(ws, x, rw, ids):
            return moe_ffn(x, rw, ids, *ws)

        return Case(jax.jit(fn), ws, (x, rw, ids), _kernel("moe_ffn", x, rw, ids, *ws))

    def lm_head() -> Case:
        w = _make_weight(h, model.vocab, "bf16", rng)
        return Case(jax.jit(lambda w, a: _matmul(a, w)), w, (x,), _impl(x, w))

    return {
        "qkv_proj": qkv,
        "attention": attention,
        "o_proj": o_proj,
        "mlp": mlp,
        "moe_router": moe_router,
        "moe_experts": moe_experts,
        "lm_head": lm_head,
    }


@dataclasses.dataclass(frozen=True)
class Measurement:
    estimate: StepEstimate  # with measured times in place of the bounds
    measured_s: dict[str, float]  # per occurrence, on this device
    fits: bool  # whether the whole model (weights + KV) fits this device's memory
    notes: tuple[str, ...]
    impls: dict[str, str]  # per component, the kernel and implementation it ran, e.g. "int4_matmul[xla]"


def measure_step(
    model: ModelShape,
    chip: Chip,
    *,
    batch: int,
    context: int,
    weights: str = "int4",
    kv: str = "bf16",
    min_time_s: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    native_bf16: bool | None = None,
) -> Measurement:
    """Time every component of one decode step of `model` on the default device and price the step.

    `chip` is the device's roofline (normally `measure_host()`), used for the bounds, fractions and price.
    `native_bf16`: run bf16 weights as native bf16 dots with bf16 activations (default: on a GPU or TPU;
    the CPU computes them in float32 blocks).
    """
    if native_bf16 is None:
        native_bf16 = on_accelerator()
    if weights not in MEASURE_WEIGHTS:
        raise ValueError(f"unknown weights={weights!r}; valid choices: {', '.join(MEASURE_WEIGHTS)}")
    comps = step_components(model, batch=batch, context=context, weights=weights, kv=kv)
    names = [c.name for c in comps]
    rng = np.random.default_rng(seed)
    builders = _cases(model, batch, context, weights, kv, rng, native_bf16)
    measured, impls = {}, {}
    for i, name in enumerate(names):
        if progress:
            _progress(i, len(names), name)
        case = builders[name]()
        measured[name] = _time_case(case, min_time_s)
        impls[name] = case.impl
        del case
    if progress:
        _progress(len(names), len(names), "done")
    compute = "fp32" if weights == "fp32" or "bf16" not in chip.peak_flops else "bf16"
    est = estimate(
        model,
        chip,
        batch=batch,
        context=context,
        weights=weights,
        kv=kv,
        compute_dtype=compute,
        chips=1,
        measured=measured,
    )
    foot = memory_footprint(model, batch=batch, context=context, weights=weights, kv=kv)
    fits = foot.total <= chip.memory * 0.9
    notes = [
        f"measured on one layer's shapes and weights; step = Σ count × measured time over "
        f"{model.layers} layers"
    ]
    if not fits:
        notes.append(
            f"the whole model ({foot.total / 1e9:.1f} GB with its KV cache) does not fit this "
            f"device's {chip.memory / 1e9:.0f} GB: only one layer's weights were allocated"
        )
    if model.is_mla:
        notes.append("MLA attention measured as one kv head of kv_lora_rank + rope dims, values included")
    if model.is_moe and weights == "bf16" and not native_bf16:
        notes.append("MoE experts measured with float32 weights (2x the bytes of bf16)")
    return Measurement(estimate=est, measured_s=measured, fits=fits, notes=tuple(notes), impls=impls)
