"""Compiling for a GPU or a TPU that is not attached: compile-only devices, and what the compiled code holds.

    program = compile_for("sm_90a", fn, *args)     # XLA:GPU for an H100, on a CPU-only host
    kernels = gpu_kernels(program)                 # each launched kernel: name, cubin, grid, block, shared
    mosaic = mosaic_gpu_kernels(program)           # the same for its Mosaic GPU kernels (custom-call thunks)
    program = compile_for("v6e", fn, *args)        # libtpu's Mosaic and XLA:TPU for a TPU v6e

`args` are arrays or `jax.ShapeDtypeStruct`s (any pytree): only their shapes and dtypes are used, so a 5 GiB
KV pool costs nothing to compile for. Targets (`TARGETS`): sm_80 (A100), sm_90a (H100), sm_100a (B200), v5e,
v6e.

How: the CUDA plugin (`jax[cuda13]`) embeds XLA's target descriptions (`GpuTargetConfigProto` text,
one per GPU model); `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`
turns one into a compile-only device, and a program jitted on it under its mesh compiles exactly as XLA
would for that GPU (without autotuning: XLA's own GEMM tiling can differ from an on-device compile; Pallas
kernels compile as written). Mosaic GPU takes its target from the default device, so that is set too.
libtpu gives compile-only TPU devices the same way. Nothing runs and no array is placed on these devices.

This is the one module that reaches into JAX internals for it: the target texts inside the plugin's shared
library and the layout of XLA:GPU's serialized executable (`GpuExecutableProto`, snappy-compressed, read
field by field). `missing(target)` says why a target cannot be compiled for here (toolchain not installed,
or a JAX whose executable layout this module does not know), so callers skip with the reason instead of
reporting something wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip to compile for: `platform` ("cuda" or "tpu") and `device`, the GPU's name in the CUDA plugin's
    target descriptions or the TPU topology ("v6e:1x1")."""

    name: str
    platform: str
    device: str
    label: str  # for reports


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("sm_80", "cuda", "NVIDIA A100-SXM4-40GB", "A100 40GB"),
        Target("sm_90a", "cuda", "NVIDIA H100 80GB HBM3", "H100 SXM"),
        Target("sm_100a", "cuda", "NVIDIA B200", "B200"),
        Target("v5e", "tpu", "v5e:1x1", "TPU v5e"),
        Target("v6e", "tpu", "v6e:1x1", "TPU v6e"),
    )
}
# The JAX versions (major, minor) whose XLA:GPU executable layout `gpu_kernels` has been checked against.
GPU_EXECUTABLE_LAYOUTS = ((0, 12),)
_CUDA_PLUGIN = "jax_plugins.xla_cuda13"


def get_target(name: str) -> Target:
    """The target called `name`; a ValueError listing the known ones otherwise."""
    if name not in TARGETS:
        raise ValueError(f"target={name!r} is not one of {list(TARGETS)}")
    return TARGETS[name]


@functools.cache
def missing(target: str) -> str | None:
    """Why `target` cannot be compiled for on this machine, or None when it can (its compile-only device is
    made once, here, so that a toolchain that is installed but does not start is a reason too)."""
    reason = _missing_toolchain(get_target(target))
    if reason is None:
        try:
            _device(target)
        except Exception as err:  # the plugin's own message says why (e.g. a CUDA version check)
            return f"the compile-only {target} device could not be made: {' '.join(str(err).split())[:300]}"
    return reason


def _missing_toolchain(t: Target) -> str | None:
    if t.platform == "cuda":
        if jax.__version_info__[:2] not in GPU_EXECUTABLE_LAYOUTS:
            known = ", ".join(f"{a}.{b}" for a, b in GPU_EXECUTABLE_LAYOUTS)
            return (
                f"the XLA:GPU executable layout of jax {jax.__version__} is not known here (known: {known})"
            )
        if importlib.util.find_spec(_CUDA_PLUGIN) is None:
            return "the CUDA plugin is not installed (pip install 'tokenlab[compile]')"
        return None
    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed (pip install 'tokenlab[compile]'; see docs/accelerators.md)"
    return None


class ToolchainMissing(RuntimeError):
    """A target this machine cannot compile for; the message says why."""


def _require(target: str) -> Target:
    reason = _missing_toolchain(get_target(target))
    if reason:
        raise ToolchainMissing(f"{target}: {reason}")
    return get_target(target)


# ----------------------------------------------------------------------------------------------------------
# GPU target descriptions
@functools.cache
def _plugin_library() -> bytes:
    spec = importlib.util.find_spec(_CUDA_PLUGIN)
    assert spec is not None and spec.origin is not None
    (lib,) = pathlib.Path(spec.origin).parent.glob("xla_cuda_plugin*.so")
    return lib.read_bytes()


@functools.cache
def gpu_target_config(device: str) -> str:
    """XLA's `GpuTargetConfigProto` text for the GPU named `device` (as the CUDA plugin names it)."""
    lib = _plugin_library()
    key = f'device_description_str: "{device}"'.encode()
    end = lib.find(key)
    if end < 0:
        names = sorted(set(re.findall(rb'device_description_str: "([^"]+)"', lib)))
        raise ValueError(
            f"the CUDA plugin has no target named {device!r}; it has {[n.decode() for n in names]}"
        )
    start = lib.rfind(b"gpu_device_info {", 0, end)
    return lib[start : lib.index(b"\0", end)].decode()


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """The limits of one GPU that decide how many CTAs fit on an SM."""

    capability: tuple[int, int]
    sms: int
    registers_per_sm: int
    shared_per_sm: int  # bytes
    shared_per_block_optin: int  # the most one CTA may ask for
    shared_reserved_per_block: int  # the driver's own share of each CTA's shared memory
    threads_per_sm: int
    ctas_per_sm: int  # the hardware's cap

    def occupancy(self, *, threads: int, registers: int, shared: int) -> int:
        """CTAs of `threads` threads, `registers` per thread and `shared` bytes that fit on one SM at once
        (registers are allocated per warp in units of 256, shared memory in units of 128 bytes)."""
        warps = -(-threads // 32)
        per_warp = -(-max(registers, 1) * 32 // 256) * 256
        by_regs = (self.registers_per_sm // per_warp) // warps
        smem = -(-(shared + self.shared_reserved_per_block) // 128) * 128
        by_smem = self.shared_per_sm // smem if shared else self.ctas_per_sm
        by_threads = self.threads_per_sm // (warps * 32)
        return max(0, min(self.ctas_per_sm, by_regs, by_smem, by_threads))


def gpu_info(target: str) -> GpuInfo:
    """`target`'s limits, read from its target description."""
    text = gpu_target_config(_require(target).device)

    def field(name: str) -> int:
        m = re.search(rf"^\s*{name}: (\d+)$", text, re.M)
        if m is None:
            raise ValueError(f"{target}: the target description has no {name}")
        return int(m.group(1))

    # Text protos leave out zero fields: a minor version of 0 is absent.
    cc = re.search(r"cuda_compute_capability \{\s*major: (\d+)(?:\s*minor: (\d+))?", text)
    if cc is None:
        raise ValueError(f"{target}: the target description has no cuda_compute_capability")
    return GpuInfo(
        capability=(int(cc.group(1)), int(cc.group(2) or 0)),
        sms=field("core_count"),
        registers_per_sm=field("registers_per_core_limit"),
        shared_per_sm=field("shared_memory_per_core"),
        shared_per_block_optin=field("shared_memory_per_block_optin"),
        shared_reserved_per_block=field("reserved_shared_memory_per_block"),
        threads_per_sm=field("threads_per_core_limit"),
        ctas_per_sm=field("max_blocks_per_multiprocessor"),
    )


# ----------------------------------------------------------------------------------------------------------
# Compiling
@functools.cache
def _device(target: str) -> tuple[Any, Any]:
    """(the compile-only device, its one-device mesh or None) for `target`."""
    from jax.experimental import topologies

    t = _require(target)
    if t.platform == "cuda":
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(t.device), topology="1x1x1"
        )
        return topo.devices[0], topologies.make_mesh(topo, (1,), ("x",))
    topo = topologies.get_topology_desc(
        t.device,
        platform="tpu",
        chip_config_name="default",
        chips_per_host_bounds=(1, 1, 1),
        num_slices=1,
        wrap=(False, False, False),
    )
    return topo.devices[0], None


@contextlib.contextmanager
def on_target(target: str) -> Iterator[Callable[[Any], Any]]:
    """Trace and lower under this context to compile for `target`; it yields `place(tree)`, which turns the
    arrays and `ShapeDtypeStruct`s of a pytree into `ShapeDtypeStruct`s on the target's device."""
    from jax.sharding import NamedSharding, PartitionSpec

    device, mesh = _device(target)
    if mesh is not None:
        sharding = NamedSharding(mesh, PartitionSpec())
    elif hasattr(jax.sharding, "make_single_device_sharding"):  # JAX >= 0.12
        sharding = jax.sharding.make_single_device_sharding(device)
    else:
        sharding = jax.sharding.SingleDeviceSharding(device)

    def place(tree: Any) -> Any:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(jax.default_device(device))
        yield place


def compile_for(target: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`jax.jit(fn)` compiled for `target` at the shapes and dtypes of `args` (a `jax.stages.Compiled`)."""
    with on_target(target) as place:
        return jax.jit(fn).trace(*place(args)).lower().compile()


# ----------------------------------------------------------------------------------------------------------
# What an XLA:GPU executable holds
@dataclasses.dataclass(frozen=True)
class GpuKernel:
    """One kernel an XLA:GPU program launches: its name, the cubin that holds it, the launch grid (CTAs along
    x, y, z), the CTA's threads (x, y, z) and the dynamic shared memory it is launched with."""

    name: str
    cubin: bytes
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dynamic_shared: int

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]


def gpu_kernels(compiled: Any) -> list[GpuKernel]:
    """The kernels of a program compiled for a GPU target, in launch order (one entry per kernel name)."""
    proto = _executable_proto(compiled)
    found: dict[str, GpuKernel] = {}
    at = proto.find(_ELF)
    while at >= 0:
        kernel = _kernel_thunk_around(proto, at)
        if kernel is not None:
            found.setdefault(kernel.name, kernel)
        at = proto.find(_ELF, at + 1)
    return list(found.values())


def _executable_proto(compiled: Any) -> bytes:
    """The `GpuExecutableProto` of a program compiled for a GPU target (a JAX whose layout is known here)."""
    if jax.__version_info__[:2] not in GPU_EXECUTABLE_LAYOUTS:
        raise ToolchainMissing(f"the XLA:GPU executable layout of jax {jax.__version__} is not known here")
    return _gpu_executable_proto(compiled._executable._unloaded_executable.xla_executable.serialize())


# A Mosaic GPU kernel's custom call and the two attributes of its backend_config read here: the kernel's MLIR
# module (bytecode, as an escaped MLIR string) and its SHA-256.
MOSAIC_GPU_CALL = 'custom_call_target="mosaic_gpu_v2"'
_MLIR_STRING = r'"((?:[^"\\]|\\.)*)"'
_MOSAIC_HASH = re.compile(r"\bkernel_hash = " + _MLIR_STRING)
_MOSAIC_MODULE = re.compile(r"\bmodule = " + _MLIR_STRING)


# --------------------------------------------------------------------------------------------------------
# Mosaic GPU kernels in an XLA:GPU executable
#
# XLA:GPU compiles a Mosaic GPU custom call (`mosaic_gpu_v2`) while it compiles the program: the kernel's MLIR
# module (in the call's backend_config) goes through Mosaic's passes, LLVM's NVPTX backend and ptxas for the
# module's own target (its `mosaic_gpu.arch_*` attributes, set from the device lowered for), and the result
# is stored in the custom-call thunk of the GpuExecutableProto as a `mosaic::gpu::CustomCallResources`
# message: 1 a version, 2 the host-side launch code (an x86-64 object), 4 the kernel hash (SHA-256 of the
# module), 5 the host entry's symbol, 8 the cubin, 9 the kernel's name, 10 its dynamic shared memory in
# bytes. The launch grid and block are not stored: the host code computes them, so they are read from the
# module's `gpu.launch` (constant operands, as Mosaic emits them). Field numbers checked against jax 0.12
# (`compile_only.GPU_EXECUTABLE_LAYOUTS`).
_MOSAIC_RESOURCES = b"N6mosaic3gpu19CustomCallResourcesE"


def _mlir_string(text: str) -> bytes:
    """The bytes of an MLIR string attribute's body as printed (`\\XX` hex escapes, `\\\\`, `\\"`)."""
    out, i = bytearray(), 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            pair = text[i + 1 : i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out += {"n": b"\n", "t": b"\t"}.get(text[i + 1], text[i + 1].encode())
            i += 2
            continue
        out += ch.encode()
        i += 1
    return bytes(out)


def mosaic_gpu_modules(hlo_text: str) -> dict[bytes, bytes]:
    """kernel hash -> MLIR module (bytecode) of each Mosaic GPU custom call in a compiled program's HLO text
    (a module whose SHA-256 is not its hash is left out)."""
    import hashlib

    out = {}
    for line in hlo_text.splitlines():
        if MOSAIC_GPU_CALL not in line:
            continue
        h, m = _MOSAIC_HASH.search(line), _MOSAIC_MODULE.search(line)
        if h is None or m is None:
            continue
        digest, module = _mlir_string(h.group(1)), _mlir_string(m.group(1))
        if hashlib.sha256(module).digest() == digest:
            out[digest] = module
    return out


def mosaic_launch(module: bytes) -> dict[str, tuple[int, int, int]] | None:
    """{"grid", "block", "cluster"} of the `gpu.launch` in a Mosaic GPU kernel's module (bytecode as in the
    custom call), or None when the module has no launch with constant dimensions."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import core, dialect

    launches: list[Any] = []

    def visit(op: Any) -> Any:
        if op.operation.name == "gpu.launch":
            launches.append(op.operation)
        return ir.WalkResult.ADVANCE

    def constant(value: Any) -> int | None:
        owner = value.owner
        op = getattr(owner, "operation", owner)
        if op.name != "arith.constant":
            return None
        return ir.IntegerAttr(op.attributes["value"]).value

    with jax_mlir.make_ir_context() as ctx, ir.Location.unknown():
        dialect.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
        parsed = core._run_serde_pass(ir.Module.parse(module), serialize=False)
        parsed.operation.walk(visit)
        if len(launches) != 1:
            return None
        (launch,) = launches
        # Operand groups: async deps, grid x/y/z, block x/y/z, cluster x/y/z, dynamic shared memory.
        sizes = list(ir.DenseI32ArrayAttr(launch.attributes["operandSegmentSizes"]))
        groups, at = [], 0
        for n in sizes:
            groups.append([constant(v) for v in list(launch.operands)[at : at + n]])
            at += n
        dims = [g[0] if len(g) == 1 else 1 for g in groups[1:10]]
        if any(d is None for d in dims):
            return None
    return {"grid": tuple(dims[0:3]), "block": tuple(dims[3:6]), "cluster": tuple(dims[6:9])}


def mosaic_gpu_kernels(compiled: Any) -> list[GpuKernel]:
    """The Mosaic GPU kernels of a program compiled for a GPU target, as `GpuKernel`s (one per
    kernel name; `gpu_kernels` lists XLA's and Triton's kernel launches, not these). A kernel
    whose launch cannot be read from its module has grid and block (0, 0, 0)."""
    text = compiled.as_text()
    if MOSAIC_GPU_CALL not in text:
        return []
    proto = _executable_proto(compiled)
    modules = mosaic_gpu_modules(text)
    found: dict[str, Any] = {}
    at = proto.find(_MOSAIC_RESOURCES)
    while at >= 0:
        start = at - 2  # the type name is field 1 of an Any-like message: tag, one-byte length, name
        at = proto.find(_MOSAIC_RESOURCES, at + 1)
        if start < 0 or proto[start] != 0x0A or proto[start + 1] != len(_MOSAIC_RESOURCES):
            continue
        try:
            _, _, _, i = _field_at(proto, start)
            number, wire, value, _ = _field_at(proto, i)
            if (number, wire) != (2, 2):
                continue
            fields = {n: v for n, _, v in _fields(value)}
        except (ValueError, IndexError):
            continue
        cubin, name = fields.get(8), fields.get(9)
        if not isinstance(cubin, bytes) or not cubin.startswith(b"\x7fELF") or not isinstance(name, bytes):
            continue
        module = modules.get(fields.get(4, b""))
        launch = mosaic_launch(module) if module else None
        zero = (0, 0, 0)
        found.setdefault(
            name.decode(),
            GpuKernel(
                name.decode(),
                cubin,
                launch["grid"] if launch else zero,
                launch["block"] if launch else zero,
                fields.get(10, 0) if isinstance(fields.get(10, 0), int) else 0,
            ),
        )
    return list(found.values())


_ELF = b"\x7fELF"
_PROTO_START = b"\n\x1axla.gpu.GpuExecutableProto"
_BLOCK, _BLOCK_HEADER, _CHUNK_HEADER = 1 << 16, 24, 40


def _gpu_executable_proto(blob: bytes) -> bytes:
    """The `GpuExecutableProto` inside a serialized XLA:GPU executable: a length-prefixed header, then a
    Riegeli file whose records hold another Riegeli file, whose records (snappy-compressed) are the proto."""
    length, i = _varint(blob, 0)
    for outer in _riegeli_records(blob[i + length :]):
        if outer[: len(_RIEGELI_SIGNATURE)] != _RIEGELI_SIGNATURE:
            continue
        proto = b"".join(_riegeli_records(outer))
        if proto.startswith(_PROTO_START):
            return proto
    raise ToolchainMissing(f"no GpuExecutableProto found in the executable (jax {jax.__version__})")


# A Riegeli file's first block header: its hash, then previous_chunk 0 and next_chunk 64 (the signature).
_RIEGELI_SIGNATURE = bytes.fromhex("83af70d10d884a3f") + bytes(8) + (64).to_bytes(8, "little")


def _riegeli_records(f: bytes) -> list[bytes]:
    """The records of a Riegeli file (github.com/google/riegeli, doc/riegeli_records_file_format.md): 24-byte
    block headers interrupt the file every 64 KiB; chunks of a 40-byte header and data follow one another
    from offset 64 (after the signature chunk); a simple chunk ("r") holds its records' sizes and values,
    each either stored or snappy-compressed."""

    def read(p: int, n: int) -> tuple[bytes, int]:
        out = bytearray()
        while n:
            if p % _BLOCK == 0:
                p += _BLOCK_HEADER
            step = min(n, _BLOCK - p % _BLOCK)
            if p + step > len(f):
                raise ValueError("chunk past the end of the file")
            out += f[p : p + step]
            p, n = p + step, n - step
        return bytes(out), p

    records: list[bytes] = []
    p = _BLOCK_HEADER + _CHUNK_HEADER
    while p + _CHUNK_HEADER <= len(f):
        header, p = read(p, _CHUNK_HEADER)
        data_size = int.from_bytes(header[8:16], "little")
        kind, count = header[24], int.from_bytes(header[25:32], "little")
        data, p = read(p, data_size)
        if kind == ord("r"):
            records += _simple_chunk(data, count)
    return records


def _simple_chunk(data: bytes, count: int) -> list[bytes]:
    compression = data[0]
    sizes_length, i = _varint(data, 1)
    sizes_data = _riegeli_decompress(compression, data[i : i + sizes_length])
    values = _riegeli_decompress(compression, data[i + sizes_length :])
    records, j, at = [], 0, 0
    for _ in range(count):
        size, j = _varint(sizes_data, j)
        records.append(values[at : at + size])
        at += size
    return records


def _riegeli_decompress(compression: int, data: bytes) -> bytes:
    if compression == 0:
        return data
    if compression != ord("s"):
        raise ToolchainMissing(f"Riegeli compression {chr(compression)!r} is not read here (snappy only)")
    _, i = _varint(data, 0)  # the decompressed size, which the snappy block repeats
    return _snappy_decompress(data, i)


def _varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        if c < 0x80:
            return n, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _snappy_decompress(b: bytes, i: int) -> bytes:
    """A raw snappy block starting at `b[i]` (format: github.com/google/snappy, format_description.txt)."""
    n, i = _varint(b, i)
    if n > 64 * len(b):
        raise ValueError("implausible length")
    out = bytearray()
    while len(out) < n:
        tag = b[i]
        i += 1
        kind = tag & 3
        if kind == 0:  # literal
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                length = int.from_bytes(b[i : i + extra], "little")
                i += extra
            length += 1
            if i + length > len(b):
                raise ValueError("literal past the end")
            out += b[i : i + length]
            i += length
            continue
        if kind == 1:
            length, offset = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | b[i]
            i += 1
        else:
            width = 2 if kind == 2 else 4
            length, offset = (tag >> 2) + 1, int.from_bytes(b[i : i + width], "little")
            i += width
        if not 0 < offset <= len(out):
            raise ValueError("copy before the start")
        for _ in range(length):
            out.append(out[-offset])
    if len(out) != n:
        raise ValueError("length mismatch")
    return bytes(out)


def _fields(b: bytes) -> list[tuple[int, int, Any]]:
    """A protobuf message's fields (number, wire type, value); a ValueError if `b` is not one."""
    i, out = 0, []
    while i < len(b):
        key, i = _varint(b, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field 0")
        if wire == 0:
            value, i = _varint(b, i)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = b[i : i + width], i + width
        elif wire == 2:
            length, i = _varint(b, i)
            value, i = b[i : i + length], i + length
        else:
            raise ValueError(f"wire type {wire}")
        if i > len(b):
            raise ValueError("past the end")
        out.append((number, wire, value))
    return out


def _message(b: bytes) -> list[tuple[int, int, Any]] | None:
    if b[:4] == _ELF:
        return None
    try:
        return _fields(b)
    except (ValueError, IndexError):
        return None


def _dims(fields: list | None) -> tuple[int, int, int]:
    got = {n: v for n, w, v in fields or [] if w == 0}
    return (got.get(1, 1), got.get(2, 1), got.get(3, 1))


def _field_at(b: bytes, i: int) -> tuple[int, int, Any, int]:
    key, i = _varint(b, i)
    if key >> 3 == 0:
        raise ValueError("field 0")
    if key & 7 == 0:
        value, i = _varint(b, i)
        return key >> 3, 0, value, i
    if key & 7 != 2:
        raise ValueError("not a varint or bytes field")
    length, i = _varint(b, i)
    if i + length > len(b):
        raise ValueError("past the end")
    return key >> 3, 2, b[i : i + length], i + length


def _kernel_thunk_around(proto: bytes, elf: int) -> GpuKernel | None:
    """The kernel launch whose cubin starts at `proto[elf]`: a message of the kernel's name (field 1), its
    spec (2, holding the cubin at 2.1), the grid (3, at 2), the block (4, at 1) and the dynamic shared
    memory (6), which begins at most a few hundred bytes before the cubin."""
    for start in range(elf - 1, max(elf - 512, 0), -1):
        try:
            number, wire, name, i = _field_at(proto, start)
            if (number, wire) != (1, 2) or not name.isascii() or not name.decode().isprintable():
                continue
            number, wire, spec, i = _field_at(proto, i)
            if (number, wire) != (2, 2) or i - len(spec) > elf or elf >= i:
                continue
            binary = _message(dict((n, v) for n, w, v in _fields(spec) if w == 2).get(2, b""))
            cubin = next((v for n, w, v in binary or [] if n == 1 and w == 2), b"")
            if not cubin.startswith(_ELF):
                continue
            rest: dict[int, Any] = {}
            while i < len(proto):
                number, wire, value, j = _field_at(proto, i)
                if number <= 2 or number in rest:
                    break
                rest[number], i = value, j
        except (ValueError, IndexError):
            continue
        grid = _dims(_sub(_message(rest.get(3, b"")) or [], 2))
        block = _dims(_sub(_message(rest.get(4, b"")) or [], 1))
        shared = rest.get(6, 0) if isinstance(rest.get(6, 0), int) else 0
        return GpuKernel(name.decode(), cubin, grid, block, shared)
    return None


def _sub(fields: list, number: int) -> list | None:
    for n, wire, value in fields:
        if n == number and wire == 2:
            return _message(value)
    return None
