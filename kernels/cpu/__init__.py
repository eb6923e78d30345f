"""CPU-native kernels: C++ handlers registered with XLA through `jax.ffi`, one source per op.

    int4_matmul.cc       INT4 dequant-matmul on the packed Int4Weight layout (matrix-vector and tiled paths)
    paged_attention.cc   paged decode attention (q_lens=None) over NHD pages, online softmax, GQA
    moe_ffn.cc           the MoE grouped SwiGLU expert FFN over rows sorted by expert, weights read in place
    *_{avx512,avx2,neon}.cc   each kernel's vector path for one instruction set (moe_ffn: no NEON path yet)
    isa.h, isa.cc        run-time choice of the instruction set, and its C interface
    loader.py            finds the built library, registers the handlers (at `import kernels`), applies
                         TOKENLAB_CPU_ISA

Instruction sets, chosen at run time: `isa()` names the path in use: "avx512" (AVX512F + AVX512BW), "avx2"
(AVX2 + FMA + F16C), "neon" (aarch64) or "scalar" (portable C++). The library is compiled once for the
architecture's baseline, and each vector path is compiled per function with GCC's/Clang's target attribute and
chosen with `__builtin_cpu_supports`, because that way one build (a wheel, or one `pip install` on a shared
file system) runs on every x86-64 or aarch64 CPU and still uses the best path of each: a `-march=native` build
dies with an illegal instruction on an older CPU, and a dispatch library such as Highway would be a system or
vendored dependency that pip alone cannot provide. TOKENLAB_CPU_ISA=<name> picks a lower path (see loader.py);
the raw calls below take `isa=` to run one path for one call (tests run every path the CPU has this way).

The functions here are the raw calls (float32 in and out, already-prepared operands); the public kernels
(`kernels.int4_matmul`, `kernels.paged_attention`, and `kernels.moe_ffn`'s grouped strategy) choose them
with `impl="auto"` on the CPU when the library is built, or with `impl="cpu_native"`. They run inside jitted
programs; under `jax.vmap` they loop over the batch (one native call per element). They exist only on the
CPU: other platforms never lower them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu.loader import ISAS, TARGETS, available, handle, library_path, load, runnable_isas

__all__ = [
    "ISAS",
    "NATIVE_OPS",
    "TARGETS",
    "available",
    "detected_isa",
    "fast_enough",
    "int4_matmul_native",
    "isa",
    "library_path",
    "load",
    "moe_ffn_native",
    "paged_decode_native",
    "supported_isas",
]

# Ops whose native kernel `fast_enough` rules on.
NATIVE_OPS = ("int4_matmul", "paged_attention", "moe_ffn")


def _require() -> None:
    reason = load()
    if reason is not None:
        raise RuntimeError(f"impl='cpu_native' needs the native library: {reason}")


def isa() -> str | None:
    """The instruction-set path the native kernels use: one of "avx512", "avx2", "neon", "scalar".

    The best path this CPU runs, or the one TOKENLAB_CPU_ISA chose; None when the library is not loaded.
    """
    lib = handle()
    return None if lib is None else ISAS[lib.TokenlabCpuIsa()]


def detected_isa() -> str | None:
    """The best path this CPU runs (whatever TOKENLAB_CPU_ISA says); None when the library is not loaded."""
    lib = handle()
    return None if lib is None else ISAS[lib.TokenlabCpuDetectedIsa()]


def supported_isas() -> tuple[str, ...]:
    """Every path this CPU runs, lowest first (always "scalar"); empty when the library is not loaded."""
    lib = handle()
    return () if lib is None else runnable_isas(lib)


def fast_enough(op: str) -> bool:
    """Whether `impl="auto"` may pick the native kernel of `op` (one of NATIVE_OPS).

    The rule: `impl="auto"` picks a native kernel only where it is faster than the portable XLA path on the
    running CPU. That holds for the vector paths ("avx512", "avx2", "neon") and not for the scalar fallback,
    so this is True exactly when `isa()` names a vector path (False without the library).

    The measurements behind the rule (each path against the XLA path, per op) are in docs/performance.md,
    "CPU instruction sets"; the MoE forward adds a token bound on the paths other than AVX-512
    (`kernels.moe.cpu_native.NATIVE_MAX_TOKENS`).
    """
    if op not in NATIVE_OPS:
        raise ValueError(f"op={op!r} must be one of {', '.join(NATIVE_OPS)}")
    current = isa()
    return current is not None and current != "scalar"


def _isa_attr(simd: bool, isa_name: str | None) -> np.int64:
    """The handlers' `isa` attribute: -1 is the process-wide path; otherwise the index of a path in ISAS."""
    if not simd:
        if isa_name not in (None, "scalar"):
            raise ValueError(f"isa={isa_name!r} contradicts simd=False (the scalar path); pass one of them")
        return np.int64(0)
    if isa_name is None:
        return np.int64(-1)
    runnable = supported_isas()
    if isa_name not in runnable:
        raise ValueError(f"isa={isa_name!r} must be a path this CPU runs: one of {', '.join(runnable)}")
    return np.int64(ISAS.index(isa_name))


def int4_matmul_native(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None,
    *,
    group_size: int,
    sym_zero: int,
    simd: bool = True,
    isa: str | None = None,
) -> jax.Array:
    """x: [M, K] float32 (permuted and scaled already) @ packed [K/2, N] uint8 -> [M, N] float32.

    scales [G, N] float32; zeros [G, N] uint8, or None for the symmetric zero `sym_zero`. `isa` runs one
    instruction-set path (one of `supported_isas()`; default: `isa()`); `simd=False` is `isa="scalar"`.
    """
    _require()
    isa_attr = _isa_attr(simd, isa)
    m = x.shape[0]
    n = packed.shape[1]
    if zeros is None:
        zeros, zero_attr = jnp.zeros((1, 1), jnp.uint8), np.int64(sym_zero)
    else:
        zero_attr = np.int64(-1)
    call = jax.ffi.ffi_call(
        "tokenlab_int4_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential"
    )
    return call(
        x.astype(jnp.float32),
        packed,
        scales.astype(jnp.float32),
        zeros,
        group_size=np.int64(group_size),
        sym_zero=zero_attr,
        isa=isa_attr,
    )


def paged_decode_native(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    alibi_slopes: jax.Array | None,
    *,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    simd: bool = True,
    isa: str | None = None,
) -> jax.Array:
    """Decode attention: q [B, H, D] float32 over pages [P, S, K, D] float32 -> [B, H, D] float32.

    kv_lens [B], block_tables [B, max_pages] (int32); alibi_slopes [H] float32 or None. The handler returns
    an error (raised as an exception) for a page id outside [0, P) among the pages a sequence covers, and
    for kv_lens outside [0, max_pages × S]. `isa` and `simd` as for `int4_matmul_native`.
    """
    _require()
    isa_attr = _isa_attr(simd, isa)
    h = q.shape[1]
    slopes = jnp.zeros((h,), jnp.float32) if alibi_slopes is None else alibi_slopes.astype(jnp.float32)
    call = jax.ffi.ffi_call(
        "tokenlab_paged_decode", jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential"
    )
    return call(
        q.astype(jnp.float32),
        k_pages,
        v_pages,
        kv_lens.astype(jnp.int32),
        block_tables.astype(jnp.int32),
        slopes,
        scale=np.float32(scale),
        soft_cap=np.float32(0.0 if soft_cap is None else soft_cap),
        sliding_window=np.int64(0 if sliding_window is None else sliding_window),
        has_alibi=np.int64(alibi_slopes is not None),
        isa=isa_attr,
    )


def moe_ffn_native(
    xs: jax.Array,
    group_sizes: jax.Array,
    group_offsets: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    simd: bool = True,
    isa: str | None = None,
) -> jax.Array:
    """The grouped SwiGLU expert FFN: xs [R, d] float32, rows sorted by expert -> ys [R, d] float32.

    Expert e owns rows [group_offsets[e], group_offsets[e] + group_sizes[e]) (int32 [E]) and maps them to
    (silu(v @ w_gate[e]) * (v @ w_up[e])) @ w_down[e]; w_gate, w_up [E, d, f] and w_down [E, f, d] float32
    are read in place, only for experts with rows. Rows outside every group (padding) are zeros. The handler
    returns an error (raised as an exception) for a group outside [0, R) or two overlapping groups, and for
    mismatched shapes. `isa` and `simd` as for `int4_matmul_native`.
    """
    _require()
    isa_attr = _isa_attr(simd, isa)
    call = jax.ffi.ffi_call(
        "tokenlab_moe_ffn", jax.ShapeDtypeStruct(xs.shape, jnp.float32), vmap_method="sequential"
    )
    return call(
        xs.astype(jnp.float32),
        group_sizes.astype(jnp.int32),
        group_offsets.astype(jnp.int32),
        w_gate.astype(jnp.float32),
        w_up.astype(jnp.float32),
        w_down.astype(jnp.float32),
        isa=isa_attr,
    )
