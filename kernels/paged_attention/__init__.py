"""Paged attention: decode and multi-token queries over a paged KV cache.

For query token t of sequence b at position p (0-based, among the sequence's kv_len tokens) and query
head h, reading kv head kh = h // (H // K):

    logit[j] = scale · q[t, h] · k[b, j, kh]                     1. scaled dot product, scale = 1/sqrt(D)
    logit[j] = soft_cap · tanh(logit[j] / soft_cap)              2. soft cap, if given
    logit[j] = logit[j] + alibi_slopes[h] · (j − p)              3. ALiBi, if given (j − p ≤ 0)
    keep j iff j ≤ p  and  j > p − sliding_window                4. causal mask; sliding window, if given,
                                                                    keeps the W most recent positions,
                                                                    the query's own included
    out[t, h] = softmax(logit)[kept] · v[b, kept, kh]            5. max-subtracted softmax in float32

A query with nothing to attend to (kv_len = 0) returns zeros, never NaN. The output has q's dtype.

Layouts (NHD pages, as vLLM and FlashInfer):
    q             [T, H, D]        float32 | bfloat16 | float16; tokens sequence after sequence
    k_pages       [P, S, K, D]     same float dtype as q, or int8 / float8_e4m3fn with scales
    v_pages       [P, S, K, D]
    kv_lens       [B] int32        tokens in each sequence's cache, new tokens included
    block_tables  [B, max_pages] int32: page j of sequence b is k_pages[block_tables[b, j]]; entries at or
                  past a sequence's ceil(kv_len / S) pages are ignored, whatever they hold
    q_lens        [B] int32 or None. None: decode, one query per sequence at position kv_len − 1 (T == B).
                  Otherwise sequence b owns q_lens[b] consecutive rows of q, and they are the LAST q_lens[b]
                  positions of its kv_lens[b] tokens: decode (1), speculative verification (a few), chunked
                  or full prefill (many) mix freely in one call.
    k_scale, v_scale  quantized pages only: a scalar (per tensor) or [P, S, K] (per token and kv head);
                  the value is stored_value × scale.
    alibi_slopes  [H] float32

Axis legend: T query tokens, B sequences, H query heads, K kv heads, G = H // K query heads per kv head,
D head dim, P pages, S page size (tokens per page), R query rows of a tile (q_tile × G).

Checks, and where they happen. Shapes, dtypes and the head ratio are checked whenever the function is
called (they are static). Values — kv_lens within what the block table holds, q_lens ≤ kv_lens,
sum(q_lens) == T, and block-table entries in [0, P) for every page a sequence covers — are checked with a
ValueError when the arrays are concrete (eager calls, and `paged_attention_reference`). Under jit they
cannot be checked, so the kernel masks instead: a key is read only if its position is below kv_len and its
page id is in [0, P); masked keys get logit −inf and their values are zeroed before the weighted sum, so
neither a foreign page nor NaN/Inf garbage in unused slots can reach the output.

Empty batches (B = 0 or T = 0) return the empty result for every implementation. Gradients (reverse mode)
with respect to q, float or fp8 k_pages/v_pages, alibi_slopes, k_scale and v_scale go through one custom
VJP that every implementation's forward takes (`xla.differentiable`): its backward recomputes each query
tile's attention densely over its sequence's pages and scatter-adds the page cotangents; masked keys get
exactly zero gradient. Forward mode (`jax.jvp`) is not defined. `jax.vmap` works over any argument.

Implementations (`impl=`; `kernels.available_impls("paged_attention")` lists those that run here; each
backend module's `IMPLEMENTATION` is its entry in `kernels.registry`):
    reference.py      validation, layout bridges (`gather_kv`, `dequantize_pages`) and the NumPy reference
    xla.py            the portable path: page blocks with an online softmax and a log-sum-exp split merge;
                      `Config(q_tile, block_pages, num_splits)`
    cpu_native.py     the C++ decode kernel through XLA's FFI (decode, float32 q and pages)
    pallas_triton.py  the Pallas Triton kernel for GPUs, interpreted on the CPU; `Config(q_tile, block_pages,
                      num_splits, num_warps, num_stages)`
    kv_cache.py       the paged cache itself: PageAllocator, write_kv, copy_pages
`impl="auto"` is the registry's per-platform choice at lowering (so the same jitted function exports for
every platform): on the CPU the native kernel for the cases it serves where its instruction-set path beats
the XLA path (`kernels.cpu.fast_enough`); on cuda/rocm the Pallas kernel for the inputs it takes; otherwise
the XLA path. `impl="pallas"` is the platform's Pallas kernel.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import registry
from kernels.cost import Cost, itemsize
from kernels.paged_attention.kv_cache import (
    OutOfPages,
    PageAllocator,
    copy_pages,
    validate_write_kv_inputs,
    write_kv,
)
from kernels.paged_attention.reference import (
    FLOAT_DTYPES,
    QUANT_DTYPES,
    dequantize_pages,
    gather_kv,
    paged_attention_reference,
    validate_paged_attention_inputs,
)

__all__ = [
    "FLOAT_DTYPES",
    "QUANT_DTYPES",
    "OutOfPages",
    "PageAllocator",
    "copy_pages",
    "dequantize_pages",
    "gather_kv",
    "paged_attention",
    "paged_attention_cost",
    "paged_attention_reference",
    "validate_paged_attention_inputs",
    "validate_write_kv_inputs",
    "write_kv",
]


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    *,
    q_lens: jax.Array | None = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: jax.Array | None = None,
    k_scale: jax.Array | float | None = None,
    v_scale: jax.Array | float | None = None,
    impl: str = "auto",
    config: Any = None,
) -> jax.Array:
    """Attention of q over a paged KV cache; conventions and layouts in the module docstring.

    q: [T, H, D] -> [T, H, D] in q's dtype. Jittable: T, B and max_pages are static; kv_lens, q_lens and
    block_tables are dynamic. Vmappable; differentiable (reverse mode) with respect to q, k_pages, v_pages,
    alibi_slopes and the scales. `impl`: a name of `kernels.available_impls("paged_attention")`, "auto" or
    "pallas" (see `kernels.registry`). `config`: the tiling of the implementation it is the Config of
    (`kernels.paged_attention.xla.Config`, `...pallas_triton.Config`); default: chosen from the shapes.
    """
    registry.check_impl("paged_attention", impl)
    options = dict(
        q_lens=q_lens, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    if impl == "reference":  # the reference validates its (concrete) inputs itself
        return registry.dispatch(
            "paged_attention", impl, q, k_pages, v_pages, kv_lens, block_tables, **options
        )
    validate_paged_attention_inputs(q, k_pages, v_pages, kv_lens, block_tables, **options)
    if q.shape[0] == 0 or np.shape(block_tables)[0] == 0:
        # An empty batch (normal in a serving loop): no query has anything to attend to, for every
        # implementation alike, so none of them is asked to handle zero-sized grids.
        return jnp.zeros(q.shape, q.dtype)
    # The arguments every implementation takes, normalized once.
    return registry.dispatch(
        "paged_attention", impl, q, k_pages, v_pages, jnp.asarray(kv_lens), jnp.asarray(block_tables),
        q_lens=None if q_lens is None else jnp.asarray(q_lens),
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window),
        alibi_slopes=None if alibi_slopes is None else jnp.asarray(alibi_slopes),
        k_scale=None if k_scale is None else jnp.asarray(k_scale, jnp.float32),
        v_scale=None if v_scale is None else jnp.asarray(v_scale, jnp.float32),
        config=config,
    )  # fmt: skip


def paged_attention_cost(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_lens: Any,
    *,
    q_lens: Any = None,
    dtype: Any = "fp32",
    kv_dtype: Any = None,
    per_token_scales: bool = False,
) -> Cost:
    """FLOPs and bytes of one call, from the actual (concrete) kv_lens and q_lens.

    FLOPs: 2·D (q·k) + 2·D (p·v) + 5 (scale, max, subtract, sum, divide) per attended (query, key, head)
    pair, causal within each sequence; one exp per pair. Bytes read: each sequence's KV once (the ideal
    kernel: one read of each kv head for its whole group of query heads), scales if per token, and q.
    Bytes written: the output.
    """
    lens = np.asarray(kv_lens, dtype=np.int64)
    qls = np.ones_like(lens) if q_lens is None else np.asarray(q_lens, dtype=np.int64)
    qls = np.where(lens > 0, qls, 0)
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    pairs = float(np.sum(qls * (lens - qls) + qls * (qls + 1) / 2))
    scores = pairs * num_q_heads
    kv_bytes = float(lens.sum()) * num_kv_heads * 2 * head_dim * itemsize(kv_dtype)
    if per_token_scales:
        kv_bytes += float(lens.sum()) * num_kv_heads * 2 * 4
    return Cost(
        flops=scores * (4.0 * head_dim + 5.0),
        bytes_read=kv_bytes + num_tokens * num_q_heads * head_dim * itemsize(dtype),
        bytes_written=num_tokens * num_q_heads * head_dim * itemsize(dtype),
        transcendentals=scores,
    )
