"""Paged attention, the portable XLA path: page blocks walked with an online softmax (flash-decoding).

Query tokens are grouped into tiles of `q_tile` consecutive tokens of one sequence; each block step gathers
the tile's next pages once for all G query heads of every kv head, transposes the block to head-major
[K, tokens, D] so that both contractions are batched dots with the batch axes in front (XLA's CPU dot is far
faster that way), and updates the running max, sum and output. The context can be split into `num_splits`
parts processed side by side and merged by log-sum-exp, which keeps the device busy when there are few
sequences. The loop stops after the longest sequence's last block (a dynamic trip count), and the gather is
sized to stay in cache (`block_pages`). Axes as in the package docstring; R = q_tile × G query rows a tile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import registry
from kernels.precision import highest_precision

# Bytes of K gathered per block step: large enough to amortize the loop, small enough to stay in cache.
# On a 2-core EPYC (32 MiB L3) 0.5–2 MiB ran at 8–10 GB/s against 3–5 GB/s at 8 MiB.
_BLOCK_BYTES = 1 << 20
# Keys per block step for multi-token query tiles (measured best of 16–1024 for a 512-token chunk).
PREFILL_BLOCK_TOKENS = 256


def auto_block_pages(rows: int, page_size: int, num_kv_heads: int, head_dim: int, splits: int) -> int:
    """Pages per block step for decode: about `_BLOCK_BYTES` of gathered keys (upcast to float32)."""
    per_page = max(1, rows * splits * page_size * num_kv_heads * head_dim * 4)  # rows = 0: an empty batch
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
@highest_precision
def paged_attention_xla(
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
    # A row with no key to attend to has l = 0 and is zeros; any other row is acc / l, so a NaN from q or from
    # a used key or value (which makes l NaN) stays NaN instead of turning into zeros. (The running max is no
    # witness: XLA's max reductions on the CPU may drop a NaN.)
    empty = l_tot == 0
    out = jnp.where(empty[..., None], 0.0, acc_tot / jnp.where(empty, 1.0, l_tot)[..., None])
    out = out.reshape(num_tiles, kh, qt, g, d).transpose(0, 2, 1, 3, 4).reshape(num_tiles * qt, h, d)
    dest = jnp.where(row_ok, rows, t_total).reshape(-1)  # invalid rows are dropped
    res = jnp.zeros((t_total, h, d), f32).at[dest].set(out, mode="drop")
    return res.astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Reverse-mode autodiff: a custom VJP whose backward recomputes attention per query tile.


def _tile_attention(qrows, kblk, vblk, ksc, vsc, slopes, key_ok, kpos, rpos, row_ok, *, scale, soft_cap,
                    sliding_window):  # fmt: skip
    """One query tile over its sequence's whole context, densely: the formula of the package docstring.

    qrows [qt, H, D]; kblk, vblk [max_pages, S, K, D] as stored; ksc, vsc None, a scalar or [max_pages, S, K];
    slopes None or [H]; key_ok [L] (L = max_pages · S), kpos [L], rpos [qt], row_ok [qt]. -> [qt, H, D] f32.
    Masked keys and values are zeroed before any product, so neither their values nor their gradients can
    carry NaN/Inf garbage (0 · NaN) into a used row.
    """
    f32 = jnp.float32
    qt, h, d = qrows.shape
    mp, s, kh, _ = kblk.shape
    g = h // kh

    def dequant(blk, sc):
        x = blk.astype(f32)
        if sc is not None:
            x = x * (sc.astype(f32)[..., None] if sc.ndim == 3 else sc.astype(f32))
        return jnp.where(key_ok[:, None, None], x.reshape(mp * s, kh, d), 0.0)

    k, v = dequant(kblk, ksc), dequant(vblk, vsc)
    qf = (qrows.astype(f32) * f32(scale)).reshape(qt, kh, g, d)
    logits = jnp.einsum("tkgd,lkd->tkgl", qf, k, preferred_element_type=f32)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    if slopes is not None:
        rel = (kpos[None, :] - rpos[:, None]).astype(f32)  # [qt, L]
        logits = logits + slopes.astype(f32).reshape(kh, g)[None, :, :, None] * rel[:, None, None, :]
    keep = key_ok[None, :] & (kpos[None, :] <= rpos[:, None]) & row_ok[:, None]  # [qt, L]
    if sliding_window is not None:
        keep &= kpos[None, :] > rpos[:, None] - sliding_window
    keep = keep[:, None, None, :]
    logits = jnp.where(keep, logits, -jnp.inf)
    m = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(keep, jnp.exp(logits - m), 0.0)
    l = p.sum(-1, keepdims=True)
    acc = jnp.einsum("tkgl,lkd->tkgd", p, v, preferred_element_type=f32)
    empty = l == 0  # nothing to attend to: zeros, as in the forward
    out = jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, l))
    return out.reshape(qt, h, d)


def _zero_cotangent(x):
    if x is None:
        return None
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


@highest_precision
def attention_vjp(
    q, k_pages, v_pages, kv_lens, block_tables, q_lens, alibi_slopes, k_scale, v_scale, dout, *,
    scale, soft_cap, sliding_window, q_tile,
):  # fmt: skip
    """The cotangents of every argument of the paged attention (the 9 arrays, in order) for `dout`.

    Recompute-based: a `lax.scan` over query tiles (one query for decode; `q_tile` consecutive queries of one
    sequence otherwise) recomputes each tile's attention densely over its sequence's pages (`_tile_attention`)
    and takes its VJP, then scatter-adds the page cotangents into [P, S, K, D]. Memory: the inputs, float32
    cotangents of the pages, and one tile's [q_tile, H, max_pages · S] probabilities; nothing is saved by the
    forward. q, float pages, float8 pages (the stored value's cotangent), the scales and the ALiBi slopes get
    their gradients; int8 pages and the integer arguments get none (float0).
    """
    f32 = jnp.float32
    t_total, h, d = q.shape
    p, s, _, _ = k_pages.shape
    b, max_pages = block_tables.shape
    kv_lens = kv_lens.astype(jnp.int32)
    bt = block_tables.astype(jnp.int32)
    if q_lens is None:
        qt, num_tiles = 1, b
        seq = jnp.arange(b)
        row0, count, pos0 = seq, jnp.where(kv_lens > 0, 1, 0), kv_lens - 1
    else:
        qt = q_tile
        num_tiles = -(-t_total // qt) + b
        seq, row0, count, pos0 = _tiles(q_lens.astype(jnp.int32), kv_lens, num_tiles, qt)
    length = max_pages * s
    kpos = jnp.arange(length)
    per_token_k = k_scale is not None and k_scale.ndim == 3
    per_token_v = v_scale is not None and v_scale.ndim == 3
    grads_k = jnp.issubdtype(k_pages.dtype, jnp.inexact)
    grads_v = jnp.issubdtype(v_pages.dtype, jnp.inexact)
    dout = dout.astype(f32)

    def tile_inputs(n):
        ids = bt[seq[n]]
        page_ok = (ids >= 0) & (ids < p) & (jnp.arange(max_pages) * s < kv_lens[seq[n]])
        ids = jnp.where(page_ok, ids, 0)
        key_ok = jnp.repeat(page_ok, s) & (kpos < kv_lens[seq[n]])
        rows = row0[n] + jnp.arange(qt)
        row_ok = jnp.arange(qt) < count[n]
        rows = jnp.where(row_ok, rows, 0)
        return ids, key_ok, rows, row_ok, pos0[n] + jnp.arange(qt)

    def body(carry, n):
        dq, dk, dv, dks, dvs, dsl = carry
        ids, key_ok, rows, row_ok, rpos = tile_inputs(n)
        ksc = k_scale[ids] if per_token_k else k_scale
        vsc = v_scale[ids] if per_token_v else v_scale
        primals = (q[rows], k_pages[ids], v_pages[ids], ksc, vsc, alibi_slopes)
        fn = functools.partial(
            _tile_attention, key_ok=key_ok, kpos=kpos, rpos=rpos, row_ok=row_ok, scale=scale,
            soft_cap=soft_cap, sliding_window=sliding_window,
        )  # fmt: skip
        _, vjp = jax.vjp(fn, *primals)
        cq, ck, cv, cks, cvs, csl = vjp(jnp.where(row_ok[:, None, None], dout[rows], 0.0))
        dq = dq.at[jnp.where(row_ok, rows, t_total)].add(cq.astype(f32), mode="drop")
        if grads_k:
            dk = dk.at[ids].add(ck.astype(f32))
        if grads_v:
            dv = dv.at[ids].add(cv.astype(f32))
        if k_scale is not None:
            dks = dks.at[ids].add(cks) if per_token_k else dks + cks
        if v_scale is not None:
            dvs = dvs.at[ids].add(cvs) if per_token_v else dvs + cvs
        if alibi_slopes is not None:
            dsl = dsl + csl.astype(f32)
        return (dq, dk, dv, dks, dvs, dsl), None

    def zeros_f32(x, wanted=True):
        return None if x is None or not wanted else jnp.zeros(x.shape, f32)

    init = (
        jnp.zeros((t_total, h, d), f32),
        zeros_f32(k_pages, grads_k),
        zeros_f32(v_pages, grads_v),
        zeros_f32(k_scale),
        zeros_f32(v_scale),
        zeros_f32(alibi_slopes),
    )
    (dq, dk, dv, dks, dvs, dsl), _ = jax.lax.scan(body, init, jnp.arange(num_tiles))

    def cast(ct, x):
        return _zero_cotangent(x) if ct is None else ct.astype(x.dtype)

    return (
        dq.astype(q.dtype),
        cast(dk, k_pages),
        cast(dv, v_pages),
        _zero_cotangent(kv_lens),
        _zero_cotangent(block_tables),
        _zero_cotangent(q_lens),
        None if alibi_slopes is None else cast(dsl, alibi_slopes),
        None if k_scale is None else cast(dks, k_scale),
        None if v_scale is None else cast(dvs, v_scale),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def differentiable(forward, logit, *arrays):
    """`forward(*arrays)` (q, k_pages, v_pages, kv_lens, block_tables, q_lens, alibi_slopes, k_scale,
    v_scale) with the recompute-based VJP (`attention_vjp`); `logit` = (scale, soft_cap, sliding_window,
    q_tile) of the call. Any implementation's forward can take this backward: the XLA path and the native
    decode kernel do. Reverse mode only (`jax.grad`, `jax.vjp`); forward mode (`jax.jvp`) is not defined."""
    return forward(*arrays)


def _differentiable_fwd(forward, logit, *arrays):
    return forward(*arrays), tuple(None if a is None else jnp.asarray(a) for a in arrays)


def _differentiable_bwd(forward, logit, arrays, dout):
    scale, soft_cap, sliding_window, q_tile = logit
    return attention_vjp(
        *arrays, dout, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window, q_tile=q_tile
    )


differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of the XLA path; a field left None is chosen from the call's shapes (`resolve`).

    q_tile       query tokens per tile (1 for decode; default 32 for multi-token queries).
    block_pages  pages gathered per block step (default: about 1 MiB of keys for decode, 256 keys for
                 multi-token tiles).
    num_splits   context splits merged by log-sum-exp (default: enough for 16 tile × kv-head units of work).
    """

    q_tile: int | None = None
    block_pages: int | None = None
    num_splits: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "q_tile", "block_pages", "num_splits")

    def resolve(
        self, q: Any, k_pages: Any, v_pages: Any, kv_lens: Any, block_tables: Any, **options: Any
    ) -> Config:
        t_total = q.shape[0]
        _, s, kh, d = k_pages.shape
        b, max_pages = block_tables.shape
        decode = options.get("q_lens") is None
        qt = 1 if decode else (self.q_tile or 32)
        tiles = b if decode else -(-t_total // qt) + b
        num_splits = self.num_splits
        if num_splits is None:
            num_splits = max(1, min(16 // max(1, tiles * kh), max_pages))
        block_pages = self.block_pages
        if block_pages is None and decode:
            block_pages = auto_block_pages(tiles, s, kh, d, num_splits)
        elif block_pages is None:
            # Multi-token tiles are compute-bound: larger blocks make larger dots.
            block_pages = max(1, PREFILL_BLOCK_TOKENS // s)
            block_pages = min(block_pages, max(1, -(-max_pages // num_splits)))
        return Config(q_tile=qt, block_pages=int(block_pages), num_splits=int(num_splits))


def _xla(
    q, k_pages, v_pages, kv_lens, block_tables, *, q_lens, alibi_slopes, k_scale, v_scale, config, **logit
):
    forward = functools.partial(
        paged_attention_xla, q_tile=config.q_tile, block_pages=config.block_pages,
        num_splits=config.num_splits, decode=q_lens is None, **logit,
    )  # fmt: skip
    grad_logit = (logit["scale"], logit["soft_cap"], logit["sliding_window"], config.q_tile)
    return differentiable(
        forward,
        grad_logit,
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        q_lens,
        alibi_slopes,
        k_scale,
        v_scale,
    )


IMPLEMENTATION = registry.Implementation("xla", _xla, platforms=registry.PLATFORMS, config=Config)


def query_tiles(q_lens: jax.Array, kv_lens: jax.Array, num_tiles: int, q_block: int) -> jax.Array:
    """[4, N] int32: per tile its sequence, first row of q, number of valid rows, position of its first row;
    the Pallas GPU kernels' schedule of query tiles.

    Each sequence's q_lens[b] rows are cut into tiles of q_block tokens; tiles past the last have 0 rows.
    """
    b = q_lens.shape[0]
    per_seq = (q_lens + q_block - 1) // q_block
    ends = jnp.cumsum(per_seq)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    # seq = how many sequences end at or before the tile (searchsorted without its while loop).
    ends_seen = jnp.zeros((num_tiles + 1,), jnp.int32).at[jnp.minimum(ends, num_tiles)].add(1)
    seq = jnp.minimum(jnp.cumsum(ends_seen)[:num_tiles], b - 1).astype(jnp.int32)
    local = tile - (ends - per_seq)[seq]
    live = tile < ends[-1]
    count = jnp.where(live, jnp.clip(q_lens[seq] - local * q_block, 0, q_block), 0)
    row0 = jnp.where(live, (jnp.cumsum(q_lens) - q_lens)[seq] + local * q_block, 0)
    pos0 = kv_lens[seq] - q_lens[seq] + local * q_block
    return jnp.stack([seq, row0, count, pos0]).astype(jnp.int32)
