"""Paged attention as a Pallas kernel for TPUs (Mosaic lowering), interpreted on the CPU.

What it computes
----------------
What `paged_attention_reference` computes (formula, masking and layouts in the package docstring): for query
row t of sequence b at position p and query head h reading kv head kh = h // G,

    out[t, h] = softmax_j(cap(scale · q[t, h] · k[b, j, kh]) + alibi[h] · (j − p))[kept j] · v[b, kept j, kh]

with j kept iff j ≤ p, j > p − sliding_window and j < kv_len[b], for the ragged mixed batch (decode rows,
speculative verification and prefill chunks in one call).

Structure
---------
grid = (N query tiles, K kv heads), or (N, 1) ("heads" below), both "parallel". A query tile is `q_tile`
consecutive query tokens of one sequence (1 for decode) times all G query heads of its kv head: R = q_tile ×
G rows, so each kv head's keys and values are read from HBM once per tile for its whole group (GQA/MQA). The
tile table (sequence, first position, first and last key block; `_tile_table`), kv_lens and the flattened
block table are scalar-prefetched into SMEM (`pltpu.PrefetchScalarGridSpec`). The page pools stay in HBM
(`memory_space=pl.ANY`); a program walks its key blocks (`block_pages` pages, BK = block_pages × S keys) with
double-buffered async copies (`pltpu.make_async_copy`, one DMA semaphore per buffer slot): block i + 1's
pages are in flight while block i is computed. A page is copied only when the sequence owns it (its index is
below ceil(kv_len / S) and below the table's width, and its id is in [0, P)), so a program never reads
another sequence's pages; the causal and sliding-window limits skip whole blocks (a tile reads keys from
max(0, p_first − W + 1) to min(kv_len, p_last + 1) only). The online softmax keeps float32 m, l [R, 1] and
acc [R, D] in VMEM scratch.

How pages are copied (static, by the pages' dtype; `copy_mode`). The pools keep their NHD layout: no XLA op
touches them outside the kernel (a reshape to [P, S, K·D] would be a relayout copy of the whole pool on a
TPU: libtpu's static estimate for it was 5x the kernel's at the B=64 decode case on v6e).
  "rows"   32-bit pages (float32): grid (N, K); each program copies its kv head's [S, D] rows of each
           page (`k_pages.at[page, :, kh, :]`), any S and D.
  "heads"  16- and 8-bit pages (bfloat16, float16 bits, int8, float8): Mosaic cannot DMA one row out of a
           packed (K, D) tile, so grid (N, 1) and each program copies whole pages [S, K, D] and computes
           all K kv heads (a strided VMEM load per head): every owned page is read once, all heads used.

Numerics. Logits, m, l and acc are float32. bfloat16 q feeds the MXU bfloat16 operands (keys converted to
bfloat16 in VMEM when stored as int8/float8, probabilities rounded to bfloat16 for the P·V dot) with float32
accumulation. float32 q is computed to float32 accuracy: both dots ask for `precision=HIGHEST` (a TPU runs
float32 dots in bfloat16 passes otherwise). float16 (which Mosaic on v5e/v6e cannot load) runs as float32:
q is converted outside, float16 pages go in as their uint16 bits (a free bitcast) and are decoded exactly in
the kernel. int8 / float8_e4m3fn pages are converted in VMEM; a per-tensor scale multiplies the logits (K) and
the output (V), per-token scales [P, S, K] (copied page by page beside the pages) multiply the key and value
rows in float32.

Safety. Keys of pages that were not copied (foreign ids, pages past the sequence's own) and slots past kv_len
get logit −inf, and their value rows are zeroed with `where` before the P·V dot, so stale VMEM or NaN/Inf
garbage cannot reach the output. A NaN in q reaches only its own row. A row with nothing to attend to is
zeros.

Block sizes per chip (`CHIPS`, read with `pltpu.get_tpu_info()` at lowering: a TPU, a compile-only TPU device
or an abstract mesh of one; `DEFAULT_CHIP` for any other TPU, `INTERPRET_CHIP` when interpreted on the CPU):
keys per block and query rows per prefill tile, and the scoped VMEM the kernel asks for
(`pltpu.CompilerParams(vmem_limit_bytes=...)`): twice the estimated footprint, at least 16 MiB, at most the
chip's cap.

Gradients (reverse mode): the entry wraps the kernel in the XLA path's recompute-based custom VJP
(`kernels.paged_attention.xla.differentiable`), as the Pallas Triton backend does.

Lowering. One primitive with a lowering per platform (`kernels.lowering.per_platform_kernel`): the compiled
Mosaic kernel (`tpu_custom_call`) on tpu, the same kernel interpreted (plain HLO) on cpu; `jax.export` needs
`disabled_checks=[DisabledSafetyCheck.custom_call("tpu_custom_call")]`.

Not done: splitting one sequence's context over several programs (flash-decoding split-K) for batches with
fewer tiles × kv heads than cores; prefetching the next program's first block across grid steps.

Axis legend: T query tokens, B sequences, H query heads, K kv heads, G = H // K, D head dim, P pages, S page
size, N query tiles, R rows of a tile (q_tile × G), BK keys per block, MP the block table's width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import registry
from kernels.int4_matmul.pallas_mosaic_tpu import f16_bits_to_f32
from kernels.lowering import per_platform_kernel, tpu_chip
from kernels.paged_attention.xla import _tiles, differentiable

_F32 = jnp.float32
_MIB = 1 << 20
LANES = 128
SUBLANES = 8
# Pages per block up to which the kernel unrolls its per-page loops (copies, masks); a loop beyond.
UNROLL_PAGES = 8


@dataclasses.dataclass(frozen=True)
class Chip:
    """Tiling defaults for one TPU generation: keys per block (one kv head's K or V block), query rows per
    prefill tile, and the most scoped VMEM the kernel may ask for (bytes)."""

    block_keys: int
    tile_rows: int
    vmem_cap: int
    max_block_pages: int = 1 << 16


# Keys per block: 1024 keys of D = 128 bf16 are 256 KiB per K or V block (1 MiB double-buffered, both pools),
# enough bytes per block step to amortize the step's fixed cost at 0.8-3.7 TB/s; v5e takes 512 (its 16 MiB
# default scoped VMEM and 128-wide MXU). Prefill rows match the MXU: 128 on v5e/v5p, 256 on v6e/v7x.
CHIPS = {
    "v5e": Chip(block_keys=512, tile_rows=128, vmem_cap=64 * _MIB),
    "v5p": Chip(block_keys=1024, tile_rows=128, vmem_cap=64 * _MIB),
    "v6e": Chip(block_keys=1024, tile_rows=256, vmem_cap=64 * _MIB),
    "7x": Chip(block_keys=1024, tile_rows=256, vmem_cap=40 * _MIB),  # 64 MiB of VMEM per core
}
DEFAULT_CHIP = Chip(block_keys=512, tile_rows=128, vmem_cap=32 * _MIB)
# Interpreted on the CPU: two pages per block (the test sequences span several blocks, so the double buffer
# crosses block boundaries) and small tiles.
INTERPRET_CHIP = Chip(block_keys=32, tile_rows=16, vmem_cap=0, max_block_pages=4)


def chip_tiles() -> Chip:
    """The tiling defaults of the TPU being lowered for (`pltpu.get_tpu_info()`); DEFAULT_CHIP when there is
    none to ask or it is not in the table."""
    return tpu_chip(CHIPS, DEFAULT_CHIP)[0]


def copy_mode(page_dtype: Any) -> str:
    """How a program copies its pages: "rows" (one kv head's rows, 32-bit pages) or "heads" (whole pages,
    all kv heads in one program); see the module docstring."""
    return "rows" if np.dtype(page_dtype).itemsize == 4 else "heads"


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static tiling of one call: query tokens per tile, pages per block, and the scoped VMEM to ask for
    (None when interpreted)."""

    q_tile: int
    block_pages: int
    vmem_limit: int | None


def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
    sub = SUBLANES * max(1, 4 // itemsize)  # packed dtypes hold more rows per (8, 128) tile
    return -(-rows // sub) * sub * (-(-cols // LANES) * LANES) * itemsize


def vmem_bytes(rows: int, head_dim: int, block_keys: int, num_kv_heads: int, itemsize: int, mode: str,
               per_token: bool) -> int:  # fmt: skip
    """VMEM of one program (bytes), tiles padded: the double-buffered K and V blocks (and per-token scales),
    the double-buffered q and output blocks, the m/l/acc scratch and the block's float32 temporaries (logits,
    probabilities, converted keys and values)."""
    if mode == "heads":
        kv = block_keys * _tile_bytes(num_kv_heads, head_dim, itemsize)
    else:
        kv = _tile_bytes(block_keys, head_dim, itemsize)
    scales = _tile_bytes(block_keys, num_kv_heads, 4) if per_token else 0
    heads = num_kv_heads if mode == "heads" else 1
    buffers = 2 * 2 * (kv + scales)
    blocks = 2 * 2 * heads * _tile_bytes(rows, head_dim, 4)
    scratch = heads * (2 * _tile_bytes(rows, 1, 4) + _tile_bytes(rows, head_dim, 4))
    temps = 4 * _tile_bytes(rows, block_keys, 4) + 4 * _tile_bytes(block_keys, head_dim, 4)
    return buffers + blocks + scratch + temps


def choose_tiling(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    max_pages: int,
    page_dtype: Any,
    *,
    decode: bool,
    per_token: bool = False,
    chip: Chip = DEFAULT_CHIP,
    q_tile: int | None = None,
    block_pages: int | None = None,
) -> Tiling:
    """Default tiles by shape and chip (a given value overrides its default).

    q_tile: 1 for decode; else chip.tile_rows // G tokens (at least 1). block_pages: chip.block_keys // S
    pages (at least 1, at most chip.max_block_pages), at most the table's width. VMEM: twice `vmem_bytes`,
    at least 16 MiB, at most chip.vmem_cap (None when interpreted: chip.vmem_cap == 0).
    """
    g = num_q_heads // num_kv_heads
    if decode:
        q_tile = 1
    elif q_tile is None:
        q_tile = max(1, chip.tile_rows // g)
    if block_pages is None:
        block_pages = min(chip.max_block_pages, max(1, chip.block_keys // page_size))
    block_pages = max(1, min(block_pages, max_pages))
    vmem = None
    if chip.vmem_cap:
        need = vmem_bytes(
            q_tile * g, head_dim, block_pages * page_size, num_kv_heads, np.dtype(page_dtype).itemsize,
            copy_mode(page_dtype), per_token,
        )  # fmt: skip
        vmem = min(chip.vmem_cap, max(16 * _MIB, 2 * need))
    return Tiling(int(q_tile), int(block_pages), vmem)


# ---------------------------------------------------------------------------------------------------------
# The kernel


def _kernel(
    meta_ref,  # SMEM [4 · N]: per tile (seq, pos0, first block, end block)
    lens_ref,  # SMEM [B]
    bt_ref,  # SMEM [B · MP]
    q_ref,  # [R, D] compute dtype
    rowtok_ref,  # [R, 1] int32: the token of each row within the tile (r // G)
    *refs,
    mode: str,
    block_pages: int,
    page_size: int,
    num_pages: int,
    max_pages: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    alibi: bool,
    tensor_scales: bool,
    per_token_k: bool,
    per_token_v: bool,
    f16_bits: tuple[bool, bool],
    compute_dtype: Any,
) -> None:
    refs = list(refs)
    slope_ref = refs.pop(0) if alibi else None
    ts_ref = refs.pop(0) if tensor_scales else None
    k_hbm, v_hbm = refs.pop(0), refs.pop(0)
    ks_hbm = refs.pop(0) if per_token_k else None
    vs_hbm = refs.pop(0) if per_token_v else None
    o_ref = refs.pop(0)
    kbuf, vbuf = refs.pop(0), refs.pop(0)
    ksbuf = refs.pop(0) if per_token_k else None
    vsbuf = refs.pop(0) if per_token_v else None
    sems, m_scr, l_scr, acc_scr = refs

    i, kh = pl.program_id(0), pl.program_id(1)  # "heads": one program for all K kv heads, kh = 0
    hp = num_kv_heads if mode == "heads" else 1  # kv heads per program
    seq = meta_ref[4 * i]
    pos0 = meta_ref[4 * i + 1]
    blk_lo = meta_ref[4 * i + 2]
    blk_hi = meta_ref[4 * i + 3]
    n = lens_ref[seq]
    del head_dim
    s, npb = page_size, block_pages
    bk = npb * s

    def page_of(blk, j):
        """(page id, whether the sequence owns it, whether it lies below kv_len) of page j of block blk: a
        page is copied only when owned; covered but not owned means a block-table entry outside [0, P)."""
        idx = blk * npb + j
        entry = bt_ref[seq * max_pages + jnp.minimum(idx, max_pages - 1)]
        covered = (idx < max_pages) & (idx * s < n)
        return entry, covered & (entry >= 0) & (entry < num_pages), covered

    def over_pages(fn, init):
        """fn(j, carry) for the block's pages: unrolled for a few pages, a loop for many (smaller code)."""
        if npb <= UNROLL_PAGES:
            for j in range(npb):
                init = fn(j, init)
            return init
        return jax.lax.fori_loop(0, npb, fn, init)

    def page_rows(j):
        return pl.ds(j * s if isinstance(j, int) else pl.multiple_of(j * s, s), s)

    def copies(slot, page, j):
        rows = page_rows(j)
        if mode == "rows":
            src_k, src_v = k_hbm.at[page, :, kh, :], v_hbm.at[page, :, kh, :]
        else:
            src_k, src_v = k_hbm.at[page], v_hbm.at[page]
        out = [
            pltpu.make_async_copy(src_k, kbuf.at[slot, rows], sems.at[slot]),
            pltpu.make_async_copy(src_v, vbuf.at[slot, rows], sems.at[slot]),
        ]
        if per_token_k:
            out.append(pltpu.make_async_copy(ks_hbm.at[page], ksbuf.at[slot, rows], sems.at[slot]))
        if per_token_v:
            out.append(pltpu.make_async_copy(vs_hbm.at[page], vsbuf.at[slot, rows], sems.at[slot]))
        return out

    def block_copies(blk, slot, start):
        def one(j, carry):
            page, owned, _ = page_of(blk, j)

            @pl.when(owned)
            def _():
                for c in copies(slot, page, j):
                    if start:
                        c.start()
                    else:
                        c.wait()

            return carry

        over_pages(one, 0)

    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

    @pl.when(blk_lo < blk_hi)
    def _():
        block_copies(blk_lo, 0, True)

    rpos = pos0 + rowtok_ref[...]  # [R, 1] position of each row
    precision = jax.lax.Precision.HIGHEST if compute_dtype == _F32 else None
    qk_scale = jnp.float32(scale)
    if tensor_scales:
        qk_scale = qk_scale * ts_ref[0]
    lane_row = jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)  # [1, BK] key index in the block
    lane_col = jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0)  # [BK, 1]

    def load(buf, slot, bits, hh):
        """[BK, D] rows of the program's head hh (stored dtype, float32 for float16 bits) from a slot."""
        x = buf[slot] if mode == "rows" else buf[slot, :, hh, :]  # "heads": a strided load of head hh
        return f16_bits_to_f32(x.astype(jnp.int32)) if bits else x

    def token_scales(buf, slot, hh):
        """[BK, 1] float32: the column of head hh (kh in "rows" mode) of the block's scales [BK, K]."""
        if mode == "heads":
            return buf[slot, :, pl.ds(hh, 1)]
        x = buf[slot]
        heads = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
        return jnp.sum(jnp.where(heads == kh, x, 0.0), axis=1, keepdims=True)

    def owned_keys(blk, idx):
        """1.0 where a key (idx: [1, BK] or [BK, 1] indices in the block) lies on a copied page, else 0."""

        def one(j, ok):
            _, owned, _ = page_of(blk, j)
            return jnp.where((idx >= j * s) & (idx < (j + 1) * s) & owned, 1.0, ok)

        return over_pages(one, jnp.zeros(idx.shape, _F32))

    def foreign_pages(blk):
        def one(j, count):
            _, owned, covered = page_of(blk, j)
            return count + (covered & jnp.logical_not(owned)).astype(jnp.int32)

        return over_pages(one, jnp.int32(0))

    def body(blk, carry):
        slot = (blk - blk_lo) % 2

        @pl.when(blk + 1 < blk_hi)
        def _():
            block_copies(blk + 1, 1 - slot, True)

        block_copies(blk, slot, False)
        first = blk * bk
        kpos = first + lane_row  # [1, BK]
        v_ok = first + lane_col < n  # [BK, 1]
        foreign = foreign_pages(blk) > 0
        # Only a block with a foreign id inside kv_len needs the per-page masks of keys and values.
        owned = jax.lax.cond(foreign, lambda: owned_keys(blk, lane_row), lambda: jnp.ones((1, bk), _F32))
        v_ok = v_ok & (
            jax.lax.cond(foreign, lambda: owned_keys(blk, lane_col), lambda: jnp.ones((bk, 1), _F32)) > 0.0
        )
        keep = (owned > 0.0) & (kpos < n) & (kpos <= rpos)
        if sliding_window is not None:
            keep = keep & (kpos > rpos - sliding_window)
        rel = (kpos - rpos).astype(_F32) if alibi else None
        for hh in range(hp):
            k = load(kbuf, slot, f16_bits[0], hh)
            v = load(vbuf, slot, f16_bits[1], hh)
            if per_token_k:
                k = k.astype(_F32) * token_scales(ksbuf, slot, hh)
            if per_token_v:
                v = v.astype(_F32) * token_scales(vsbuf, slot, hh)
            logits = jax.lax.dot_general(
                q_ref[hh], k.astype(compute_dtype), (((1,), (1,)), ((), ())),
                precision=precision, preferred_element_type=_F32,
            )  # fmt: skip
            logits = logits * qk_scale
            if soft_cap is not None:
                logits = soft_cap * jnp.tanh(logits / soft_cap)
            if alibi:
                logits = logits + slope_ref[hh] * rel
            logits = jnp.where(keep, logits, -jnp.inf)
            m_prev = m_scr[hh]
            m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(logits - m_safe)
            corr = jnp.exp(m_prev - m_safe)
            l_scr[hh] = corr * l_scr[hh] + jnp.sum(p, axis=1, keepdims=True)
            m_scr[hh] = m_new
            # Value rows past kv_len or on foreign pages (stale or garbage) are zeroed: 0 · NaN would
            # spread to every row.
            v = jnp.where(v_ok, v.astype(compute_dtype), jnp.zeros((), compute_dtype))
            pv = jax.lax.dot_general(
                p.astype(compute_dtype), v, (((1,), (0,)), ((), ())),
                precision=precision, preferred_element_type=_F32,
            )  # fmt: skip
            acc_scr[hh] = corr * acc_scr[hh] + pv
        return carry

    jax.lax.fori_loop(blk_lo, blk_hi, body, 0)
    l_fin = l_scr[...]
    empty = l_fin == 0.0  # nothing to attend to: zeros (a NaN row keeps l = NaN and stays NaN)
    out = jnp.where(empty, 0.0, acc_scr[...] / jnp.where(empty, 1.0, l_fin))
    if tensor_scales:
        out = out * ts_ref[1]
    o_ref[...] = out.astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------------------
# The call around it (XLA on the small arrays: tile table, q rows, output rows)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call."""

    scale: float
    soft_cap: float | None
    sliding_window: int | None
    q_tile: int | None
    block_pages: int | None
    out_shape: jax.ShapeDtypeStruct


def _tile_table(kv_lens, q_lens, num_tiles, q_tile, block_keys, sliding_window):
    """Per tile: (seq, pos0, first key block, end key block) flattened [4 · N], the first row of q [N] and the
    number of rows [N]. A tile with no rows reads no block."""
    b = kv_lens.shape[0]
    if q_lens is None:
        seq = jnp.arange(b, dtype=jnp.int32)
        row0, count, pos0 = seq, jnp.where(kv_lens > 0, 1, 0), kv_lens - 1
    else:
        seq, row0, count, pos0 = _tiles(q_lens, kv_lens, num_tiles, q_tile)
    n = kv_lens[seq]
    hi = jnp.where(count > 0, jnp.clip(jnp.minimum(n, pos0 + count), 0, None), 0)
    lo = jnp.zeros_like(hi) if sliding_window is None else jnp.clip(pos0 - sliding_window + 1, 0, hi)
    blk_lo = lo // block_keys
    blk_hi = jnp.maximum((hi + block_keys - 1) // block_keys, blk_lo)
    meta = jnp.stack([seq, pos0, blk_lo, blk_hi], axis=1).astype(jnp.int32).reshape(-1)
    return meta, row0.astype(jnp.int32), count.astype(jnp.int32)


def _run(q, k_pages, v_pages, kv_lens, block_tables, q_lens, alibi_slopes, k_scale, v_scale, *, spec: _Spec,
         interpret: bool):  # fmt: skip
    """The whole call for one lowering: tiling by chip, the tile table, q in tiles, the pallas_call, the
    output back in token order."""
    t, h, d = q.shape
    p, s, kh, _ = k_pages.shape
    g = h // kh
    b, mp = block_tables.shape
    decode = q_lens is None
    per_token_k = k_scale is not None and k_scale.ndim == 3
    per_token_v = v_scale is not None and v_scale.ndim == 3
    tensor_scales = (k_scale is not None and not per_token_k) or (v_scale is not None and not per_token_v)
    page_dtype = np.dtype(k_pages.dtype)
    if np.dtype(v_pages.dtype).itemsize != page_dtype.itemsize:  # one copy mode for both pools
        page_dtype = min(page_dtype, np.dtype(v_pages.dtype), key=lambda x: x.itemsize)
    tiling = choose_tiling(
        h, kh, d, s, mp, page_dtype, decode=decode, per_token=per_token_k or per_token_v,
        chip=INTERPRET_CHIP if interpret else chip_tiles(),
        q_tile=spec.q_tile, block_pages=spec.block_pages,
    )  # fmt: skip
    qt, npb = tiling.q_tile, tiling.block_pages
    mode = copy_mode(page_dtype)
    hp = kh if mode == "heads" else 1
    rows = qt * g
    kv_lens = kv_lens.astype(jnp.int32)
    num_tiles = b if decode else -(-t // qt) + b
    meta, row0, count = _tile_table(
        kv_lens, None if decode else q_lens.astype(jnp.int32), num_tiles, qt, npb * s, spec.sliding_window
    )
    f16 = np.dtype(q.dtype) == np.float16
    compute = _F32 if np.dtype(q.dtype) != np.dtype(jnp.bfloat16) else jnp.bfloat16
    out_dtype = _F32 if f16 else q.dtype
    # q as [N, K, R, D], rows ordered (token, group head).
    local = jnp.arange(qt, dtype=jnp.int32)[None, :]
    if decode:
        q_rows = q.reshape(b, 1, kh, g, d)
    else:
        q_rows = q[jnp.clip(row0[:, None] + local, 0, t - 1)].reshape(num_tiles, qt, kh, g, d)
    q_rows = q_rows.transpose(0, 2, 1, 3, 4).reshape(num_tiles, kh, rows, d).astype(compute)
    rowtok = (jnp.arange(rows, dtype=jnp.int32) // g)[:, None]

    def pool(x):
        if np.dtype(x.dtype) == np.float16:  # Mosaic loads no float16 on v5e/v6e: its bits, decoded inside
            x = jax.lax.bitcast_convert_type(x, jnp.uint16)
        return x

    in_specs = [
        pl.BlockSpec((None, hp, rows, d), lambda i, k, *_: (i, k, 0, 0)),
        pl.BlockSpec((rows, 1), lambda i, k, *_: (0, 0)),
    ]
    args = [q_rows, rowtok]
    if alibi_slopes is not None:
        sl = jnp.tile(alibi_slopes.astype(_F32).reshape(kh, 1, g), (1, qt, 1)).reshape(kh, rows, 1)
        in_specs.append(pl.BlockSpec((hp, rows, 1), lambda i, k, *_: (k, 0, 0)))
        args.append(sl)
    if tensor_scales:
        one = jnp.ones((), _F32)
        ks = one if k_scale is None or per_token_k else k_scale.astype(_F32)
        vs = one if v_scale is None or per_token_v else v_scale.astype(_F32)
        in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
        args.append(jnp.stack([ks, vs]))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    in_specs += [any_spec, any_spec]
    args += [pool(k_pages), pool(v_pages)]
    for per_token, sc in ((per_token_k, k_scale), (per_token_v, v_scale)):
        if per_token:
            in_specs.append(any_spec)
            args.append(sc.astype(_F32))

    buf_shape = (2, npb * s, kh, d) if mode == "heads" else (2, npb * s, d)

    def buf_dtype(x):
        return jnp.uint16 if np.dtype(x.dtype) == np.float16 else x.dtype

    scratch = [pltpu.VMEM(buf_shape, buf_dtype(k_pages)), pltpu.VMEM(buf_shape, buf_dtype(v_pages))]
    scratch += [pltpu.VMEM((2, npb * s, kh), _F32) for pt in (per_token_k, per_token_v) if pt]
    scratch += [
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.VMEM((hp, rows, 1), _F32),
        pltpu.VMEM((hp, rows, 1), _F32),
        pltpu.VMEM((hp, rows, d), _F32),
    ]
    kernel = functools.partial(
        _kernel,
        mode=mode,
        block_pages=npb,
        page_size=s,
        num_pages=p,
        max_pages=mp,
        num_kv_heads=kh,
        head_dim=d,
        scale=spec.scale,
        soft_cap=spec.soft_cap,
        sliding_window=spec.sliding_window,
        alibi=alibi_slopes is not None,
        tensor_scales=tensor_scales,
        per_token_k=per_token_k,
        per_token_v=per_token_v,
        f16_bits=(np.dtype(k_pages.dtype) == np.float16, np.dtype(v_pages.dtype) == np.float16),
        compute_dtype=compute,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(num_tiles, kh // hp),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, hp, rows, d), lambda i, k, *_: (i, k, 0, 0)),
        scratch_shapes=scratch,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_tiles, kh, rows, d), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=tiling.vmem_limit
        ),
        interpret=interpret,
        name=f"paged_attention_tpu_r{rows}_bk{npb * s}_{mode}",
    )(meta, kv_lens, block_tables.astype(jnp.int32).reshape(-1), *args)
    out = out.reshape(num_tiles, kh, qt, g, d).transpose(0, 2, 1, 3, 4).reshape(num_tiles * qt, h, d)
    if decode:
        return out.astype(q.dtype)
    dest = jnp.where(local < count[:, None], row0[:, None] + local, t).reshape(-1)
    return jnp.zeros((t, h, d), q.dtype).at[dest].set(out.astype(q.dtype), mode="drop")


# The compiled Mosaic kernel on tpu, the same kernel interpreted on cpu, chosen per lowering platform.
_paged_tpu = per_platform_kernel(
    "tokenlab_paged_attention_pallas_tpu",
    {
        "cpu": functools.partial(_run, interpret=True),
        "tpu": functools.partial(_run, interpret=False),
    },
    kernel="the Pallas Mosaic TPU paged attention kernel",
    runs_on="cpu (interpreted) and tpu",
    out_shape=lambda *args, spec: spec.out_shape,
)


def pallas_unsupported(q: Any, k_pages: Any, v_pages: Any, *, q_lens: Any = None) -> str | None:
    """Why the TPU kernel cannot serve these (already validated) inputs; None when it can.

    It serves every validated call: float32/bfloat16/float16 q, pages in q's dtype or int8/float8_e4m3fn
    with either scale form, any head dim, page size and head ratio, decode and mixed batches. (Kept as the
    registry's hook so that a shape found not to compile can be declined with its reason.)
    """
    del q, k_pages, v_pages, q_lens
    return None


def paged_attention_tpu(
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
    q_tile: int | None = None,
    block_pages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Paged attention through the Mosaic TPU kernel; inputs already validated by the public entry.

    q: [T, H, D] float32|bfloat16|float16; k_pages, v_pages: [P, S, K, D] q's dtype, int8 or float8_e4m3fn;
    kv_lens: [B] int; block_tables: [B, MP] int; q_lens: [B] int or None (decode, T == B); alibi_slopes: [H]
    or None; k_scale, v_scale: scalar or [P, S, K] for quantized pages, else None. Returns [T, H, D] in q's
    dtype. Forward only (the registry entry adds the custom VJP).

    q_tile: query tokens per tile for multi-token queries (default: the chip's rows // G); block_pages: pages
    per block step (default: the chip's keys per block // S). interpret: None chooses per lowering platform
    (interpreted on cpu, compiled on tpu); True/False force one.
    """
    for name, v in (("q_tile", q_tile), ("block_pages", block_pages)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be None, True or False")
    reason = pallas_unsupported(q, k_pages, v_pages, q_lens=q_lens)
    if reason is not None:
        raise ValueError(f"the Pallas TPU paged attention kernel does not support {reason}")
    t, h, d = q.shape
    if t == 0 or block_tables.shape[0] == 0 or block_tables.shape[1] == 0 or k_pages.shape[0] == 0:
        return jnp.zeros((t, h, d), q.dtype)  # nothing to read: every row is empty
    spec = _Spec(
        scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window),
        q_tile=None if q_tile is None else int(q_tile),
        block_pages=None if block_pages is None else int(block_pages),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    )

    def as_scale(x):
        return None if x is None else jnp.asarray(x, _F32)

    args = (
        q, k_pages, v_pages, jnp.asarray(kv_lens), jnp.asarray(block_tables),
        None if q_lens is None else jnp.asarray(q_lens),
        None if alibi_slopes is None else jnp.asarray(alibi_slopes), as_scale(k_scale), as_scale(v_scale),
    )  # fmt: skip
    return _forward(*args, spec=spec, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _forward(*args, spec: _Spec, interpret: bool | None):
    """Jitted once per static spec, so eager calls of one shape compile once."""
    if interpret is None:
        return _paged_tpu(*args, spec=spec)
    return _run(*args, spec=spec, interpret=interpret)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tunables of the Pallas Mosaic TPU kernel; a field left None takes `choose_tiling`'s choice (by shape
    and by the chip, at lowering).

    q_tile       query tokens per tile for multi-token queries (decode: always 1).
    block_pages  pages per block step.
    """

    q_tile: int | None = None
    block_pages: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "q_tile", "block_pages")


def _supports(q, k_pages, v_pages, kv_lens, block_tables, *, q_lens=None, **options):
    return pallas_unsupported(q, k_pages, v_pages, q_lens=q_lens)


def _pallas(q, k_pages, v_pages, kv_lens, block_tables, *, q_lens, config, scale, soft_cap, sliding_window,
            **options):  # fmt: skip
    logit = dict(scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)

    def forward(q, k_pages, v_pages, kv_lens, block_tables, q_lens, alibi_slopes, k_scale, v_scale):
        return paged_attention_tpu(
            q, k_pages, v_pages, kv_lens, block_tables, q_lens=q_lens, alibi_slopes=alibi_slopes,
            k_scale=k_scale, v_scale=v_scale, **logit,
            q_tile=None if q_lens is None else config.q_tile, block_pages=config.block_pages,
        )  # fmt: skip

    # The kernel's forward with the XLA path's recompute-based backward (reverse-mode autodiff).
    return differentiable(
        forward, (scale, soft_cap, sliding_window, config.q_tile or 32), q, k_pages, v_pages, kv_lens,
        block_tables, q_lens, options["alibi_slopes"], options["k_scale"], options["v_scale"],
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation(
    "pallas_mosaic_tpu", _pallas, platforms=("cpu", "tpu"), supports=_supports, config=Config
)
