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

The XLA path (`impl="xla"`) walks each sequence's pages in blocks with an online softmax (flash
attention / flash-decoding). Query tokens are grouped into tiles of `q_tile` consecutive tokens of one
sequence; each block step gathers the tile's next pages once for all G query heads of every kv head,
transposes the block to head-major [K, tokens, D] so that both contractions are batched dots with the
batch axes in front (XLA's CPU dot is far faster that way), and updates the running max, sum and output.
The context can be split into `num_splits` parts processed side by side and merged by log-sum-exp, which
keeps the device busy when there are few sequences. The loop stops after the longest sequence's last
block (a dynamic trip count), and the gather is sized to stay in cache (`block_pages`).

The native CPU path (`impl="cpu_native"`, kernels/cpu/paged_attention.cc through XLA's FFI) serves decode
(q_lens=None) with float32 q and float32 pages: one work unit per (sequence, kv head, context split) walks
the sequence's pages in place — each page's slice of that kv head is read once for all G query heads, no
gathered copy — with an online softmax and a log-sum-exp merge of the splits. It checks every page id a
sequence covers and kv_lens against the block table, and a bad one is an error raised from the handler
(never a read outside the pages). Multi-token queries (q_lens given), bfloat16/float16, and quantized
(int8/float8) pages stay on the XLA path. `impl="auto"` picks the native kernel for the cases it serves when
the library is built (`kernels.cpu.available()`), chosen per platform at lowering
(`jax.lax.platform_dependent`), so the same jitted function still exports for cuda, rocm and tpu;
`impl="xla"` forces the portable path.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kernels import cpu
from roofline.counters import Cost, itemsize

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
QUANT_DTYPES = (np.dtype(np.int8), np.dtype(ml_dtypes.float8_e4m3fn))
IMPLS = ("auto", "xla", "cpu_native")
# Bytes of K gathered per block step: large enough to amortize the loop, small enough to stay in cache.
# On a 2-core EPYC (32 MiB L3) 0.5–2 MiB ran at 8–10 GB/s against 3–5 GB/s at 8 MiB.
_BLOCK_BYTES = 1 << 20
# Keys per block step for multi-token query tiles (measured best of 16–1024 for a 512-token chunk).
_PREFILL_BLOCK_TOKENS = 256


def _is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(np.shape(x)), np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def validate_paged_attention_inputs(
    q: Any,
    k_pages: Any,
    v_pages: Any,
    kv_lens: Any,
    block_tables: Any,
    *,
    q_lens: Any = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
) -> None:
    """Raise ValueError naming the argument when the inputs are inconsistent (see the module docstring
    for which checks need concrete values)."""
    q_shape, q_dtype = _shape_dtype(q)
    k_shape, k_dtype = _shape_dtype(k_pages)
    v_shape, v_dtype = _shape_dtype(v_pages)
    if len(q_shape) != 3:
        raise ValueError(f"q must be [T, H, D]; got shape {q_shape}")
    if q_dtype not in FLOAT_DTYPES:
        raise ValueError(f"q.dtype={q_dtype} must be one of float32, bfloat16, float16")
    if len(k_shape) != 4:
        raise ValueError(f"k_pages must be [P, S, K, D]; got shape {k_shape}")
    if v_shape != k_shape:
        raise ValueError(f"v_pages.shape={v_shape} must equal k_pages.shape={k_shape}")
    t, h, d = q_shape
    p, s, kh, dk = k_shape
    if dk != d:
        raise ValueError(f"k_pages head dim {dk} must equal q head dim {d}")
    if kh < 1 or h % kh:
        raise ValueError(f"num_q_heads={h} must be a multiple of num_kv_heads={kh}")
    for name, dt, sc in (("k_pages", k_dtype, k_scale), ("v_pages", v_dtype, v_scale)):
        sc_name = name[0] + "_scale"
        if dt in QUANT_DTYPES:
            if sc is None:
                raise ValueError(f"{name}.dtype={dt} is quantized and needs {sc_name}")
            sc_shape = tuple(np.shape(sc))
            if sc_shape not in ((), (p, s, kh)):
                raise ValueError(f"{sc_name}.shape={sc_shape} must be () (per tensor) or {(p, s, kh)}")
        elif dt in FLOAT_DTYPES:
            if dt != q_dtype:
                raise ValueError(f"{name}.dtype={dt} must equal q.dtype={q_dtype} (or be int8/float8_e4m3fn)")
            if sc is not None:
                raise ValueError(f"{sc_name} is only for int8/float8_e4m3fn pages; {name}.dtype={dt}")
        else:
            raise ValueError(f"{name}.dtype={dt} must be q's dtype, int8 or float8_e4m3fn")
    kv_shape, kv_dtype = _shape_dtype(kv_lens)
    bt_shape, bt_dtype = _shape_dtype(block_tables)
    if len(kv_shape) != 1:
        raise ValueError(f"kv_lens must be [B]; got shape {kv_shape}")
    b = kv_shape[0]
    if len(bt_shape) != 2 or bt_shape[0] != b:
        raise ValueError(f"block_tables must be [B={b}, max_pages]; got shape {bt_shape}")
    for name, dt in (("kv_lens", kv_dtype), ("block_tables", bt_dtype)):
        if not np.issubdtype(dt, np.integer):
            raise ValueError(f"{name}.dtype={dt} must be an integer type")
    if q_lens is None:
        if t != b:
            raise ValueError(f"with q_lens=None (decode) q must have one token per sequence: T={t} != B={b}")
    else:
        ql_shape, ql_dtype = _shape_dtype(q_lens)
        if ql_shape != (b,):
            raise ValueError(f"q_lens.shape={ql_shape} must be (B={b},)")
        if not np.issubdtype(ql_dtype, np.integer):
            raise ValueError(f"q_lens.dtype={ql_dtype} must be an integer type")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale={scale!r} must be a finite number")
    if soft_cap is not None and not (isinstance(soft_cap, (int, float)) and soft_cap > 0):
        raise ValueError(f"soft_cap={soft_cap!r} must be a positive number")
    if sliding_window is not None and not (
        isinstance(sliding_window, (int, np.integer)) and sliding_window >= 1
    ):
        raise ValueError(f"sliding_window={sliding_window!r} must be an integer >= 1")
    if alibi_slopes is not None and tuple(np.shape(alibi_slopes)) != (h,):
        raise ValueError(f"alibi_slopes.shape={tuple(np.shape(alibi_slopes))} must be (H={h},)")

    # Value checks, possible only on concrete arrays.
    max_pages = bt_shape[1]
    if _is_concrete(kv_lens):
        lens = np.asarray(kv_lens)
        if (lens < 0).any():
            raise ValueError(f"kv_lens must be >= 0; got {lens.tolist()}")
        if (lens > max_pages * s).any():
            bad = int(np.argmax(lens > max_pages * s))
            raise ValueError(
                f"kv_lens[{bad}]={lens[bad]} exceeds what block_tables holds: max_pages={max_pages} × page "
                f"size {s} = {max_pages * s} tokens"
            )
        if _is_concrete(block_tables):
            bt = np.asarray(block_tables)
            for seq in range(b):
                used = -(-int(lens[seq]) // s)
                row = bt[seq, :used]
                bad = np.flatnonzero((row < 0) | (row >= p))
                if bad.size:
                    j = int(bad[0])
                    raise ValueError(
                        f"block_tables[{seq}, {j}]={row[j]} is not a page id in [0, {p}) "
                        f"(sequence {seq} covers {used} pages)"
                    )
        if q_lens is not None and _is_concrete(q_lens):
            ql = np.asarray(q_lens)
            if (ql < 0).any():
                raise ValueError(f"q_lens must be >= 0; got {ql.tolist()}")
            if (ql > lens).any():
                bad = int(np.argmax(ql > lens))
                raise ValueError(f"q_lens[{bad}]={ql[bad]} exceeds kv_lens[{bad}]={lens[bad]}")
            if int(ql.sum()) != t:
                raise ValueError(f"sum(q_lens)={int(ql.sum())} must equal the number of query tokens T={t}")
    if (
        alibi_slopes is not None
        and _is_concrete(alibi_slopes)
        and not np.isfinite(np.asarray(alibi_slopes)).all()
    ):
        raise ValueError("alibi_slopes must be finite")


def dequantize_pages(pages: Any, scale: Any = None) -> np.ndarray:
    """Pages [P, S, K, D] as float64 values: stored value × scale (scalar or [P, S, K]) when quantized."""
    x = np.asarray(pages).astype(np.float64)
    if scale is None:
        return x
    sc = np.asarray(scale, dtype=np.float64)
    return x * (sc if sc.ndim == 0 else sc[..., None])


def gather_kv(pages: Any, block_table_row: Any, kv_len: int) -> np.ndarray:
    """Layout bridge: one sequence's first kv_len tokens from pages [P, S, K, D] -> [kv_len, K, D]."""
    pages = np.asarray(pages)
    s = pages.shape[1]
    used = -(-int(kv_len) // s)
    ids = np.asarray(block_table_row)[:used]
    return pages[ids].reshape(used * s, *pages.shape[2:])[: int(kv_len)]


def paged_attention_reference(
    q: Any,
    k_pages: Any,
    v_pages: Any,
    kv_lens: Any,
    block_tables: Any,
    *,
    q_lens: Any = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
    impl: str = "reference",
) -> np.ndarray:
    """NumPy, float64 inside, one query token at a time. Same arguments as `paged_attention`."""
    del impl
    validate_paged_attention_inputs(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        q_lens=q_lens,
        scale=scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        alibi_slopes=alibi_slopes,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    q_dtype = np.asarray(q).dtype
    q64 = np.asarray(q).astype(np.float64)
    t_total, h, d = q64.shape
    kh = np.shape(k_pages)[2]
    g = h // kh
    k64 = dequantize_pages(k_pages, k_scale)
    v64 = dequantize_pages(v_pages, v_scale)
    lens = np.asarray(kv_lens)
    bt = np.asarray(block_tables)
    qls = np.ones_like(lens) if q_lens is None else np.asarray(q_lens)
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, dtype=np.float64)
    out = np.zeros((t_total, h, d), dtype=np.float64)
    kv_head = np.arange(h) // g  # query head -> the kv head it reads
    row = 0
    for b in range(len(lens)):
        n = int(lens[b])
        keys = gather_kv(k64, bt[b], n)[:, kv_head]  # [n, H, D]
        values = gather_kv(v64, bt[b], n)[:, kv_head]
        j = np.arange(n)
        for i in range(int(qls[b])):
            pos = n - int(qls[b]) + i
            logits = sc * np.einsum("nhd,hd->hn", keys, q64[row])  # [H, n]
            if soft_cap is not None:
                logits = soft_cap * np.tanh(logits / soft_cap)
            if slopes is not None:
                logits = logits + slopes[:, None] * (j - pos)[None, :]
            keep = j <= pos
            if sliding_window is not None:
                keep &= j > pos - sliding_window
            if keep.any():  # otherwise nothing to attend to: the row stays zero
                kept = logits[:, keep]
                w = np.exp(kept - kept.max(axis=1, keepdims=True))
                w /= w.sum(axis=1, keepdims=True)
                out[row] = np.einsum("hn,nhd->hd", w, values[keep])
            row += 1
    return out.astype(q_dtype)


# ---------------------------------------------------------------------------------------------------------
# The jitted XLA path.


def _auto_block_pages(rows: int, page_size: int, num_kv_heads: int, head_dim: int, splits: int) -> int:
    per_page = rows * splits * page_size * num_kv_heads * head_dim * 4  # gathered block, upcast to float32
    return max(1, _BLOCK_BYTES // per_page)


def _tiles(q_lens: jax.Array, kv_lens: jax.Array, num_tiles: int, q_tile: int):
    """Assign query tokens to tiles of at most q_tile consecutive tokens of one sequence.

    Returns per tile: seq [N], first token row [N], valid row count [N], and the position of its first
    query token [N]. Tiles past the last one have count 0.
    """
    b = q_lens.shape[0]
    tiles_per_seq = (q_lens + q_tile - 1) // q_tile
    first_tile = jnp.cumsum(tiles_per_seq) - tiles_per_seq  # exclusive prefix sum
    first_row = jnp.cumsum(q_lens) - q_lens
    tile = jnp.arange(num_tiles)
    seq = jnp.clip(jnp.searchsorted(first_tile + tiles_per_seq, tile, side="right"), 0, b - 1)
    local = tile - first_tile[seq]
    live = tile < jnp.sum(tiles_per_seq)
    count = jnp.where(live, jnp.clip(q_lens[seq] - local * q_tile, 0, q_tile), 0)
    row0 = first_row[seq] + local * q_tile
    pos0 = kv_lens[seq] - q_lens[seq] + local * q_tile
    return seq, row0, count, pos0


@functools.partial(
    jax.jit,
    static_argnames=("scale", "soft_cap", "sliding_window", "q_tile", "block_pages", "num_splits", "decode"),
)
def _paged_attention_xla(
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
    q_tile,
    block_pages,
    num_splits,
    decode,
):
    t_total, h, d = q.shape
    p, s, kh, _ = k_pages.shape
    g = h // kh
    b, max_pages = block_tables.shape
    f32 = jnp.float32
    kv_lens = kv_lens.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)

    if decode:
        seq = jnp.arange(b)
        row0 = seq
        count = jnp.where(kv_lens > 0, 1, 0)
        pos0 = kv_lens - 1
        num_tiles, qt = b, 1
    else:
        qt = q_tile
        num_tiles = -(-t_total // qt) + b
        seq, row0, count, pos0 = _tiles(q_lens.astype(jnp.int32), kv_lens, num_tiles, qt)
    rows = row0[:, None] + jnp.arange(qt)[None, :]  # [N, qt]
    row_ok = jnp.arange(qt)[None, :] < count[:, None]
    qpos = pos0[:, None] + jnp.arange(qt)[None, :]  # [N, qt] position of each query row
    # Query tile [N, K, qt*G, D], rows ordered (token, group head).
    qtile = q[jnp.clip(rows, 0, t_total - 1)].astype(f32)  # [N, qt, H, D]
    qtile = qtile.reshape(num_tiles, qt, kh, g, d).transpose(0, 2, 1, 3, 4).reshape(num_tiles, kh, qt * g, d)
    qtile = qtile * f32(scale)
    rpos = jnp.repeat(qpos, g, axis=1)  # [N, R] matching rows (token, group head)
    rok = jnp.repeat(row_ok, g, axis=1)
    seq_len = kv_lens[seq]  # [N]
    if alibi_slopes is not None:
        slopes = alibi_slopes.astype(f32).reshape(kh, g)
        rslope = jnp.tile(slopes[:, None, :], (1, qt, 1)).reshape(kh, qt * g)  # [K, R]

    bp = block_pages
    splits = num_splits
    blocks_total = -(-max_pages // bp)
    steps = -(-blocks_total // splits)
    padded = steps * splits * bp
    bt = jnp.pad(block_tables, ((0, 0), (0, padded - max_pages)), constant_values=-1)
    # [B, splits, steps, bp]: split j holds the contiguous block range [j*steps, (j+1)*steps).
    bt = bt.reshape(b, splits, steps, bp)
    bt_tiles = bt[seq]  # [N, splits, steps, bp]
    per_token_k = k_scale is not None and k_scale.ndim == 3
    per_token_v = v_scale is not None and v_scale.ndim == 3
    tokens = bp * s
    r = qt * g

    def load(pages_arr, scale_arr, per_token, ids):
        blk = pages_arr[ids]  # [N, splits, bp, S, K, D]
        blk = blk.astype(f32)
        if per_token:
            blk = blk * scale_arr[ids].astype(f32)[..., None]
        elif scale_arr is not None:
            blk = blk * scale_arr.astype(f32)
        # -> [N, splits, K, tokens, D]: head-major, so the dots batch over leading axes.
        return blk.reshape(num_tiles, splits, tokens, kh, d).transpose(0, 1, 3, 2, 4)

    def body(step, carry):
        m, l, acc = carry
        ids = bt_tiles[:, :, step, :]  # [N, splits, bp]
        block0 = (jnp.arange(splits) * steps + step) * tokens  # [splits] first key position of the block
        kpos = block0[:, None] + jnp.arange(tokens)[None, :]  # [splits, tokens]
        page_pos = kpos[:, ::s]  # [splits, bp] first key position of each page
        page_ok = (ids >= 0) & (ids < p) & (page_pos[None] < seq_len[:, None, None])  # [N, splits, bp]
        # Pages a tile does not need are read from page 0, which stays in cache, instead of whatever page
        # a stale block-table entry names.
        ids = jnp.where(page_ok, ids, 0)
        key_ok = jnp.repeat(page_ok, s, axis=2) & (kpos[None] < seq_len[:, None, None])  # [N, splits, tok]
        kb = load(k_pages, k_scale, per_token_k, ids)
        vb = load(v_pages, v_scale, per_token_v, ids)
        vb = jnp.where(key_ok[:, :, None, :, None], vb, 0.0)  # garbage (NaN/Inf) in masked slots stays out
        logits = jnp.einsum("nkrd,nsktd->nskrt", qtile, kb, preferred_element_type=f32)
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        if alibi_slopes is not None:
            rel = (kpos[None, :, None, :] - rpos[:, None, :, None]).astype(f32)  # [N, splits, R, tok]
            logits = logits + rslope[None, None, :, :, None] * rel[:, :, None]
        keep = key_ok[:, :, None, :] & (kpos[None, :, None, :] <= rpos[:, None, :, None])  # [N, sp, R, tok]
        if sliding_window is not None:
            keep &= kpos[None, :, None, :] > rpos[:, None, :, None] - sliding_window
        keep &= rok[:, None, :, None]
        logits = jnp.where(keep[:, :, None], logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        pr = jnp.exp(logits - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + pr.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("nskrt,nsktd->nskrd", pr, vb, preferred_element_type=f32)
        return m_new, l, acc

    init = (
        jnp.full((num_tiles, splits, kh, r), -jnp.inf, f32),
        jnp.zeros((num_tiles, splits, kh, r), f32),
        jnp.zeros((num_tiles, splits, kh, r, d), f32),
    )
    # Stop after the last block that any tile needs (block positions grow with the step in every split).
    needed = -(-jnp.max(jnp.where(count > 0, seq_len, 0)) // tokens)  # blocks of the longest sequence
    n_steps = jnp.minimum(steps, needed)
    m, l, acc = jax.lax.fori_loop(0, n_steps, body, init)
    # Merge the splits by log-sum-exp.
    m_all = m.max(axis=1, keepdims=True)
    m_all_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    w = jnp.exp(m - m_all_safe)  # [N, splits, K, R]
    l_tot = (l * w).sum(1)
    acc_tot = (acc * w[..., None]).sum(1)  # [N, K, R, D]
    out = jnp.where(l_tot[..., None] > 0, acc_tot / jnp.where(l_tot > 0, l_tot, 1.0)[..., None], 0.0)
    out = out.reshape(num_tiles, kh, qt, g, d).transpose(0, 2, 1, 3, 4).reshape(num_tiles * qt, h, d)
    dest = jnp.where(row_ok, rows, t_total).reshape(-1)  # invalid rows are dropped
    res = jnp.zeros((t_total, h, d), f32).at[dest].set(out, mode="drop")
    return res.astype(q.dtype)


def native_unsupported(q: Any, k_pages: Any, v_pages: Any, *, q_lens: Any = None) -> str | None:
    """Why the native CPU decode kernel cannot serve these inputs (None when it can)."""
    if q_lens is not None:
        return "multi-token queries (q_lens given): the native kernel is decode-only"
    f32 = np.dtype(np.float32)
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        dt = _shape_dtype(x)[1]
        if dt != f32:
            return f"{name}.dtype={dt} (the native kernel takes float32 q and pages)"
    return None


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "sliding_window", "xla_kw", "force"))
def _paged_decode_native(
    q,
    k_pages,
    v_pages,
    kv_lens,
    block_tables,
    alibi_slopes,
    *,
    scale,
    soft_cap,
    sliding_window,
    xla_kw,
    force,
):
    def native(q, k_pages, v_pages, kv_lens, block_tables, alibi_slopes):
        return cpu.paged_decode_native(
            q,
            k_pages,
            v_pages,
            kv_lens,
            block_tables,
            alibi_slopes,
            scale=scale,
            soft_cap=soft_cap,
            sliding_window=sliding_window,
        ).astype(q.dtype)

    args = (q, k_pages, v_pages, kv_lens, block_tables, alibi_slopes)
    if force:
        return native(*args)

    def xla(q, k_pages, v_pages, kv_lens, block_tables, alibi_slopes):
        return _paged_attention_xla(
            q,
            k_pages,
            v_pages,
            kv_lens,
            block_tables,
            None,
            alibi_slopes,
            None,
            None,
            scale=scale,
            soft_cap=soft_cap,
            sliding_window=sliding_window,
            decode=True,
            **dict(xla_kw),
        )

    return jax.lax.platform_dependent(*args, cpu=native, default=xla)


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
    q_tile: int | None = None,
    block_pages: int | None = None,
    num_splits: int | None = None,
) -> jax.Array:
    """Attention of q over a paged KV cache; conventions and layouts in the module docstring.

    q: [T, H, D] -> [T, H, D] in q's dtype. Jittable: T, B and max_pages are static; kv_lens, q_lens and
    block_tables are dynamic. Tunables (keyword-only, static): `q_tile` query tokens per tile (default 1 for
    decode, 32 otherwise), `block_pages` pages gathered per step (default: about 1 MiB of keys for decode,
    256 keys for multi-token tiles), `num_splits`
    context splits merged by log-sum-exp (default: enough to give 16 tile × kv-head units of work).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    validate_paged_attention_inputs(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        q_lens=q_lens,
        scale=scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        alibi_slopes=alibi_slopes,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    t_total, _, d = q.shape
    _, s, kh, _ = k_pages.shape
    b, max_pages = block_tables.shape
    decode = q_lens is None
    qt = 1 if decode else (q_tile or 32)
    for name, v in (("q_tile", q_tile), ("block_pages", block_pages), ("num_splits", num_splits)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    tiles = b if decode else -(-t_total // qt) + b
    if num_splits is None:
        num_splits = max(1, min(16 // max(1, tiles * kh), max_pages))
    if block_pages is None and decode:
        block_pages = _auto_block_pages(tiles, s, kh, d, num_splits)
    elif block_pages is None:
        # Multi-token tiles are compute-bound: larger blocks make larger dots.
        block_pages = max(1, _PREFILL_BLOCK_TOKENS // s)
        block_pages = min(block_pages, max(1, -(-max_pages // num_splits)))
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)

    def as_scale(x):
        return None if x is None else jnp.asarray(x, jnp.float32)

    reason = native_unsupported(q, k_pages, v_pages, q_lens=q_lens)
    if impl == "cpu_native":
        if reason is not None:
            raise ValueError(f"impl='cpu_native' does not support {reason}; use impl='auto' or 'xla'")
        why = cpu.load()
        if why is not None:
            raise RuntimeError(f"impl='cpu_native' needs the native CPU library: {why}")
    if impl == "cpu_native" or (impl == "auto" and reason is None and cpu.available()):
        return _paged_decode_native(
            q,
            k_pages,
            v_pages,
            jnp.asarray(kv_lens),
            jnp.asarray(block_tables),
            None if alibi_slopes is None else jnp.asarray(alibi_slopes),
            scale=sc,
            soft_cap=None if soft_cap is None else float(soft_cap),
            sliding_window=None if sliding_window is None else int(sliding_window),
            xla_kw=(("q_tile", 1), ("block_pages", int(block_pages)), ("num_splits", int(num_splits))),
            force=impl == "cpu_native",
        )
    return _paged_attention_xla(
        q,
        k_pages,
        v_pages,
        jnp.asarray(kv_lens),
        jnp.asarray(block_tables),
        None if q_lens is None else jnp.asarray(q_lens),
        None if alibi_slopes is None else jnp.asarray(alibi_slopes),
        as_scale(k_scale),
        as_scale(v_scale),
        scale=sc,
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window),
        q_tile=qt,
        block_pages=int(block_pages),
        num_splits=int(num_splits),
        decode=decode,
    )


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
