"""CPU-native kernels: C++ handlers registered with XLA through `jax.ffi`, one source per op.

    int4_matmul.cc       INT4 dequant-matmul on the packed Int4Weight layout (matrix-vector and tiled paths)
    paged_attention.cc   paged decode attention (q_lens=None) over NHD pages, online softmax, GQA
    loader.py            finds the built library and registers the handlers (once per process)

The functions here are the raw calls (float32 in and out, already-prepared operands); the public kernels
(`kernels.int4_matmul`, `kernels.paged_attention`) choose them with `impl="auto"` on the CPU when the
library is built, or with `impl="cpu_native"`. They run inside jitted programs; under `jax.vmap` they loop
over the batch (one native call per element). They exist only on the CPU: other platforms never lower them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu.loader import TARGETS, available, library_path, load

__all__ = ["TARGETS", "available", "int4_matmul_native", "library_path", "load", "paged_decode_native"]


def _require() -> None:
    reason = load()
    if reason is not None:
        raise RuntimeError(f"impl='cpu_native' needs the native library: {reason}")


def int4_matmul_native(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None,
    *,
    group_size: int,
    sym_zero: int,
    simd: bool = True,
) -> jax.Array:
    """x: [M, K] float32 (permuted and scaled already) @ packed [K/2, N] uint8 -> [M, N] float32.

    scales [G, N] float32; zeros [G, N] uint8, or None for the symmetric zero `sym_zero`. `simd=False`
    forces the portable scalar path (tests use it to check the fallback on a SIMD machine).
    """
    _require()
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
        simd=np.int64(simd),
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
) -> jax.Array:
    """Decode attention: q [B, H, D] float32 over pages [P, S, K, D] float32 -> [B, H, D] float32.

    kv_lens [B], block_tables [B, max_pages] (int32); alibi_slopes [H] float32 or None. The handler returns
    an error (raised as an exception) for a page id outside [0, P) among the pages a sequence covers, and
    for kv_lens outside [0, max_pages × S].
    """
    _require()
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
        simd=np.int64(simd),
    )
