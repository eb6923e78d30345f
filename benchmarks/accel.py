"""The lab's check on whatever accelerator is present: every lab kernel against the device's own baselines.

    python -m benchmarks.accel [--smoke] [--out FILE] [--only KERNEL[,KERNEL]] [--impl-module MODULE]
    python -m benchmarks.accel --tune [--smoke] [--only KERNEL] [--tune-out PATH] [--tune-target TARGET]

Cases: each op's `kernels/<op>/arg_specs.py`, tag "accel" (bf16; `--smoke`: tag "smoke", the same code at
tiny shapes on any backend, the CPU included). Lab rows: every implementation of
`kernels.registry.implementations(op)` that runs here (`kernels.available_impls(op)`) but the NumPy reference
(one that runs only eagerly, `traceable=False`, is a "missing" row, and so is a Pallas kernel on the CPU,
where it would time an interpreter; `--tune --smoke` runs them there), the one `impl="auto"` runs for the case
marked (`kernels.registry.auto_impl`).
`--impl-module MODULE` imports MODULE first, so the implementations it registers
(`kernels.registry.register`) are timed beside the built-in ones. Baselines (`PEERS`): paged_attention on the
same tokens gathered into a contiguous cache through `jax.nn.dot_product_attention` (cudnn, xla) and torch's
`scaled_dot_product_attention`, and JAX's own Pallas `ops.gpu.paged_attention` (its [K, P, S, D] pages);
int4_matmul: the bf16 matmul through XLA and torch, and torch's `_weight_int4pack_mm` (tinygemm); moe_ffn: a
balanced batched einsum (E experts × T·k/E rows: the same FLOPs and weights, no routing) and the SwiGLU FFN on
`jax.lax.ragged_dot` and on JAX's Mosaic GPU `ops.gpu.ragged_dot_mgpu` (Hopper). A peer that cannot run here
is a row with status "missing: <why>"; one that raises is "failed: <error>"; nothing is dropped.

Timing (`roofline.timing`): `ms` is device time per call inside one jitted program that calls the kernel
many times over C rotated copies of the inputs (`in_program_loop`; C from `rotation_copies`: the copies
exceed ~128 MB, past an H100/H200's 50–60 MB L2, within ~40 GB); torch rows replay a CUDA graph of the same
calls (`cuda_graph_loop`). `ms_dispatch`: the same calls dispatched one by one from Python (with JAX's
10–16 µs host dispatch each). A case's rows run in interleaved rounds (`interleave`; medians), so a slow spell
of the device hits them alike. `frac_datasheet`, `frac_measured`: the bytes the row must move (the ops' cost
functions) over `ms`, as a fraction of the recognized chip's datasheet HBM bandwidth (`roofline.
catalogue_chip`; null if unknown) and of the bandwidth `roofline.measure_host()` measured. `ratio`: ms over
the best baseline's ms in the same case (< 1 is faster).

Output: a table on stdout and, with `--out`, JSON {"device", "chip", "smoke", "impl_modules", "records"}, one
record per (case, implementation): kernel, case, params, impl, role ("lab" | "baseline"), auto (the row
impl="auto" runs), status, ms, ms_dispatch, bytes, frac_datasheet, frac_measured, ratio, calls, copies.

Tuning (`--tune [--only OP] [--smoke] [--tune-out PATH] [--tune-target TARGET]`): for each Pallas GPU kernel
available here (`TUNED_IMPLS`: pallas_mosaic_gpu, pallas_triton) whose module defines `shape_class(*args,
**kwargs) -> str` and `tune_space(*args, **kwargs) -> list[Config]`, at each case: every configuration of the
space (`--smoke`: its first three) is compiled on this device (one that fails is dropped), then compiled
shape-only for the compile-only target of this GPU's architecture (`PRUNE_TARGETS`, or `--tune-target`)
through `benchmarks.compiled`, and dropped if a Pallas kernel spills or asks for more shared memory than a CTA
may have; the rest are timed like the lab rows (in-program loop, interleaved rounds). The best configuration
per (op, impl, shape class) — the lowest geometric mean of ms over the class's cases, among configurations
timed at all of them — is written with `kernels.tuning.write` for this device's `device_kind` (date, JAX
version, that ms) to `--tune-out` or `kernels.tuning.user_file()`; the kernels' default configurations read it
back (`kernels.tuning.lookup`). On the CPU, `--tune --smoke` runs the same code at tiny shapes with the
kernels interpreted (device_kind "cpu"; no compile-only target stands for a CPU, so only compiling here
prunes).
`--out` then writes {"device", "prune_target", "tuned", "entries", "records"}.

Nothing heavy is imported at module level, and no module-level name starts with time_/track_, so asv's
discovery skips this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

KERNELS = ("paged_attention", "int4_matmul", "moe_ffn")
ARG_SPECS = {op: f"kernels.{'moe' if op == 'moe_ffn' else op}.arg_specs" for op in KERNELS}
# copy_bytes: rotate copies until they exceed this (well past a 50-60 MB L2); max_bytes: device memory per
# row's copies; target_s: device time per timed program; repeats: interleaved rounds.
# max_configs: with --tune, the most candidates of each space timed per case (the space's first ones; the
# default comes first by the tuning contract).
FULL = dict(copy_bytes=128 << 20, max_bytes=40 << 30, max_copies=8, target_s=0.02, max_calls=400, repeats=3)
FULL.update(max_configs=None)
SMOKE = dict(copy_bytes=1 << 16, max_bytes=1 << 26, max_copies=2, target_s=0.001, max_calls=4, repeats=1)
SMOKE.update(max_configs=3)


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


class Missing(Exception):
    """A peer that cannot run on this machine (reported as "missing: <why>")."""


@dataclasses.dataclass
class Timed:
    """What one row times: `fn(*s)` for each input set `s` of `sets` (a JAX function, or with `torch` a
    PyTorch callable on CUDA tensors), and the bytes one call must move."""

    fn: Callable[..., Any]
    sets: list
    bytes: float
    torch: bool = False


@dataclasses.dataclass
class Ctx:
    """One case of one op, as the rows see it: the arguments of the op's entry and shared input copies."""

    op: str
    case: Any
    args: tuple
    kwargs: dict
    cfg: dict
    lab_bytes: float

    def copies(self, per_copy_bytes: float) -> int:
        from roofline import timing

        c = self.cfg
        return timing.rotation_copies(
            per_copy_bytes, exceed_bytes=c["copy_bytes"], max_bytes=c["max_bytes"], max_copies=c["max_copies"]
        )

    def jax_sets(self, args: tuple) -> list:
        from roofline import timing

        return timing.copy_inputs(args, self.copies(timing.tree_nbytes(args)))

    @functools.cached_property
    def entry_sets(self) -> list:
        """Copies of (*args, {array keyword arguments}), shared by every row that reads the entry's inputs."""
        return self.jax_sets((*self.args, _arrays(self.kwargs)))

    def torch_sets(self, make: Callable[[], tuple], per_copy_bytes: float) -> list:
        return [make() for _ in range(self.copies(per_copy_bytes))]


def _arrays(kwargs: dict) -> dict:
    import jax
    import numpy as np

    return {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}


FIELDS = ("kernel", "case", "params", "impl", "role", "auto", "status", "ms", "ms_dispatch", "bytes")
FIELDS += ("frac_datasheet", "frac_measured", "ratio", "calls", "copies")


def _record(kernel: str, case: Any, impl: str, role: str, **fields: Any) -> dict:
    rec = dict.fromkeys(FIELDS)
    rec.update(kernel=kernel, case=case.name, params=case.params(), impl=impl, role=role, auto=False)
    return {**rec, **fields}


# --------------------------------------------------------------------------------------------------
# the lab's implementations, as the registry has them


def _lab_impls(op: str) -> tuple[str, ...]:
    """Every implementation that runs here but the NumPy reference (the oracle, not a contender)."""
    import kernels
    from kernels import registry

    here = kernels.available_impls(op)
    return tuple(n for n in registry.implementations(op) if n in here and n != "reference")


# The INT4 implementation that runs on a prepared weight (`kernels.int4_matmul.prepare`).
PREPARED_INT4 = "pallas_mosaic_gpu"


def _lab_row(ctx: Ctx, name: str) -> Timed:
    import jax

    import kernels
    from kernels import registry

    impl = registry.implementations(ctx.op)[name]
    if not impl.traceable:
        raise Missing("it runs eagerly on the host (traceable=False); this check times jitted programs")
    if name.startswith("pallas_") and jax.default_backend() == "cpu":
        raise Missing(
            "a Pallas kernel runs interpreted on the CPU: the interpreter's time is not the kernel's"
        )
    reason = impl.unsupported(*ctx.args, **ctx.kwargs)
    if reason is not None:
        raise Missing(f"unsupported: {reason}")
    entry = getattr(kernels, ctx.op)
    static = {k: v for k, v in ctx.kwargs.items() if k not in _arrays(ctx.kwargs)}

    def fn(*s):
        return entry(*s[:-1], impl=name, **static, **s[-1])

    sets = ctx.entry_sets
    if ctx.op == "int4_matmul" and name == PREPARED_INT4:
        # A serving loop prepares its weights once, at load (docs/kernels.md): so does this row, untimed.
        from kernels.int4_matmul import prepare

        prep = jax.jit(prepare)
        sets = [(s[0], prep(s[1]), *s[2:]) for s in sets]
    jax.eval_shape(fn, *sets[0])
    return Timed(fn, sets, ctx.lab_bytes)


# --------------------------------------------------------------------------------------------------
# the device and its peers


def _device_info(smoke: bool) -> dict:
    import jax

    import roofline

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "") or ""
    info: dict[str, Any] = {
        "platform": dev.platform,
        "device_kind": kind,
        "jax": jax.__version__,
        "compute_capability": getattr(dev, "compute_capability", None),
    }
    key = None
    try:
        key = roofline.catalogue_chip(kind)
    except Exception as err:  # the device check must run even if the recognizer trips
        info["chip_error"] = _short(err)
    info["chip"] = key
    info["datasheet_bandwidth"] = float(roofline.CHIPS[key].bandwidth) if key in roofline.CHIPS else None
    try:
        host = (
            roofline.measure_host(matmul_n=256, stream_bytes=64 << 20) if smoke else roofline.measure_host()
        )
        info["measured_bandwidth"] = float(host.bandwidth)
    except Exception as err:  # report the device anyway; fractions of the measured roof become null
        info["measured_bandwidth"] = None
        info["measure_error"] = _short(err)
    return info


def _is_gpu(hopper: bool = False) -> bool:
    import jax

    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", ""))
    return dev.platform == "gpu" and (not hopper or cc.startswith("9."))


def _torch_cuda():
    """torch, when it imports and sees a CUDA device; else raise Missing."""
    try:
        import torch
    except Exception as err:  # any import failure means the peer is missing, whatever it is
        raise Missing(f"torch does not import ({type(err).__name__})") from err
    if not torch.cuda.is_available():
        raise Missing("torch sees no CUDA device")
    return torch


def _uniform_decode(case: Any) -> tuple[int, int, int, int, int]:
    """(B, L, H, K, D) of a decode case whose sequences all hold L tokens (what the contiguous peers take)."""
    if case.q_lens is not None or len(set(case.kv_lens)) != 1:
        raise Missing("the contiguous baselines take decode batches of equal lengths")
    return case.batch, case.kv_lens[0], case.num_q_heads, case.num_kv_heads, case.head_dim


def _dpa(kind: str) -> Callable[[Ctx], Timed]:
    def prepare(ctx: Ctx) -> Timed:
        import jax

        if kind == "cudnn" and not _is_gpu():
            raise Missing("cuDNN attention needs an NVIDIA GPU")
        b, seq, _, kh, d = _uniform_decode(ctx.case)
        q, kp, vp, _, bt = ctx.args
        # The same tokens, gathered once (outside the timing) into [B, L, K, D].
        k, v = (p[bt].reshape(b, -1, kh, d)[:, :seq] for p in (kp, vp))

        def fn(q, k, v):
            return jax.nn.dot_product_attention(q[:, None], k, v, implementation=kind)[:, 0]

        return Timed(fn, ctx.jax_sets((q, k, v)), ctx.lab_bytes)

    return prepare


def _jax_paged(ctx: Ctx) -> Timed:
    import jax.numpy as jnp

    if not _is_gpu():
        raise Missing("JAX's Pallas paged attention is a GPU kernel")
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
    except Exception as err:  # absent from this JAX
        raise Missing(f"jax.experimental.pallas.ops.gpu.paged_attention: {_short(err)}") from err
    _uniform_decode(ctx.case)
    q, kp, vp, lens, bt = ctx.args
    kp, vp = (jnp.transpose(p, (2, 0, 1, 3)) for p in (kp, vp))  # its layout: [K, P, S, D]
    pages_per_seq = bt.shape[1]
    splits = math.gcd(16, pages_per_seq)
    per_block = max(1, math.gcd(8, pages_per_seq // splits))

    def fn(q, kp, vp, bt, lens):
        return jax_paged.paged_attention(
            q, kp, vp, bt, lens, k_splits=splits, pages_per_compute_block=per_block
        )

    return Timed(fn, ctx.jax_sets((q, kp, vp, bt, lens)), ctx.lab_bytes)


def _is_tpu() -> bool:
    import jax

    return jax.devices()[0].platform == "tpu"


def _jax_ragged_paged(ctx: Ctx) -> Timed:
    """JAX's TPU ragged paged attention on the same pages: K and V interleaved per head into its combined
    [P, S, 2K, D] pool once, outside the timing; one query token per sequence."""
    import jax.numpy as jnp

    if not _is_tpu():
        raise Missing("JAX's ragged paged attention is a TPU kernel")
    try:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa
    except Exception as err:  # absent from this JAX
        raise Missing(f"jax.experimental.pallas.ops.tpu.ragged_paged_attention: {_short(err)}") from err
    b, _, _, _, d = _uniform_decode(ctx.case)
    q, kp, vp, lens, bt = ctx.args
    kv = jnp.stack([kp, vp], axis=3).reshape(*kp.shape[:2], 2 * kp.shape[2], d)
    cu_q = jnp.arange(b + 1, dtype=jnp.int32)
    num = jnp.array([b], jnp.int32)

    def fn(q, kv, lens, bt, cu_q, num):
        return rpa.ragged_paged_attention(q, kv, lens, bt, cu_q, num, sm_scale=d**-0.5)

    return Timed(fn, ctx.jax_sets((q, kv, lens, bt, cu_q, num)), ctx.lab_bytes)


def _torch_sdpa(ctx: Ctx) -> Timed:
    torch = _torch_cuda()
    import torch.nn.functional as tf

    b, seq, h, kh, d = _uniform_decode(ctx.case)

    def make():
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, kh, seq, d, device="cuda", dtype=torch.bfloat16)
        return q, k, torch.randn(b, kh, seq, d, device="cuda", dtype=torch.bfloat16)

    def fn(q, k, v):
        return tf.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return Timed(fn, ctx.torch_sets(make, 2.0 * b * kh * seq * d * 2), ctx.lab_bytes, torch=True)


def _bf16_matmul_bytes(case: Any) -> float:
    from roofline import matmul_cost

    return matmul_cost(case.m, case.k, case.n, x_dtype="bf16").bytes


def _xla_bf16(ctx: Ctx) -> Timed:
    import jax
    import jax.numpy as jnp

    c = ctx.case
    w = jax.random.normal(jax.random.key(1), (c.k, c.n), jnp.bfloat16) * 0.02

    def fn(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    return Timed(fn, ctx.jax_sets((ctx.args[0].astype(jnp.bfloat16), w)), _bf16_matmul_bytes(c))


def _torch_bf16(ctx: Ctx) -> Timed:
    torch = _torch_cuda()
    c = ctx.case

    def make():
        x = torch.randn(c.m, c.k, device="cuda", dtype=torch.bfloat16)
        return x, torch.randn(c.k, c.n, device="cuda", dtype=torch.bfloat16)

    sets = ctx.torch_sets(make, 2.0 * c.k * c.n)
    return Timed(torch.mm, sets, _bf16_matmul_bytes(c), torch=True)


def _tinygemm(ctx: Ctx) -> Timed:
    torch = _torch_cuda()
    mm = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack", None)
    if mm is None or convert is None:
        raise Missing("this torch has no _weight_int4pack_mm")
    c = ctx.case
    if c.bits != 4 or c.act_order or c.act_scales:
        raise Missing("tinygemm takes plain 4-bit weights")

    def make():
        # Codes [N, K] in 0..15, two per byte along K (torch >= 2.5's uint8 input), then the kernel's tiled
        # layout; scales and zeros [K/g, N, 2] bf16.
        codes = torch.randint(0, 16, (c.n, c.k), device="cuda", dtype=torch.int32)
        wq = convert((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
        sz = torch.rand(c.k // c.group, c.n, 2, device="cuda", dtype=torch.bfloat16)
        return torch.randn(c.m, c.k, device="cuda", dtype=torch.bfloat16), wq, sz

    def fn(x, wq, sz):
        return mm(x, wq, c.group, sz)

    spec = importlib.import_module(ARG_SPECS["int4_matmul"])
    nbytes = spec.cost(dataclasses.replace(c, scale_dtype="bfloat16")).bytes
    return Timed(fn, ctx.torch_sets(make, c.k * c.n / 2.0), nbytes, torch=True)


def _swiglu_ragged(dot: Callable, x, weights, ids, wg, wu, wd):
    """The MoE FFN with the three expert GEMMs as grouped (ragged) dots: sort assignments by expert, run,
    scatter back weighted (a baseline; the lab's "ragged" strategy is the same idea)."""
    import jax
    import jax.numpy as jnp

    t, k = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros((wg.shape[0],), jnp.int32).at[flat].add(1)
    xs = x[order // k]
    g, u = dot(xs, wg, sizes), dot(xs, wu, sizes)
    hdn = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(x.dtype)
    ys = dot(hdn, wd, sizes).astype(jnp.float32)
    w = weights.reshape(-1)[order].astype(jnp.float32)
    y = jnp.zeros((t, x.shape[1]), jnp.float32).at[order // k].add(ys * w[:, None])
    return y.astype(x.dtype)


def _balanced(ctx: Ctx) -> Timed:
    import jax
    import jax.numpy as jnp

    from kernels import moe_ffn_cost

    c = ctx.case
    per = max(1, c.tokens * c.top_k // c.num_experts)
    xb = jax.random.normal(jax.random.key(5), (c.num_experts, per, c.d_model), ctx.args[0].dtype)

    def fn(xb, wg, wu, wd):
        g = jnp.einsum("ecd,edf->ecf", xb, wg, preferred_element_type=jnp.float32)
        u = jnp.einsum("ecd,edf->ecf", xb, wu, preferred_element_type=jnp.float32)
        hdn = (jax.nn.silu(g) * u).astype(xb.dtype)
        return jnp.einsum("ecf,efd->ecd", hdn, wd, preferred_element_type=jnp.float32)

    sets = [(xb, *s[3:6]) for s in ctx.entry_sets]  # the experts' own rotated copies
    e, k, d, f = c.num_experts, c.top_k, c.d_model, c.d_ff
    nbytes = moe_ffn_cost(c.tokens, e, k, d, f, dtype=c.dtype, experts_touched=e).bytes
    return Timed(fn, sets, nbytes)


def _ragged_with(dot_of: Callable[[], Callable]) -> Callable[[Ctx], Timed]:
    def prepare(ctx: Ctx) -> Timed:
        dot = dot_of()

        def fn(x, w, ids, wg, wu, wd, _):
            return _swiglu_ragged(dot, x, w, ids, wg, wu, wd)

        return Timed(fn, ctx.entry_sets, ctx.lab_bytes)

    return prepare


def _lax_ragged_dot() -> Callable:
    import jax
    import jax.numpy as jnp

    def dot(a, b, sizes):
        return jax.lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32).astype(a.dtype)

    return dot


def _mgpu_ragged_dot() -> Callable:
    if not _is_gpu(hopper=True):
        raise Missing("JAX's Mosaic GPU ragged dot example needs a Hopper GPU (compute capability 9.x)")
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except Exception as err:  # absent from this JAX, or absl-py missing
        raise Missing(f"ragged_dot_mgpu does not import: {_short(err)}") from err

    def dot(a, b, sizes):
        # Whole blocks at the smoke shapes too.
        blocks = {"block_n": math.gcd(128, b.shape[2]), "block_k": math.gcd(64, a.shape[1])}
        return ragged_dot_mgpu.ragged_dot(
            a, b, group_sizes=sizes, block_m=128, max_concurrent_steps=4, grid_block_n=1, **blocks
        )

    return dot


def _megablox_gmm() -> Callable:
    if not _is_tpu():
        raise Missing("megablox gmm is a TPU kernel")
    try:
        from jax.experimental.pallas.ops.tpu.megablox import gmm
    except Exception as err:  # absent from this JAX
        raise Missing(f"jax.experimental.pallas.ops.tpu.megablox: {_short(err)}") from err

    def dot(a, b, sizes):
        tiling = (min(512, a.shape[0]), math.gcd(1024, b.shape[1]), math.gcd(1024, b.shape[2]))
        return gmm(a, b, sizes, preferred_element_type=a.dtype, tiling=tiling)

    return dot


# Each op's baselines, (row name, prepare(ctx) -> Timed); the lab rows come from the registry.
PEERS: dict[str, tuple[tuple[str, Callable[[Ctx], Timed]], ...]] = {
    "paged_attention": (
        ("jax.nn.dot_product_attention[cudnn] contiguous", _dpa("cudnn")),
        ("jax.nn.dot_product_attention[xla] contiguous", _dpa("xla")),
        ("jax.experimental.pallas.ops.gpu.paged_attention", _jax_paged),
        ("torch scaled_dot_product_attention contiguous", _torch_sdpa),
        ("jax.experimental.pallas.ops.tpu.ragged_paged_attention", _jax_ragged_paged),
    ),
    "int4_matmul": (
        ("bf16 matmul (XLA)", _xla_bf16),
        ("torch bf16 mm", _torch_bf16),
        ("torch _weight_int4pack_mm (tinygemm)", _tinygemm),
    ),
    "moe_ffn": (
        ("balanced batched einsum", _balanced),
        ("jax.lax.ragged_dot", _ragged_with(_lax_ragged_dot)),
        ("jax.experimental.pallas.ops.gpu.ragged_dot_mgpu", _ragged_with(_mgpu_ragged_dot)),
        ("jax.experimental.pallas.ops.tpu.megablox.gmm", _ragged_with(_megablox_gmm)),
    ),
}


# --------------------------------------------------------------------------------------------------
# the one row builder and the driver


def _case_records(op: str, case: Any, cfg: dict) -> list[dict]:
    """Every row of one case (lab implementations, then baselines), timed in interleaved rounds."""
    from kernels import registry
    from roofline import timing

    spec = importlib.import_module(ARG_SPECS[op])
    args, kwargs = spec.make_args(case)
    ctx = Ctx(op, case, args, kwargs, cfg, spec.cost(case, args).bytes)
    try:
        auto = registry.auto_impl(op, *args, **kwargs)
    except Exception:  # the rows are still worth timing; no row is marked
        auto = None
    rows = [
        (_record(op, case, n, "lab", auto=n == auto), functools.partial(_lab_row, ctx, n))
        for n in _lab_impls(op)
    ]
    rows += [(_record(op, case, n, "baseline"), functools.partial(p, ctx)) for n, p in PEERS[op]]
    runners = {}
    for i, (rec, prepare) in enumerate(rows):
        try:
            timed = prepare()
            loop = timing.cuda_graph_loop if timed.torch else timing.in_program_loop
            runners[i] = loop(timed.fn, timed.sets, target_s=cfg["target_s"], max_calls=cfg["max_calls"])
            rec["bytes"] = timed.bytes
        except Missing as err:
            rec["status"] = f"missing: {err}"
        except Exception as err:  # every failure is reported in its row, never dropped
            rec["status"] = f"failed: {_short(err)}"
    errors: dict[int, BaseException] = {}
    results = timing.interleave(runners, rounds=cfg["repeats"], errors=errors)
    for i, err in errors.items():
        rows[i][0]["status"] = f"failed: {_short(err)}"
    for i, t in results.items():
        rows[i][0].update(
            status="ok",
            ms=1e3 * t.device.median_s,
            ms_dispatch=1e3 * t.dispatch.median_s,
            calls=t.calls,
            copies=t.copies,
        )
    return [rec for rec, _ in rows]


def run(
    smoke: bool = False,
    only: tuple[str, ...] = KERNELS,
    progress: Callable[[str], None] | None = None,
    impl_modules: tuple[str, ...] = (),
) -> dict:
    """Run every case; returns {"device", "chip", "smoke", "impl_modules", "records"} (module docstring).
    `impl_modules` are imported first, so the implementations they register are timed too."""
    for name in only:
        if name not in KERNELS:
            raise ValueError(f"kernel {name!r} must be one of {KERNELS}")
    for module in impl_modules:
        importlib.import_module(module)
    cfg = SMOKE if smoke else FULL
    info = _device_info(smoke)
    records = []
    for op in only:
        for case in importlib.import_module(ARG_SPECS[op]).cases("smoke" if smoke else "accel"):
            try:
                recs = _case_records(op, case, cfg)
            except Exception as err:  # e.g. the arguments cannot be built: one failed record for the case
                recs = [_record(op, case, "-", "lab", status=f"failed: {_short(err)}")]
            for rec in recs:
                _fractions(rec, info)
                records.append(rec)
                if progress is not None:
                    progress(_row(rec))
    _ratios(records)
    return {
        "device": info,
        "chip": info.get("chip"),
        "smoke": smoke,
        "impl_modules": list(impl_modules),
        "records": records,
    }


# --------------------------------------------------------------------------------------------------
# --tune: each Pallas GPU kernel's configuration space, pruned by compiling, timed, the best written


# The kernels --tune sweeps, where they are available: each module's `shape_class(*args, **kwargs) -> str` and
# `tune_space(*args, **kwargs) -> list[Config]` define the sweep (a module without them is skipped).
TUNED_IMPLS = ("pallas_mosaic_gpu", "pallas_triton")
# The compile-only target whose compiled code prunes the candidates on a GPU of each compute capability major
# (the same architecture, so the same registers, spills and shared-memory limit as compiling on the device).
PRUNE_TARGETS = {8: "sm_80", 9: "sm_90a", 10: "sm_100a"}


def _tune_module(op: str, name: str) -> Any:
    """The kernel module of implementation `name` of `op` when it defines the tuning contract, else None."""
    from kernels import registry

    impl = registry.implementations(op)[name]
    module = importlib.import_module(impl.fn.__module__)
    ok = all(callable(getattr(module, f, None)) for f in ("shape_class", "tune_space"))
    return module if ok else None


def _config_fields(config: Any) -> dict:
    """A Config as the tuned file stores it: its fields that are set (None means "by heuristic")."""
    return {k: v for k, v in dataclasses.asdict(config).items() if v is not None}


def prune_target() -> str | None:
    """The compile-only target that stands for this machine's GPU when pruning (`PRUNE_TARGETS`), or None."""
    import jax

    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", "") or "")
    if dev.platform != "gpu" or not cc:
        return None
    return PRUNE_TARGETS.get(int(cc.split(".")[0]))


def prune_by_resources(op: str, name: str, case: Any, config: Any, target: str) -> str | None:
    """Why `config` is dropped before timing on `target` (compiled shape-only through `benchmarks.compiled`,
    the compile report's own code): it fails to compile there, a Pallas kernel spills, or one asks for more
    shared memory than a CTA may have. None: it stays. A target this machine cannot compile for drops
    nothing (the caller says so once)."""
    import functools as ft

    from benchmarks import compiled
    from kernels import compile_only, registry

    spec = importlib.import_module(ARG_SPECS[op])
    args, kwargs = spec.arg_shapes(case)
    impl = registry.implementations(op)[name]
    entry = compiled._entry(op)
    fn = ft.partial(entry, impl=name, config=config, **kwargs)
    check = ft.partial(impl.unsupported, **kwargs)
    program = compiled.Program(op, case.name, name, compiled._dtype(op, case), fn, args, check)
    rec = compiled.compile_program(program, target)
    if rec["status"].startswith("missing"):
        return None
    if rec["status"] != "ok":
        return f"{target}: {rec['status']}"
    limit = compile_only.gpu_info(target).shared_per_block_optin
    for k in rec["kernels"]:
        if not k["pallas"]:
            continue
        if k["spill_bytes"]:
            return f"{target}: {k['name']} spills {k['spill_bytes']} bytes per thread"
        if k["shared_bytes"] > limit:
            return (
                f"{target}: {k['name']} asks for {k['shared_bytes']} bytes of shared memory (limit {limit})"
            )
    return None


def _tune_case(op: str, case: Any, cfg: dict, target: str | None, progress: Callable | None) -> list[dict]:
    """One record per (tuned implementation, candidate config) of one case: compiled on this device (a
    failure drops it), pruned on `target`'s compiled code, the rest timed in interleaved rounds."""
    import jax

    import kernels
    from kernels import registry
    from roofline import timing

    spec = importlib.import_module(ARG_SPECS[op])
    args, kwargs = spec.make_args(case)
    ctx = Ctx(op, case, args, kwargs, cfg, spec.cost(case, args).bytes)
    entry = getattr(kernels, op)
    static = {k: v for k, v in ctx.kwargs.items() if k not in _arrays(ctx.kwargs)}
    here = kernels.available_impls(op)
    records: list[dict] = []
    runners: dict[int, Any] = {}
    for name in (n for n in TUNED_IMPLS if n in here):
        base = {
            "kernel": op,
            "case": case.name,
            "impl": name,
            "shape_class": None,
            "config": None,
            "ms": None,
        }
        module = _tune_module(op, name)
        if module is None:
            records.append({**base, "status": "skipped: its module has no shape_class/tune_space"})
            continue
        reason = registry.implementations(op)[name].unsupported(*args, **kwargs)
        if reason is not None:
            records.append({**base, "status": f"unsupported: {reason}"})
            continue
        try:
            shape_class = module.shape_class(*args, **kwargs)
            space = list(module.tune_space(*args, **kwargs))
        except Exception as err:  # the module's own error, reported in its row
            records.append({**base, "status": f"failed: tune_space: {_short(err)}"})
            continue
        unique = {json.dumps(_config_fields(c), sort_keys=True, default=str): c for c in reversed(space)}
        for config in list(reversed(unique.values()))[: cfg["max_configs"]]:
            rec = {**base, "shape_class": shape_class, "config": _config_fields(config), "status": "ok"}
            records.append(rec)

            def fn(*s, name=name, config=config):
                return entry(*s[:-1], impl=name, config=config, **static, **s[-1])

            try:
                jax.jit(fn).trace(*ctx.entry_sets[0]).lower().compile()
            except Exception as err:  # does not compile here: dropped before any timing
                rec["status"] = f"pruned: does not compile: {_short(err)}"
                continue
            if target is not None:
                why = prune_by_resources(op, name, case, config, target)
                if why:
                    rec["status"] = f"pruned: {why}"
                    continue
            try:
                runners[len(records) - 1] = timing.in_program_loop(
                    fn, ctx.entry_sets, target_s=cfg["target_s"], max_calls=cfg["max_calls"]
                )
            except Exception as err:
                rec["status"] = f"failed: {_short(err)}"
    errors: dict[int, BaseException] = {}
    for i, t in timing.interleave(runners, rounds=cfg["repeats"], dispatch=False, errors=errors).items():
        records[i]["ms"] = 1e3 * t.device.median_s
    for i, err in errors.items():
        records[i]["status"] = f"failed: {_short(err)}"
    for rec in records:
        if progress is not None:
            progress(_tune_row(rec))
    return records


def best_configs(records: list[dict]) -> list[tuple[str, str, str, dict, float]]:
    """(op, impl, shape_class, config, ms) of the fastest config of each (op, impl, shape class): the lowest
    geometric mean of ms over the class's cases, among the configs timed at every one of them (ms: that
    geometric mean)."""
    timed: dict[tuple, dict[str, dict]] = {}
    cases: dict[tuple, set] = {}
    for r in records:
        if r["shape_class"] is None:
            continue
        key = (r["kernel"], r["impl"], r["shape_class"])
        cases.setdefault(key, set()).add(r["case"])
        if r["status"] == "ok" and r["ms"]:
            name = json.dumps(r["config"], sort_keys=True)
            timed.setdefault(key, {}).setdefault(name, {})[r["case"]] = r["ms"]
    out = []
    for key, configs in timed.items():
        full = {c: ms for c, ms in configs.items() if set(ms) == cases[key]}
        if not full:
            continue
        score = {c: math.exp(sum(math.log(v) for v in ms.values()) / len(ms)) for c, ms in full.items()}
        best = min(score, key=score.get)
        out.append((*key, json.loads(best), score[best]))
    return out


def tune(
    smoke: bool = False,
    only: tuple[str, ...] = KERNELS,
    out: str | None = None,
    target: str | None = "device",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Sweep every tuned kernel's space at each case (`--tune`), write the best configuration per (op, impl,
    shape class, device kind) to `out` (default `kernels.tuning.user_file()`) and return {"device",
    "prune_target", "tuned" (the path), "entries", "records"}. `target`: the compile-only target whose
    compiled code prunes candidates ("device": the one standing for this GPU, `prune_target()`; None: prune
    by compiling on this device only)."""
    import jax

    from kernels import compile_only, tuning

    for name in only:
        if name not in KERNELS:
            raise ValueError(f"kernel {name!r} must be one of {KERNELS}")
    cfg = SMOKE if smoke else FULL
    if target == "device":
        target = prune_target()
    skipped = compile_only.missing(target) if target else None
    if skipped and progress is not None:
        progress(f"not pruning by compiled resources: {target}: {skipped}")
    prune_on = None if skipped else target
    device_kind = getattr(jax.devices()[0], "device_kind", "") or jax.devices()[0].platform
    records = []
    for op in only:
        for case in importlib.import_module(ARG_SPECS[op]).cases("smoke" if smoke else "accel"):
            try:
                records += _tune_case(op, case, cfg, prune_on, progress)
            except Exception as err:  # e.g. the arguments cannot be built: one failed record for the case
                records.append(
                    {"kernel": op, "case": case.name, "impl": "-", "shape_class": None, "config": None,
                     "ms": None, "status": f"failed: {_short(err)}"}
                )  # fmt: skip
    entries = [tuning.entry(op, impl, cls, device_kind, config, ms) for op, impl, cls, config, ms in
               best_configs(records)]  # fmt: skip
    path = tuning.write(entries, out)
    return {
        "device": {"platform": jax.devices()[0].platform, "device_kind": device_kind, "jax": jax.__version__},
        "prune_target": prune_on,
        "tuned": None if path is None else str(path),
        "entries": entries,
        "records": records,
    }


def _tune_row(r: dict) -> str:
    config = "-" if r["config"] is None else json.dumps(r["config"], sort_keys=True)
    return (
        f"{r['kernel']:<16} {r['case']:<24} {r['impl']:<18} {r['shape_class'] or '-':<12} {config[:60]:<60} "
        f"{_fmt(r['ms'], '9.4f')}  {r['status'][:200]}"
    )


def _fractions(rec: dict, info: dict) -> None:
    if rec["status"] != "ok" or not rec.get("bytes") or not rec.get("ms"):
        return
    rate = rec["bytes"] / (rec["ms"] * 1e-3)
    if info.get("datasheet_bandwidth"):
        rec["frac_datasheet"] = rate / info["datasheet_bandwidth"]
    if info.get("measured_bandwidth"):
        rec["frac_measured"] = rate / info["measured_bandwidth"]


def _ratios(records: list[dict]) -> None:
    best: dict[tuple[str, str], float] = {}
    for r in records:
        if r["role"] == "baseline" and r["status"] == "ok" and r["ms"]:
            key = (r["kernel"], r["case"])
            best[key] = min(best.get(key, math.inf), r["ms"])
    for r in records:
        b = best.get((r["kernel"], r["case"]))
        if r["status"] == "ok" and b:
            r["ratio"] = r["ms"] / b


def _fmt(v: Any, spec: str) -> str:
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return f"{'-':>{width}}" if v is None else format(v, spec)


HEADER = (
    f"{'kernel':<16} {'case':<24} {'impl':<50} {'ms':>9} {'ms_disp':>9} {'%sheet':>7} {'%meas':>7} "
    f"{'ratio':>7}  status"
)


def _row(r: dict) -> str:
    pct = {k: None if r[k] is None else 100 * r[k] for k in ("frac_datasheet", "frac_measured")}
    impl = f"{r['impl']} (auto)" if r.get("auto") else r["impl"]
    return (
        f"{r['kernel']:<16} {r['case']:<24} {impl[:50]:<50} {_fmt(r['ms'], '9.4f')} "
        f"{_fmt(r['ms_dispatch'], '9.4f')} {_fmt(pct['frac_datasheet'], '7.1f')} "
        f"{_fmt(pct['frac_measured'], '7.1f')} {_fmt(r['ratio'], '7.2f')}  {r['status']}"
    )


def _only(text: str) -> tuple[str, ...]:
    """argparse `type` of --only: comma-separated kernels, each one of KERNELS, at least one, no repeats."""
    names = [s.strip() for s in text.split(",")]
    valid = ", ".join(KERNELS)
    if not any(names) or not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item; give kernels from: {valid}")
    bad = [n for n in names if n not in KERNELS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kernel(s) {', '.join(bad)}; valid kernels: {valid}")
    return tuple(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    from roofline.cli import writable_path

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accel",
        description="The lab's kernels against the accelerator's own baselines (see the module docstring).",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, any backend (the test suite's run)"
    )
    parser.add_argument(
        "--out", type=writable_path, help="write the records as JSON to this file (checked before any run)"
    )
    parser.add_argument(
        "--only",
        type=_only,
        default=KERNELS,
        help=f"comma-separated kernels to run, of: {', '.join(KERNELS)} (default: all)",
    )
    parser.add_argument(
        "--impl-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first; the implementations it registers (kernels.registry.register) are timed",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="sweep each Pallas GPU kernel's tune_space instead: prune by compiling, time, write the best "
        "configuration per (op, impl, shape class, device kind) to the tuned file",
    )
    parser.add_argument(
        "--tune-out",
        type=writable_path,
        metavar="PATH",
        help="with --tune: the tuned file to write (default: tuned.json in $TOKENLAB_CACHE; kernels read "
        "another one through TOKENLAB_TUNED)",
    )
    parser.add_argument(
        "--tune-target",
        default="device",
        metavar="TARGET",
        help="with --tune: the compile-only target (sm_80, sm_90a, sm_100a) whose compiled code prunes "
        "candidates that spill or exceed shared memory (default: the one standing for this GPU; none on "
        "another device; 'none': prune only by compiling here)",
    )
    args = parser.parse_args(argv)
    if args.tune_target not in ("device", "none", *PRUNE_TARGETS.values()):
        parser.error(
            f"argument --tune-target: {args.tune_target!r} is not one of device, none, "
            f"{', '.join(PRUNE_TARGETS.values())}"
        )
    if (args.tune_out or args.tune_target != "device") and not args.tune:
        parser.error("--tune-out and --tune-target go with --tune")
    for module in args.impl_module:
        try:
            importlib.import_module(module)
        except Exception as err:  # say which module, then stop: the table would silently lack its rows
            parser.error(f"--impl-module {module}: {_short(err)}")
    t0 = time.perf_counter()
    if args.tune:
        return _main_tune(args, t0)
    result = run(
        smoke=args.smoke,
        only=args.only,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        impl_modules=tuple(args.impl_module),
    )
    dev = result["device"]
    print(HEADER)
    for rec in result["records"]:
        print(_row(rec))
    print(
        f"\ndevice: {dev['platform']} {dev['device_kind']!r} (catalogue: {dev['chip']}), jax {dev['jax']}; "
        f"datasheet {_fmt(dev['datasheet_bandwidth'] and dev['datasheet_bandwidth'] / 1e9, '.0f')} GB/s, "
        f"measured {_fmt(dev['measured_bandwidth'] and dev['measured_bandwidth'] / 1e9, '.0f')} GB/s; "
        f"{time.perf_counter() - t0:.0f} s. ratio: ms over the best baseline's ms in the same case."
    )
    bad = [r for r in result["records"] if r["status"].startswith("failed") and r["role"] == "lab"]
    if args.out:
        try:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
        except OSError as err:  # the table above is already printed
            print(f"error: could not write {args.out!r}: {err}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
    return 1 if bad else 0


def _main_tune(args: argparse.Namespace, t0: float) -> int:
    result = tune(
        smoke=args.smoke,
        only=args.only,
        out=args.tune_out,
        target=None if args.tune_target == "none" else args.tune_target,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    dev = result["device"]
    print(f"{'kernel':<16} {'case':<24} {'impl':<18} {'class':<12} {'config':<60} {'ms':>9}  status")
    for rec in result["records"]:
        print(_tune_row(rec))
    print(f"\nbest per (op, impl, shape class) on {dev['device_kind']!r}, jax {dev['jax']}:")
    for e in result["entries"]:
        print(
            f"  {e['op']:<16} {e['impl']:<18} {e['shape_class']:<12} {json.dumps(e['config'])} "
            f"{e['ms']:.4f} ms"
        )
    print(
        f"{'wrote ' + result['tuned'] if result['tuned'] else 'nothing to write (no candidate was timed)'}; "
        f"pruned on {result['prune_target'] or 'this device only'}; {time.perf_counter() - t0:.0f} s."
    )
    if args.out:
        try:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
        except OSError as err:
            print(f"error: could not write {args.out!r}: {err}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
    failed = [r for r in result["records"] if r["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    # PyTorch shares the device: keep JAX from reserving 75% of it when it starts.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
