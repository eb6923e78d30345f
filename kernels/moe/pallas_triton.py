"""The MoE expert FFN as two Pallas (Triton) grouped GEMMs over rows sorted by expert.

Formula. For the dispatched rows xs: [A, d], sorted by expert (the rows of expert e are the contiguous
range [o_e, o_e + n_e) with o_e = n_0 + ... + n_{e-1}, n = group_sizes):

    h[r]  = silu(xs[r] · w_gate[e]) ⊙ (xs[r] · w_up[e])        kernel 1: [A, f], written once
    ys[r] = h[r] · w_down[e]                                     kernel 2: [A, d]

for every row r of expert e, and ys[r] = 0 for the rows past Σ n_e (padding rows at the end of the
buffer). `moe_ffn_pallas` wraps these in the public dispatch plan and the weighted combine.

Tile schedule (MegaBlocks' block-sparse grouped GEMM, JAX's ragged-dot examples). The rows are cut into
blocks of `block_m`; a tile is a (row block, expert) pair, so a block that straddles an expert boundary
is visited once per expert it holds, each visit computing the whole block against that expert's weights
and storing only that expert's rows (a row mask). The schedule is computed in jnp from group_sizes
(`tile_schedule`): tile i has its expert, its row block and its row range [lo, hi). The grid is static:
ceil(A / block_m) + E - 1 row tiles (the most there can be) by the column tiles, launched 1-D in grouped
order (`launch_order`: GROUP_M row tiles at a time, so xs rows and weight columns are reused from L2).
Tiles past the schedule do nothing, and tiles for the blocks past the last routed row write zeros. An
expert with no rows has no tile, so its weights are never read (decode: only the experts that receive
tokens cost bandwidth).

Kernels. Both keep the whole reduction (d for kernel 1, f for kernel 2) in a loop over `block_k`
slices inside one program, with float32 accumulators; kernel 1 holds the gate and up accumulators
side by side and applies the SwiGLU before its single store. Low-precision inputs use the native dot
with float32 accumulation; float32 inputs ask for `precision=HIGHEST` (IEEE float32 on Triton, never
TF32). h is stored in the weights' dtype, as the XLA strategies do.

Quantized experts (stacks of `quant.Int4Weight`, leaves with a leading expert axis; bits 4, or 3 in the
4-bit container): each K tile reads the expert's packed bytes [block_k / 2, block_n] and runs the INT4
kernel's tile step `kernels.int4_matmul.pallas_triton.int4_tile_dot` (nibbles unpacked in registers, the
dots on (code - zero) in the activation dtype, the group scale applied to the [block_m, block_n] product),
with the activation's even and odd columns read by strided loads and divided by the AWQ activation
scales if any. Float experts are never materialized. block_k divides the group size (so a K tile lies
in one group). Act-order weights (`perm`) are not taken (each expert would gather its own activation
columns), nor are bits 2 and 8: `pallas_unsupported` says so, and `moe_ffn` keeps its XLA path for them.

Addressing. Expert stacks are the kernels' big operands (DeepSeek-V3's bf16 w_gate, E256 x d7168 x f2048,
is 7.5 GB). JAX's Triton lowering gives an operand 64-bit element offsets past 2**32 bytes and 32-bit ones
below, exact for float stacks and their float32 weight gradients; the one-byte operands of INT4 stacks
(packed codes, zero points) of 2**31 to 2**32 elements would wrap, so they go in as 16-bit words
(`kernels.triton_addressing`: the rule, its evidence and `to_words`), split back into bytes after each
load. The choice is static, by each operand's size as the pallas_call sees it (through jax.vmap).

Platforms. The kernels are chosen per lowering platform, never from `jax.default_backend()`: compiled
Triton on cuda and rocm, interpret mode on cpu (slow: for tests at small shapes), and the XLA
`jax.lax.ragged_dot` formulation anywhere else (TPU). The choice is a small primitive (forward, and one
for the backward) with one lowering rule per platform rather than `jax.lax.platform_dependent`, which
lowers every branch for every platform of a multi-platform lowering, where a compiled pallas_call fails
for cpu and tpu; so one jitted function lowers for cpu, cuda, rocm and tpu at once (`jax.export` needs
`disabled_checks` for the Triton custom calls; `kernels.lowering.per_platform_kernel` builds them).
`interpret=True/False` forces one form. Under `jax.vmap` the kernels batch as one pallas_call with an extra
grid axis; the ragged_dot formulation runs a sequential `lax.map` over the mapped axis.

Gradients. A custom VJP whose backward is three more Pallas kernels for float experts, on the same
tile schedule: (1) per (row tile, f-column tile), recompute g and u and, in the same reduction over d,
dh = dy · w_down[e]ᵀ, then store h = silu(g)·u, dg = dh·u·silu'(g) and du = dh·silu(g) once; (2) dx =
dg · w_gate[e]ᵀ + du · w_up[e]ᵀ; (3) the weight gradients dw_gate[e] = xs_eᵀ dg_e, dw_up[e] = xs_eᵀ du_e
(one kernel) and dw_down[e] = h_eᵀ dy_e, a grid over (expert, output tile) whose loop walks that expert's
rows (masked loads at its ragged ends; an expert with no rows stores exact zeros and reads nothing).
Other platforms differentiate the ragged_dot formulation. Quantized experts are frozen: the cotangent
reaches xs only, through the ragged_dot formulation on the dequantized weights.

Axis legend: `A` dispatched rows, `E` experts, `d` model width, `f` expert hidden width, `T` tokens,
`k` experts per token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import registry, tuning
from kernels.int4_matmul.pallas_triton import dot_precision, int4_tile_dot
from kernels.int4_matmul.xla import zero_cotangent
from kernels.lowering import before_hopper, per_platform_kernel, target_gpu
from kernels.moe.dispatch import check_grouped_operands, expert_dims
from kernels.moe.reference import capacity_of
from kernels.triton_addressing import from_words, needs_words, to_words, word_slice
from quant.format import Int4Weight, symmetric_zero

__all__ = [
    "grouped_ffn_pallas",
    "launch_order",
    "moe_ffn_pallas",
    "pallas_unsupported",
    "tile_schedule",
]

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
INT4_BITS = (3, 4)  # the 4-bit container that `int4_tile_dot` unpacks
MIN_BLOCK = 16  # Triton's dot needs every tile dimension >= 16
DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 128
DEFAULT_BLOCK_K = 64  # 32 for float32 (twice the bytes per element)
GROUP_M = 8  # row tiles per group of the launch order (see launch_order)
WGRAD_BLOCK = 64  # weight-gradient tiles: 64 x 64 float32 accumulators, two of them for gate and up
_NUM_WARPS = 4  # 8 before Hopper (see `_num_warps`)
_NUM_STAGES = 3


def _num_warps() -> int:
    """Warps per CTA: 4, or 8 before Hopper, where the gate/up tiles' two float32 accumulators (three in the
    backward) held in 4 warps' registers spill on sm_80 (`kernels.lowering.before_hopper`)."""
    return 2 * _NUM_WARPS if before_hopper() else _NUM_WARPS


# --------------------------------------------------------------------------------------------------
# shapes, tunables and what the kernel does not take


_dims = expert_dims


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (1 if n is odd)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _quantized_block_k(w: Int4Weight, block_k: int) -> int:
    """K tile of an INT4 stack: a power of two dividing the group size (and K), at least 32 rows (16 per
    nibble plane) when the group allows, at most block_k otherwise."""
    k = _dims(w)[1]
    return _pow2_divisor(math.gcd(k, w.group_size), max(block_k, 2 * MIN_BLOCK))


def pallas_unsupported(
    x: Any, w_gate: Any, w_up: Any, w_down: Any, *, capacity: int | None = None
) -> str | None:
    """Why the Pallas grouped FFN cannot run these operands (a sentence), or None when it can.

    x: [T, d] (or the dispatched rows [A, d]); w_gate, w_up: [E, d, f]; w_down: [E, f, d], float
    arrays or stacks of Int4Weight. capacity is accepted for symmetry with `moe_ffn` (both dropless and
    capacity mode run here: the dispatch plan packs the kept rows either way).
    """
    del capacity
    if np.dtype(x.dtype).name not in FLOAT_DTYPES:
        return f"x.dtype={x.dtype} (it takes {FLOAT_DTYPES})"
    _, d, f = _dims(w_gate)
    for name, size in (("d", d), ("f", f)):
        if size % MIN_BLOCK:
            return f"{name}={size} (must be a multiple of {MIN_BLOCK}: Triton tiles need >= 16 per dimension)"
    quantized = [isinstance(w, Int4Weight) for w in (w_gate, w_up, w_down)]
    if not any(quantized):
        if np.dtype(w_gate.dtype).name not in FLOAT_DTYPES:
            return f"w_gate.dtype={w_gate.dtype} (it takes {FLOAT_DTYPES})"
        return None
    if not all(quantized):
        return "mixed float and Int4Weight experts"
    if (w_gate.bits, w_gate.group_size) != (w_up.bits, w_up.group_size):
        return (
            "w_gate and w_up differ in bits or group_size (the fused kernel reads both with one tile shape)"
        )
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.perm is not None:
            return f"act-ordered {name} (perm): each expert would gather its own activation columns"
        if w.bits not in INT4_BITS:
            return f"{name}.bits={w.bits}: the INT4 tile helper reads the 4-bit container (bits {INT4_BITS})"
        if _quantized_block_k(w, 1 << 30) < 2 * MIN_BLOCK:
            return (
                f"{name}.group_size={w.group_size}: a K tile must lie in one group and hold "
                f">= {2 * MIN_BLOCK} rows ({MIN_BLOCK} per nibble plane)"
            )
    return None


def _resolve_blocks(num_rows, num_experts, dtype, block_m, block_n, block_k):
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < MIN_BLOCK or v & (v - 1)):
            raise ValueError(f"{name}={v} must be a power of two >= {MIN_BLOCK} (or None)")
    if block_m is None:
        # About one block per expert's balanced share of rows, between 16 (decode) and 64.
        per_expert = max(1, -(-num_rows // max(1, num_experts)))
        block_m = min(DEFAULT_BLOCK_M, max(MIN_BLOCK, 1 << (per_expert - 1).bit_length()))
    if block_n is None:
        block_n = DEFAULT_BLOCK_N
    if block_k is None:
        # Prefill tiles (64 rows) take 32-deep K slices: with 64 the gate/up kernel held 129 registers x 8
        # warps and 80 KiB on sm_80 (168 and 121 KiB on sm_90a), 1 CTA/SM; with 32 it is 127 and 40 KiB,
        # 2 CTAs (168 and 61 KiB, 3 CTAs, still wgmma on sm_90a). Decode tiles keep 64.
        prefill = block_m >= DEFAULT_BLOCK_M
        block_k = DEFAULT_BLOCK_K // 2 if np.dtype(dtype) == np.float32 or prefill else DEFAULT_BLOCK_K
    return int(block_m), int(block_n), int(block_k)


# --------------------------------------------------------------------------------------------------
# the tile schedule


def tile_schedule(group_sizes: jax.Array, num_rows: int, block_m: int) -> jax.Array:
    """The row tiles of the grouped GEMM: sched [5, num_rows // block_m + E - 1] int32.

    group_sizes: [E] int rows per expert (their sum at most num_rows; num_rows a multiple of block_m).
    Column i is one tile: (expert, row block, lo, hi, zero_from). The tile computes row block
    `block` (rows [block·block_m, (block+1)·block_m)) against expert `expert` and stores its rows in
    [lo, hi); rows >= zero_from in the block are stored as zeros. Tiles come expert by expert, blocks in
    order; then one tile per block wholly past the routed rows (lo = hi = 0, zero_from = its first row);
    the rest do nothing (lo = hi = 0, zero_from = num_rows).
    """
    num_experts = group_sizes.shape[0]
    num_blocks = num_rows // block_m
    num_tiles = num_blocks + num_experts - 1
    # Traced sizes cannot be validated: clamp them so that no tile can reach past the buffer.
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    sizes = ends - starts
    total = ends[-1]
    first = starts // block_m
    last = jnp.maximum(ends - 1, 0) // block_m
    tiles_per_expert = jnp.where(sizes > 0, last - first + 1, 0)
    tile_end = jnp.cumsum(tiles_per_expert)
    tile_start = tile_end - tiles_per_expert
    used = tile_end[-1]

    i = jnp.arange(num_tiles, dtype=jnp.int32)
    e = jnp.minimum(jnp.searchsorted(tile_end, i, side="right"), num_experts - 1).astype(jnp.int32)
    block = first[e] + i - tile_start[e]
    lo = jnp.maximum(starts[e], block * block_m)
    hi = jnp.minimum(ends[e], (block + 1) * block_m)
    routed = i < used
    # The last expert tile also zeroes the rows past the routed ones in its block.
    zero_from = jnp.where(i == used - 1, total, num_rows)
    zero_block = (total + block_m - 1) // block_m + (i - used)
    is_zero = ~routed & (zero_block < num_blocks)
    block = jnp.where(routed, block, jnp.where(is_zero, zero_block, 0))
    lo = jnp.where(routed, lo, 0)
    hi = jnp.where(routed, hi, 0)
    zero_from = jnp.where(routed, zero_from, jnp.where(is_zero, zero_block * block_m, num_rows))
    return jnp.stack([e, block, lo, hi, zero_from]).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# one K tile of one expert: x_tile @ W_tile, float or INT4


def _x_cols(x_ref, act_ref, e, rows, k0, n, stride, dtype):
    """x[rows, k0 :: stride][:, :n] in dtype, divided by the expert's AWQ activation scales if any."""
    cols = pl.ds(k0, n, stride=stride) if stride > 1 else pl.ds(k0, n)
    v = x_ref[rows, cols]
    if act_ref is not None:
        v = v.astype(jnp.float32) / act_ref[pl.ds(e, 1), cols].astype(jnp.float32)
    return v.astype(dtype)


def _tile_dot(x_ref, act_ref, w_refs, meta, e, rows, k0, block_k, cols, dtype):
    """float32 [bm, bn]: rows `rows` of x (k columns [k0, k0 + block_k)) times expert e's weight tile.

    Float experts: one dot. INT4 experts: the INT4 kernel's `int4_tile_dot` on the tile's packed bytes,
    with the activation's even and odd columns loaded by strided reads (the tile lies in one group); packed
    bytes and zero points stored as 16-bit words (`to_words`) are split back into bytes after the load.
    """
    if meta is None:
        xv = _x_cols(x_ref, act_ref, e, rows, k0, block_k, 1, dtype)
        w = w_refs[0][e, pl.ds(k0, block_k), cols].astype(dtype)
        return jnp.dot(xv, w, preferred_element_type=jnp.float32, precision=dot_precision(dtype))
    packed_ref, scales_ref, zeros_ref = w_refs
    bits, group_size, packed_words, zeros_words = meta
    half = block_k // 2
    g = k0 // group_size
    x_even = _x_cols(x_ref, act_ref, e, rows, k0, half, 2, dtype)
    x_odd = _x_cols(x_ref, act_ref, e, rows, k0 + 1, half, 2, dtype)
    krows = pl.ds(pl.multiple_of(k0 // 2, half), half)
    if packed_words:
        packed = from_words(packed_ref[e, krows, word_slice(cols)], jnp.uint8)
    else:
        packed = packed_ref[e, krows, cols]
    if zeros_ref is None:
        zero = symmetric_zero(bits)
    elif zeros_words:
        zero = from_words(zeros_ref[e, pl.ds(g, 1), word_slice(cols)], jnp.uint8)
    else:
        zero = zeros_ref[e, pl.ds(g, 1), cols]
    return int4_tile_dot(x_even, x_odd, packed, scales_ref[e, pl.ds(g, 1), cols], zero)


# --------------------------------------------------------------------------------------------------
# the two kernels


def launch_order(pid: Any, num_row_tiles: int, num_col_tiles: int) -> tuple[Any, Any]:
    """Program pid of the 1-D grid -> (row tile, column tile), a bijection onto the two tile ranges.

    Groups of GROUP_M row tiles, column tile by column tile within a group (Triton's grouped ordering):
    the programs in flight share a few row tiles of xs and a few weight columns, so both are served from
    L2 instead of being re-read from HBM once per column tile (xs) or per row tile (weights).
    """
    per_group = GROUP_M * num_col_tiles
    first = (pid // per_group) * GROUP_M
    rows_in_group = jnp.minimum(num_row_tiles - first, GROUP_M)
    return first + (pid % per_group) % rows_in_group, (pid % per_group) // rows_in_group


def _tile_header(sched_ref, block_m, block_n, num_col_tiles):
    i, j = launch_order(pl.program_id(0), sched_ref.shape[1], num_col_tiles)
    e, block, lo, hi, zero_from = (sched_ref[c, i] for c in range(5))
    row0 = pl.multiple_of(block * block_m, block_m)
    rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
    return e, pl.ds(row0, block_m), rows, cols, lo, hi, zero_from


def _steps_if(cond: jax.Array, steps: int | jax.Array) -> jax.Array:
    """`steps` where `cond` holds, else 0, as an int32 loop bound. With Python-int branches `jnp.where`
    lowers for Triton to a select typed i1, and an `scf.for` bound of that type does not verify."""
    return jnp.where(cond, jnp.asarray(steps, jnp.int32), jnp.int32(0))


def _gate_up_kernel(*refs, metas, n_wrefs, block_m, block_n, block_k, num_k, num_col_tiles):
    """h[rows of e, cols] = silu(x · w_gate[e]) ⊙ (x · w_up[e]) for one (row tile, column tile)."""
    sched_ref, x_ref, *rest = refs
    wg_refs, wu_refs = rest[:n_wrefs], rest[n_wrefs : 2 * n_wrefs]
    act_g_ref, act_u_ref, h_ref = rest[2 * n_wrefs :]
    e, xrows, rows, cols, lo, hi, _ = _tile_header(sched_ref, block_m, block_n, num_col_tiles)
    dtype = h_ref.dtype

    def step(kk, acc):
        g, u = acc
        k0 = pl.multiple_of(kk * block_k, block_k)
        g = g + _tile_dot(x_ref, act_g_ref, wg_refs, metas[0], e, xrows, k0, block_k, cols, dtype)
        u = u + _tile_dot(x_ref, act_u_ref, wu_refs, metas[1], e, xrows, k0, block_k, cols, dtype)
        return g, u

    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    # Tiles with no rows (past the schedule, or wholly past the routed rows) skip the loop: no weight reads.
    g, u = lax.fori_loop(0, _steps_if(hi > lo, num_k), step, (zeros, zeros))
    h = (g / (1.0 + jnp.exp(-g)) * u).astype(dtype)
    keep = jnp.broadcast_to((rows >= lo) & (rows < hi), (block_m, block_n))
    plgpu.store(h_ref.at[xrows, cols], h, mask=keep)


def _down_kernel(*refs, meta, n_wrefs, block_m, block_n, block_k, num_k, num_col_tiles):
    """ys[rows of e, cols] = h · w_down[e]; rows past the routed ones get zeros."""
    sched_ref, h_ref, *rest = refs
    wd_refs = rest[:n_wrefs]
    act_ref, y_ref = rest[n_wrefs:]
    e, hrows, rows, cols, lo, hi, zero_from = _tile_header(sched_ref, block_m, block_n, num_col_tiles)
    dtype = h_ref.dtype

    def step(kk, acc):
        k0 = pl.multiple_of(kk * block_k, block_k)
        return acc + _tile_dot(h_ref, act_ref, wd_refs, meta, e, hrows, k0, block_k, cols, dtype)

    acc = lax.fori_loop(0, _steps_if(hi > lo, num_k), step, jnp.zeros((block_m, block_n), jnp.float32))
    mine = (rows >= lo) & (rows < hi)
    y = jnp.where(mine, acc, 0.0).astype(y_ref.dtype)
    keep = jnp.broadcast_to(mine | (rows >= zero_from), (block_m, block_n))
    plgpu.store(y_ref.at[hrows, cols], y, mask=keep)


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers


def _weight_operands(w, words=None):
    """(static meta, the refs' arrays, act_scales or None): meta is None for a float stack and
    (bits, group_size, packed_words, zeros_words) for a stack of Int4Weight (whose zeros are None when
    symmetric). The packed codes and the zero points go in as 16-bit words (`to_words`) where their size
    needs it (`needs_words`; this runs inside the kernels' lowering, so the count sees through vmap);
    words=True/False forces the choice (tests). Float stacks are addressed as they are: two-byte and wider
    operands get the lowering's 64-bit offsets when they pass 2**32 bytes, which is all they need."""
    if not isinstance(w, Int4Weight):
        return None, (w,), None

    def wide(a):
        return a is not None and (needs_words(a) if words is None else bool(words))

    packed_words, zeros_words = wide(w.packed), wide(w.zeros)
    packed = to_words(w.packed) if packed_words else w.packed
    zeros = to_words(w.zeros) if zeros_words else w.zeros
    return (w.bits, w.group_size, packed_words, zeros_words), (packed, w.scales, zeros), w.act_scales


def _call(kernel, grid, out_shape, operands, interpret, name):
    # None operands (symmetric zeros, absent activation scales) travel as Python None inside the kernel:
    # drop them from the call. out_shape: one ShapeDtypeStruct, or a tuple of them.
    present = [a for a in operands if a is not None]
    where_none = [a is None for a in operands]
    num_out = len(out_shape) if isinstance(out_shape, tuple) else 1

    def body(*refs):
        it = iter(refs[: len(refs) - num_out])
        kernel(*[None if missing else next(it) for missing in where_none], *refs[len(refs) - num_out :])

    return pl.pallas_call(
        body,
        grid=grid,
        out_shape=out_shape,
        interpret=interpret,
        name=name,
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(), num_stages=_NUM_STAGES),
    )(*present)


def _kernels(xs, sched, wg, wu, wd, *, blocks, interpret, words=None):
    """Both kernels on rows xs: [A_pad, d] (A_pad a multiple of block_m) -> ys [A_pad, d].

    ys (and h) are in the weights' dtype for float experts and in xs's dtype for INT4 experts. words: how
    INT4 stacks' one-byte operands go in (`_weight_operands`; None: by size).
    """
    block_m, block_n, block_k = blocks
    num_rows, d = xs.shape
    _, _, f = _dims(wg)
    num_tiles = sched.shape[1]
    quantized = isinstance(wg, Int4Weight)
    dtype = xs.dtype if quantized else wd.dtype
    xs = xs.astype(dtype)

    meta, gate_arrays, act_g = _weight_operands(wg, words)
    up_meta, up_arrays, act_u = _weight_operands(wu, words)
    bn = _pow2_divisor(f, block_n)
    bk = _quantized_block_k(wg, block_k) if quantized else _pow2_divisor(d, block_k)
    gate_up = functools.partial(
        _gate_up_kernel, metas=(meta, up_meta), n_wrefs=len(gate_arrays), block_m=block_m, block_n=bn,
        block_k=bk, num_k=d // bk, num_col_tiles=f // bn,
    )  # fmt: skip
    h = _call(
        gate_up,
        (num_tiles * (f // bn),),
        jax.ShapeDtypeStruct((num_rows, f), dtype),
        (sched, xs, *gate_arrays, *up_arrays, act_g, act_u),
        interpret,
        "moe_gate_up_swiglu",
    )

    meta, down_arrays, act_d = _weight_operands(wd, words)
    bn = _pow2_divisor(d, block_n)
    bk = _quantized_block_k(wd, block_k) if quantized else _pow2_divisor(f, block_k)
    down = functools.partial(
        _down_kernel, meta=meta, n_wrefs=len(down_arrays), block_m=block_m, block_n=bn, block_k=bk,
        num_k=f // bk, num_col_tiles=d // bn,
    )  # fmt: skip
    return _call(
        down,
        (num_tiles * (d // bn),),
        jax.ShapeDtypeStruct((num_rows, d), dtype),
        (sched, h, *down_arrays, act_d),
        interpret,
        "moe_down",
    )


# --------------------------------------------------------------------------------------------------
# the backward kernels (float experts)


def _gate_up_bwd_kernel(sched_ref, x_ref, dy_ref, wg_ref, wu_ref, wd_ref, h_ref, dg_ref, du_ref, *, block_m,
                        block_n, block_k, num_k, num_col_tiles):  # fmt: skip
    """For one (row tile, f-column tile): recompute g = x·w_gate[e] and u = x·w_up[e], and with
    dh = dy·w_down[e]ᵀ (the same reduction over d) store h = silu(g)·u, dg = dh·u·silu'(g) and
    du = dh·silu(g)."""
    e, xrows, rows, cols, lo, hi, _ = _tile_header(sched_ref, block_m, block_n, num_col_tiles)
    dtype = h_ref.dtype
    precision = dot_precision(dtype)

    def step(kk, acc):
        g, u, dh = acc
        ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
        xv, dyv = x_ref[xrows, ks], dy_ref[xrows, ks]
        g = g + jnp.dot(xv, wg_ref[e, ks, cols], preferred_element_type=jnp.float32, precision=precision)
        u = u + jnp.dot(xv, wu_ref[e, ks, cols], preferred_element_type=jnp.float32, precision=precision)
        wdt = wd_ref[e, cols, ks]  # [block_n, block_k]: w_down[e]ᵀ's tile, contracted on its second axis
        dh = dh + jnp.dot(dyv, wdt.T, preferred_element_type=jnp.float32, precision=precision)
        return g, u, dh

    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    g, u, dh = lax.fori_loop(0, _steps_if(hi > lo, num_k), step, (zeros, zeros, zeros))
    sig = 1.0 / (1.0 + jnp.exp(-g))
    keep = jnp.broadcast_to((rows >= lo) & (rows < hi), (block_m, block_n))
    plgpu.store(h_ref.at[xrows, cols], (g * sig * u).astype(dtype), mask=keep)
    plgpu.store(dg_ref.at[xrows, cols], (dh * u * sig * (1.0 + g * (1.0 - sig))).astype(dtype), mask=keep)
    plgpu.store(du_ref.at[xrows, cols], (dh * g * sig).astype(dtype), mask=keep)


def _dx_kernel(sched_ref, dg_ref, du_ref, wg_ref, wu_ref, dx_ref, *, block_m, block_n, block_k, num_k,
               num_col_tiles):  # fmt: skip
    """dx[rows of e, d-cols] = dg·w_gate[e]ᵀ + du·w_up[e]ᵀ (reduction over f); other rows get zeros."""
    e, xrows, rows, cols, lo, hi, zero_from = _tile_header(sched_ref, block_m, block_n, num_col_tiles)
    precision = dot_precision(dg_ref.dtype)

    def step(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
        for a_ref, w_ref in ((dg_ref, wg_ref), (du_ref, wu_ref)):
            wt = w_ref[e, cols, ks]  # [block_n, block_k]
            acc = acc + jnp.dot(
                a_ref[xrows, ks], wt.T, preferred_element_type=jnp.float32, precision=precision
            )
        return acc

    acc = lax.fori_loop(0, _steps_if(hi > lo, num_k), step, jnp.zeros((block_m, block_n), jnp.float32))
    mine = (rows >= lo) & (rows < hi)
    keep = jnp.broadcast_to(mine | (rows >= zero_from), (block_m, block_n))
    plgpu.store(dx_ref.at[xrows, cols], jnp.where(mine, acc, 0.0).astype(dx_ref.dtype), mask=keep)


def _weight_grad_kernel(bounds_ref, a_ref, *refs, block_m, block_p, block_q):
    """dW[e][p-tile, q-tile] = Σ over expert e's rows r of a[r, p]ᵀ · b[r, q], for each (b, dW) pair: a GEMM
    whose reduction (the rows) is ragged. Rows outside the expert are masked off at the load; an expert with
    no rows runs no step and stores zeros."""
    b_refs, o_refs = refs[: len(refs) // 2], refs[len(refs) // 2 :]
    e = pl.program_id(0)
    pcols = pl.ds(pl.multiple_of(pl.program_id(1) * block_p, block_p), block_p)
    qcols = pl.ds(pl.multiple_of(pl.program_id(2) * block_q, block_q), block_q)
    start, end = bounds_ref[0, e], bounds_ref[1, e]
    first = start // block_m
    steps = _steps_if(end > start, (end + block_m - 1) // block_m - first)
    precision = dot_precision(a_ref.dtype)

    def step(t, accs):
        row0 = pl.multiple_of((first + t) * block_m, block_m)
        rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
        inside = (rows >= start) & (rows < end)
        rblock = pl.ds(row0, block_m)
        av = plgpu.load(a_ref.at[rblock, pcols], mask=jnp.broadcast_to(inside, (block_m, block_p)), other=0)
        qmask = jnp.broadcast_to(inside, (block_m, block_q))
        return tuple(
            acc + jnp.dot(av.T, plgpu.load(b_ref.at[rblock, qcols], mask=qmask, other=0),
                          preferred_element_type=jnp.float32, precision=precision)
            for acc, b_ref in zip(accs, b_refs, strict=True)
        )  # fmt: skip

    zeros = tuple(jnp.zeros((block_p, block_q), jnp.float32) for _ in b_refs)
    accs = lax.fori_loop(0, steps, step, zeros)
    for acc, o_ref in zip(accs, o_refs, strict=True):
        o_ref[e, pcols, qcols] = acc.astype(o_ref.dtype)


def _backward_kernels(xp, dyp, sched, bounds, wg, wu, wd, *, blocks, interpret):
    """The float experts' cotangents: (dxs [A_pad, d], dw_gate, dw_up [E, d, f], dw_down [E, f, d]), from
    rows xp [A_pad, d] and their cotangents dyp [A_pad, d]. Three kernels: the gate/up backward (h, dg, du
    [A_pad, f], written once), dx, and the ragged-reduction weight gradients."""
    block_m, block_n, block_k = blocks
    num_rows, d = xp.shape
    num_experts, _, f = wg.shape
    dtype = wd.dtype
    xp, dyp = xp.astype(dtype), dyp.astype(dtype)
    num_tiles = sched.shape[1]
    # Three float32 accumulators (g, u, dh): half the forward's columns keep them in registers.
    bn, bk = _pow2_divisor(f, max(MIN_BLOCK, block_n // 2)), _pow2_divisor(d, block_k)
    rows_f = jax.ShapeDtypeStruct((num_rows, f), dtype)
    h, dg, du = _call(
        functools.partial(
            _gate_up_bwd_kernel, block_m=block_m, block_n=bn, block_k=bk, num_k=d // bk, num_col_tiles=f // bn
        ),
        (num_tiles * (f // bn),),
        (rows_f, rows_f, rows_f),
        (sched, xp, dyp, wg, wu, wd),
        interpret,
        "moe_gate_up_bwd",
    )
    bn, bk = _pow2_divisor(d, block_n), _pow2_divisor(f, block_k)
    dx = _call(
        functools.partial(
            _dx_kernel, block_m=block_m, block_n=bn, block_k=bk, num_k=f // bk, num_col_tiles=d // bn
        ),
        (num_tiles * (d // bn),),
        jax.ShapeDtypeStruct((num_rows, d), dtype),
        (sched, dg, du, wg, wu),
        interpret,
        "moe_dx",
    )

    def weight_grads(a, bs, name):
        p, q = a.shape[1], bs[0].shape[1]
        bp, bq = _pow2_divisor(p, WGRAD_BLOCK), _pow2_divisor(q, WGRAD_BLOCK)
        out = jax.ShapeDtypeStruct((num_experts, p, q), jnp.float32)
        kernel = functools.partial(_weight_grad_kernel, block_m=block_m, block_p=bp, block_q=bq)
        return _call(
            kernel, (num_experts, p // bp, q // bq), (out,) * len(bs), (bounds, a, *bs), interpret, name
        )

    dwg, dwu = weight_grads(xp, (dg, du), "moe_dw_gate_up")
    (dwd,) = weight_grads(h, (dyp,), "moe_dw_down")
    return dx, dwg, dwu, dwd


# --------------------------------------------------------------------------------------------------
# the XLA formulation: other platforms' forward and everyone's backward


def _dequantized(w):
    return jax.vmap(lambda v: v.dequantize())(w) if isinstance(w, Int4Weight) else w


def _ragged_ffn(xs, group_sizes, wg, wu, wd):
    """The same FFN through jax.lax.ragged_dot: [A, d] -> [A, d] float32 (rows past Σ sizes are 0)."""
    wg, wu, wd = (_dequantized(w) for w in (wg, wu, wd))
    dtype = wd.dtype
    xs = xs.astype(dtype)

    def rdot(a, w):
        return lax.ragged_dot(
            a, w, group_sizes, precision=dot_precision(dtype), preferred_element_type=jnp.float32
        )

    g, u = rdot(xs, wg), rdot(xs, wu)
    h = (jax.nn.silu(g) * u).astype(dtype)
    return rdot(h, wd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped_ffn(xs, group_sizes, wg, wu, wd, blocks, interpret):
    return _grouped_ffn_fwd_impl(xs, group_sizes, wg, wu, wd, blocks, interpret)


def _forward_fn(mode):
    def run(xp, group_sizes, sched, weights, *, blocks, out_dtype):
        wg, wu, wd = weights
        if mode == "portable":
            ys = _ragged_ffn(xp, group_sizes, wg, wu, wd)
        else:
            ys = _kernels(xp, sched, wg, wu, wd, blocks=blocks, interpret=mode == "interpret")
        return ys.astype(out_dtype)

    return run


# One primitive whose lowering is chosen per platform (see `kernels.lowering`): lax.platform_dependent would
# lower every branch for every platform of a multi-platform export, and a compiled pallas_call cannot lower
# for cpu or tpu.
_grouped_ffn_per_platform = per_platform_kernel(
    "tokenlab_moe_grouped_ffn",
    {
        "cpu": _forward_fn("interpret"),
        "cuda": _forward_fn("compiled"),
        "rocm": _forward_fn("compiled"),
        "tpu": _forward_fn("portable"),
    },
    kernel="the Pallas Triton grouped FFN",
    out_shape=lambda xp, *_, out_dtype, **__: jax.ShapeDtypeStruct(xp.shape, out_dtype),
    map_sequentially=("tpu",),  # lax.ragged_dot does not batch with unbatched weights
)


def _grouped_ffn_fwd_impl(xs, group_sizes, wg, wu, wd, blocks, interpret):
    num_rows = xs.shape[0]
    block_m = blocks[0]
    padded = -(-num_rows // block_m) * block_m
    xp = jnp.pad(xs, ((0, padded - num_rows), (0, 0))) if padded != num_rows else xs
    sched = tile_schedule(group_sizes, padded, block_m)
    if interpret is None:
        ys = _grouped_ffn_per_platform(
            xp, group_sizes, sched, (wg, wu, wd), blocks=blocks, out_dtype=xs.dtype
        )
    else:
        ys = _kernels(xp, sched, wg, wu, wd, blocks=blocks, interpret=interpret).astype(xs.dtype)
    return ys[:num_rows]


def _grouped_ffn_fwd(xs, group_sizes, wg, wu, wd, blocks, interpret):
    ys = _grouped_ffn_fwd_impl(xs, group_sizes, wg, wu, wd, blocks, interpret)
    return ys, (xs, group_sizes, wg, wu, wd)


def _ragged_cotangents(xp, dyp, group_sizes, wg, wu, wd):
    _, vjp = jax.vjp(lambda *a: _ragged_ffn(a[0], group_sizes, *a[1:]), xp, wg, wu, wd)
    return vjp(dyp)


def _backward_fn(mode):
    def run(xp, dyp, group_sizes, sched, bounds, wg, wu, wd, *, blocks):
        if mode == "portable":
            out = _ragged_cotangents(xp, dyp, group_sizes, wg, wu, wd)
        else:
            out = _backward_kernels(
                xp, dyp, sched, bounds, wg, wu, wd, blocks=blocks, interpret=mode == "interpret"
            )
        # Every platform's branch returns the out_shape's dtypes.
        dxs, *dws = out
        return [dxs.astype(wd.dtype), *(dw.astype(jnp.float32) for dw in dws)]

    return run


def _backward_shapes(xp, dyp, group_sizes, sched, bounds, wg, wu, wd, *, blocks):
    del dyp, group_sizes, sched, bounds, blocks
    return [jax.ShapeDtypeStruct(xp.shape, wd.dtype)] + [
        jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in (wg, wu, wd)
    ]


# The backward's per-platform choice, for the same reason as the forward's.
_grouped_ffn_bwd_per_platform = per_platform_kernel(
    "tokenlab_moe_grouped_ffn_bwd",
    {
        "cpu": _backward_fn("interpret"),
        "cuda": _backward_fn("compiled"),
        "rocm": _backward_fn("compiled"),
        "tpu": _backward_fn("portable"),
    },
    kernel="the Pallas Triton grouped FFN's backward",
    out_shape=_backward_shapes,
    map_sequentially=("tpu",),  # lax.ragged_dot does not batch with unbatched weights
)


def _row_bounds(group_sizes, num_rows):
    """[2, E] int32: the first and one-past-last row of every expert (clamped to the buffer, as in the
    tile schedule)."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return jnp.stack([starts, ends])


def _grouped_ffn_bwd(blocks, interpret, res, d_ys):
    xs, group_sizes, wg, wu, wd = res
    d_ys = d_ys.astype(jnp.float32)
    if isinstance(wg, Int4Weight):  # frozen experts: the cotangent reaches the rows only
        _, vjp = jax.vjp(lambda v: _ragged_ffn(v, group_sizes, wg, wu, wd), xs)
        (dxs,) = vjp(d_ys)
        return dxs.astype(xs.dtype), None, *(zero_cotangent(w) for w in (wg, wu, wd))
    num_rows, block_m = xs.shape[0], blocks[0]
    padded = -(-num_rows // block_m) * block_m
    xp = jnp.pad(xs, ((0, padded - num_rows), (0, 0)))
    dyp = jnp.pad(d_ys, ((0, padded - num_rows), (0, 0)))
    sched = tile_schedule(group_sizes, padded, block_m)
    bounds = _row_bounds(group_sizes, padded)
    if interpret is None:
        dxs, dwg, dwu, dwd = _grouped_ffn_bwd_per_platform(
            xp, dyp, group_sizes, sched, bounds, wg, wu, wd, blocks=blocks
        )
    else:
        dxs, dwg, dwu, dwd = _backward_kernels(
            xp, dyp, sched, bounds, wg, wu, wd, blocks=blocks, interpret=interpret
        )
    return (
        dxs[:num_rows].astype(xs.dtype),
        None,
        dwg.astype(wg.dtype),
        dwu.astype(wu.dtype),
        dwd.astype(wd.dtype),
    )


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


# --------------------------------------------------------------------------------------------------
# public entry points


def _validate(xs, group_sizes, wg, wu, wd, interpret):
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be None, True or False")
    check_grouped_operands(xs, group_sizes, wg, wu, wd)
    if not isinstance(wg, Int4Weight) and not (wg.dtype == wu.dtype == wd.dtype):
        raise ValueError(f"w_gate/w_up/w_down dtypes {wg.dtype}/{wu.dtype}/{wd.dtype} must match")
    reason = pallas_unsupported(xs, wg, wu, wd)
    if reason is not None:
        raise ValueError(f"the Pallas grouped FFN does not take these operands: {reason}")


def grouped_ffn_pallas(
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
    """The SwiGLU expert FFN on rows sorted by expert: xs [A, d] -> ys [A, d] (xs.dtype).

    xs: [A, d] float32|bfloat16|float16, the rows of expert e contiguous and in expert order (the
    packed layout of `dispatch_plan` with row_align=1); group_sizes: [E] int32, rows per expert, summing
    to at most A. Rows past the sum (padding at the end of the buffer) come out as zeros.
    w_gate, w_up: [E, d, f], w_down: [E, f, d], all float (one dtype) or all stacks of Int4Weight.
    block_m/block_n/block_k: powers of two >= 16 (None: 16..64 rows by the balanced load, 128 columns,
    64 reduction rows, 32 for float32); each kernel uses the largest power of two <= block_n (block_k)
    that divides its output (reduction) width, and quantized experts cap block_k at the group size.
    interpret: None chooses per lowering platform (cpu: interpret mode; cuda/rocm: Triton; others: the
    jax.lax.ragged_dot formulation); True/False forces interpret mode / the compiled kernel.
    Differentiable with respect to xs and float expert weights (a custom VJP with its own kernels).
    """
    _validate(xs, group_sizes, w_gate, w_up, w_down, interpret)
    blocks = _resolve_blocks(xs.shape[0], _dims(w_gate)[0], xs.dtype, block_m, block_n, block_k)
    return _grouped_ffn_jit(xs, group_sizes, w_gate, w_up, w_down, blocks=blocks, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def _grouped_ffn_jit(xs, group_sizes, wg, wu, wd, *, blocks, interpret):
    return _grouped_ffn(xs, group_sizes.astype(jnp.int32), wg, wu, wd, blocks, interpret)


def moe_ffn_pallas(
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
    """The MoE FFN through the Pallas grouped GEMMs: x [T, d] -> y [T, d] (x.dtype).

    weights: [T, k] float, expert_ids: [T, k] int; experts as for `grouped_ffn_pallas`. capacity: keep at
    most this many assignments per expert in drop_priority order (None: dropless). The public
    `dispatch_plan` (packed, row_align=1) sorts the assignments by expert, the rows are gathered, the two
    kernels run, and `combine` sums the k weighted outputs per token. Differentiable with respect to x,
    weights and float expert weights.
    """
    from kernels import validate_moe_ffn_inputs  # the package imports this module: import at call time

    validate_moe_ffn_inputs(x, weights, expert_ids, w_gate, w_up, w_down, drop_priority=drop_priority)
    if capacity is not None and (not isinstance(capacity, (int, np.integer)) or capacity < 1):
        raise ValueError(f"capacity={capacity} must be a positive int or None")
    num_experts = _dims(w_gate)[0]
    blocks = _resolve_blocks(expert_ids.size, num_experts, x.dtype, block_m, block_n, block_k)
    return _moe_ffn_pallas(
        x, weights, expert_ids, w_gate, w_up, w_down, capacity=None if capacity is None else int(capacity),
        drop_priority=drop_priority, interpret=interpret, blocks=blocks,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("capacity", "drop_priority", "interpret", "blocks"))
def _moe_ffn_pallas(x, weights, expert_ids, wg, wu, wd, *, capacity, drop_priority, interpret, blocks):
    from kernels import combine, dispatch_plan

    plan = dispatch_plan(
        expert_ids.astype(jnp.int32),
        _dims(wg)[0],
        weights=weights,
        capacity=capacity,
        drop_priority=drop_priority,
        layout="packed",
        row_align=1,
    )
    num_rows = plan.row_token.shape[0]
    # Gather straight into a buffer of whole row blocks (extra rows read token T: zeros), so the kernels
    # need no padded copy; combine reads the first R rows.
    padded = -(-num_rows // blocks[0]) * blocks[0]
    row_token = jnp.pad(plan.row_token, (0, padded - num_rows), constant_values=x.shape[0])
    xs = jnp.take(x, row_token, axis=0, mode="fill", fill_value=0)
    _validate(xs, plan.group_sizes, wg, wu, wd, interpret)
    ys = _grouped_ffn(xs, plan.group_sizes, wg, wu, wd, blocks, interpret)
    return combine(ys[:num_rows], weights, plan).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles of the Pallas Triton grouped GEMMs; a field left None takes the default by shape and dtype."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "block_m", "block_n", "block_k")


def shape_class(x: Any, weights: Any, expert_ids: Any, w_gate: Any, w_up: Any, w_down: Any, **_: Any) -> str:
    """The family of shapes sharing a best configuration: "decode" when the balanced rows per expert fit a
    16-32-row tile, else "prefill"; "-f32" for float32 x, "-int4" for quantized experts. The key
    `kernels.tuning` stores tuned configs by."""
    rows = int(np.prod(np.shape(expert_ids)))
    per_expert = -(-rows // max(1, _dims(w_gate)[0]))
    kind = "decode" if per_expert <= 32 else "prefill"
    if np.dtype(x.dtype) == np.float32:
        kind += "-f32"
    if isinstance(w_gate, Int4Weight):
        kind += "-int4"
    return kind


def tune_space(
    x: Any, weights: Any, expert_ids: Any, w_gate: Any, w_up: Any, w_down: Any, **_: Any
) -> list[Config]:
    """The configurations `benchmarks.accel --tune` times (at most 12), the default first: decode tiles of 16
    and 32 rows × block_n 64/128 × block_k 64; prefill tiles of 64 and 128 rows × block_n 64/128 × block_k
    32/64 (128-row tiles only with block_k 32)."""
    if shape_class(x, weights, expert_ids, w_gate, w_up, w_down).startswith("decode"):
        space = [Config(block_m=bm, block_n=bn, block_k=64) for bm in (16, 32) for bn in (64, 128)]
    else:
        space = [Config(block_m=64, block_n=bn, block_k=bk) for bn in (64, 128) for bk in (32, 64)]
        space += [Config(block_m=128, block_n=bn, block_k=32) for bn in (64, 128)]
    return list(dict.fromkeys([Config(), *space]))


def default_config(x: Any, weights: Any, expert_ids: Any, w_gate: Any, w_up: Any, w_down: Any) -> Config:
    """The configuration a call without one runs: the tuned entry for (shape class, the GPU being lowered
    for) from `kernels.tuning` when there is one, else `Config()` (tiles by shape and dtype)."""
    target = target_gpu()
    cls = shape_class(x, weights, expert_ids, w_gate, w_up, w_down)
    found = tuning.lookup("moe_ffn", "pallas_triton", cls, None if target is None else target[0])
    return Config() if found is None else Config(**found)


def _supports(x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor=None, **_):
    return pallas_unsupported(
        x, w_gate, w_up, w_down, capacity=capacity_of(expert_ids, w_gate, capacity_factor)
    )


def _pallas(x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor, drop_priority, config):
    if config == Config():
        config = default_config(x, weights, expert_ids, w_gate, w_up, w_down)
    return moe_ffn_pallas(
        x, weights, expert_ids, w_gate, w_up, w_down,
        capacity=capacity_of(expert_ids, w_gate, capacity_factor), drop_priority=drop_priority,
        **dataclasses.asdict(config),
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation(
    "pallas_triton", _pallas, platforms=("cpu", "cuda", "rocm"), supports=_supports, config=Config
)
