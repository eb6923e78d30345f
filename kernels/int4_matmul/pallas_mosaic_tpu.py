"""W4A16 INT4 matmul as a Pallas kernel for TPUs (Mosaic lowering): y = x̃ @ W_stored.

What it computes
----------------
With stored rows r, group g(r) = r // group_size, codes q, scales s and zero points z (see quant/format.py):

    y[m, n] = Σ_g  s[g, n] · Σ_{r in g} x̃[m, r] · (q[r, n] − z[g, n])

x̃ is x already permuted (act-order) and divided by the AWQ activation scales: `int4_weight_matmul_tpu` does
that once on the small activation, exactly as for the XLA path and the Triton kernel, so the kernel only ever
sees the stored row order. The weight is read in its canonical layout (`packed: [K/2, N] uint8`, low nibble
= even row); nothing is prepared per weight.

Unpacking without widening bytes
--------------------------------
The kernel never converts bytes one by one. A block of packed rows is reinterpreted (`pltpu.bitcast`, free
in the vector registers) as int32 words: word row a holds packed rows 4a..4a+3, that is stored rows 8a..8a+7,
nibble j of the word being row 8a + j. One shift, one mask and one OR per word then make two bfloat16
values at once:

    plane_j = ((word >> 4j) & 0x000F000F) | 0x43004300        (j = 0..3)

read as bfloat16 [2 rows per word], is exactly 128 + q for rows 8a + j (low half) and 8a + j + 4 (high
half): 0x43 is the exponent of 128, whose bfloat16 spacing is 1, so the code lands in the mantissa. The four
planes of one *segment* (L stored rows inside one group) are stacked into an [L, bn] bfloat16 tile, and x is
arranged once, outside the kernel, into the same row order (`arrange_x`), so one MXU dot per segment gives

    P = Σ_r x̃[:, r] · (128 + q[r])           (bfloat16 operands, float32 accumulation)

and the group's contribution is applied to the small [bm, bn] product, never per weight:

    acc += s[g] ⊙ (P − (Σ_r x̃[:, r]) ⊗ (128 + z[g]))

Float32 (and float16, computed as float32) activations subtract 128 + z from the planes instead, so the dot
sees the exact small integers q − z (no cancellation against the 128 offset) and runs at
`precision=HIGHEST`; the scale still multiplies the product.

Grid and tiles
--------------
grid = (Mp / bm, N / bn, K / bk), dimension semantics ("parallel", "parallel", "arbitrary"), a float32
accumulator in VMEM across the K steps. Per step the kernel streams one packed block [bk/2, bn] (Pallas
double-buffers it) and walks its segments with a loop (eight per iteration); the scales and zero points of
the column tile ([G, bn], a few hundred KiB at most) stay resident for all K steps and are converted to
float32 once per tile into VMEM scratch. A group longer than `MAX_SEGMENT` rows (per-channel weights) is cut
into segments of 512 rows, each given a copy of its group's scale and zero row (an XLA repeat of the small
[G, N] arrays, K/512 rows). Decode (M ≤ 16, `MAX_DECODE_M`): bm = M (no padding) with wide
column tiles, usually the whole K in one step: x is fully resident and the weight streams once. Larger M:
bm up to 256 rows (x padded to a multiple of bm). Blocks keep the (8, 128) rule: bn a multiple of 128 (or
all of N), bk/2 packed rows a multiple of 32 (the uint8 sublane tile), L/4 plane rows a multiple of 16 (the
bfloat16 tile), hence L and the group size multiples of `SEGMENT_ALIGN` = 64. The tile sizes and the VMEM
limit come from a small per-chip table (`CHIPS`) keyed by `pltpu.get_tpu_info()`, read when the kernel is
lowered for a TPU (a TPU, a compile-only TPU device, or an abstract mesh of one); interpreted on the CPU the
kernel takes the interpret defaults (the smallest legal tiles for the test shapes).

float16 scales (the GPTQ/AWQ checkpoints' dtype) cannot be loaded by Mosaic on v5e/v6e: they go in as their
uint16 bit patterns (one XLA bitcast of the [G, N] scales per call) and are decoded in the kernel
(`f16_bits_to_f32`, exact, subnormals and infinities included). float16 activations likewise go in as
float32 and the result comes back as float32, cast to float16 outside.

Lowering
--------
`interpret=None` chooses per lowering platform through `kernels.lowering.per_platform_kernel`: the compiled
Mosaic kernel (`tpu_custom_call`) on tpu and the same kernel interpreted (plain HLO) on cpu, so one jitted
function runs on the CPU, lowers and compiles for a TPU, and exports for cpu and tpu at once. `jax.export`
needs `disabled_checks=[DisabledSafetyCheck.custom_call("tpu_custom_call")]`. `jax.vmap` (stacks of expert
weights) adds a grid axis inside the same primitive.

Declines (`pallas_unsupported`, so impl="auto"/"pallas" fall back to the XLA path): bits other than 3 and 4,
group sizes that are not multiples of 64 (per-channel included when K is), N that is neither a multiple of
128 nor small enough for one column tile, x dtypes other than float32/bfloat16/float16.

Gradients: `jax.grad` with respect to x and the scales goes through a custom VJP whose backward is the XLA
path's (`xla.scan_matmul_transposed`, `xla.scan_scale_grad`); the integer codes and zero points get none.

Axis legend: M rows of x (Mp padded), K input features (stored order), N output features, G groups,
bm/bn/bk the tiles along M, N and K (bk counts stored rows: a block holds bk/2 packed byte rows), L the
segment (stored rows per dot, inside one group).
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
from kernels.int4_matmul.xla import prepare_x, scan_matmul_transposed, scan_scale_grad, zero_cotangent
from kernels.lowering import per_platform_kernel, tpu_chip
from kernels.precision import highest_precision
from quant.format import Int4Weight, symmetric_zero

X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
SUPPORTED_BITS = (3, 4)  # the 4-bit container (3-bit codes share it)
# The smallest segment: L/2 packed rows fill a uint8 (32, 128) tile and the L/4 rows of each bfloat16 plane a
# (16, 128) tile, so slicing and stacking segments never moves data between vector registers.
SEGMENT_ALIGN = 64
MAX_SEGMENT = 512  # stored rows per dot when a group is longer (per-channel weights)
LANES = 128
MAX_DECODE_M = 16  # rows of x up to which the kernel runs unpadded with the whole of x resident
MAX_BLOCK_M = 256
SEGMENTS_PER_ITERATION = 8  # segments unrolled per loop iteration (the scale rows of 8 are one f32 tile)
# 128 + code as bfloat16 bits (0x4300 is 128.0), twice per int32 word.
_MAGIC = 0x43004300
_NIBBLES = 0x000F000F
_OFFSET = 128.0


@dataclasses.dataclass(frozen=True)
class Chip:
    """Tiling defaults for one TPU generation: the column tile, the largest packed block per K step (bytes),
    and the scoped VMEM the kernel asks for (bytes; the chip has `TpuInfo`'s vmem_capacity_bytes per core)."""

    block_n: int
    max_block_bytes: int
    vmem_limit: int


_MIB = 1 << 20
# From libtpu's static cycle estimates of the compiled kernel on the compile-only v5e and v6e devices, at the
# benchmark shapes (4096x14336 and 8192x28672, M = 1, 16, 64, bf16, group 128; estimated cycles of the kernel,
# bn = 512 / 1024 / 2048): v5e M=16 8192x28672 254k / 223k / 211k, M=64 329k / 302k / 288k; v6e M=16 239k /
# 196k / 178k, M=64 268k / 260k / 257k. Wider column tiles amortize each grid step's fixed cost; a packed
# block of up to 8 MiB (double-buffered: 16 MiB) keeps all of K in one step at these shapes.
CHIPS = {
    "v5e": Chip(block_n=2048, max_block_bytes=8 * _MIB, vmem_limit=96 * _MIB),
    "v6e": Chip(block_n=2048, max_block_bytes=8 * _MIB, vmem_limit=96 * _MIB),
}
# Any other TPU (and a tpu lowering with no device to ask): blocks that fit a 64 MiB VMEM (v7x) with room.
DEFAULT_CHIP = Chip(block_n=1024, max_block_bytes=4 * _MIB, vmem_limit=40 * _MIB)
# Interpreted on the CPU: the VMEM limit means nothing; small tiles keep the interpreter's work per step
# small, and the test shapes (K = 256, N = 96) take one block.
INTERPRET_CHIP = Chip(block_n=128, max_block_bytes=1 * _MIB, vmem_limit=0)
# The float32 accumulator a row tile carries through the segment loop, at most (elements: 512 KiB): wide
# column tiles at decode, narrower ones as bm grows.
MAX_ACC_ELEMENTS = 128 * 1024


def chip_tiles() -> tuple[Chip, int | None]:
    """(the tiling defaults, the per-core VMEM in bytes) of the TPU being lowered for: `pltpu.get_tpu_info()`
    (a TPU, a compile-only TPU device, or an abstract mesh of one); `DEFAULT_CHIP` and None when there is
    none to ask."""
    return tpu_chip(CHIPS, DEFAULT_CHIP)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static tiling of one call: rows, columns and stored K rows per grid step, the segment L (stored rows
    per dot) and the scoped VMEM to ask for (None: the compiler's default; interpret mode)."""

    block_m: int
    block_n: int
    block_k: int
    segment: int
    vmem_limit: int | None


def _segment(group_size: int) -> int:
    """The longest multiple of SEGMENT_ALIGN up to MAX_SEGMENT that divides the group."""
    for seg in range(min(MAX_SEGMENT, group_size), 0, -SEGMENT_ALIGN):
        if group_size % seg == 0:
            return seg
    raise ValueError(f"group_size={group_size} has no divisor that is a multiple of {SEGMENT_ALIGN}")


def _legal_block_k(bk: int, k: int, seg: int) -> bool:
    """bk divides K in whole segments; with several K steps, each step starts on an f32-tile-aligned scale
    row (a multiple of eight segments)."""
    if bk < seg or bk % seg or k % bk:
        return False
    return bk == k or (bk // seg) % SEGMENTS_PER_ITERATION == 0


def _block_k(k: int, bn: int, seg: int, max_bytes: int, bm: int = 1) -> int | None:
    """All of K when its packed block [K/2, bn] and x's block [bm, K] (counted as float32) each fit
    `max_bytes`, else the largest legal block that does; None when none does."""
    fits = [
        bk
        for bk in range(seg, k + 1, seg)
        if _legal_block_k(bk, k, seg) and max((bk // 2) * bn, bm * bk * 4) <= max_bytes
    ]
    return k if k in fits else max(fits, default=None)


def choose_tiling(
    m: int,
    k: int,
    n: int,
    group_size: int,
    *,
    chip: Chip = DEFAULT_CHIP,
    vmem_capacity: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> Tiling:
    """Default tiles by shape and chip (any given value overrides its default after validation).

    bm: M itself at decode (M ≤ 16, no padding), else M rounded up to 16 rows, at most 256. bn: the chip's
    column tile, capped so that the accumulator holds at most MAX_ACC_ELEMENTS, lowered to the largest
    multiple of 128 dividing N (all of N when N is not a multiple of 128). bk: all of K when its packed
    block and x's block fit `chip.max_block_bytes`, else the largest legal divisor of K that does (whole
    segments, and a multiple of eight segments per step). VMEM: what the
    blocks, their double buffers, the scratch and the segment temporaries take, doubled for the compiler's own
    use, at least 16 MiB and at most the chip's table value (and 3/4 of its VMEM).
    """
    if m < 1:
        raise ValueError(f"M={m} must be at least 1")
    seg = _segment(group_size)
    decode = m <= MAX_DECODE_M
    if block_m is None:
        block_m = m if decode else min(MAX_BLOCK_M, -(-m // 16) * 16)
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m={block_m!r} must be a positive int")
    if block_m < m and block_m % 16:
        raise ValueError(
            f"block_m={block_m} must be a multiple of 16 (the bfloat16 sublane tile) below M={m}"
        )
    if block_n is None:
        if n % LANES:
            block_n = n
        else:
            block_n = LANES
            target = max(LANES, min(chip.block_n, MAX_ACC_ELEMENTS // block_m // LANES * LANES))
            for bn in range(min(target, n), LANES - 1, -LANES):
                if n % bn == 0:
                    block_n = bn
                    break
    if (
        isinstance(block_n, bool)
        or not isinstance(block_n, int)
        or n % block_n
        or not (block_n == n or block_n % LANES == 0)
    ):
        raise ValueError(f"block_n={block_n!r} must divide N={n} and be a multiple of {LANES} (or N itself)")
    if block_k is None:
        block_k = _block_k(k, block_n, seg, chip.max_block_bytes, block_m) or k
    if isinstance(block_k, bool) or not isinstance(block_k, int) or not _legal_block_k(block_k, k, seg):
        raise ValueError(
            f"block_k={block_k!r} must divide K={k} into whole segments of {seg} rows, and be K or hold a "
            f"multiple of {SEGMENTS_PER_ITERATION} segments"
        )
    vmem = None
    if chip.vmem_limit:
        need = _vmem_bytes(block_m, block_n, block_k, seg, k // group_size)
        vmem = min(chip.vmem_limit, max(16 * _MIB, 2 * need))
        if vmem_capacity:
            vmem = min(vmem, vmem_capacity * 3 // 4)
    return Tiling(block_m, block_n, block_k, seg, vmem)


def _vmem_bytes(bm: int, bn: int, bk: int, seg: int, groups: int) -> int:
    """VMEM of one grid step (bytes), sublanes and lanes padded to their tiles: double-buffered x, packed,
    scales, zeros and output blocks, the float32 accumulator and scale scratch, and one segment's temporaries
    (words, planes, the float32 copy of the tile)."""

    def tile(rows: int, cols: int, itemsize: int, sub: int) -> int:
        return -(-rows // sub) * sub * (-(-cols // LANES) * LANES) * itemsize

    m16 = -(-bm // 16) * 16
    blocks = (
        (bk // seg) * tile(bm, seg, 4, 8)
        + tile(bk // 2, bn, 1, 32)
        + tile(groups, bn, 4, 8)
        + tile(groups, bn, 1, 32)
        + tile(bm, bn, 4, 8)
    )
    scratch = tile(bm, bn, 4, 8) + 2 * tile(groups, bn, 4, 8)
    temps = seg * bn * (4 + 2 + 4) + 2 * m16 * bn * 4
    return 2 * blocks + scratch + temps


# ---------------------------------------------------------------------------------------------------------
# Pieces used inside the kernel body (plain JAX on values: they also run outside a kernel).


def f16_bits_to_f32(bits: jax.Array) -> jax.Array:
    """float16 bit patterns (uint16/int32 values) -> the float32 values they encode, exactly: normals,
    subnormals, signed zeros, infinities and NaNs. Integer arithmetic only (Mosaic on v5e/v6e loads no
    float16)."""
    h = bits.astype(jnp.int32)
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    normal = jax.lax.bitcast_convert_type(((exp + 112) << 23) | (mant << 13), jnp.float32)
    special = jax.lax.bitcast_convert_type(jnp.int32(0x7F800000) | (mant << 13), jnp.float32)
    subnormal = mant.astype(jnp.float32) * jnp.float32(2.0**-24)
    mag = jnp.where(exp == 0, subnormal, jnp.where(exp == 31, special, normal))
    return jnp.where((h & 0x8000) != 0, -mag, mag)


def planes_tile(packed_rows: jax.Array) -> jax.Array:
    """packed_rows: [L/2, bn] uint8 (L stored rows, L a multiple of 8) -> [L, bn] bfloat16 holding 128 + q,
    rows in the order `arrange_x` puts x's columns in: position j·L/4 + 2a + h is stored row 8a + j + 4h."""
    words = pltpu.bitcast(packed_rows, jnp.int32)  # [L/8, bn]: word row a = stored rows 8a..8a+7
    planes = []
    for j in range(4):
        shifted = words >> (4 * j) if j else words
        planes.append(pltpu.bitcast((shifted & _NIBBLES) | _MAGIC, jnp.bfloat16))  # [L/4, bn]
    return jnp.concatenate(planes, axis=0)


def arrange_x(x: jax.Array, seg: int) -> jax.Array:
    """x: [M, K] (stored row order) -> [K/L, M, L]: each segment's columns in `planes_tile`'s row order
    (position j·L/4 + 2a + h holds column 8a + j + 4h of the segment)."""
    m, k = x.shape
    x = x.reshape(m, k // seg, seg // 8, 2, 4).transpose(1, 0, 4, 2, 3)
    return x.reshape(k // seg, m, seg)


# ---------------------------------------------------------------------------------------------------------
# The kernel.


def _kernel(
    x_ref,
    p_ref,
    s_ref,
    *rest,
    seg: int,
    num_k: int,
    sym_zero: int | None,
    f16_scales: bool,
    exact_f32: bool,
):
    """One [bm, bn] output tile, one K block per step.

    x_ref [nseg, bm, L] (arranged x, the block's segments), p_ref [bk/2, bn] uint8, s_ref [G, bn] scales
    (float32/bfloat16, or uint16 float16 bits), z_ref [G, bn] uint8 (absent when symmetric), o_ref [bm, bn];
    scratch: acc [bm, bn] f32, s_scr [G, bn] f32 scales, zb_scr [G, bn] f32 128 + zero points. Here a group
    is one segment (`_run` repeats the rows of longer groups), so segment t of the whole K takes row t.
    """
    if sym_zero is None:
        z_ref, o_ref, acc_ref, s_scr, zb_scr = rest
    else:
        o_ref, acc_ref, s_scr = rest
        z_ref = zb_scr = None
    k = pl.program_id(2)
    nseg = x_ref.shape[0]
    half = seg // 2

    @pl.when(k == 0)
    def _():
        s = s_ref[...]
        s_scr[...] = f16_bits_to_f32(s) if f16_scales else s.astype(jnp.float32)
        if z_ref is not None:
            zb_scr[...] = z_ref[...].astype(jnp.float32) + _OFFSET

    def segment(t, s_row, zb_row, acc):
        """Segment t of the block (a traced or static index) with its scale and 128 + zero rows [1, bn]."""
        start = t * half if isinstance(t, int) else pl.multiple_of(t * half, half)
        w = planes_tile(p_ref[pl.ds(start, half), :])  # [L, bn] bf16: 128 + q
        x = x_ref[t]  # [bm, L]
        if exact_f32:
            w = w.astype(jnp.float32) - zb_row  # q − z, exact
            part = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        else:
            part = jnp.dot(x, w, preferred_element_type=jnp.float32)
            part = part - jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) * zb_row
        return acc + part * s_row

    def rows(ref_or_none, start, count):
        if ref_or_none is None:
            return None
        return ref_or_none[pl.ds(start, count), :]

    def zb(zb_rows, i):
        return jnp.float32(_OFFSET + sym_zero) if zb_rows is None else zb_rows[i : i + 1]

    bm, bn = o_ref.shape
    acc = jnp.zeros((bm, bn), jnp.float32)
    step = SEGMENTS_PER_ITERATION
    if nseg % step == 0 and (nseg > step or num_k > 1):

        def body(u, acc):
            first = pl.multiple_of(k * nseg + u * step, step)
            s_rows, zb_rows = rows(s_scr, first, step), rows(zb_scr, first, step)
            for i in range(step):
                acc = segment(u * step + i, s_rows[i : i + 1], zb(zb_rows, i), acc)
            return acc

        acc = jax.lax.fori_loop(0, nseg // step, body, acc)
    else:  # all of K in this step (choose_tiling), a few segments: static indices throughout
        s_rows, zb_rows = rows(s_scr, 0, nseg), rows(zb_scr, 0, nseg)
        for t in range(nseg):
            acc = segment(t, s_rows[t : t + 1], zb(zb_rows, t), acc)

    if num_k == 1:
        o_ref[...] = acc.astype(o_ref.dtype)
        return

    @pl.when(k == 0)
    def _():
        acc_ref[...] = acc

    @pl.when(k > 0)
    def _():
        acc_ref[...] += acc

    @pl.when(k == num_k - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call: the group size, the symmetric zero (None when zero points are
    passed), the tunables (None: by heuristic at lowering) and the output's shape and dtype."""

    group_size: int
    sym_zero: int | None
    block_m: int | None
    block_n: int | None
    block_k: int | None
    m: int
    n: int
    dtype: np.dtype

    @property
    def out_shape(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.m, self.n), self.dtype)


def _run(x, packed, scales, *zeros, spec: _Spec, interpret: bool):
    """x̃ [M, K], packed [K/2, N], scales [G, N][, zeros [G, N]] -> [M, N] in x's dtype (one pallas_call).

    The tiles are chosen here, at lowering: for a TPU from `pltpu.get_tpu_info()`, interpreted from
    INTERPRET_CHIP (the given tunables win in both).
    """
    m, k = x.shape
    n = packed.shape[1]
    g = k // spec.group_size
    chip, capacity = (INTERPRET_CHIP, None) if interpret else chip_tiles()
    tiling = choose_tiling(
        m,
        k,
        n,
        spec.group_size,
        chip=chip,
        vmem_capacity=capacity,
        block_m=spec.block_m,
        block_n=spec.block_n,
        block_k=spec.block_k,
    )
    bm, bn, bk, seg = tiling.block_m, tiling.block_n, tiling.block_k, tiling.segment
    exact_f32 = np.dtype(x.dtype) != np.dtype(jnp.bfloat16)
    compute = jnp.float32 if exact_f32 else jnp.bfloat16
    out_dtype = jnp.float32 if exact_f32 else jnp.bfloat16
    mp = -(-m // bm) * bm
    xc = x.astype(compute)
    if mp != m:
        xc = jnp.pad(xc, ((0, mp - m), (0, 0)))
    x3 = arrange_x(xc, seg)
    f16_scales = np.dtype(scales.dtype) == np.float16
    if f16_scales:
        scales = jax.lax.bitcast_convert_type(scales, jnp.uint16)
    if spec.group_size > seg:  # groups longer than a segment: one scale (and zero) row per segment
        reps = spec.group_size // seg
        scales = jnp.repeat(scales, reps, axis=0)
        zeros = tuple(jnp.repeat(z, reps, axis=0) for z in zeros)
        g = k // seg
    nseg, num_k = bk // seg, k // bk
    in_specs = [
        pl.BlockSpec((nseg, bm, seg), lambda i, j, kk: (kk, i, 0)),
        pl.BlockSpec((bk // 2, bn), lambda i, j, kk: (kk, j)),
        pl.BlockSpec((g, bn), lambda i, j, kk: (0, j)),
    ]
    scratch = [pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((g, bn), jnp.float32)]
    if zeros:
        in_specs.append(pl.BlockSpec((g, bn), lambda i, j, kk: (0, j)))
        scratch.append(pltpu.VMEM((g, bn), jnp.float32))
    kernel = functools.partial(
        _kernel,
        seg=seg,
        num_k=num_k,
        sym_zero=None if zeros else spec.sym_zero,
        f16_scales=f16_scales,
        exact_f32=exact_f32,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid=(mp // bm, n // bn, num_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=tiling.vmem_limit,
        ),
        interpret=interpret,
        name="int4_matmul_w4a16_tpu",
    )(x3, packed, scales, *zeros)
    return out[:m].astype(spec.dtype)


# One primitive whose lowering is chosen per platform (`kernels.lowering`): the compiled Mosaic kernel on tpu,
# the same kernel interpreted on cpu; it exports for ("cpu", "tpu") at once and batches under vmap.
_int4_tpu = per_platform_kernel(
    "tokenlab_int4_matmul_pallas_tpu",
    {
        "cpu": functools.partial(_run, interpret=True),
        "tpu": functools.partial(_run, interpret=False),
    },
    kernel="the Pallas Mosaic TPU INT4 matmul kernel",
    runs_on="cpu (interpreted) and tpu",
    out_shape=lambda *args, spec: spec.out_shape,
)


def _forward(x, packed, scales, zeros, spec: _Spec, interpret: bool | None):
    args = (x, packed, scales) + (() if zeros is None else (zeros,))
    if interpret is None:
        return _int4_tpu(*args, spec=spec)
    return _run(*args, spec=spec, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _matmul(x, packed, scales, zeros, spec, interpret):
    return _forward(x, packed, scales, zeros, spec, interpret)


def _matmul_fwd(x, packed, scales, zeros, spec, interpret):
    return _forward(x, packed, scales, zeros, spec, interpret), (x, packed, scales, zeros)


@highest_precision  # the XLA transpose's float32 dots: full precision on every backend
def _matmul_bwd(spec, interpret, res, dy):
    x, packed, scales, zeros = res
    zp = jnp.full(scales.shape, spec.sym_zero, jnp.uint8) if zeros is None else zeros
    dy32 = dy.astype(jnp.float32)
    dx = scan_matmul_transposed(dy32, packed, scales, zp, group_size=spec.group_size)
    ds = scan_scale_grad(x.astype(jnp.float32), dy32, packed, zp, group_size=spec.group_size)
    # y, hence dy, has x's dtype; the codes and zero points are integers (float0).
    return dx.astype(dy.dtype), *zero_cotangent((packed,)), ds.astype(scales.dtype), *zero_cotangent((zeros,))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def pallas_unsupported(x: Any, w: Int4Weight) -> str | None:
    """Why the TPU kernel cannot take `x @ w` (None when it can); the caller falls back to the XLA path.

    Takes bits 4 and 3 (the 4-bit container), group sizes that are multiples of 64 (per-channel when K is),
    N a multiple of 128 or one column tile (small N), x float32/bfloat16/float16, float32/bfloat16/float16
    scales, a single (unstacked) weight.
    """
    if not isinstance(w, Int4Weight):
        return f"w is a {type(w).__name__}, not a quant.Int4Weight"
    if w.bits not in SUPPORTED_BITS:
        return f"bits={w.bits} (the TPU kernel reads the 4-bit container: bits 3 and 4)"
    if w.packed.ndim != 2:
        return f"w.packed has shape {tuple(w.packed.shape)}; the kernel takes one [K/2, N] weight"
    k, n = w.shape
    if w.group_size % SEGMENT_ALIGN:
        return (
            f"group_size={w.group_size} (the TPU kernel needs a multiple of {SEGMENT_ALIGN}: a uint8 tile "
            "of packed rows per segment)"
        )
    if n % LANES and _block_k(k, n, _segment(w.group_size), DEFAULT_CHIP.max_block_bytes) is None:
        return (
            f"N={n} (not a multiple of {LANES}, and one column tile of it with the fewest K rows a step "
            f"takes exceeds {DEFAULT_CHIP.max_block_bytes} bytes)"
        )
    if np.dtype(w.scales.dtype) not in SCALE_DTYPES:
        return f"scales.dtype={w.scales.dtype} (the TPU kernel reads float32, bfloat16 or float16 scales)"
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    if dtype not in X_DTYPES:
        return f"x.dtype={dtype} (must be float32, bfloat16 or float16)"
    if np.shape(x)[-1:] != (k,):
        return f"x's last dimension {np.shape(x)[-1:]} is not K={k}"
    return None


def int4_matmul_tpu(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None,
    *,
    group_size: int,
    bits: int,
    sym_zero: int,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """x̃: [M, K] float32|bfloat16|float16 @ the packed weight -> [M, N] in x's dtype (float32 accumulation).

    x̃ is already permuted (act-order) and divided by the activation scales. packed: [K/2, N] uint8 (stored
    row order); scales: [G, N] float; zeros: [G, N] uint8, or None for a symmetric weight whose zero point is
    `sym_zero`. Tiles default by shape and chip at lowering (`choose_tiling`); `interpret=None` interprets on
    cpu and compiles for tpu, chosen per lowering platform. Differentiable with respect to x and the scales
    (custom VJP, XLA backward); jittable.
    """
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {getattr(x, 'shape', None)}")
    if np.dtype(x.dtype) not in X_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} must be one of float32, bfloat16, float16")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported by the TPU kernel; expected one of {SUPPORTED_BITS}")
    if getattr(packed, "ndim", None) != 2 or packed.dtype != np.uint8:
        raise ValueError(
            f"packed must be [K/2, N] uint8, got {getattr(packed, 'shape', None)} {packed.dtype}"
        )
    m, k = x.shape
    half, n = packed.shape
    if k != 2 * half:
        raise ValueError(f"x's K={k} must be 2 * packed rows = {2 * half}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing K={k}")
    if group_size % SEGMENT_ALIGN:
        raise ValueError(f"group_size={group_size} must be a multiple of {SEGMENT_ALIGN} for the TPU kernel")
    g = k // group_size
    if tuple(scales.shape) != (g, n) or np.dtype(scales.dtype) not in SCALE_DTYPES:
        raise ValueError(
            f"scales must be [G, N] = [{g}, {n}] float, got {tuple(scales.shape)} {scales.dtype}"
        )
    if zeros is not None and (tuple(zeros.shape) != (g, n) or zeros.dtype != np.uint8):
        raise ValueError(f"zeros must be [G, N] = [{g}, {n}] uint8, got {tuple(zeros.shape)} {zeros.dtype}")
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be None, True or False")
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    # The tunables are checked here, once, against the interpret defaults; at lowering they are re-resolved
    # against the chip (the same rules, so a value accepted here stays legal).
    choose_tiling(m, k, n, group_size, chip=INTERPRET_CHIP, block_m=block_m, block_n=block_n, block_k=block_k)
    spec = _Spec(group_size, int(sym_zero), block_m, block_n, block_k, m, n, np.dtype(x.dtype))
    return _matmul(x, packed, scales, zeros, spec, interpret)


def int4_weight_matmul_tpu(x: jax.Array, w: Int4Weight, **tunables: Any) -> jax.Array:
    """x: [..., K] in input-channel order @ an Int4Weight -> [..., N] in x's dtype, through the TPU kernel.

    Applies the activation scales and the act-order permutation to x (as the public entry does), then calls
    `int4_matmul_tpu`; `tunables` are its keyword tunables (block_m, block_n, block_k, interpret). Jitted
    (tunables static), so an eager call is one dispatch.
    """
    reason = pallas_unsupported(x, w)
    if reason is not None:
        raise ValueError(f"the Pallas TPU INT4 kernel does not support {reason}")
    unknown = sorted(set(tunables) - {"block_m", "block_n", "block_k", "interpret"})
    if unknown:
        raise ValueError(f"unknown tunables {unknown}; expected block_m, block_n, block_k, interpret")
    return _weight_matmul(x, w, **tunables)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret"))
def _weight_matmul(x: jax.Array, w: Int4Weight, **tunables: Any) -> jax.Array:
    n = w.shape[1]
    xf = prepare_x(x, w).astype(x.dtype)  # stored row order, AWQ scales divided out (exact round trip)
    y = int4_matmul_tpu(
        xf,
        w.packed,
        w.scales,
        w.zeros,
        group_size=w.group_size,
        bits=w.bits,
        sym_zero=symmetric_zero(w.bits),
        **tunables,
    )
    return y.reshape(*x.shape[:-1], n)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles of the Pallas TPU INT4 kernel; a field left None takes `choose_tiling`'s choice (by shape and by
    the chip, at lowering)."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "block_m", "block_n", "block_k")


def _pallas(x: jax.Array, w: Int4Weight, *, config: Config) -> jax.Array:
    return _weight_matmul(x, w, **dataclasses.asdict(config))


IMPLEMENTATION = registry.Implementation(
    "pallas_mosaic_tpu", _pallas, platforms=("cpu", "tpu"), supports=pallas_unsupported, config=Config
)
