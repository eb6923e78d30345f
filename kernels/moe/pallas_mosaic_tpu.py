"""The MoE expert FFN as two Pallas Mosaic TPU grouped GEMMs over rows sorted by expert.

What it computes
----------------
For the dispatched rows xs: [A, d], sorted by expert (expert e owns the contiguous rows [o_e, o_e + n_e),
o_e = n_0 + ... + n_{e-1}, n = group_sizes):

    h[r]  = silu(xs[r] · w_gate[e]) ⊙ (xs[r] · w_up[e])        kernel 1 ("moe_gate_up_swiglu_tpu"): [A, f]
    ys[r] = h[r] · w_down[e]                                     kernel 2 ("moe_down_tpu"): [A, d]

`moe_ffn_pallas_tpu` wraps them in the public dispatch plan (`kernels.moe.dispatch`, packed layout, one row
per kept assignment) and the weighted `combine`, in dropless and capacity mode alike. h is written once, in
the compute dtype (bfloat16 for bfloat16 inputs, float32 otherwise).

Grid and tiles (megablox `gmm`'s schedule)
------------------------------------------
The rows are cut into tiles of bm. A grid step along the tile axis is one (expert, row tile) pair: a row tile
that straddles an expert boundary is visited once per expert it holds, consecutively, each visit computing
the whole tile against that expert's weights and storing only that expert's rows (a row mask), so the output
block stays in VMEM across the visits. Three int32 vectors are scalar-prefetched into SMEM
(`pltpu.PrefetchScalarGridSpec`): `offsets` [E + 1] (the groups' first rows), and per visit `group_ids` and
`m_tile_ids` [A_pad / bm + E - 1] (`group_metadata`); the grid is (N / bn, visits, K / bk) with the visit
count a traced scalar (a dynamic grid bound), so only routed (expert, tile) pairs run: an expert with no
rows has no visit, and no block of its weights (or scales) is ever copied from HBM. Rows past the routed ones
are never visited either (their output is left unwritten; `combine` never reads them). Each step streams one
[bm, bk] block of rows and one [bk, bn] block per weight (Pallas double-buffers them), and accumulates in
float32 VMEM scratch; the last K step applies the epilogue (kernel 1: the SwiGLU of the gate and up
accumulators) and stores the masked tile. Dimension semantics ("parallel", "arbitrary", "arbitrary"): the
column tiles are independent, the visits must run in order (revisited output blocks).

Tile sizes come from a per-chip table (`CHIPS`: v5e, v5p, v6e, v7x) read with `pltpu.get_tpu_info()` at
lowering (a TPU, a compile-only TPU device or an abstract mesh of one; `DEFAULT_CHIP` when there is nothing to
ask), with the VMEM limit set explicitly in `pltpu.CompilerParams(vmem_limit_bytes=...)`; interpreted on the
CPU the kernels take `INTERPRET_CHIP`. bm: the balanced rows per expert (A / E) rounded up to a power of two,
from 16 (the bfloat16 sublane tile) to the chip's cap. bn, bk: the largest multiple of 128 dividing the
width, up to the chip's cap, or the whole width when it is not a multiple of 128 (the (8, 128) rule).

Precision: float32 inputs run their dots at `precision=HIGHEST` (float32 accuracy on the MXU); bfloat16
inputs feed the MXU bfloat16 with float32 accumulation. float16 float experts are declined (Mosaic on v5e and
v6e loads no float16); float16 activations with INT4 experts are computed as float32.

INT4 experts
------------
Stacks of `quant.Int4Weight` (leaves with a leading expert axis; bits 4, or 3 in the 4-bit container). The
kernels stream each expert's packed bytes [bk/2, bn] (uint8, low nibble = even row) and convert them in the
kernel: `p & 15` and `p >> 4` (the even and the odd rows of the block) stacked into one [bk, bn] tile, minus
the zero points and times the scales (rows repeated per group), cast to the compute dtype and fed to the MXU
in one dot per step. The activation columns of each K block are arranged the same way outside the kernel
(`arrange_columns`: the block's even columns, then its odd ones; for kernel 2 an XLA pass over h), AWQ
activation scales too. The scales and zero points of the expert's column tile ([G, bn]) are resident per
visit and converted to float32 once into VMEM scratch at its first K step (float16 scales go in as their
uint16 bits and are decoded exactly, `kernels.int4_matmul.pallas_mosaic_tpu.f16_bits_to_f32`). A K block
holds whole groups: bk is a multiple of the group size, with a multiple of 8 groups per block, or all of K.
Act-order weights (`perm`) and other bit widths are declined (`pallas_unsupported`).

Platforms. `interpret=None` chooses per lowering platform (`kernels.lowering.per_platform_kernel`): the
compiled Mosaic kernels (`tpu_custom_call`) on tpu and the same kernels interpreted on cpu, so one jitted
function runs on the CPU, lowers and compiles for a TPU, and exports for cpu and tpu at once (`jax.export`
needs `disabled_checks=[DisabledSafetyCheck.custom_call("tpu_custom_call")]`). `jax.vmap` adds a grid axis.

Gradients. A custom VJP whose backward is the XLA path's grouped loop (`kernels.moe.xla`, the strategy a TPU
runs): dx, the float experts' weight gradients, and for INT4 experts the gradients of their scales (the codes
and zero points get none). Experts without rows get exact zeros. No Pallas backward kernels yet.

Axis legend: `A` dispatched rows (A_pad: padded to a multiple of bm), `E` experts, `d` model width, `f`
expert hidden width, `T` tokens, `k` experts per token, `G` quantization groups of a weight's K; `bm`, `bn`,
`bk` the tiles along rows, output columns and the reduction.
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
from kernels.moe import xla as moe_xla
from kernels.moe.dispatch import check_grouped_operands, expert_dims
from kernels.moe.reference import capacity_of
from quant.format import Int4Weight, symmetric_zero

__all__ = [
    "CHIPS",
    "Chip",
    "Config",
    "Tiling",
    "arrange_columns",
    "choose_tiling",
    "group_metadata",
    "grouped_ffn_tpu",
    "moe_ffn_pallas_tpu",
    "pallas_unsupported",
]

FLOAT_EXPERT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))
INT4_X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
INT4_BITS = (3, 4)  # the 4-bit container
LANES = 128
MIN_BLOCK_M = 16  # the bfloat16 sublane tile
GROUPS_PER_STEP = 8  # a K step of an INT4 weight starts on an f32-tile-aligned scale row
_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
    """Tiling caps for one TPU generation: rows per tile, output columns, reduction rows per step, and the
    scoped VMEM the kernels may ask for (bytes; None in interpret mode)."""

    block_m: int
    block_n: int
    block_k: int
    vmem_limit: int | None


# v5e/v5p: 128x128 MXUs; v6e/v7x: 256x256. VMEM per core: v5e and v6e 128 MiB, v5p and v7x 64 MiB. A step's
# weight blocks (bk x bn per weight, gate and up together, double-buffered) stay a few MiB, well under each
# chip's VMEM; the limit asked is the table's (`choose_tiling`).
CHIPS = {
    "v5e": Chip(block_m=128, block_n=512, block_k=1024, vmem_limit=64 * _MIB),
    "v5p": Chip(block_m=128, block_n=512, block_k=1024, vmem_limit=48 * _MIB),
    "v6e": Chip(block_m=256, block_n=1024, block_k=1024, vmem_limit=96 * _MIB),
    "7x": Chip(block_m=256, block_n=512, block_k=1024, vmem_limit=48 * _MIB),
}
CHIPS["7"] = CHIPS["7x"]
# Any other TPU, or a tpu lowering with no device to ask: blocks that fit a 64 MiB VMEM with room.
DEFAULT_CHIP = Chip(block_m=128, block_n=512, block_k=512, vmem_limit=32 * _MIB)
# Interpreted on the CPU: small tiles, so that the test shapes take several steps along every grid axis.
INTERPRET_CHIP = Chip(block_m=16, block_n=128, block_k=128, vmem_limit=None)


def chip_tiles() -> tuple[Chip, int | None]:
    """(the tiling caps, the per-core VMEM in bytes) of the TPU being lowered for (`pltpu.get_tpu_info()`);
    `DEFAULT_CHIP` and None when there is none to ask."""
    return tpu_chip(CHIPS, DEFAULT_CHIP)


# --------------------------------------------------------------------------------------------------
# shapes and what the kernels take


_dims = expert_dims


def pallas_unsupported(
    x: Any, w_gate: Any, w_up: Any, w_down: Any, *, capacity: int | None = None
) -> str | None:
    """Why the TPU grouped FFN cannot run these operands (a sentence), or None when it can.

    x: [T, d]; w_gate, w_up: [E, d, f]; w_down: [E, f, d], float32/bfloat16 arrays of x's dtype, or stacks of
    Int4Weight (bits 4 or 3, no act-order perm, float32/bfloat16/float16 scales; w_gate and w_up with one
    group size) with float32, bfloat16 or float16 x. capacity: accepted for symmetry (both modes run here).
    """
    del capacity
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    quantized = [isinstance(w, Int4Weight) for w in (w_gate, w_up, w_down)]
    if not any(quantized):
        if dtype not in FLOAT_EXPERT_DTYPES:
            return f"x.dtype={dtype} (float experts: float32 or bfloat16; Mosaic on v5e/v6e loads no float16)"
        if np.dtype(w_gate.dtype) not in FLOAT_EXPERT_DTYPES:
            return f"w_gate.dtype={w_gate.dtype} (float32 or bfloat16)"
        return None
    if not all(quantized):
        return "mixed float and Int4Weight experts"
    if dtype not in INT4_X_DTYPES:
        return f"x.dtype={dtype} (INT4 experts: float32, bfloat16 or float16 activations)"
    if w_gate.group_size != w_up.group_size:
        return "w_gate and w_up differ in group_size (the fused kernel steps through both with one K tile)"
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.perm is not None:
            return f"act-ordered {name} (perm): each expert would gather its own activation columns"
        if w.bits not in INT4_BITS:
            return f"{name}.bits={w.bits} (the TPU kernel reads the 4-bit container: bits {INT4_BITS})"
        if np.dtype(w.scales.dtype) not in SCALE_DTYPES:
            return f"{name}.scales.dtype={w.scales.dtype} (float32, bfloat16 or float16)"
    return None


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static tiling of one call: rows per tile, (bn, bk) of kernel 1 (gate/up) and of kernel 2 (down), and
    the scoped VMEM to ask for (None: interpret mode)."""

    block_m: int
    gate_up: tuple[int, int]
    down: tuple[int, int]
    vmem_limit: int | None


def _col_tile(n: int, cap: int) -> int:
    """Output columns per tile: all of N when it is not a multiple of 128 or fits the cap, else the largest
    multiple of 128 up to the cap that divides N (all of N instead when that is below half the cap and N is
    at most twice it: one wide tile beats many narrow ones)."""
    if n % LANES or n <= cap:
        return n
    best = max(b for b in range(LANES, cap + 1, LANES) if n % b == 0)
    return n if best < cap // 2 and n <= 2 * cap else best


def _k_tile(k: int, cap: int, group: int | None) -> int:
    """Reduction rows per step: the largest multiple of 128 up to the cap dividing K (for an INT4 weight also
    holding whole groups, a multiple of GROUPS_PER_STEP of them), else all of K."""
    if k % LANES or k <= cap:
        return k
    for b in range(cap // LANES * LANES, LANES - 1, -LANES):
        if k % b:
            continue
        if group is None or (b % group == 0 and (b // group) % GROUPS_PER_STEP == 0):
            return b
    return k


def _group(w: Any) -> int | None:
    return w.group_size if isinstance(w, Int4Weight) else None


def choose_tiling(
    rows: int,
    w_gate: Any,
    w_down: Any,
    dtype: Any,
    *,
    chip: Chip = DEFAULT_CHIP,
    vmem_capacity: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> Tiling:
    """Tiles for A = `rows` dispatched rows against the experts (w_gate [E, d, f], w_down [E, f, d], float or
    Int4Weight stacks; only their shapes and group sizes are read) on `chip`.

    bm: A / E rounded up to a power of two, between MIN_BLOCK_M and chip.block_m (block_m: a multiple of 16).
    bn, bk: the largest legal tile up to chip.block_n / chip.block_k (or up to block_n / block_k when given)
    for each kernel's widths. VMEM: the chip's limit, at most 3/4 of its VMEM.
    """
    num_experts, d, f = _dims(w_gate)
    if block_m is None:
        per_expert = max(1, -(-rows // max(1, num_experts)))
        block_m = min(chip.block_m, max(MIN_BLOCK_M, 1 << (per_expert - 1).bit_length()))
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1 or block_m % MIN_BLOCK_M:
        raise ValueError(f"block_m={block_m!r} must be a positive multiple of {MIN_BLOCK_M}")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < LANES or v % LANES):
            raise ValueError(f"{name}={v!r} must be a multiple of {LANES} (or None)")
    cap_n, cap_k = block_n or chip.block_n, block_k or chip.block_k
    gate_up = (_col_tile(f, cap_n), _k_tile(d, cap_k, _group(w_gate)))
    down = (_col_tile(d, cap_n), _k_tile(f, cap_k, _group(w_down)))
    # The chip's limit as it stands (the blocks use far less: v5e, Mixtral T4096, 5.4 MiB for gate/up and 3.1
    # MiB for down by libtpu's used_scoped_memory_configs). Under a lower limit libtpu's report reads larger
    # (16 MiB asked: 37.4 MiB "used", i.e. 2 x 16 MiB + the 5.4 MiB), so read it at this limit.
    vmem = chip.vmem_limit
    if vmem and vmem_capacity:
        vmem = min(vmem, vmem_capacity * 3 // 4)
    return Tiling(block_m, gate_up, down, vmem)


# --------------------------------------------------------------------------------------------------
# the schedule


def group_metadata(group_sizes: jax.Array, num_rows: int, block_m: int) -> tuple[jax.Array, ...]:
    """The visits of the grouped GEMM: (offsets [E + 1], group_ids [V], m_tile_ids [V], num_visits [] int32),
    V = num_rows / block_m + E - 1 (the most there can be; num_rows a multiple of block_m).

    Visit i < num_visits computes row tile m_tile_ids[i] against expert group_ids[i]; its rows are
    [offsets[e], offsets[e + 1]). Visits come expert by expert and, within one, tile by tile, so a row tile
    shared by two experts is visited twice in a row. Experts with no rows have no visit; tiles wholly past
    the routed rows have none. Sizes are clamped to the buffer (traced values cannot be checked).
    """
    num_experts = group_sizes.shape[0]
    tiles_m = num_rows // block_m
    num_slots = tiles_m + num_experts - 1
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    sizes = ends - starts
    first = starts // block_m
    last = (jnp.maximum(ends, 1) - 1) // block_m
    visits = jnp.where(sizes > 0, last - first + 1, 0).astype(jnp.int32)
    visit_end = jnp.cumsum(visits)
    visit_start = visit_end - visits
    num_visits = visit_end[-1].astype(jnp.int32)
    group_ids = jnp.repeat(
        jnp.arange(num_experts, dtype=jnp.int32), visits, total_repeat_length=num_slots
    ).astype(jnp.int32)
    i = jnp.arange(num_slots, dtype=jnp.int32)
    m_tile_ids = first[group_ids] + i - visit_start[group_ids]
    # Slots past the last visit never run; keep their ids in range anyway.
    m_tile_ids = jnp.clip(jnp.where(i < num_visits, m_tile_ids, tiles_m - 1), 0, tiles_m - 1)
    offsets = jnp.concatenate([starts, ends[-1:]]).astype(jnp.int32)
    return offsets, group_ids, m_tile_ids.astype(jnp.int32), num_visits


def arrange_columns(a: jax.Array, block_k: int) -> jax.Array:
    """a: [..., K] -> [..., K] with each block of block_k columns reordered to its even columns, then its odd
    ones: the row order of the kernel's decoded INT4 tile (low nibbles, then high nibbles)."""
    *lead, k = a.shape
    a = a.reshape(*lead, k // block_k, block_k // 2, 2)
    return jnp.swapaxes(a, -1, -2).reshape(*lead, k)


# --------------------------------------------------------------------------------------------------
# the kernels


@dataclasses.dataclass(frozen=True)
class _Quant:
    """What the kernel needs to decode one INT4 stack: group size, the symmetric zero (None: zero points
    are passed), whether scales come as float16 bits, and whether AWQ activation scales are passed."""

    group_size: int
    sym_zero: int | None
    f16_scales: bool
    act: bool

    @property
    def num_refs(self) -> int:
        return 2 + (self.sym_zero is None) + self.act

    @property
    def num_scratch(self) -> int:
        return 1 + (self.sym_zero is None)


def _quant(w: Any) -> _Quant | None:
    if not isinstance(w, Int4Weight):
        return None
    sym = symmetric_zero(w.bits) if w.zeros is None else None
    f16 = np.dtype(w.scales.dtype) == np.float16
    return _Quant(w.group_size, sym, f16, w.act_scales is not None)


def _int4_tile(refs, scratch, q: _Quant, kk, num_k: int, block_k: int, dtype):
    """The expert's [bk, bn] weight block in `dtype`: even rows, then odd rows (`arrange_columns`)."""
    packed_ref = refs[0]
    p = packed_ref[...].astype(jnp.int32)  # [bk/2, bn]
    codes = jnp.concatenate([p & 15, p >> 4], axis=0).astype(jnp.float32)  # [bk, bn]
    groups = block_k // q.group_size  # whole groups per block (`_k_tile`)

    def rows(scr):
        if num_k == 1:
            v = scr[...]
        else:
            v = scr[pl.ds(pl.multiple_of(kk * groups, GROUPS_PER_STEP), groups), :]
        half = jnp.repeat(v, q.group_size // 2, axis=0)  # [bk/2, bn]: each group's rows of one parity
        return jnp.concatenate([half, half], axis=0)

    zero = jnp.float32(q.sym_zero) if q.sym_zero is not None else rows(scratch[1])
    return ((codes - zero) * rows(scratch[0])).astype(dtype)


def _fill_scales(refs, scratch, q: _Quant):
    """At an expert's first K step: its column tile's scales (and zero points) as float32 into scratch."""
    s = refs[1][...]
    scratch[0][...] = f16_bits_to_f32(s) if q.f16_scales else s.astype(jnp.float32)
    if q.sym_zero is None:
        scratch[1][...] = refs[2][...].astype(jnp.int32).astype(jnp.float32)


def _ffn_kernel(offs_ref, gids_ref, mids_ref, x_ref, *refs, quants, num_k, block_m, block_k, swiglu, exact):
    """One (column tile, visit, K step) of a grouped GEMM with one weight (down) or two (gate and up, SwiGLU
    epilogue). refs: each weight's refs ([w] or packed, scales[, zeros][, act]), the output, then the float32
    accumulators and each INT4 weight's scale (and zero) scratch."""
    w_refs, it = [], iter(refs)
    for q in quants:
        w_refs.append([next(it) for _ in range(1 if q is None else q.num_refs)])
    o_ref = next(it)
    accs = [next(it) for _ in quants]
    scratches = [[] if q is None else [next(it) for _ in range(q.num_scratch)] for q in quants]
    t, kk = pl.program_id(1), pl.program_id(2)
    dtype = o_ref.dtype
    precision = jax.lax.Precision.HIGHEST if exact else None

    @pl.when(kk == 0)
    def _():
        for acc, q, wr, scr in zip(accs, quants, w_refs, scratches, strict=True):
            acc[...] = jnp.zeros(acc.shape, jnp.float32)
            if q is not None:
                _fill_scales(wr, scr, q)

    x = x_ref[...]
    for acc, q, wr, scr in zip(accs, quants, w_refs, scratches, strict=True):
        if q is None:
            xv, w = x.astype(dtype), wr[0][...].astype(dtype)
        else:
            xv = x.astype(jnp.float32) / wr[-1][...].astype(jnp.float32) if q.act else x
            xv = xv.astype(dtype)
            w = _int4_tile(wr, scr, q, kk, num_k, block_k, dtype)
        acc[...] += jnp.dot(xv, w, preferred_element_type=jnp.float32, precision=precision)

    @pl.when(kk == num_k - 1)
    def _():
        g = gids_ref[t]
        rows = mids_ref[t] * block_m + jax.lax.broadcasted_iota(jnp.int32, o_ref.shape, 0)
        mine = (rows >= offs_ref[g]) & (rows < offs_ref[g + 1])
        if swiglu:
            gate, up = accs[0][...], accs[1][...]
            val = gate / (1.0 + jnp.exp(-gate)) * up
        else:
            val = accs[0][...]
        o_ref[...] = jnp.where(mine, val, o_ref[...].astype(jnp.float32)).astype(dtype)


def _weight_specs(w: Any, q: _Quant | None, bk: int, bn: int) -> tuple[list, list, list]:
    """(arrays, block specs, scratch shapes) of one expert stack for a grid (n, visit, k)."""
    gid = lambda n, t, kk, offs, gids, mids: gids[t]  # noqa: E731
    if q is None:
        return [w], [pl.BlockSpec((None, bk, bn), lambda n, t, kk, *s: (gid(n, t, kk, *s), kk, n))], []
    k_rows = w.packed.shape[1] * 2
    groups = k_rows // w.group_size
    scales = jax.lax.bitcast_convert_type(w.scales, jnp.uint16) if q.f16_scales else w.scales
    arrays = [w.packed, scales]
    specs = [
        pl.BlockSpec((None, bk // 2, bn), lambda n, t, kk, *s: (gid(n, t, kk, *s), kk, n)),
        pl.BlockSpec((None, groups, bn), lambda n, t, kk, *s: (gid(n, t, kk, *s), 0, n)),
    ]
    scratch = [pltpu.VMEM((groups, bn), jnp.float32)]
    if q.sym_zero is None:
        arrays.append(w.zeros)
        specs.append(pl.BlockSpec((None, groups, bn), lambda n, t, kk, *s: (gid(n, t, kk, *s), 0, n)))
        scratch.append(pltpu.VMEM((groups, bn), jnp.float32))
    if q.act:
        act = arrange_columns(w.act_scales.astype(jnp.float32), bk)[:, None, :]  # [E, 1, K]
        arrays.append(act)
        specs.append(pl.BlockSpec((None, 1, bk), lambda n, t, kk, *s: (gid(n, t, kk, *s), 0, kk)))
    return arrays, specs, scratch


def _grouped_gemm(meta, x, ws, *, tiles, block_m, out_dtype, exact, swiglu, vmem_limit, interpret, name):
    """x: [A_pad, K] rows (columns arranged per K block for INT4 weights) against the stacks `ws` (one, or
    gate and up) -> [A_pad, N] in out_dtype."""
    offsets, group_ids, m_tile_ids, num_visits = meta
    bn, bk = tiles
    rows, k = x.shape
    n = _dims(ws[0])[2]
    quants = tuple(_quant(w) for w in ws)
    arrays, specs, scratch = [], [], []
    for w, q in zip(ws, quants, strict=True):
        a, s, sc = _weight_specs(w, q, bk, bn)
        arrays += a
        specs += s
        scratch += sc
    scratch = [pltpu.VMEM((block_m, bn), jnp.float32) for _ in ws] + scratch
    kernel = functools.partial(
        _ffn_kernel, quants=quants, num_k=k // bk, block_m=block_m, block_k=bk, swiglu=swiglu, exact=exact
    )
    x_spec = pl.BlockSpec((block_m, bk), lambda n_, t, kk, offs, gids, mids: (mids[t], kk))
    out_spec = pl.BlockSpec((block_m, bn), lambda n_, t, kk, offs, gids, mids: (mids[t], n_))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(n // bn, num_visits, k // bk),
            in_specs=[x_spec, *specs],
            out_specs=out_spec,
            scratch_shapes=scratch,
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=vmem_limit
        ),
        interpret=interpret,
        name=name,
    )(offsets, group_ids, m_tile_ids, x, *arrays)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call: the tunables (None: chosen at lowering)."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None


def _compute_dtype(xs_dtype: Any, wg: Any) -> Any:
    return jnp.bfloat16 if np.dtype(xs_dtype) == np.dtype(jnp.bfloat16) else jnp.float32


def _run(xs, group_sizes, wg, wu, wd, *, spec: _Spec, interpret: bool):
    """xs [A, d] -> ys [A, d] in the compute dtype: both kernels, tiles chosen here (at lowering)."""
    rows = xs.shape[0]
    dtype = _compute_dtype(xs.dtype, wg)
    chip, capacity = (INTERPRET_CHIP, None) if interpret else chip_tiles()
    tiling = choose_tiling(
        rows, wg, wd, dtype, chip=chip, vmem_capacity=capacity,
        block_m=spec.block_m, block_n=spec.block_n, block_k=spec.block_k,
    )  # fmt: skip
    bm = tiling.block_m
    padded = -(-rows // bm) * bm
    xp = xs.astype(dtype)
    if padded != rows:
        xp = jnp.pad(xp, ((0, padded - rows), (0, 0)))
    meta = group_metadata(group_sizes, padded, bm)
    exact = dtype == jnp.float32
    common = dict(block_m=bm, out_dtype=dtype, exact=exact, vmem_limit=tiling.vmem_limit, interpret=interpret)
    if isinstance(wg, Int4Weight):
        xp = arrange_columns(xp, tiling.gate_up[1])
    h = _grouped_gemm(
        meta, xp, (wg, wu), tiles=tiling.gate_up, swiglu=True, name="moe_gate_up_swiglu_tpu", **common
    )
    if isinstance(wd, Int4Weight):
        h = arrange_columns(h, tiling.down[1])
    ys = _grouped_gemm(meta, h, (wd,), tiles=tiling.down, swiglu=False, name="moe_down_tpu", **common)
    return ys[:rows]


def _out_shape(xs, group_sizes, wg, wu, wd, *, spec):
    return jax.ShapeDtypeStruct(xs.shape, _compute_dtype(xs.dtype, wg))


# One primitive whose lowering is chosen per platform (`kernels.lowering`): the compiled Mosaic kernels on
# tpu, the same kernels interpreted on cpu; it exports for ("cpu", "tpu") at once and batches under vmap.
_ffn_tpu = per_platform_kernel(
    "tokenlab_moe_grouped_ffn_pallas_tpu",
    {
        "cpu": functools.partial(_run, interpret=True),
        "tpu": functools.partial(_run, interpret=False),
    },
    kernel="the Pallas Mosaic TPU grouped MoE FFN",
    runs_on="cpu (interpreted) and tpu",
    out_shape=_out_shape,
)


def _forward(xs, group_sizes, wg, wu, wd, spec, interpret):
    if interpret is None:
        return _ffn_tpu(xs, group_sizes, wg, wu, wd, spec=spec)
    return _run(xs, group_sizes, wg, wu, wd, spec=spec, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped_ffn(xs, group_sizes, wg, wu, wd, spec, interpret):
    return _forward(xs, group_sizes, wg, wu, wd, spec, interpret)


def _grouped_ffn_fwd(xs, group_sizes, wg, wu, wd, spec, interpret):
    return _forward(xs, group_sizes, wg, wu, wd, spec, interpret), (xs, group_sizes, wg, wu, wd)


# The XLA grouped loop's row blocks in the backward (its default; row_align 1 matches the packed plan here).
_BWD_BLOCK_ROWS = 64


def _grouped_ffn_bwd(spec, interpret, res, d_ys):
    """The XLA grouped loop's VJP (kernels.moe.xla) on the same rows: its forward is dead code here."""
    xs, group_sizes, wg, wu, wd = res
    sizes = jnp.minimum(
        jnp.maximum(group_sizes.astype(jnp.int32), 0), xs.shape[0]
    )  # in range, as the metadata clamps them
    ends = jnp.minimum(jnp.cumsum(sizes), xs.shape[0])
    offsets = (ends - jnp.minimum(sizes, ends)).astype(jnp.int32)
    sizes = ends - offsets
    # Every static block size of the loop must fit in the buffer.
    block_rows = min(_BWD_BLOCK_ROWS, 1 << (xs.shape[0].bit_length() - 1))
    if isinstance(wg, Int4Weight):

        def fn(v, a, b, c):
            return moe_xla._grouped_ffn_quantized(v, sizes, offsets, a, b, c, 1, block_rows)
    else:

        def fn(v, a, b, c):
            return moe_xla._grouped_ffn(v, sizes, offsets, a, b, c, 1, block_rows, False)

    _, vjp = jax.vjp(fn, xs, wg, wu, wd)
    dxs, dwg, dwu, dwd = vjp(d_ys.astype(jnp.float32))
    return dxs.astype(xs.dtype), None, dwg, dwu, dwd


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


# --------------------------------------------------------------------------------------------------
# public entry points


def _validate(xs, group_sizes, wg, wu, wd, interpret):
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be None, True or False")
    check_grouped_operands(xs, group_sizes, wg, wu, wd)
    if not isinstance(wg, Int4Weight) and not (wg.dtype == wu.dtype == wd.dtype == xs.dtype):
        raise ValueError(
            f"xs/w_gate/w_up/w_down dtypes {xs.dtype}/{wg.dtype}/{wu.dtype}/{wd.dtype} must match"
        )
    reason = pallas_unsupported(xs, wg, wu, wd)
    if reason is not None:
        raise ValueError(f"the Pallas TPU grouped FFN does not take these operands: {reason}")


def _check_tunables(rows, wg, wd, dtype, spec: _Spec) -> None:
    """The tunables, checked once against the interpret caps (the same rules hold at lowering)."""
    choose_tiling(
        max(rows, 1), wg, wd, dtype, chip=INTERPRET_CHIP,
        block_m=spec.block_m, block_n=spec.block_n, block_k=spec.block_k,
    )  # fmt: skip


def grouped_ffn_tpu(
    xs: jax.Array,
    group_sizes: jax.Array,
    w_gate: Any,
    w_up: Any,
    w_down: Any,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The SwiGLU expert FFN on rows sorted by expert: xs [A, d] -> ys [A, d].

    xs: [A, d] float32|bfloat16 (float16 with INT4 experts), the rows of expert e contiguous and in expert
    order (the packed layout of `dispatch_plan` with row_align=1); group_sizes: [E] int, rows per expert,
    summing to at most A. w_gate, w_up: [E, d, f], w_down: [E, f, d], float of xs's dtype or stacks of
    Int4Weight. ys is bfloat16 for bfloat16 xs and float32 otherwise; rows past the sum of group_sizes are
    left unwritten (undefined). block_m (a multiple of 16), block_n, block_k (multiples of 128): caps on the
    tiles (None: the chip's, at lowering). interpret: None chooses per lowering platform (cpu: interpreted;
    tpu: compiled); True/False forces one. Differentiable with respect to xs, float experts and INT4 scales.
    """
    _validate(xs, group_sizes, w_gate, w_up, w_down, interpret)
    spec = _Spec(block_m, block_n, block_k)
    _check_tunables(xs.shape[0], w_gate, w_down, _compute_dtype(xs.dtype, w_gate), spec)
    return _grouped_ffn_jit(xs, group_sizes, w_gate, w_up, w_down, spec=spec, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("spec", "interpret"))
def _grouped_ffn_jit(xs, group_sizes, wg, wu, wd, *, spec, interpret):
    return _grouped_ffn(xs, group_sizes.astype(jnp.int32), wg, wu, wd, spec, interpret)


def moe_ffn_pallas_tpu(
    x: jax.Array,
    weights: jax.Array,
    expert_ids: jax.Array,
    w_gate: Any,
    w_up: Any,
    w_down: Any,
    *,
    capacity: int | None = None,
    drop_priority: str = "choice",
    interpret: bool | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """The MoE FFN through the TPU grouped GEMMs: x [T, d] -> y [T, d] (x.dtype).

    weights: [T, k] float, expert_ids: [T, k] int; experts as for `grouped_ffn_tpu`. capacity: keep at most
    this many assignments per expert in drop_priority order (None: dropless). The public `dispatch_plan`
    (packed, row_align=1) sorts the assignments by expert, the rows are gathered, the two kernels run, and
    `combine` sums the k weighted outputs per token (float32). Differentiable with respect to x, weights,
    float experts and INT4 experts' scales.
    """
    from kernels import validate_moe_ffn_inputs  # the package imports this module: import at call time

    validate_moe_ffn_inputs(x, weights, expert_ids, w_gate, w_up, w_down, drop_priority=drop_priority)
    if capacity is not None and (
        isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1
    ):
        raise ValueError(f"capacity={capacity} must be a positive int or None")
    reason = pallas_unsupported(x, w_gate, w_up, w_down)
    if reason is not None:
        raise ValueError(f"the Pallas TPU grouped FFN does not take these operands: {reason}")
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be None, True or False")
    spec = _Spec(block_m, block_n, block_k)
    _check_tunables(expert_ids.size, w_gate, w_down, _compute_dtype(x.dtype, w_gate), spec)
    return _moe_ffn_tpu(
        x, weights, expert_ids, w_gate, w_up, w_down, capacity=None if capacity is None else int(capacity),
        drop_priority=drop_priority, interpret=interpret, spec=spec,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("capacity", "drop_priority", "interpret", "spec"))
def _moe_ffn_tpu(x, weights, expert_ids, wg, wu, wd, *, capacity, drop_priority, interpret, spec):
    from kernels.moe.dispatch import combine, dispatch_plan, gather_rows

    plan = dispatch_plan(
        expert_ids.astype(jnp.int32),
        _dims(wg)[0],
        weights=weights,
        capacity=capacity,
        drop_priority=drop_priority,
        layout="packed",
        row_align=1,
    )
    xs = gather_rows(x, plan.row_token)
    ys = _grouped_ffn(xs, plan.group_sizes, wg, wu, wd, spec, interpret)
    return combine(ys, weights, plan).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Config:
    """Caps on the TPU grouped GEMMs' tiles; a field left None takes the chip's (`choose_tiling`, at
    lowering). block_m: a multiple of 16; block_n, block_k: multiples of 128."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "block_m", "block_n", "block_k")


def _supports(x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor=None, **_):
    return pallas_unsupported(
        x, w_gate, w_up, w_down, capacity=capacity_of(expert_ids, w_gate, capacity_factor)
    )


def _pallas(x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor, drop_priority, config):
    return moe_ffn_pallas_tpu(
        x, weights, expert_ids, w_gate, w_up, w_down,
        capacity=capacity_of(expert_ids, w_gate, capacity_factor), drop_priority=drop_priority,
        **dataclasses.asdict(config),
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation(
    "pallas_mosaic_tpu", _pallas, platforms=("cpu", "tpu"), supports=_supports, config=Config
)
