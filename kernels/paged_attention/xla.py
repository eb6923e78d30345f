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

from kernels import registry
from kernels.precision import highest_precision

# Bytes of K gathered per block step: large enough to amortize the loop, small enough to stay in cache.
# On a 2-core EPYC (32 MiB L3) 0.5–2 MiB ran at 8–10 GB/s against 3–5 GB/s at 8 MiB.
_BLOCK_BYTES = 1 << 20
# Keys per block step for multi-token query tiles (measured best of 16–1024 for a 512-token chunk).
PREFILL_BLOCK_TOKENS = 256


def auto_block_pages(rows: int, page_size: int, num_kv_heads: int, head_dim: int, splits: int) -> int:
    """Pages per block step for decode: about `_BLOCK_BYTES` of gathered keys (upcast to float32)."""
    per_page = rows * splits * page_size * num_kv_heads * head_dim * 4
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
    return paged_attention_xla(
        q, k_pages, v_pages, kv_lens, block_tables, q_lens, alibi_slopes, k_scale, v_scale,
        q_tile=config.q_tile, block_pages=config.block_pages, num_splits=config.num_splits,
        decode=q_lens is None, **logit,
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation("xla", _xla, platforms=registry.PLATFORMS, config=Config)
