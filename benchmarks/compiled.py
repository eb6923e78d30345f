"""Every lab program compiled for the GPUs and TPUs it is meant for, on a machine with neither, and what the
compiled code says about each kernel.

    python -m benchmarks.compiled [--only OP[,OP]] [--targets sm_80,sm_90a,sm_100a,v5e,v6e] [--quick]
                                  [--json FILE]

Programs (`programs`): each op's public entry at its benchmark cases (`kernels/<op>/arg_specs.py`, tag
"accel", the shapes `benchmarks.accel` times) and at its small ones (tag "smoke"), shape-only (no array is
made). For every implementation of `kernels.registry.implementations(op)` that lowers for the target's
platform and is traced (the NumPy reference and the CPU library are not): a Pallas kernel in the case's
dtype, forward and, where the op differentiates through the kernel, backward (`jax.grad` of the summed
output with respect to the floating inputs); the XLA path at every strategy (`xla.Config(strategy=...)`),
in the case's dtype and in float32 ("xla": the strategy it picks itself; "xla:<strategy>": each one).
`--quick`: the small cases only. `--impls pallas,xla,strategies`: which of the three families (default all).

Targets (`kernels.compile_only.TARGETS`): sm_80 (A100), sm_90a (H100) and sm_100a (B200) through XLA:GPU's
deviceless compilation with the CUDA plugin; v5e and v6e through libtpu's compile-only devices.

Records (one per kernel op × case × impl × target; `--json` writes {"device", "records"} as
`benchmarks.accel --out` does): kernel (the op), case, impl (with the strategy and, for a backward, " grad"),
dtype, target, status: "ok", "unsupported: <why>" (the backend declines the call on that target; not a
failure), "failed: <compiler message>" or "missing: <toolchain absent>".

On GPU targets `kernels` lists each compiled kernel: name; backend ("pallas_mosaic_gpu", "pallas_triton" or
"xla": one of XLA's own fusions); pallas (a lab Pallas kernel: backend is not "xla"); registers; spill_bytes
(local memory and stack frame per thread: where spills go, so an upper bound on them); shared_bytes (static
+ dynamic); threads; ctas_per_sm (the fewest that registers, shared memory, threads and the hardware's cap
allow); programs (the launch grid); waves (programs / (SMs × ctas_per_sm)); num_stages (a Triton kernel's
software-pipelining stages, from its custom call; null for the others); tensor_core ("tcgen05",
"wgmma", "mma" or "none", from the SASS); tma (bulk tensor copies in the SASS); loop_instructions (the SASS
instructions of the largest innermost loop, barrier-wait loops not counted: a pipeline's mbarrier try-wait
is a loop of a few instructions inside the main loop; null without a loop). `kernels_per_call`: how many
distinct kernels the program launches (GEMMs XLA hands to cuBLAS are library calls, not kernels of the
program, and are not counted). Reading SASS costs about a second a kernel, so by default it is read for the
lab's Pallas kernels only (`--sass all`: XLA's own kernels too; the others have these three null).

Mosaic GPU kernels are compiled by XLA:GPU with the program (Mosaic's passes, LLVM and ptxas, for the target
the kernel was lowered for) and stored in their custom call's thunk, not as kernel launches: the report
reads their cubin there and their grid and block from the kernel's MLIR module
(`kernels.compile_only.mosaic_gpu_kernels`).

INT4 records: each Pallas kernel with a main loop carries weights_per_warp_instruction, the INT4 weights
whose packed codes one pass of the main loop loads (`loop_weights`: the kernel module's
`weights_per_loop_pass`, else the Triton kernel's block_k × block_n) ÷ the CTA's warps (all of them, a
warp-specialized kernel's producer warps included) ÷ loop_instructions; null for kernels without such a loop
(a reduction pass, XLA's fusions) and for backends that do not say.

On TPU targets: `vmem`, the most scoped VMEM one of the program's Mosaic kernels uses (libtpu's
`used_scoped_memory_configs`; null without a Mosaic kernel), `vmem_limit` (what the kernel asked for, or
libtpu's default scoped limit), `vmem_capacity`, the chip's (`pltpu.get_tpu_info()`), and `roofline_us`, the
Pallas forward's bytes (the op's cost counter) over the chip's datasheet HBM bandwidth: the bound a timing
would be held against. libtpu 0.0.52 writes a static cycle estimate (`estimated_cycles`) on XLA's own ops
but none on a Mosaic kernel, so the report gives none. This is a compile, not a timing: nothing runs.

The exit status is 1 if any program failed to compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

KERNELS = ("paged_attention", "int4_matmul", "moe_ffn")
ARG_SPECS = {op: f"kernels.{'moe' if op == 'moe_ffn' else op}.arg_specs" for op in KERNELS}
GPU_TARGETS = ("sm_80", "sm_90a")
TPU_TARGETS = ("v5e", "v6e")
DEFAULT_TARGETS = (*GPU_TARGETS, "sm_100a", *TPU_TARGETS)
FAMILIES = ("pallas", "xla", "strategies")
# Custom calls that hold a lab Pallas Triton kernel, and where their kernel's name is.
_PALLAS_NAME = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?\bname = \\?"([A-Za-z0-9_]+)')
# What the backend of each kernel is called in the records.
BACKENDS = ("pallas_mosaic_gpu", "pallas_triton", "xla")


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program: `fn(*args)` for the op `kernel` at `case`, by `impl`."""

    kernel: str
    case: str
    impl: str
    dtype: str
    fn: Callable[..., Any] = dataclasses.field(repr=False)
    args: tuple[Any, ...] = dataclasses.field(repr=False)
    check: Callable[..., str | None] | None = None  # why the backend declines the call (None: it serves it)
    # INT4 Pallas programs: the weights one pass of the kernel's main loop loads (`loop_weights`).
    weights: Callable[..., int | dict[str, int] | None] | None = None
    bytes: float | None = None  # the forward's HBM bytes by the op's cost counter (the roofline bound's)

    @property
    def family(self) -> str:
        return family(self.impl)


def family(impl: str) -> str:
    """The family of a program's impl label: "pallas" (a Pallas kernel, forward or backward), "xla" (the XLA
    path's own strategy choice) or "strategies" (one XLA strategy named)."""
    if impl.startswith("xla:"):
        return "strategies"
    return "xla" if impl == "xla" else "pallas"


# --------------------------------------------------------------------------------------------------------
# The programs
def _entry(op: str) -> Callable[..., Any]:
    import kernels

    return getattr(kernels, op)


def _with_dtype(op: str, case: Any, dtype: str) -> Any:
    """`case` with its activations (and float weights) in `dtype`, renamed to say so."""
    field = "x_dtype" if op == "int4_matmul" else "dtype"
    old = getattr(case, field)
    if old == dtype:
        return case
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    name = case.name.replace(short.get(old, old), short.get(dtype, dtype))
    return dataclasses.replace(case, name=name, **{field: dtype})


def _float_argnums(args: tuple[Any, ...]) -> tuple[int, ...]:
    import jax.numpy as jnp

    return tuple(
        i for i, a in enumerate(args) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
    )


def _grad_fn(entry: Callable[..., Any], argnums: tuple[int, ...], **kw: Any) -> Callable[..., Any]:
    import jax
    import jax.numpy as jnp

    def loss(*a: Any) -> Any:
        return entry(*a, **kw).astype(jnp.float32).sum()

    return jax.grad(loss, argnums=argnums)


def programs(op: str, platform: str, *, quick: bool = False) -> Iterator[Program]:
    """The programs `op` is compiled as for `platform` ("cuda" or "tpu"); see the module docstring."""
    import importlib

    from kernels import registry

    specs = importlib.import_module(ARG_SPECS[op])
    entry = _entry(op)
    cases = specs.cases("smoke") + (() if quick else specs.cases("accel"))
    impls = [
        impl
        for name, impl in registry.implementations(op).items()
        if platform in impl.platforms and impl.traceable and name != "reference"
    ]
    import jax

    for case in cases:
        for impl in impls:
            if impl.name == "xla":
                for dtype in dict.fromkeys((_dtype(op, case), "float32")):
                    variant = _with_dtype(op, case, dtype)
                    args, kwargs = specs.arg_shapes(variant)
                    # "xla": the strategy the XLA path picks itself (the one impl="auto" runs); then each.
                    for name in ("xla", *registry.STRATEGIES[op]):
                        label = name if name == "xla" else f"xla:{name}"
                        fn = functools.partial(entry, impl=name, **kwargs)
                        yield Program(op, variant.name, label, dtype, fn, args)
                continue
            args, kwargs = specs.arg_shapes(case)
            check = functools.partial(impl.unsupported, **kwargs)
            kw = {"impl": impl.name, **kwargs}
            dtype = _dtype(op, case)
            weights = functools.partial(loop_weights, impl, **kwargs) if op == "int4_matmul" else None
            fn = functools.partial(entry, **kw)
            nbytes = specs.cost(case).bytes
            if op == "int4_matmul" and impl.name == PREPARED_INT4:
                # Its forward as a serving loop runs it: on the weight prepared once, at load.
                from kernels.int4_matmul import prepare

                prepared = (args[0], jax.eval_shape(prepare, args[1]), *args[2:])
                on_canonical = functools.partial(_on_args, args=args)
                yield Program(
                    op,
                    case.name,
                    impl.name,
                    dtype,
                    fn,
                    prepared,
                    on_canonical(check),
                    on_canonical(weights),
                    nbytes,
                )
            else:
                yield Program(op, case.name, impl.name, dtype, fn, args, check, weights, nbytes)
            if impl.name.startswith("pallas") and op in ("int4_matmul", "moe_ffn"):
                grad = _grad_fn(entry, _float_argnums(args), **kw)
                yield Program(op, case.name, f"{impl.name} grad", dtype, grad, args, check, weights)


def _on_args(fn: Callable[..., Any], *, args: tuple) -> Callable[..., Any]:
    """`fn` asked about `args` (the canonical Int4Weight's shapes) whatever the program is placed with."""

    def asked(*_placed: Any) -> Any:
        return fn(*args)

    return asked


# The INT4 implementation whose forward is compiled on a prepared weight (`kernels.int4_matmul.prepare`).
PREPARED_INT4 = "pallas_mosaic_gpu"


def _dtype(op: str, case: Any) -> str:
    return case.x_dtype if op == "int4_matmul" else case.dtype


def loop_weights(impl: Any, *args: Any, **kwargs: Any) -> int | dict[str, int] | None:
    """The INT4 weights whose packed codes one pass of the main loop of `impl`'s kernel loads (per CTA), for
    `int4_matmul(*args, **kwargs)` on the target being compiled for (call it under `on_target`), or None.

    The kernel's module says it where it can: `weights_per_loop_pass(*args, **kwargs)` -> int, or
    {kernel name: int} when the program launches several kernels with such a loop. Without that function, one
    pass of the main loop is taken to load one block_k × block_n tile of the weight (both Pallas INT4 kernels
    step along K one weight tile at a time), with the tiles the kernel resolves for the call: the Mosaic GPU
    module's `choose(x, w, config)`, the Triton module's `choose_config(M, K, N, group_size, dtype=..., **the
    Config's fields)`. Any other backend: None (no figure rather than a guess)."""
    import importlib
    import math

    if not impl.name.startswith("pallas"):
        return None
    module = importlib.import_module(impl.fn.__module__)
    hook = getattr(module, "weights_per_loop_pass", None)
    if hook is not None:
        return hook(*args, **kwargs)
    x, w = args[:2]
    config = impl.resolve_config(None, *args, **kwargs)
    if hasattr(module, "choose"):
        tiles = module.choose(x, w, config)
    elif hasattr(module, "choose_config"):
        k, n = w.shape
        given = {f: v for f, v in dataclasses.asdict(config).items() if v is not None} if config else {}
        tiles = module.choose_config(math.prod(x.shape[:-1]), k, n, w.group_size, dtype=x.dtype, **given)
    else:
        return None
    return tiles.block_k * tiles.block_n


def _add_loop_figures(rec: dict[str, Any], weights: int | dict[str, int] | None) -> None:
    """weights_per_warp_instruction on each Pallas kernel with a main loop (see the module docstring)."""
    for k in rec.get("kernels") or []:
        k.setdefault("weights_per_warp_instruction", None)
        if not k["pallas"] or weights is None:
            continue
        w = weights.get(k["name"]) if isinstance(weights, dict) else weights
        if w and k["loop_instructions"] and k["threads"]:
            k["weights_per_warp_instruction"] = round(w / (k["threads"] / 32) / k["loop_instructions"], 2)


# --------------------------------------------------------------------------------------------------------
# Reading the compiled code
def _tool(name: str) -> str | None:
    """A CUDA binary tool (cuobjdump, nvdisasm): the pip wheel's copy, else one on PATH."""
    try:
        import nvidia.cu13 as cu13  # the nvidia-cuda-cuobjdump wheel's namespace

        for root in cu13.__path__:
            path = os.path.join(root, "bin", name)
            if os.access(path, os.X_OK):
                return path
    except ImportError:
        pass
    return shutil.which(name)


def _cuobjdump(cubin: bytes, option: str) -> str:
    tool = _tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, option, fh.name], capture_output=True, text=True)
    if out.returncode:
        raise ValueError(f"cuobjdump {option}: {(out.stderr or out.stdout).strip()[:200]}")
    return out.stdout


@functools.lru_cache(maxsize=4096)
def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread, spill bytes per thread (local memory and stack) and static shared memory of a
    one-kernel cubin (`cuobjdump --dump-resource-usage`)."""
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise ValueError(f"cuobjdump found no kernel in the cubin: {usage.strip()[:200]}")
    return {
        "registers": int(m.group(1)),
        "spill_bytes": int(m.group(4)) + int(m.group(2)),
        "static_shared": int(m.group(3)),
    }


@functools.lru_cache(maxsize=1024)
def cubin_sass(cubin: bytes) -> dict[str, Any]:
    """`sass_figures` of a one-kernel cubin (`cuobjdump --dump-sass`: about a second each, so the report
    reads the SASS of the lab's Pallas kernels, and of XLA's own kernels only when asked)."""
    return sass_figures(_cuobjdump(cubin, "--dump-sass"))


# The most instructions a barrier-wait loop has (try-wait, back-off, retry, branch, and a few of address
# arithmetic); sass_figures skips such loops when it looks for the main loop.
SPIN_LOOP_MAX = 12
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_figures(sass: str) -> dict[str, Any]:
    """From `cuobjdump -sass` text: the tensor-core instructions used, whether TMA is, and the instruction
    count of the largest innermost loop (a backward branch whose span holds no other backward branch)."""
    lines = [(int(a, 16), op) for a, op in _SASS_LINE.findall(sass)]
    ops = " ".join(op for _, op in lines)
    if re.search(r"\bUTC\w*MMA", ops):
        tensor_core = "tcgen05"
    elif re.search(r"\bHGMMA|\bIGMMA|\bQGMMA", ops):
        tensor_core = "wgmma"
    elif re.search(r"\bHMMA|\bIMMA", ops):
        tensor_core = "mma"
    else:
        tensor_core = "none"
    tma = bool(re.search(r"\bUTMALDG|\bUTMASTG|\bUBLKCP", ops))
    loops = []
    for addr, op in lines:
        m = re.search(r"\bBRA(?:\.\w+)* (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))

    def waits(s: int, e: int) -> bool:
        # A barrier wait (an mbarrier try-wait retried until its phase flips: TMA and wgmma pipelines, Mosaic
        # GPU's and Triton's alike) is a loop in the SASS but no pass of the kernel's work: a few
        # instructions around SYNCS.PHASECHK with no loop inside.
        span = [o for a, o in lines if s <= a <= e]
        nested = any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)
        return len(span) <= SPIN_LOOP_MAX and not nested and any("SYNCS.PHASECHK" in o for o in span)

    loops = [(s, e) for s, e in loops if not waits(s, e)]
    inner = [
        (s, e) for s, e in loops if not any(s < s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)
    ]
    size = max((sum(1 for a, _ in lines if s <= a <= e) for s, e in inner), default=None)
    return {"tensor_core": tensor_core, "tma": tma, "loop_instructions": size}


def triton_calls(hlo_text: str) -> dict[str, int | None]:
    """name -> num_stages of each Pallas Triton kernel in a compiled program's HLO text (its custom call's
    backend_config)."""
    out: dict[str, int | None] = {}
    for line in hlo_text.splitlines():
        m = _PALLAS_NAME.search(line)
        if m:
            stages = re.search(r"\bnum_stages = (\d+)", line)
            out.setdefault(m.group(1), int(stages.group(1)) if stages else None)
    return out


def gpu_report(compiled: Any, target: str, *, sass: str = "pallas") -> list[dict[str, Any]]:
    """One dict per kernel of a program compiled for a GPU target (see the module docstring). `sass`: whose
    SASS is read for tensor_core, tma and loop_instructions: "pallas" (the lab's kernels), "all" or "none";
    the others have them null."""
    from kernels import compile_only

    if sass not in ("pallas", "all", "none"):
        raise ValueError(f"sass={sass!r} must be 'pallas', 'all' or 'none'")
    info = compile_only.gpu_info(target)
    triton = triton_calls(compiled.as_text())
    mosaic = compile_only.mosaic_gpu_kernels(compiled)
    kernels = [(k, "pallas_mosaic_gpu") for k in mosaic]
    kernels += [
        (k, "pallas_triton" if k.name in triton else "xla") for k in compile_only.gpu_kernels(compiled)
    ]
    out = []
    for k, backend in kernels:
        pallas = backend != "xla"
        res = cubin_resources(k.cubin)
        shared = res["static_shared"] + k.dynamic_shared
        ctas = (
            info.occupancy(threads=k.threads, registers=res["registers"], shared=shared)
            if k.threads
            else None
        )
        waves = k.programs / (info.sms * ctas) if ctas else None
        read = sass == "all" or (sass == "pallas" and pallas)
        code = cubin_sass(k.cubin) if read else dict.fromkeys(("tensor_core", "tma", "loop_instructions"))
        out.append(
            {
                "name": k.name,
                "backend": backend,
                "pallas": pallas,
                "registers": res["registers"],
                "spill_bytes": res["spill_bytes"],
                "shared_bytes": shared,
                "threads": k.threads or None,
                "ctas_per_sm": ctas,
                "programs": k.programs or None,
                "waves": None if waves is None else round(waves, 3),
                "num_stages": triton.get(k.name) if backend == "pallas_triton" else None,
                **code,
            }
        )
    return out


_USED_VMEM = re.compile(r'"used_scoped_memory_configs":\[\{"memory_space":"1"[^}]*?"size":"?(\d+)')
_ASKED_VMEM = re.compile(r'"scoped_memory_configs":\[\{"memory_space":"?1"?,[^}]*?"size":"?(\d+)')
# libtpu's default scoped VMEM limit per chip (from its out-of-memory messages; no API reports it).
DEFAULT_SCOPED_VMEM = {"v5e": 16 << 20, "v6e": 32 << 20}


def tpu_report(compiled: Any, target: str) -> dict[str, Any]:
    """The VMEM figures of a program compiled for a TPU target (see the module docstring)."""
    from jax.experimental.pallas import tpu as pltpu

    from kernels import compile_only

    text = "\n".join(
        line for line in compiled.as_text().splitlines() if 'custom_call_target="tpu_custom_call"' in line
    )
    used = [int(v) for v in _USED_VMEM.findall(text)]
    asked = [int(v) for v in _ASKED_VMEM.findall(text)]
    with compile_only.on_target(target):
        capacity = pltpu.get_tpu_info().vmem_capacity_bytes
    return {
        "vmem": max(used) if used else None,
        "vmem_limit": max(asked) if asked else DEFAULT_SCOPED_VMEM.get(target),
        "vmem_capacity": capacity,
    }


# --------------------------------------------------------------------------------------------------------
# Running
def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:400]}"


def compile_program(program: Program, target: str, *, sass: str = "pallas") -> dict[str, Any]:
    """The record of `program` compiled for `target`."""
    from kernels import compile_only

    rec: dict[str, Any] = {
        "kernel": program.kernel,
        "case": program.case,
        "impl": program.impl,
        "dtype": program.dtype,
        "target": target,
    }
    import jax

    reason = compile_only.missing(target)
    if reason:
        return {**rec, "status": f"missing: {reason}"}
    t0 = time.perf_counter()
    try:
        with compile_only.on_target(target) as place:
            args = place(program.args)
            why = program.check(*args) if program.check else None
            if why:
                return {**rec, "status": f"unsupported: {why}"}
            hopper_only = program.impl.startswith("pallas_mosaic_gpu")
            if hopper_only and compile_only.gpu_info(target).capability < (9, 0):
                # LLVM aborts the whole process on wgmma/TMA for an older GPU: never try, and say whose fault.
                return {
                    **rec,
                    "status": f"failed: {program.impl} serves this call on {target}, but Mosaic "
                    "GPU kernels need compute capability 9.0; its supports() must decline",
                }
            try:
                weights = program.weights(*args) if program.weights else None
            except Exception as err:  # the compile is still worth its record; this says why the figure is not
                weights, rec["weights_error"] = None, _short(err)
            compiled = jax.jit(program.fn).trace(*args).lower().compile()
    except Exception as err:  # the compiler's own message is the record
        return {**rec, "status": f"failed: {_short(err)}", "seconds": round(time.perf_counter() - t0, 2)}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    try:
        if compile_only.get_target(target).platform == "cuda":
            rec["kernels"] = gpu_report(compiled, target, sass=sass)
            rec["kernels_per_call"] = len(rec["kernels"])
            if program.kernel == "int4_matmul":
                _add_loop_figures(rec, weights)
        else:
            rec.update(tpu_report(compiled, target))
            rec["roofline_us"] = _roofline_us(program.bytes, target)
    except (compile_only.ToolchainMissing, FileNotFoundError) as err:
        return {**rec, "status": f"missing: {err}"}
    except Exception as err:
        return {**rec, "status": f"failed: reading the compiled code: {_short(err)}"}
    return {**rec, "status": "ok"}


# The catalogue chip of each TPU target (roofline.CHIPS), for the HBM roofline bound beside libtpu's estimate.
TPU_CHIPS = {"v5e": "tpu-v5e", "v6e": "tpu-v6e"}


def _roofline_us(nbytes: float | None, target: str) -> float | None:
    """The program's bytes over the chip's datasheet HBM bandwidth, in µs (None when either is unknown)."""
    import roofline

    chip = roofline.CHIPS.get(TPU_CHIPS.get(target, ""))
    if nbytes is None or chip is None:
        return None
    return round(1e6 * nbytes / float(chip.bandwidth), 3)


def run(
    *,
    only: tuple[str, ...] = KERNELS,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    quick: bool = False,
    select: Callable[[Program], bool] | None = None,
    sass: str = "pallas",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compile every program of `only` for every target; {"device", "records"}."""
    import jax

    from kernels import compile_only

    records = []
    for target in targets:
        platform = compile_only.get_target(target).platform
        for op in only:
            for program in programs(op, platform, quick=quick):
                if select is not None and not select(program):
                    continue
                rec = compile_program(program, target, sass=sass)
                records.append(rec)
                if progress:
                    progress(_row(rec))
    device = {
        "platform": "compile-only",
        "targets": {t: compile_only.get_target(t).label for t in targets},
        "jax": jax.__version__,
    }
    return {"device": device, "records": records}


def main_kernels(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The kernels of a record a row summarizes: its Pallas kernels, else all of them."""
    ks = rec.get("kernels") or []
    return [k for k in ks if k["pallas"]] or ks


HEADER = (
    f"{'kernel':<16} {'case':<22} {'impl':<22} {'target':<7} {'#k':>3} {'regs':>4} {'spill':>5} "
    f"{'smem KiB':>8} {'CTA/SM':>6} {'waves':>7} {'tc':<7} {'loop':>5} {'w/wi':>6}  status"
)


def _summary(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The figures one row shows for a record: over its Pallas kernels, else all its kernels."""
    ks = main_kernels(rec)
    if not ks:
        return None
    worst = max(ks, key=lambda k: (k["registers"], k["shared_bytes"]))
    loops = [k["loop_instructions"] for k in ks if k["loop_instructions"]]
    wpi = [k["weights_per_warp_instruction"] for k in ks if k.get("weights_per_warp_instruction")]
    ctas = [k["ctas_per_sm"] for k in ks if k["ctas_per_sm"] is not None]
    return {
        "kernels": rec.get("kernels_per_call", len(rec["kernels"])),
        "registers": worst["registers"],
        "spills": sum(k["spill_bytes"] for k in ks),
        "shared_kib": worst["shared_bytes"] / 1024,
        "ctas": min(ctas) if ctas else None,
        "waves": max((k["waves"] or 0) for k in ks),
        "tensor_core": worst["tensor_core"] or "",
        "loop": max(loops) if loops else None,
        "wpi": min(wpi) if wpi else None,
    }


def _row(rec: dict[str, Any]) -> str:
    head = f"{rec['kernel']:<16} {rec['case']:<22} {rec['impl']:<22} {rec['target']:<7}"
    f = _summary(rec)
    if f is None:
        extra = f" vmem {rec['vmem'] / 2**20:.1f} MiB" if rec.get("vmem") else ""
        blank = f"{'':>3} {'':>4} {'':>5} {'':>8} {'':>6} {'':>7} {'':<7} {'':>5} {'':>6}"
        return f"{head} {blank}  {rec['status'][:160]}{extra}"
    return (
        f"{head} {f['kernels']:>3} {f['registers']:>4} {f['spills']:>5} {f['shared_kib']:>8.1f} "
        f"{'' if f['ctas'] is None else f['ctas']:>6} {f['waves']:>7.2f} {f['tensor_core']:<7} "
        f"{'' if f['loop'] is None else f['loop']:>5} {'' if f['wpi'] is None else f['wpi']:>6}  "
        f"{rec['status'][:160]}"
    )


def markdown(records: list[dict[str, Any]]) -> str:
    """The records as a Markdown table, one row per program (its Pallas kernels, else all its kernels)."""
    cols = ("op", "case", "impl", "target", "kernels", "regs", "spills (B)", "shared (KiB)", "CTAs/SM")
    cols += ("waves", "tensor cores", "loop", "weights/warp-instr")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in records:
        f = _summary(rec)
        if f is None:
            status = rec["status"] if rec["status"] != "ok" else "compiles"
            row = (rec["kernel"], rec["case"], rec["impl"], rec["target"], status, *[""] * (len(cols) - 5))
            lines.append("| " + " | ".join(row) + " |")
            continue
        show = {k: "" if v is None else v for k, v in f.items()}
        lines.append(
            f"| {rec['kernel']} | {rec['case']} | {rec['impl']} | {rec['target']} | {show['kernels']} | "
            f"{show['registers']} | {show['spills']} | {f['shared_kib']:.1f} | {show['ctas']} | "
            f"{f['waves']:.2f} | {show['tensor_core']} | {show['loop']} | {show['wpi']} |"
        )
    return "\n".join(lines)


def _names(valid: tuple[str, ...], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = [s.strip() for s in text.split(",")]
        if not all(names):
            raise argparse.ArgumentTypeError(
                f"{text!r} has an empty item; give {what} from: {', '.join(valid)}"
            )
        bad = [n for n in names if n not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; valid: {', '.join(valid)}")
        return tuple(dict.fromkeys(names))

    return parse


def main(argv: list[str] | None = None) -> int:
    from kernels.compile_only import TARGETS
    from roofline.cli import writable_path

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compiled",
        description="Every lab program compiled for GPU and TPU targets, with each kernel's resources "
        "(a compile, not a timing; see the module docstring).",
    )
    parser.add_argument("--only", type=_names(KERNELS, "kernels"), default=KERNELS)
    parser.add_argument("--targets", type=_names(tuple(TARGETS), "targets"), default=DEFAULT_TARGETS)
    parser.add_argument("--quick", action="store_true", help="the small cases only")
    parser.add_argument(
        "--impls",
        type=_names(FAMILIES, "families"),
        default=FAMILIES,
        help="pallas (the Pallas kernels), xla (the XLA path's own choice), strategies (each XLA strategy)",
    )
    parser.add_argument(
        "--sass",
        choices=("pallas", "all", "none"),
        default="pallas",
        help="whose SASS to read for tensor cores, TMA and the main loop (about 1 s a kernel; default: the "
        "lab's Pallas kernels)",
    )
    parser.add_argument("--markdown", action="store_true", help="also print the rows as a Markdown table")
    parser.add_argument("--json", type=writable_path, help="write {device, records} as JSON to this file")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    print(HEADER, flush=True)
    result = run(
        only=args.only,
        targets=args.targets,
        quick=args.quick,
        select=lambda p: p.family in args.impls,
        sass=args.sass,
        progress=lambda r: print(r, flush=True),
    )
    failed = [r for r in result["records"] if r["status"].startswith("failed")]
    if args.markdown:
        print("\n" + markdown(result["records"]))
    print(
        f"\n{len(result['records'])} programs, {len(failed)} failed, jax {result['device']['jax']}, "
        f"{time.perf_counter() - t0:.0f} s. A compile for each target, not a timing."
    )
    if args.json:
        try:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
        except OSError as err:
            print(f"error: could not write {args.json!r}: {err}", file=sys.stderr)
            return 1
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    # Compile-only devices need no platform: keep JAX on the CPU, quietly, with the CUDA plugin installed.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu: one process at a time, unless told
    sys.exit(main())
