"""Paged attention as a Pallas kernel for GPUs (Triton lowering), interpreted on the CPU.

Computes what `paged_attention_reference` computes (formula, masking and layouts in the package docstring):
for query row t of sequence b at position p and query head h reading kv head kh = h // G,

    out[t, h] = softmax_j(cap(scale · q[t, h] · k[b, j, kh]) + alibi[h] · (j − p))[kept j] · v[b, kept j, kh]

with j kept iff j ≤ p, j > p − sliding_window and j < kv_len[b]. Flash-decoding structure (FlashAttention-2's
online softmax, split-K over the context with a log-sum-exp merge, as in vLLM's and FlashInfer's paged decode
and JAX's `pallas/ops/gpu/paged_attention.py`):

- One program per (query tile, kv head, context split). A query tile is `q_block` consecutive query tokens of
  one sequence times all G query heads of the kv head, R = q_block × Gq rows (Gq = G rounded up to a power of
  two; decode tiles have q_block = 1 and Gq ≥ 16, since Triton's `tl.dot` needs 16 rows). Each key and value
  block is therefore read from HBM once per kv head for the whole group of query heads (GQA/MQA).
- The program walks its share of the sequence's keys in blocks of `block_k` = `pages_per_block` × S keys
  (rounded up to a power of two). The block table and kv_lens are ordinary inputs (scalar prefetch is a TPU
  idea): each key's page id is loaded from the block table inside the kernel and the key's row is gathered
  from the NHD pages, so any page size works and a block need not align with pages.
- Logits, the running max/sum and the output accumulator are float32; bf16/f16 operands go to the tensor
  cores as they are (float32 accumulation), float32 operands with full float32 precision (IEEE, not TF32).
  int8 / float8_e4m3fn pages are converted to q's dtype in the kernel (exact for both) and their scales are
  applied to the logits (K) and to the probabilities (V): per tensor or per token and kv head.
- Split-K: with `num_splits` > 1 each program covers a contiguous share of the sequence's actual key blocks
  (shares are recomputed per sequence from kv_len, so short and long sequences spread evenly) and writes an
  unnormalized float32 output with its running max and sum; a small XLA step merges the splits by
  log-sum-exp. With one split the kernel writes the normalized output in q's dtype directly.
- Causal and sliding-window limits skip whole blocks: a tile reads keys from max(0, p_first − W + 1) to
  min(kv_len, p_last + 1) only.

Safety. A block-table entry outside [0, P), or one at or past the sequence's ceil(kv_len / S) pages, is never
dereferenced: the page index is replaced by 0 and the key masked. Keys and values of masked slots are loaded
as zeros by masked loads (no memory access), their probabilities are zeroed with `where`, so NaN/Inf garbage
past kv_len cannot reach the output. A NaN in q reaches exactly the output rows it feeds; only rows with
nothing to attend to become zeros.

Gradients (reverse mode): the entry's implementation wraps the kernel in the XLA path's recompute-based
custom VJP (`kernels.paged_attention.xla.differentiable`), with respect to q, the pages, the ALiBi slopes and
the scales.

Lowering. `paged_attention_pallas` chooses per lowering platform through one primitive with a lowering rule
per platform (`kernels.lowering.per_platform_kernel`): Pallas's interpret mode on cpu (slow; for tests),
the Triton-compiled kernel on cuda and rocm (through `jax.experimental.pallas.triton.CompilerParams`, since
`pl.pallas_call` on GPUs defaults to Mosaic GPU in JAX 0.10), and a clear error when tpu is the only platform.
The choice is never made from `jax.default_backend()`, so the same jitted function runs interpreted on a CPU
and compiled on a GPU.
`jax.lax.platform_dependent` is not used here because it lowers every branch for every platform of a
multi-platform export, and a compiled `pallas_call` cannot lower for cpu or tpu. With per-platform rules, a
caller's own per-platform choice (`impl="auto"`) can hold this kernel in its GPU branch and still export for
cpu, cuda, rocm and tpu together. In such a multi-platform lowering, the rule for a platform without a kernel
lowers to NaN outputs that the caller never selects. Exporting the kernel with `jax.export` needs
`disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]`. float8 pages need a
GPU with native fp8 conversion in Triton (compute capability 8.9 and newer: Ada, Hopper). For an older target
(A100), found as the Triton lowering finds it (`target_gpu`), `pallas_unsupported` declines them: impl="auto"
takes the XLA path, and impl="pallas_triton" is a ValueError naming the pages and the target.

Addressing. The page pools are the kernel's big operands (a KV pool of 4 GiB and more is normal on 80-141 GB
GPUs). JAX's Triton lowering gives an operand 64-bit element offsets when it holds more than 2**32 bytes and
32-bit ones otherwise, which is exact for 16- and 32-bit pages; int8/float8 pools of 2**31 to 2**32 elements
go in as 16-bit words instead (`kernels.triton_addressing.to_words`), each loaded word split into its two
page bytes in registers, so no offset wraps (the rule and its evidence are in `kernels.triton_addressing`).
The choice is static, by the pool's size as the pallas_call sees it (through jax.vmap: a stack of layers'
pools counts whole).

Axis legend: T query tokens, B sequences, H query heads, K kv heads, G = H // K, Gq = G padded, D head dim,
Dp = D padded to a power of two, P pages, S page size, N query tiles, R rows of a tile, BK keys per block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import registry, tuning
from kernels.lowering import per_platform_kernel, target_gpu
from kernels.paged_attention.xla import differentiable, query_tiles
from kernels.triton_addressing import from_words, needs_words, operand_elements, to_words

_F32 = jnp.float32
# Head dims the kernel pads to a power of two (Triton tiles are powers of two); at least 16 for tl.dot.
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256
# Rows of one tile at most: q_block × Gq. Beyond this the float32 accumulator no longer fits in registers.
_MAX_TILE_ROWS = 256
# Programs to aim for when choosing the number of context splits: about two thread blocks per SM on a
# 132-SM H100/H200 (flash-decoding splits until the grid covers the GPU; more splits only add merge work).
_TARGET_PROGRAMS = 256
_MAX_SPLITS = 64
# The defaults below follow the anchors (JAX's Pallas GPU attention ops, FlashAttention's Triton kernels) and
# what Triton 3.9 + ptxas make of this kernel for sm_90a offline (registers, spills, shared memory; see
# docs/accelerators.md).
# Decode, 16-bit q: 8 KiB of K per step, i.e. 32 bf16 keys of D = 128, with 5 stages. Masked loads fill
# masked keys with zeros themselves (`other=0`, no select after the load), and at 5 stages Triton keeps two K
# and two V blocks in flight (it double-buffers these gathered loads only from num_stages=5 at 32-64 keys a
# block; 3 does at 128 keys). Compiled for sm_80 that is 96 registers and 37.5 KiB of shared memory: 4 CTAs
# per SM on an A100 (5 on an H100), with 2 x 16 KiB of K/V in flight per CTA, far more than HBM latency
# needs (about 10-15 KiB per SM). The old 128-key blocks with 2 stages (one buffer) and a select after the
# load took 238 registers, 104.5 KiB and 1 CTA per SM on sm_80, and a 1,390-instruction loop.
_BLOCK_BYTES = 8 * 1024
_DECODE_STAGES = 5
_MAX_BLOCK_K = 128
# Multi-token tiles, 16-bit q: 64 rows × 64 keys with 8 warps (208 registers, no spills; 4 warps spill),
# FlashAttention-2's Triton tile for D <= 128; 32 × 32 for D = 256.
_PREFILL_ROWS = 64
_PREFILL_BLOCK_K = 64
# float32 q: the dots run as IEEE float32 FMAs (no tensor cores), whose operands live in registers: 16 rows
# × 16 keys with 8 warps is the largest tile without spills (166 registers; 64 keys spill 9 KB).
_F32_ROWS = 16
_F32_BLOCK_K = 16


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _pow2_at_most(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


# The first NVIDIA compute capability with float8 conversions in Triton (Ada sm_89, Hopper sm_90).
_MIN_FP8_CAPABILITY = 89


def pallas_unsupported(q: Any, k_pages: Any, v_pages: Any, *, q_lens: Any = None) -> str | None:
    """Why the Pallas kernel cannot serve these (already validated) inputs; None when it can.

    q: [T, H, D], k_pages/v_pages: [P, S, K, D]. Head dims from 16 to 256 are padded to a power of two
    inside the kernel (64, 80, 128, 256 all work); any page size works (keys are gathered one by one);
    a kv head's query rows (G = H // K, padded to a power of two) must fit one tile of 256 rows. float8
    pages need a GPU target of compute capability 8.9 or more when one is known (`target_gpu`): Triton has no
    float8 conversion below (A100). A one-byte pool of 2**31 to 2**32 elements is read as 16-bit words,
    which needs an even D.
    """
    del q_lens
    _, h, d = np.shape(q)
    kh = np.shape(k_pages)[2]
    if not _MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM:
        return f"head dim D={d} (the Pallas kernel takes {_MIN_HEAD_DIM} <= D <= {_MAX_HEAD_DIM})"
    g = h // kh
    if _pow2_at_least(g) > _MAX_TILE_ROWS:
        return f"{g} query heads per kv head (the Pallas kernel takes at most {_MAX_TILE_ROWS})"
    for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
        dt = _dtype(pages)
        if dt.itemsize == 1 and jnp.issubdtype(dt, jnp.floating):
            target = target_gpu()
            if target is not None and target[1] < _MIN_FP8_CAPABILITY:
                kind, cc = target
                need = _MIN_FP8_CAPABILITY
                return (
                    f"{name}.dtype={dt} on {kind} (compute capability {cc // 10}.{cc % 10}): Triton converts "
                    f"float8 only on compute capability {need // 10}.{need % 10} and newer"
                )
        if d % 2 and needs_words(pages):
            return (
                f"head dim D={d} with one-byte {name} {list(np.shape(pages))}: a pool of more than 2**31 "
                "elements is read as 16-bit words, which needs an even D"
            )
    return None


def default_tunables(
    num_tokens: int,
    num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    max_pages: int,
    kv_itemsize: int,
    *,
    decode: bool,
    q_itemsize: int = 2,
    block_k: int | None = None,
    q_block: int | None = None,
) -> dict[str, int]:
    """The tunables `paged_attention_pallas` uses for a call, given any the caller fixed.

    num_tokens T, num_seqs B, num_q_heads H, num_kv_heads K, head_dim D, page_size S, max_pages (the block
    table's width), kv_itemsize and q_itemsize (bytes per stored K/V and q element), decode (q_lens is None).
    Returns a dict: block_k (keys per block step), q_block (tokens per tile), num_splits, num_warps,
    num_stages. The reasons are in the comments of the module constants.
    """
    g = num_q_heads // num_kv_heads
    dp = _pow2_at_least(max(head_dim, _MIN_HEAD_DIM))
    gq = max(16, _pow2_at_least(g)) if decode else _pow2_at_least(g)
    f32 = q_itemsize >= 4
    if block_k is None:
        if f32:
            block_k = _F32_BLOCK_K
        elif decode:
            block_k = min(_MAX_BLOCK_K, max(16, _pow2_at_most(_BLOCK_BYTES // (dp * kv_itemsize))))
        else:
            block_k = _PREFILL_BLOCK_K if dp <= 128 else _PREFILL_BLOCK_K // 2
    if decode:
        q_block = 1
    else:
        if q_block is None:
            target = _F32_ROWS if f32 else (_PREFILL_ROWS if dp <= 128 else _PREFILL_ROWS // 2)
            q_block = max(1, target // gq)
        # A power of two (Triton tiles), at least 16 rows (tl.dot), at most _MAX_TILE_ROWS rows.
        q_block = _pow2_at_least(max(q_block, -(-16 // gq)))
        q_block = max(1, min(q_block, _MAX_TILE_ROWS // gq))
    rows = q_block * gq
    tiles = num_tokens if decode else min(num_tokens, -(-num_tokens // q_block) + num_seqs)
    max_blocks = max(1, -(-max_pages * page_size // block_k))
    num_splits = max(1, min(_TARGET_PROGRAMS // max(1, tiles * num_kv_heads), max_blocks, _MAX_SPLITS))
    num_warps = 8 if f32 or dp > 128 or rows >= 64 else 4
    num_stages = _DECODE_STAGES if decode and not f32 else 2
    return dict(
        block_k=block_k, q_block=q_block, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages
    )


def _kernel(
    *refs: Any,
    block_k: int,
    rows: int,
    group_rows: int,
    page_size: int,
    num_pages: int,
    max_pages: int,
    head_dim: int,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    per_token_k: bool,
    per_token_v: bool,
    tensor_scales: bool,
    alibi: bool,
    compute_dtype: Any,
    split: bool,
    num_splits: int,
    kv_dtypes: tuple[Any, Any],
    words: tuple[bool, bool],
) -> None:
    refs = list(refs)
    tiles_ref, kv_lens_ref, bt_ref, q_ref, k_ref, v_ref = refs[:6]
    refs = refs[6:]
    ks_ref = refs.pop(0) if per_token_k else None
    vs_ref = refs.pop(0) if per_token_v else None
    ts_ref = refs.pop(0) if tensor_scales else None
    slope_ref = refs.pop(0) if alibi else None
    o_ref, *ml_refs = refs

    i, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b = tiles_ref[0, i]
    row0 = tiles_ref[1, i]
    count = tiles_ref[2, i]
    pos0 = tiles_ref[3, i]
    n = kv_lens_ref[b]
    # Keys this tile can see: causal up to its last row, the sliding window from its first row.
    hi = jnp.maximum(jnp.minimum(n, pos0 + count), 0)
    lo = jnp.zeros_like(hi) if sliding_window is None else jnp.clip(pos0 - sliding_window + 1, 0, hi)
    blk_lo = lo // block_k
    blk_hi = (hi + block_k - 1) // block_k
    if num_splits == 1:
        first, last = blk_lo, blk_hi
    else:
        per = (blk_hi - blk_lo + num_splits - 1) // num_splits
        first = jnp.minimum(blk_lo + j * per, blk_hi)
        last = jnp.minimum(first + per, blk_hi)

    dp = q_ref.shape[-1]
    d_idx = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1)
    d_ok = d_idx < head_dim  # padded head-dim lanes are never loaded
    q = q_ref[kh, pl.ds(row0 * group_rows, rows), :].astype(compute_dtype)  # [R, Dp]
    rpos = pos0 + jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) // group_rows  # [R] row positions
    qk_scale = scale
    if tensor_scales:
        qk_scale = scale * ts_ref[0]
    slopes = slope_ref[kh, :] if alibi else None  # [R]
    precision = jax.lax.Precision.HIGHEST if compute_dtype == _F32 else None

    def load_rows(which, tok, ok):
        # K (which=0) or V (1): [BK] token rows -> [BK, Dp] in compute dtype; masked rows and lanes are 0.
        ref = (k_ref, v_ref)[which]
        mask = ok[:, None] & d_ok
        # Masked slots and lanes are not read: the load itself fills them with 0 (`other=0`), so garbage
        # (NaN/Inf) past kv_len never enters a register. No select after the load: a `where` on the loaded
        # tile made Triton round-trip it through registers between the shared-memory copy and the dot.
        if words[which]:  # one-byte pages as 16-bit words [P·S, K, D/2] (see `to_words`): two lanes a word
            w_idx = jax.lax.broadcasted_iota(jnp.int32, (1, dp // 2), 1)
            w = plgpu.load(
                ref.at[tok[:, None], kh, w_idx], mask=ok[:, None] & (w_idx < head_dim // 2), other=0
            )
            return from_words(w, kv_dtypes[which]).astype(compute_dtype)  # zero words: +0.0 in every dtype
        if jnp.issubdtype(kv_dtypes[which], jnp.floating) and kv_dtypes[which].itemsize == 1:
            # Triton cannot cast `other` to float8: these pages keep the select (float8 needs sm_89+).
            x = plgpu.load(ref.at[tok[:, None], kh, d_idx], mask=mask).astype(compute_dtype)
            return jnp.where(mask, x, jnp.zeros((), compute_dtype))
        return plgpu.load(ref.at[tok[:, None], kh, d_idx], mask=mask, other=0).astype(compute_dtype)

    def body(blk, carry):
        m, l, acc = carry
        kpos = blk * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)  # [BK]
        slot = kpos // page_size
        page = bt_ref[b, jnp.minimum(slot, max_pages - 1)]
        ok = (slot < max_pages) & (kpos < n) & (page >= 0) & (page < num_pages)
        tok = jnp.where(ok, page, 0) * page_size + kpos % page_size  # never outside [0, P·S)
        k = load_rows(0, tok, ok)
        s = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=_F32
        )  # [R, BK]
        s = s * qk_scale
        if per_token_k:
            s = s * plgpu.load(ks_ref.at[tok, kh], mask=ok, other=0.0)[None, :]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        if alibi:
            s = s + slopes[:, None] * (kpos[None, :] - rpos[:, None]).astype(_F32)
        keep = ok[None, :] & (kpos[None, :] <= rpos[:, None])
        if sliding_window is not None:
            keep = keep & (kpos[None, :] > rpos[:, None] - sliding_window)
        s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])  # masked keys: exp(-inf) = 0, no select needed
        corr = jnp.exp(m - m_safe)
        l = l * corr + p.sum(axis=1)
        if per_token_v:
            p = p * plgpu.load(vs_ref.at[tok, kh], mask=ok, other=0.0)[None, :]
        v = load_rows(1, tok, ok)
        pv = jax.lax.dot_general(
            p.astype(compute_dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=_F32,
        )  # [R, Dp]
        return m_new, l, acc * corr[:, None] + pv

    init = (
        jnp.full((rows,), -jnp.inf, _F32),
        jnp.zeros((rows,), _F32),
        jnp.zeros((rows, dp), _F32),
    )
    m, l, acc = jax.lax.fori_loop(first, last, body, init)
    if tensor_scales:
        acc = acc * ts_ref[1]
    if split:
        o_ref[...] = acc
        m_ref, l_ref = ml_refs
        m_ref[...] = m
        l_ref[...] = l
    else:
        # l == 0 only when nothing was attended (then acc == 0); a NaN l stays NaN.
        out = jnp.where(l[:, None] == 0.0, 0.0, acc / jnp.where(l == 0.0, 1.0, l)[:, None])
        o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "soft_cap",
        "sliding_window",
        "block_k",
        "q_block",
        "num_splits",
        "num_warps",
        "num_stages",
        "interpret",
        "words",
    ),
)
def _paged_attention_pallas(
    q,
    k_pages,
    v_pages,
    kv_lens,
    block_tables,
    q_lens,
    alibi_slopes,
    k_scale,
    v_scale,
    *,
    scale,
    soft_cap,
    sliding_window,
    block_k,
    q_block,
    num_splits,
    num_warps,
    num_stages,
    interpret,
    words=None,
):
    t, h, d = q.shape
    p, s, kh, _ = k_pages.shape
    g = h // kh
    b, max_pages = block_tables.shape
    decode = q_lens is None
    dp = _pow2_at_least(max(d, _MIN_HEAD_DIM))
    gq = max(16, _pow2_at_least(g)) if decode else _pow2_at_least(g)
    qb = q_block
    rows = qb * gq
    kv_lens = kv_lens.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)

    if decode:
        num_tiles = b
        tiles = jnp.stack([jnp.arange(b), jnp.arange(b), jnp.ones((b,), jnp.int32), kv_lens - 1]).astype(
            jnp.int32
        )
        t_pad = t
    else:
        num_tiles = min(t, -(-t // qb) + b)
        tiles = query_tiles(q_lens.astype(jnp.int32), kv_lens, num_tiles, qb)
        t_pad = t + qb  # a tile's rows may run past T: they read padding and are dropped
    # q as [K, T_pad · Gq, Dp]: the rows of one tile and kv head are contiguous, ordered (token, group head).
    q4 = q.reshape(t, kh, g, d)
    q4 = jnp.pad(q4, ((0, t_pad - t), (0, 0), (0, gq - g), (0, dp - d)))
    q_rows = q4.transpose(1, 0, 2, 3).reshape(kh, t_pad * gq, dp)

    per_token_k = k_scale is not None and k_scale.ndim == 3
    per_token_v = v_scale is not None and v_scale.ndim == 3
    tensor_scales = (k_scale is not None and not per_token_k) or (v_scale is not None and not per_token_v)
    args = [
        tiles,
        kv_lens,
        block_tables,
        q_rows,
        k_pages.reshape(p * s, kh, d),
        v_pages.reshape(p * s, kh, d),
    ]
    if per_token_k:
        args.append(k_scale.astype(_F32).reshape(p * s, kh))
    if per_token_v:
        args.append(v_scale.astype(_F32).reshape(p * s, kh))
    if tensor_scales:
        one = jnp.ones((), _F32)
        ks = one if k_scale is None or per_token_k else k_scale.astype(_F32)
        vs = one if v_scale is None or per_token_v else v_scale.astype(_F32)
        args.append(jnp.stack([ks, vs]))
    if alibi_slopes is not None:
        sl = jnp.pad(alibi_slopes.astype(_F32).reshape(kh, g), ((0, 0), (0, gq - g)))
        args.append(jnp.tile(sl, (1, qb)))  # [K, R], row r = token · Gq + group head
    split = num_splits > 1
    compute_dtype = q.dtype

    kernel = functools.partial(
        _kernel,
        block_k=block_k,
        rows=rows,
        group_rows=gq,
        page_size=s,
        num_pages=p,
        max_pages=max_pages,
        head_dim=d,
        scale=scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        per_token_k=per_token_k,
        per_token_v=per_token_v,
        tensor_scales=tensor_scales,
        alibi=alibi_slopes is not None,
        compute_dtype=compute_dtype,
        split=split,
        num_splits=num_splits,
        kv_dtypes=(np.dtype(k_pages.dtype), np.dtype(v_pages.dtype)),
    )
    grid = (num_tiles, kh, num_splits)
    if split:
        out_shape = (
            jax.ShapeDtypeStruct((num_tiles, num_splits, kh, rows, dp), _F32),
            jax.ShapeDtypeStruct((num_tiles, num_splits, kh, rows), _F32),
            jax.ShapeDtypeStruct((num_tiles, num_splits, kh, rows), _F32),
        )
        out_specs = (
            pl.BlockSpec((None, None, None, rows, dp), lambda i, k, j: (i, j, k, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, k, j: (i, j, k, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, k, j: (i, j, k, 0)),
        )
    else:
        out_shape = (jax.ShapeDtypeStruct((num_tiles, kh, rows, dp), q.dtype),)
        out_specs = (pl.BlockSpec((None, None, rows, dp), lambda i, k, j: (i, k, 0, 0)),)

    call = functools.partial(
        pl.pallas_call,
        kernel,
        out_shape=out_shape,
        grid=grid,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"paged_attention_r{rows}_bk{block_k}_s{num_splits}",
    )
    if interpret is None:
        outs = _per_platform(*args, call=call, words=words)
    else:
        outs = _run(*args, call=call, interpret=interpret, words=words)

    if split:
        acc, m, l = outs
        m_all = m.max(axis=1, keepdims=True)
        w = jnp.exp(m - jnp.where(m_all == -jnp.inf, 0.0, m_all))  # [N, splits, K, R]
        l_tot = (l * w).sum(axis=1)
        acc_tot = (acc * w[..., None]).sum(axis=1)  # [N, K, R, Dp]
        o = jnp.where(l_tot[..., None] == 0.0, 0.0, acc_tot / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None])
    else:
        (o,) = outs
    o = o.reshape(num_tiles, kh, qb, gq, dp)[:, :, :, :g, :d].transpose(0, 2, 1, 3, 4)
    o = o.reshape(num_tiles * qb, h, d).astype(q.dtype)
    if decode:
        return o
    local = jnp.arange(qb, dtype=jnp.int32)[None, :]
    dest = jnp.where(local < tiles[2][:, None], tiles[1][:, None] + local, t).reshape(-1)
    return jnp.zeros((t, h, d), q.dtype).at[dest].set(o, mode="drop")


def _zeros_index(ndim: int, *_: Any) -> tuple[int, ...]:
    return (0,) * ndim


def _run(*args: jax.Array, call: Any, interpret: bool, words: bool | None) -> Any:
    """The pallas_call on its operands (args as `_paged_attention_pallas` lists them; the kernel's full-array
    block specs are made here). A one-byte K or V pool goes in as 16-bit words when its size needs it
    (`needs_words`): this runs inside the primitive's lowering, so the count sees through jax.vmap (a stack
    of layers' pools). words=True forces the word view for one-byte pools, words=False forbids it (tests)."""
    kernel = call.args[0]
    args = list(args)
    flags = []
    for i, name in ((4, "k_pages"), (5, "v_pages")):
        one_byte = np.dtype(args[i].dtype).itemsize == 1
        flag = one_byte and (needs_words(args[i]) if words is None else bool(words))
        if flag:
            if kernel.keywords["head_dim"] % 2:
                raise ValueError(
                    f"{name}: a one-byte pool of {operand_elements(args[i])} elements is read as 16-bit "
                    f"words, which pair head-dim lanes; head dim D={kernel.keywords['head_dim']} is odd"
                )
            args[i] = to_words(args[i])
        flags.append(flag)
    in_specs = [pl.BlockSpec(a.shape, functools.partial(_zeros_index, a.ndim)) for a in args]
    kernel = functools.partial(kernel, words=tuple(flags))
    return call.func(kernel, *call.args[1:], **call.keywords, in_specs=in_specs, interpret=interpret)(*args)


# The interpreted kernel on cpu, the Triton kernel on cuda/rocm, chosen per lowering platform (see
# `kernels.lowering`): `impl="auto"` can hold this kernel in its GPU branch and still export for cpu, cuda,
# rocm and tpu at once.
_per_platform = per_platform_kernel(
    "tokenlab_paged_attention_pallas",
    {
        "cpu": functools.partial(_run, interpret=True),
        "cuda": functools.partial(_run, interpret=False),
        "rocm": functools.partial(_run, interpret=False),
    },
    kernel="the Pallas Triton paged attention kernel",
    runs_on="cpu (interpreted), cuda and rocm",
    out_shape=lambda *args, call, words: call.keywords["out_shape"],
)


def paged_attention_pallas(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    *,
    q_lens: jax.Array | None,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    alibi_slopes: jax.Array | None,
    k_scale: jax.Array | float | None,
    v_scale: jax.Array | float | None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    q_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Paged attention through the Pallas kernel; inputs already validated by the public entry.

    q: [T, H, D] float32|bfloat16|float16; k_pages, v_pages: [P, S, K, D] q's dtype, int8 or float8_e4m3fn;
    kv_lens: [B] int; block_tables: [B, max_pages] int; q_lens: [B] int or None (decode, T == B);
    alibi_slopes: [H] float or None; k_scale, v_scale: scalar or [P, S, K] float for quantized pages, else
    None. Returns [T, H, D] in q's dtype. Jittable.

    Tunables (keyword-only, static; defaults by shape from `default_tunables`):
      pages_per_block  pages per block step; the block is pages_per_block × S keys rounded up to a power of
                       two (default for 16-bit q: 8 KiB of K per step, at most 128 keys, for decode, 64 keys
                       for multi-token tiles; 16 keys for float32 q; with pages larger than the default
                       block a step walks part of a page).
      num_splits       context splits per (tile, kv head), merged by log-sum-exp (default: enough programs
                       to give about 256, at most one per key block, at most 64).
      q_block          query tokens per tile for multi-token queries, rounded up to a power of two with at
                       least 16 rows (default: 64 rows, i.e. 64 // Gq tokens; 32 rows for D = 256; 16
                       rows for float32 q; decode always 1).
      num_warps, num_stages  Triton launch parameters (default 4 warps; 8 for tiles of 64 rows or more,
                       D = 256 or float32 q; 5 stages for 16-bit decode, which double-buffers K and V,
                       else 2).
      interpret        None: interpret mode on cpu, compiled on cuda/rocm, chosen per lowering platform;
                       True/False force one (False cannot run on a CPU).
    """
    t, h, d = q.shape
    _, s, kh, _ = k_pages.shape
    _, max_pages = block_tables.shape
    for name, v in (
        ("pages_per_block", pages_per_block),
        ("num_splits", num_splits),
        ("q_block", q_block),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
    ):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    reason = pallas_unsupported(q, k_pages, v_pages, q_lens=q_lens)
    if reason is not None:
        raise ValueError(f"the Pallas paged attention kernel does not support {reason}")
    decode = q_lens is None
    if t == 0 or max_pages == 0 or k_pages.shape[0] == 0:  # nothing to read: every row is empty
        return jnp.zeros((t, h, d), q.dtype)
    tun = default_tunables(
        t,
        np.shape(kv_lens)[0],
        h,
        kh,
        d,
        s,
        max_pages,
        _dtype(k_pages).itemsize,
        decode=decode,
        q_itemsize=_dtype(q).itemsize,
        block_k=None if pages_per_block is None else max(16, _pow2_at_least(pages_per_block * s)),
        q_block=q_block,
    )

    def as_scale(x):
        return None if x is None else jnp.asarray(x, _F32)

    return _paged_attention_pallas(
        q,
        k_pages,
        v_pages,
        jnp.asarray(kv_lens),
        jnp.asarray(block_tables),
        None if q_lens is None else jnp.asarray(q_lens),
        None if alibi_slopes is None else jnp.asarray(alibi_slopes),
        as_scale(k_scale),
        as_scale(v_scale),
        scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window),
        block_k=tun["block_k"],
        q_block=tun["q_block"],
        num_splits=int(num_splits or tun["num_splits"]),
        num_warps=int(num_warps or tun["num_warps"]),
        num_stages=int(num_stages or tun["num_stages"]),
        interpret=interpret,
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """Tunables of the Pallas Triton kernel; a field left None takes `default_tunables`' choice.

    q_tile       query tokens per tile for multi-token queries (decode: always 1).
    block_pages  pages per block step (the block is block_pages × S keys, rounded up to a power of two).
    num_splits   context splits per (tile, kv head), merged by log-sum-exp.
    num_warps, num_stages  Triton launch parameters.
    """

    q_tile: int | None = None
    block_pages: int | None = None
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "q_tile", "block_pages", "num_splits", "num_warps", "num_stages")


def shape_class(q: Any, k_pages: Any, v_pages: Any, kv_lens: Any, block_tables: Any, *, q_lens: Any = None,
                **_: Any) -> str:  # fmt: skip
    """The family of shapes that share a best configuration: "decode" (one query token per sequence,
    q_lens None) or "prefill" (multi-token tiles), with "-f32" for float32 q (no tensor cores: other tiles)
    and "-d256" for head dims above 128 (half the tile). The key `kernels.tuning` stores tuned configs by."""
    kind = "decode" if q_lens is None else "prefill"
    if _dtype(q).itemsize >= 4:
        kind += "-f32"
    if np.shape(q)[-1] > 128:
        kind += "-d256"
    return kind


def tune_space(q: Any, k_pages: Any, v_pages: Any, kv_lens: Any, block_tables: Any, *, q_lens: Any = None,
               **_: Any) -> list[Config]:  # fmt: skip
    """The configurations `benchmarks.accel --tune` times for this call (at most 12), the default first.

    Decode: K blocks of 32, 64 and 128 keys (as pages per block for this page size S) × num_stages 3 and 5
    (5 double-buffers the gathered K/V blocks at 32-64 keys, 3 at 128) × 4 warps, and 8 warps at the two
    larger blocks with 5 stages. Prefill: 32- and 64-key blocks × q tiles of 32 and 64 rows × 2 and 3 stages,
    8 warps. Splits stay with the default (they follow the grid, not the chip)."""
    s = np.shape(k_pages)[1]

    def pages(keys: int) -> int:
        return max(1, keys // s)

    space = [Config()]
    if q_lens is None:
        for keys in (32, 64, 128):
            for stages in (3, 5):
                space.append(Config(block_pages=pages(keys), num_warps=4, num_stages=stages))
        space += [Config(block_pages=pages(keys), num_warps=8, num_stages=5) for keys in (64, 128)]
    else:
        g = max(1, np.shape(q)[1] // np.shape(k_pages)[2])
        gq = _pow2_at_least(g)
        for keys in (32, 64):
            for rows in (32, 64):
                for stages in (2, 3):
                    space.append(Config(q_tile=max(1, rows // gq), block_pages=pages(keys), num_warps=8,
                                        num_stages=stages))  # fmt: skip
    return list(dict.fromkeys(space))


def _supports(q, k_pages, v_pages, kv_lens, block_tables, *, q_lens=None, **options):
    return pallas_unsupported(q, k_pages, v_pages, q_lens=q_lens)


def default_config(q, k_pages, v_pages, kv_lens, block_tables, *, q_lens=None, **_: Any) -> Config:
    """The configuration a call without one runs: the tuned entry for (shape class, the GPU being lowered
    for) from `kernels.tuning` when there is one, else `Config()` (every field by `default_tunables`)."""
    target = target_gpu()
    cls = shape_class(q, k_pages, v_pages, kv_lens, block_tables, q_lens=q_lens)
    found = tuning.lookup("paged_attention", "pallas_triton", cls, None if target is None else target[0])
    return Config() if found is None else Config(**found)


def _pallas(q, k_pages, v_pages, kv_lens, block_tables, *, q_lens, config, scale, soft_cap, sliding_window,
            **options):  # fmt: skip
    if config == Config():
        config = default_config(q, k_pages, v_pages, kv_lens, block_tables, q_lens=q_lens)
    logit = dict(scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)

    def forward(q, k_pages, v_pages, kv_lens, block_tables, q_lens, alibi_slopes, k_scale, v_scale):
        return paged_attention_pallas(
            q, k_pages, v_pages, kv_lens, block_tables, q_lens=q_lens, alibi_slopes=alibi_slopes,
            k_scale=k_scale, v_scale=v_scale, **logit,
            pages_per_block=config.block_pages, num_splits=config.num_splits,
            q_block=None if q_lens is None else config.q_tile,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip

    # The kernel's forward with the XLA path's recompute-based backward (reverse-mode autodiff).
    return differentiable(
        forward, (scale, soft_cap, sliding_window, config.q_tile or 32), q, k_pages, v_pages, kv_lens,
        block_tables, q_lens, options["alibi_slopes"], options["k_scale"], options["v_scale"],
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation(
    "pallas_triton", _pallas, platforms=("cpu", "cuda", "rocm"), supports=_supports, config=Config
)
