"""Paged attention as a Pallas Mosaic GPU kernel (Hopper and newer), interpreted on the CPU.

Computes what `paged_attention_reference` computes (formula, masking and layouts in the package docstring):
for query row t of sequence b at position p and query head h reading kv head kh = h // G,

    out[t, h] = softmax_j(cap(scale · q[t, h] · k[b, j, kh]) + alibi[h] · (j − p))[kept j] · v[b, kept j, kh]

with j kept iff j ≤ p, j > p − sliding_window, j < kv_len[b] and j's page id in [0, P).

Structure (FlashAttention-2's online softmax and flash-decoding's split-K, as in the Triton kernel beside it,
written for Hopper's asynchronous units):

- One program (CTA, one warpgroup of 128 threads) per (query tile, kv head, context split). A tile is
  `q_tile` consecutive query tokens of one sequence times the G query heads of the kv head, R = 64 rows
  (a wgmma's M; decode tiles are one token, rows past G are padding). Each K/V block is read from HBM once
  per kv head for the whole group of query heads (GQA/MQA).
- K and V blocks of BK keys arrive by TMA, one copy per page ([S, D] of one kv head, strided in the NHD
  pool) straight into swizzled shared memory, through a ring of `num_stages` buffers: while block i is
  computed, blocks i+1 .. i+num_stages−1 are in flight. The block table and kv_lens are read as scalars
  from global memory inside the kernel.
- S = Q·Kᵀ and O += P·V are wgmmas (bf16/f16 operands, float32 accumulators in registers); q sits in
  registers in the wgmma layout for the whole loop. int8 / float8_e4m3fn pages land in a raw ring and are
  converted to q's dtype in shared memory before the wgmma (exact for both); their scales apply to the
  logits (K) and to the probabilities (V), per tensor or per token and kv head.
- Split-K: with `num_splits` > 1 each program covers a contiguous share of the sequence's actual key
  blocks and writes float32 (acc, max, sum); one small XLA reduction merges the splits by log-sum-exp and
  writes [T, H, D]. With one split the kernel writes the output rows of q's dtype in place by TMA, so a call
  is this kernel alone.

Safety. A block-table entry outside [0, P) (or past the table) is never dereferenced: page 0 is copied in
its place and the page's keys are masked. Masked logits are −inf, and in a block holding any masked key
(the sequence's tail, a bad page) V's masked rows are zeroed in shared memory before P·V, so NaN/Inf in
unused slots cannot reach the output. A NaN in q reaches only its own output row.

Declines (`pallas_unsupported`): float32 q (wgmma has no IEEE float32 product; impl="auto" takes the Triton
kernel or the XLA path), head dims that are not a multiple of 64 (TMA copies of a query-head group move
whole 128-byte rows), page sizes that are not a multiple of 8 tiling a 64- or 128-key block (S = 1 pages
would need cp.async gathers, not written), more than 64 query heads per kv head, and GPU targets below
compute capability 9.0 (no wgmma/TMA: A100 takes the Triton kernel).

Interpret mode. On the CPU the kernel runs in Mosaic GPU's interpreter (`plgpu.InterpretGPUParams`) from a
host callback, because the interpreter's ordered IO effects cannot pass through the per-platform primitive's
lowering rule; the callback is pure, so jit, vmap and the custom VJP see an ordinary op.

Axis legend: T query tokens, B sequences, H query heads, K kv heads, G = H // K, D head dim, P pages,
S page size, W block-table width, N query tiles, R = 64 rows of a tile, BK keys per block, NS splits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import lowering, registry, tuning
from kernels.lowering import per_platform_kernel, target_gpu
from kernels.paged_attention.xla import differentiable, query_tiles

_F32 = jnp.float32
ROWS = 64  # rows of a tile: one wgmma M
MIN_CAPABILITY = 90  # wgmma and TMA: Hopper (sm_90a) and newer
_MAX_HEAD_DIM = 256
_TARGET_PROGRAMS = 132  # one wave of an H100/H200's SMs
_MAX_SPLITS = 16


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


@dataclasses.dataclass(frozen=True)
class Config:
    """Tunables of the Mosaic GPU kernel; a field left None is chosen from the shapes (`defaults`).

    q_tile       query tokens per tile for multi-token queries (decode: always 1); at most 64 // G.
    block_keys   keys per block step (64 or 128; a multiple of the page size or a divisor of it).
    num_splits   context splits per (tile, kv head), merged by log-sum-exp.
    num_stages   K/V buffers in the TMA ring (>= 2: the next blocks are in flight while one computes).
    """

    q_tile: int | None = None
    block_keys: int | None = None
    num_splits: int | None = None
    num_stages: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "q_tile", "block_keys", "num_splits", "num_stages")
        if self.block_keys is not None and self.block_keys % 64:
            raise ValueError(f"block_keys={self.block_keys} must be a multiple of 64 (the wgmma tile)")
        if self.num_stages is not None and self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2 (double buffering at least)")


def _block_keys_ok(bk: int, s: int) -> bool:
    return bk % s == 0 if s <= bk else s % bk == 0


def pallas_unsupported(q: Any, k_pages: Any, v_pages: Any, *, q_lens: Any = None) -> str | None:
    """Why the Mosaic GPU kernel cannot serve these (already validated) inputs; None when it can.

    q: [T, H, D] bfloat16|float16 (float32: wgmma has no IEEE float32 product, so the lab's precision policy
    sends it elsewhere); k_pages/v_pages: [P, S, K, D] q's dtype, int8 or float8_e4m3fn. D must be a multiple
    of 64 up to 256 (TMA moves whole 128-byte rows of a query head group; wgmma's K step), S a multiple of 8
    that divides a 64- or 128-key block or is a multiple of it, G = H // K at most 64 (one wgmma M), and
    the GPU being lowered for (`target_gpu`), when there is one, of compute capability 9.0 or more.
    """
    del q_lens
    _, h, d = np.shape(q)
    _, s, kh, _ = np.shape(k_pages)
    qd = _dtype(q)
    if qd not in (np.dtype(jnp.bfloat16), np.dtype(np.float16)):
        return (
            f"q.dtype={qd} (the Mosaic GPU kernel's wgmma takes bfloat16/float16 operands; float32 would "
            "lose precision)"
        )
    if d % 64 or d > _MAX_HEAD_DIM:
        return f"head dim D={d} (the Mosaic GPU kernel takes multiples of 64 up to {_MAX_HEAD_DIM})"
    if h // kh > ROWS:
        return f"{h // kh} query heads per kv head (the Mosaic GPU kernel takes at most {ROWS})"
    if s % 8 or not any(_block_keys_ok(bk, s) for bk in (64, 128)):
        return (
            f"page size S={s} (the Mosaic GPU kernel takes multiples of 8 that tile a 64- or 128-key block)"
        )
    target = target_gpu()
    if target is not None and target[1] < MIN_CAPABILITY:
        kind, cc = target
        return (
            f"{kind} (compute capability {cc // 10}.{cc % 10}): Mosaic GPU's wgmma/TMA kernel needs "
            f"{MIN_CAPABILITY // 10}.{MIN_CAPABILITY % 10} or newer"
        )
    return None


def shape_class(q: Any, k_pages: Any, v_pages: Any, kv_lens: Any, block_tables: Any, *, q_lens: Any = None,
                **options: Any) -> str:  # fmt: skip
    """The family of shapes sharing a best configuration: "decode" (one query per sequence) or "prefill"
    (multi-token queries), suffixed "-int8"/"-fp8" for quantized pages."""
    del v_pages, kv_lens, block_tables, options
    kind = "decode" if q_lens is None else "prefill"
    kd = _dtype(k_pages)
    if kd.itemsize == 1:
        kind += "-int8" if kd == np.dtype(np.int8) else "-fp8"
    return kind


def tune_space(q: Any, k_pages: Any, v_pages: Any, kv_lens: Any, block_tables: Any, *, q_lens: Any = None,
               **options: Any) -> list[Config]:  # fmt: skip
    """The configurations `benchmarks.accel --tune` times for this call: block of 64 or 128 keys × 2, 3 or 4
    stages, and for decode 1, 2 or 4 times the default number of splits (at most 12 configs). Configurations
    whose page size does not tile the block are left out."""
    del v_pages, options
    s = np.shape(k_pages)[1]
    base = defaults(q, k_pages, kv_lens, block_tables, q_lens=q_lens, config=Config())
    space = []
    for bk in (64, 128):
        if not _block_keys_ok(bk, s):
            continue
        for st in (2, 3, 4):
            if q_lens is None:
                for f in (1, 2):
                    space.append(
                        Config(
                            block_keys=bk, num_stages=st, num_splits=min(_MAX_SPLITS, base["num_splits"] * f)
                        )
                    )
            else:
                space.append(Config(block_keys=bk, num_stages=st))
    return space[:12]


def defaults(
    q: Any, k_pages: Any, kv_lens: Any, block_tables: Any, *, q_lens: Any, config: Config
) -> dict[str, int]:
    """The configuration a call runs with: `config`'s fields, else a tuned entry (`kernels.tuning`, for the
    GPU being lowered for), else the built-in choice: blocks of 64 keys (128 when a page is larger), 3 stages,
    q_tile = 64 // G, splits enough for about one program per SM (at most one per block, at most 16)."""
    t, h, _ = np.shape(q)
    _, s, kh, _ = np.shape(k_pages)
    b, w = np.shape(block_tables)
    g = h // kh
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(Config)}
    target = target_gpu()
    if all(v is None for v in fields.values()) and target is not None:
        cls = shape_class(q, k_pages, k_pages, kv_lens, block_tables, q_lens=q_lens)
        found = tuning.lookup("paged_attention", "pallas_mosaic_gpu", cls, target[0])
        if found is not None:
            fields = {f.name: Config(**found).__dict__[f.name] for f in dataclasses.fields(Config)}
    bk = fields["block_keys"] or (64 if _block_keys_ok(64, s) else 128)
    if not _block_keys_ok(bk, s):
        raise ValueError(f"block_keys={bk} does not tile pages of S={s} keys")
    decode = q_lens is None
    qt = 1 if decode else max(1, min(fields["q_tile"] or ROWS // g, ROWS // g))
    tiles = t if decode else min(t, -(-t // qt) + b)
    max_blocks = max(1, -(-w * s // bk))
    splits = fields["num_splits"] or max(
        1, min(_TARGET_PROGRAMS // max(1, tiles * kh), max_blocks, _MAX_SPLITS)
    )
    stages = fields["num_stages"] or 3
    return dict(block_keys=bk, q_tile=qt, num_splits=int(splits), num_stages=int(stages))


def _kernel(*refs, cfg: dict) -> None:
    c = cfg
    refs = list(refs)
    kv_lens_ref, bt_ref = refs[:2]
    refs = refs[2:]
    tiles_ref = None if c["decode"] else refs.pop(0)
    q_ref, k_ref, v_ref = refs[:3]
    refs = refs[3:]
    ks_ref = refs.pop(0) if c["per_token_k"] else None
    vs_ref = refs.pop(0) if c["per_token_v"] else None
    ts_ref = refs.pop(0) if c["tensor_scales"] else None
    slope_ref = refs.pop(0) if c["alibi"] else None
    out_refs = refs

    g, qt, bk, ns, s = c["g"], c["q_tile"], c["block_keys"], c["num_stages"], c["page_size"]
    d, w, p_pages = c["head_dim"], c["max_pages"], c["num_pages"]
    dtype = c["dtype"]
    quant = c["quant"]  # (k quantized, v quantized)
    i = jax.lax.axis_index("tile")
    kh = jax.lax.axis_index("kv")
    j = jax.lax.axis_index("split")
    if c["decode"]:
        b = i
        row0 = i
        count = jnp.int32(1)
        pos0 = kv_lens_ref[b] - 1
    else:
        b = tiles_ref[0, i]
        row0 = tiles_ref[1, i]
        count = tiles_ref[2, i]
        pos0 = tiles_ref[3, i]
    n = kv_lens_ref[b]
    hi = jnp.maximum(jnp.minimum(n, pos0 + count), 0)
    if c["sliding_window"] is None:
        lo = jnp.zeros_like(hi)
    else:
        lo = jnp.clip(pos0 - c["sliding_window"] + 1, 0, hi)
    blk_lo = lo // bk
    blk_hi = (hi + bk - 1) // bk
    if c["num_splits"] == 1:
        first, last = blk_lo, blk_hi
    else:
        per = (blk_hi - blk_lo + c["num_splits"] - 1) // c["num_splits"]
        first = jnp.minimum(blk_lo + j * per, blk_hi)
        last = jnp.minimum(first + per, blk_hi)
    nblk = last - first
    chunks = max(1, bk // s)  # TMA copies per block (one per page when pages are smaller than a block)
    chunk = min(bk, s)

    def page_of(blk, cidx):
        """(page id to copy from, its first key inside the page, whether the page is valid)."""
        key0 = blk * bk + cidx * chunk
        slot = key0 // s
        page = bt_ref[b, jnp.minimum(slot, w - 1)]
        ok = (slot < w) & (page >= 0) & (page < p_pages)
        return jnp.where(ok, page, 0), key0 % s, ok

    def bad_bits(blk):
        bits = jnp.int32(0)
        for cidx in range(chunks):
            _, _, ok = page_of(blk, cidx)
            bits = bits | jnp.where(ok, 0, 1 << cidx).astype(jnp.int32)
        return bits

    tiling = plgpu.TilingTransform((8, c["swizzle"] // np.dtype(dtype).itemsize))
    swizzle = plgpu.SwizzleTransform(c["swizzle"])
    kv_t = (tiling, swizzle)

    def scoped(q_smem, o_smem, k_smem, v_smem, kraw, vraw, ksc, vsc, ml_smem, q_bar, k_bars, v_bars):
        def issue(blk, slot):
            for cidx in range(chunks):
                page, off, _ = page_of(blk, cidx)
                dst = pl.ds(cidx * chunk, chunk)
                kdst = (kraw if quant[0] else k_smem).at[slot, dst]
                vdst = (vraw if quant[1] else v_smem).at[slot, dst]
                plgpu.copy_gmem_to_smem(k_ref.at[page, pl.ds(off, chunk), kh], kdst, k_bars.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[page, pl.ds(off, chunk), kh], vdst, v_bars.at[slot])
            # Per-token scales come gathered per sequence ([B, K, keys]): one copy per block.
            if ks_ref is not None:
                plgpu.copy_gmem_to_smem(ks_ref.at[b, kh, pl.ds(blk * bk, bk)], ksc.at[slot], k_bars.at[slot])
            if vs_ref is not None:
                plgpu.copy_gmem_to_smem(vs_ref.at[b, kh, pl.ds(blk * bk, bk)], vsc.at[slot], v_bars.at[slot])

        # q: the tile's tokens, G rows each, into rows [0, qt·G) of an unswizzled [R, D] buffer.
        t_last = c["num_tokens"] - 1
        for tok in range(qt):
            plgpu.copy_gmem_to_smem(
                q_ref.at[jnp.minimum(row0 + tok, t_last), pl.ds(kh * g, g)],
                q_smem.at[pl.ds(tok * g, g)],
                q_bar,
            )
        for st in range(ns):

            @pl.when(st < nblk)
            def _(st=st):
                issue(first + st, st)

        plgpu.barrier_wait(q_bar)
        q = plgpu.load(q_smem, layout=plgpu.Layout.WGMMA, optimized=False)

        row = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 0, layout=plgpu.Layout.WGMMA)
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=plgpu.Layout.WGMMA)
        rpos = pos0 + row // g
        qk_scale = c["scale"]
        if ts_ref is not None:
            qk_scale = qk_scale * ts_ref[0]
        if slope_ref is not None:
            hrow = row % g
            slopes = jnp.zeros((ROWS, bk), _F32)
            for gi in range(g):
                slopes = jnp.where(hrow == gi, slope_ref[kh * g + gi], slopes)

        def convert(raw, dst):
            x = plgpu.load(raw, layout=plgpu.Layout.WGMMA, optimized=False)
            if jnp.issubdtype(x.dtype, jnp.floating) and dtype != np.dtype(np.float16):
                x = x.astype(jnp.float16)  # float8 converts natively only to float16 (exact: e4m3 ⊂ f16)
            dst[...] = x.astype(dtype)

        def body(it, carry):
            acc, m, l = carry
            blk = first + it
            slot = jax.lax.rem(it, ns)
            plgpu.barrier_wait(k_bars.at[slot])
            kbuf = k_smem.at[slot]
            if quant[0]:  # one converted buffer: the raw ring holds the blocks in flight
                kbuf = k_smem
                convert(kraw.at[slot], kbuf)
                plgpu.commit_smem()

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q, kbuf.T)
                return acc_ref[...]

            sc = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), _F32))
            sc = sc * qk_scale
            kpos = blk * bk + col
            if ks_ref is not None:
                ksv = plgpu.load(ksc.at[slot], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
                sc = sc * jax.lax.broadcast_in_dim(ksv, (ROWS, bk), [1])
            if c["soft_cap"] is not None:
                sc = c["soft_cap"] * jnp.tanh(sc / c["soft_cap"])
            if slope_ref is not None:
                sc = sc + slopes * (kpos - rpos).astype(_F32)
            bits = bad_bits(blk)
            keep = (kpos < n) & (kpos <= rpos)
            if c["sliding_window"] is not None:
                keep = keep & (kpos > rpos - c["sliding_window"])
            if chunks > 1:
                keep = keep & (((bits >> (col // chunk)) & 1) == 0)
            else:
                keep = keep & (bits == 0)
            sc = jnp.where(keep, sc, -jnp.inf)
            m_new = jnp.maximum(m, sc.max(axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            pr = jnp.exp(sc - jax.lax.broadcast_in_dim(m_safe, (ROWS, bk), [0]))
            corr = jnp.exp(m - m_safe)
            l = l * corr + pr.sum(axis=1)
            if vs_ref is not None:
                vsv = plgpu.load(vsc.at[slot], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
                # A masked key's scale may be garbage: its probability stays exactly 0.
                pr = jnp.where(keep, pr * jax.lax.broadcast_in_dim(vsv, (ROWS, bk), [1]), 0.0)
            acc = acc * jax.lax.broadcast_in_dim(corr, (ROWS, d), [0])
            plgpu.barrier_wait(v_bars.at[slot])
            vbuf = v_smem.at[slot]
            if quant[1]:
                vbuf = v_smem
                convert(vraw.at[slot], vbuf)
            dirty = ((blk + 1) * bk > n) | (bits != 0)

            @pl.when(dirty)
            def _():
                # Zero V's masked rows: 0 · NaN would reach the output.
                vrow = blk * bk + plgpu.broadcasted_iota(jnp.int32, (bk, d), 0, layout=plgpu.Layout.WGMMA)
                ok = vrow < n
                if chunks > 1:
                    ok = ok & (((bits >> ((vrow - blk * bk) // chunk)) & 1) == 0)
                else:
                    ok = ok & (bits == 0)
                vbuf[...] = jnp.where(ok, vbuf[...], jnp.zeros((), dtype))

            plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, pr.astype(dtype), vbuf)

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))

            @pl.when(it + ns < nblk)
            def _():
                issue(blk + ns, slot)

            return acc, m_new, l

        init = (
            plgpu.layout_cast(jnp.zeros((ROWS, d), _F32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, _F32), plgpu.Layout.WGMMA.reduce(1)),
            plgpu.layout_cast(jnp.zeros((ROWS,), _F32), plgpu.Layout.WGMMA.reduce(1)),
        )
        acc, m, l = jax.lax.fori_loop(0, nblk, body, init)
        if ts_ref is not None:
            acc = acc * ts_ref[1]
        if c["num_splits"] == 1:
            (o_ref,) = out_refs
            lsafe = jnp.where(l == 0.0, 1.0, l)
            out = acc / jax.lax.broadcast_in_dim(lsafe, (ROWS, d), [0])
            out = jnp.where(jax.lax.broadcast_in_dim(l, (ROWS, d), [0]) == 0.0, 0.0, out)
            o_smem[...] = out.astype(dtype)
            plgpu.commit_smem()
            for tok in range(qt):

                @pl.when(tok < count)
                def _(tok=tok):
                    plgpu.copy_smem_to_gmem(
                        o_smem.at[pl.ds(tok * g, g)], o_ref.at[row0 + tok, pl.ds(kh * g, g)]
                    )
        else:
            acc_ref, m_ref, l_ref = out_refs
            o_smem[...] = acc
            ml_smem[0] = m
            ml_smem[1] = l
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, acc_ref.at[i, j, kh])
            plgpu.copy_smem_to_gmem(ml_smem.at[0], m_ref.at[i, j, kh])
            plgpu.copy_smem_to_gmem(ml_smem.at[1], l_ref.at[i, j, kh])
        plgpu.wait_smem_to_gmem(0)

    k_copies = chunks + (1 if c["per_token_k"] else 0)
    v_copies = chunks + (1 if c["per_token_v"] else 0)
    kq, vq = quant
    kv_shape = (ns, bk, d)
    scratch = [
        plgpu.SMEM((ROWS, d), dtype),
        plgpu.SMEM((ROWS, d), dtype if c["num_splits"] == 1 else _F32),
        plgpu.SMEM((bk, d) if kq else kv_shape, dtype, transforms=kv_t),
        plgpu.SMEM((bk, d) if vq else kv_shape, dtype, transforms=kv_t),
        plgpu.SMEM(kv_shape, c["kv_dtypes"][0]) if kq else None,
        plgpu.SMEM(kv_shape, c["kv_dtypes"][1]) if vq else None,
        plgpu.SMEM((ns, bk), _F32) if c["per_token_k"] else None,
        plgpu.SMEM((ns, bk), _F32) if c["per_token_v"] else None,
        plgpu.SMEM((2, ROWS), _F32) if c["num_splits"] > 1 else None,
        plgpu.Barrier(num_arrivals=qt),
        plgpu.Barrier(num_arrivals=k_copies, num_barriers=ns),
        plgpu.Barrier(num_arrivals=v_copies, num_barriers=ns),
    ]
    pl.run_scoped(scoped, *scratch)


def _seq_scales(scale: jax.Array, block_tables: jax.Array, keys: int) -> jax.Array:
    """Per-token scales [P, S, K] gathered per sequence: [B, K, keys] float32 (keys = W·S rounded up to a
    whole block); entries of invalid pages are whatever page 0 holds (their keys are masked)."""
    p, s, kh = scale.shape
    b, w = block_tables.shape
    ids = jnp.where((block_tables >= 0) & (block_tables < p), block_tables, 0)
    x = scale.astype(_F32)[ids]  # [B, W, S, K]
    x = x.reshape(b, w * s, kh).transpose(0, 2, 1)
    return jnp.pad(x, ((0, 0), (0, 0), (0, keys - w * s)))


def _run(*args: jax.Array, cfg: tuple, interpret: bool) -> Any:
    """The Mosaic GPU kernel on its operands (`_paged_attention_mgpu` lists them)."""
    c = dict(cfg)
    n_tiles, kh, ns = c["num_tiles"], c["num_kv_heads"], c["num_splits"]
    d = c["head_dim"]
    if ns == 1:
        out_type = jax.ShapeDtypeStruct((c["num_tokens"], kh * c["g"], d), c["dtype"])
    else:
        out_type = (
            jax.ShapeDtypeStruct((n_tiles, ns, kh, ROWS, d), _F32),
            jax.ShapeDtypeStruct((n_tiles, ns, kh, ROWS), _F32),
            jax.ShapeDtypeStruct((n_tiles, ns, kh, ROWS), _F32),
        )
    kernel = plgpu.kernel(
        functools.partial(_kernel, cfg=c),
        out_type=out_type,
        grid=(n_tiles, kh, ns),
        grid_names=("tile", "kv", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=False),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    out = kernel(*args)
    return out if ns > 1 else (out,)


def _out_shape(*args: Any, cfg: tuple) -> Any:
    c = dict(cfg)
    n_tiles, kh, ns, d = c["num_tiles"], c["num_kv_heads"], c["num_splits"], c["head_dim"]
    if ns == 1:
        return (jax.ShapeDtypeStruct((c["num_tokens"], kh * c["g"], d), c["dtype"]),)
    return (
        jax.ShapeDtypeStruct((n_tiles, ns, kh, ROWS, d), _F32),
        jax.ShapeDtypeStruct((n_tiles, ns, kh, ROWS), _F32),
        jax.ShapeDtypeStruct((n_tiles, ns, kh, ROWS), _F32),
    )


@functools.cache
def _interpreter(cfg: tuple) -> Any:
    return jax.jit(functools.partial(_run, cfg=cfg, interpret=True))


def _run_interpreted(*args: jax.Array, cfg: tuple) -> Any:
    """The kernel in Mosaic GPU's interpreter, run from a host callback: the interpreter threads ordered IO
    effects that a lowering rule cannot carry, while the callback is effect-free (the kernel is pure)."""

    def host(*xs):
        return jax.tree.map(np.asarray, _interpreter(cfg)(*xs))

    return jax.pure_callback(host, _out_shape(*args, cfg=cfg), *args, vmap_method="sequential")


# Interpreted on cpu, compiled on cuda, chosen per lowering platform (`kernels.lowering`).
_per_platform = per_platform_kernel(
    "tokenlab_paged_attention_mosaic_gpu",
    {"cpu": _run_interpreted, "cuda": functools.partial(_run, interpret=False)},
    kernel="the Mosaic GPU paged attention kernel",
    runs_on="cpu (interpreted) and cuda (compute capability 9.0 and newer)",
    out_shape=_out_shape,
)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "soft_cap",
        "sliding_window",
        "block_keys",
        "q_tile",
        "num_splits",
        "num_stages",
    ),
)
def _paged_attention_mgpu(
    q, k_pages, v_pages, kv_lens, block_tables, q_lens, alibi_slopes, k_scale, v_scale, *,
    scale, soft_cap, sliding_window, block_keys, q_tile, num_splits, num_stages,
):  # fmt: skip
    t, h, d = q.shape
    p, s, kh, _ = k_pages.shape
    g = h // kh
    b, w = block_tables.shape
    decode = q_lens is None
    kv_lens = kv_lens.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)
    args = [kv_lens, block_tables]
    if decode:
        num_tiles = b
    else:
        num_tiles = min(t, -(-t // q_tile) + b)
        tiles = query_tiles(q_lens.astype(jnp.int32), kv_lens, num_tiles, q_tile)
        args.append(tiles)
    args += [q, k_pages, v_pages]
    per_token_k = k_scale is not None and k_scale.ndim == 3
    per_token_v = v_scale is not None and v_scale.ndim == 3
    tensor_scales = (k_scale is not None and not per_token_k) or (v_scale is not None and not per_token_v)
    keys = -(-w * s // block_keys) * block_keys
    if per_token_k:
        args.append(_seq_scales(k_scale, block_tables, keys))
    if per_token_v:
        args.append(_seq_scales(v_scale, block_tables, keys))
    if tensor_scales:
        one = jnp.ones((), _F32)
        ks = one if k_scale is None or per_token_k else k_scale.astype(_F32)
        vs = one if v_scale is None or per_token_v else v_scale.astype(_F32)
        args.append(jnp.stack([ks, vs]))
    if alibi_slopes is not None:
        args.append(alibi_slopes.astype(_F32))
    kd, vd = np.dtype(k_pages.dtype), np.dtype(v_pages.dtype)
    itemsize = np.dtype(q.dtype).itemsize
    cfg = dict(
        decode=decode, g=g, q_tile=1 if decode else q_tile, block_keys=block_keys, num_stages=num_stages,
        page_size=s, head_dim=d, max_pages=w, num_pages=p, dtype=np.dtype(q.dtype), num_tokens=t,
        num_tiles=num_tiles, num_kv_heads=kh, num_splits=num_splits, scale=scale, soft_cap=soft_cap,
        sliding_window=sliding_window, per_token_k=per_token_k, per_token_v=per_token_v,
        tensor_scales=tensor_scales, alibi=alibi_slopes is not None,
        quant=(kd.itemsize == 1, vd.itemsize == 1), kv_dtypes=(kd, vd),
        swizzle=min(128, d * itemsize),
    )  # fmt: skip
    outs = _per_platform(*args, cfg=tuple(sorted(cfg.items())))
    if num_splits == 1:
        return outs[0]
    acc, m, l = outs  # [N, NS, K, R, D], [N, NS, K, R]
    m_all = m.max(axis=1, keepdims=True)
    wts = jnp.exp(m - jnp.where(m_all == -jnp.inf, 0.0, m_all))
    l_tot = (l * wts).sum(axis=1)
    acc_tot = (acc * wts[..., None]).sum(axis=1)  # [N, K, R, D]
    o = jnp.where(l_tot[..., None] == 0.0, 0.0, acc_tot / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None])
    qt = 1 if decode else q_tile
    o = o[:, :, : qt * g].reshape(num_tiles, kh, qt, g, d).transpose(0, 2, 1, 3, 4)
    o = o.reshape(num_tiles * qt, h, d).astype(q.dtype)
    if decode:
        return o
    local = jnp.arange(qt, dtype=jnp.int32)[None, :]
    dest = jnp.where(local < tiles[2][:, None], tiles[1][:, None] + local, t).reshape(-1)
    return jnp.zeros((t, h, d), q.dtype).at[dest].set(o, mode="drop")


def paged_attention_mosaic_gpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    *,
    q_lens: jax.Array | None,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: jax.Array | None = None,
    k_scale: jax.Array | float | None = None,
    v_scale: jax.Array | float | None = None,
    config: Config | None = None,
) -> jax.Array:
    """Paged attention through the Mosaic GPU kernel; inputs already validated by the public entry.

    q: [T, H, D] bfloat16|float16; k_pages, v_pages: [P, S, K, D] q's dtype, int8 or float8_e4m3fn;
    kv_lens: [B] int; block_tables: [B, W] int; q_lens: [B] int or None (decode, T == B); alibi_slopes:
    [H] float or None; k_scale, v_scale: scalar or [P, S, K] for quantized pages, else None. Returns
    [T, H, D] in q's dtype. Jittable. `config`: `Config` (None or None fields: `defaults`).
    """
    reason = pallas_unsupported(q, k_pages, v_pages, q_lens=q_lens)
    if reason is not None:
        raise ValueError(f"the Mosaic GPU paged attention kernel does not support {reason}")
    t, h, d = q.shape
    if t == 0 or block_tables.shape[1] == 0 or k_pages.shape[0] == 0:
        return jnp.zeros((t, h, d), q.dtype)
    tun = defaults(q, k_pages, kv_lens, block_tables, q_lens=q_lens, config=config or Config())

    def as_scale(x):
        return None if x is None else jnp.asarray(x, _F32)

    return _paged_attention_mgpu(
        q, k_pages, v_pages, jnp.asarray(kv_lens), jnp.asarray(block_tables),
        None if q_lens is None else jnp.asarray(q_lens),
        None if alibi_slopes is None else jnp.asarray(alibi_slopes), as_scale(k_scale), as_scale(v_scale),
        scale=float(scale), soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window), **tun,
    )  # fmt: skip


def _supports(q, k_pages, v_pages, kv_lens, block_tables, *, q_lens=None, **options):
    return pallas_unsupported(q, k_pages, v_pages, q_lens=q_lens)


def _pallas(q, k_pages, v_pages, kv_lens, block_tables, *, q_lens, config, scale, soft_cap, sliding_window,
            **options):  # fmt: skip
    logit = dict(scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)

    def forward(q, k_pages, v_pages, kv_lens, block_tables, q_lens, alibi_slopes, k_scale, v_scale):
        return paged_attention_mosaic_gpu(
            q, k_pages, v_pages, kv_lens, block_tables, q_lens=q_lens, alibi_slopes=alibi_slopes,
            k_scale=k_scale, v_scale=v_scale, config=config, **logit,
        )  # fmt: skip

    # The kernel's forward with the XLA path's recompute-based backward (reverse-mode autodiff).
    return differentiable(
        forward, (scale, soft_cap, sliding_window, (config.q_tile if config else None) or 32), q, k_pages,
        v_pages, kv_lens, block_tables, q_lens, options["alibi_slopes"], options["k_scale"],
        options["v_scale"],
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation(
    "pallas_mosaic_gpu",
    _pallas,
    platforms=("cpu", "cuda"),
    supports=_supports,
    config=Config,
    available=lowering.mosaic_gpu_unavailable,
)
