"""W4A16 INT4 matmul as a Pallas kernel for GPUs (Triton lowering): y = x̃ @ W_stored.

What it computes
----------------
With stored rows r, group g(r) = r // group_size, codes q, scales s and zero points z (see quant/format.py):

    y[m, n] = Σ_g  s[g, n] · Σ_{r in g} x̃[m, r] · (q[r, n] − z[g, n])

x̃ is x already permuted (act-order) and divided by the AWQ activation scales: the public `int4_matmul`
does that once on the small activation, exactly as for the XLA path, so this kernel only ever sees the stored
row order.

Layout and tiling
-----------------
The packed weight is read in its canonical layout, `packed: [K/2, N] uint8`, low nibble = even row. Instead
of interleaving the two nibble planes back into rows inside the kernel (a register shuffle Triton does not do
cheaply), the activation is split once, outside the kernel, into its even and odd input channels:

    x̃ @ W = x̃[:, 0::2] @ lo + x̃[:, 1::2] @ hi,   lo = packed & 0xF,  hi = packed >> 4

(`split_even_odd`). Each program owns one output tile [bm, bn] and walks its share of K in tiles of bk rows
(bk/2 packed byte rows, one contiguous slab of `bk/2 · bn` bytes, loaded with wide vector loads along the
contiguous N axis). A K tile never straddles a group (bk divides group_size), so the tile's work is

    acc += s[g] ⊙ (x_even @ (lo − z[g]) + x_odd @ (hi − z[g]))

with `lo − z` and `hi − z` small integers, exact in bf16/f16/f32: the dots run on the activation's dtype
(tensor cores for bf16/f16, IEEE float32 for float32 per the precision policy, never TF32) with float32
accumulation, and the group scale multiplies the [bm, bn] partial product once per tile instead of every
weight element (the XLA "codes" strategy's identity). This tile step is public (`int4_tile_dot`,
`unpack_tile`, `dequantize_tile`) for the MoE kernel's quantized experts.

Grid and split-K
----------------
grid = (ceil(M / bm), N / bn, split_k). Decode (M ≤ 16) is bandwidth-bound: x is padded to bm = 16 rows
(the smallest tensor-core tile; the wasted MMA work is free next to the weight bytes) and, when N / bn alone
gives too few programs to keep every SM's memory pipeline busy, K is split over `split_k` programs that each
write a float32 partial [M, N]; the partials are summed (float32) outside the kernel. GEMM-sized M uses
larger tiles and no split. Defaults (`choose_config`) follow the published W4A16 kernels (Marlin and
tinygemm both run tensor-core MMAs on 16-row activation tiles even at M = 1, and Marlin partitions K across
SMs when N alone does not fill the GPU) and Triton's standard matmul configurations (docs/accelerators.md
says what has been measured on GPUs).

Matrix-vector form (block_m < 16): up to 8 rows of x per program, each an unrolled multiply-and-reduce on the
CUDA cores in float32, `acc[r] += s ⊙ Σ_k (x_even[r, k] · (lo − z) + x_odd[r, k] · (hi − z))`. It is the
default for float32 activations at M ≤ 8: IEEE float32 dots run on the CUDA cores anyway (the precision
policy rules out TF32), so the 16-row dot tile would multiply the FMA work by 16 / M. bf16/f16 activations
can ask for it (`block_m=1, 2, 4, 8`) to compare with the tensor-core form at decode (GemLite's Triton
kernels use a GEMV form at batch 1).

Lowering
--------
`interpret=None` chooses per lowering platform: the kernel is one primitive whose lowering rule is the
compiled Triton kernel (`CompilerParams(num_warps, num_stages)`) on cuda and rocm and interpret mode (plain
HLO) on cpu and tpu (`kernels.lowering.per_platform_kernel`), so one jitted function runs on the CPU,
lowers for a GPU, and exports for ("cpu", "cuda", "rocm", "tpu") at once (a `platform_dependent` around two
pallas_calls would not: a multi-platform module lowers every branch for every platform). `jax.export` needs
`disabled_checks=[DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]` for the Triton custom call.
`jax.vmap` (stacks of expert weights) batches the pallas_call with an extra grid axis, inside the same
primitive. `interpret=True`/`False` forces one form.

Addressing: JAX's Triton lowering gives an operand 32-bit element offsets up to 2**32 bytes, which wrap for
a one-byte operand of more than 2**31 elements (a packed weight of 2 to 4 GiB, such as the output head of a
262,144-token vocabulary at d above 16384, or a stack of experts under vmap). Those go in as 16-bit words
(`kernels.triton_addressing`, which gives the rule and its evidence), split back into bytes after each
load; past 2**32 bytes the lowering's own 64-bit offsets take over. Smaller weights keep their byte loads.

Gradients: `jax.grad` with respect to x and the scales goes through a custom VJP whose backward is the XLA
path's (`xla.scan_matmul_transposed`: dx = dy @ W_storedᵀ, one dequantized K block at a time;
`xla.scan_scale_grad` for the scales); the integer codes and zero points get none (float0).

Axis legend: M rows of x, K input features (stored order), N output features, G groups, bm/bn/bk the tile
sizes along M, N and K (bk counts unpacked rows: a tile holds bk/2 packed byte rows).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels import registry, tuning
from kernels.int4_matmul.xla import prepare_x, scan_matmul_transposed, scan_scale_grad, zero_cotangent
from kernels.lowering import before_hopper, per_platform_kernel, target_gpu
from kernels.precision import highest_precision
from kernels.triton_addressing import from_words, needs_words, to_words
from quant.format import Int4Weight, symmetric_zero

X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
SUPPORTED_BITS = (3, 4)  # the 4-bit container (3-bit codes share it)
# Smallest K tile: 16 packed rows, the smallest K of a tensor-core dot (Triton needs K >= 16).
MIN_BLOCK_K = 32
MIN_BLOCK_N = 16
# Programs in flight that the decode split-K aims for: about four per SM on a 132-SM H100/H200 (five on a
# 108-SM A100), so each SM has several independent K slices' loads outstanding. Marlin likewise spreads the K
# work of every output tile over all SMs instead of relying on N alone. To be tuned on a GPU.
DECODE_TARGET_PROGRAMS = 512
MAX_SPLIT_K = 16
# block_m below the tensor-core tile selects the matrix-vector kernel: up to this many rows per program, each
# an unrolled multiply-and-reduce on the CUDA cores.
MAX_MATVEC_ROWS = 8


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static tiling of one call: tile sizes, K split and Triton launch parameters.

    block_m >= 16 runs tensor-core dots on [block_m, bn] output tiles; block_m in (1, 2, 4, 8) runs the
    matrix-vector kernel (`matvec`), block_m rows per program.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    @property
    def matvec(self) -> bool:
        return self.block_m < 16


def _pow2_divisor(n: int, cap: int, floor: int) -> int | None:
    """Largest power of two in [floor, cap] that divides n, or None."""
    b = 1 << (max(cap, 1).bit_length() - 1)
    while b >= floor:
        if n % b == 0:
            return b
        b //= 2
    return None


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def pallas_unsupported(x: Any, w: Int4Weight) -> str | None:
    """Why the Pallas kernel cannot take `x @ w` (None when it can); the caller falls back to the XLA path.

    Takes bits 4 and 3 (the 4-bit container), group sizes that are multiples of 32 (per-channel included),
    N a multiple of 16, x float32/bfloat16/float16, a single (unstacked) weight.
    """
    if not isinstance(w, Int4Weight):
        return f"w is a {type(w).__name__}, not a quant.Int4Weight"
    if w.bits not in SUPPORTED_BITS:
        return f"bits={w.bits} (the Pallas kernel reads the 4-bit container: bits 3 and 4)"
    if w.packed.ndim != 2:
        return f"w.packed has shape {tuple(w.packed.shape)}; the kernel takes one [K/2, N] weight"
    k, n = w.shape
    if w.group_size % MIN_BLOCK_K:
        return f"group_size={w.group_size} (must be a multiple of {MIN_BLOCK_K}: the smallest K tile)"
    if n % MIN_BLOCK_N:
        return f"N={n} (must be a multiple of {MIN_BLOCK_N}: the smallest N tile)"
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    if dtype not in X_DTYPES:
        return f"x.dtype={dtype} (must be float32, bfloat16 or float16)"
    if np.shape(x)[-1:] != (k,):
        return f"x's last dimension {np.shape(x)[-1:]} is not K={k}"
    return None


def choose_config(
    m: int,
    k: int,
    n: int,
    group_size: int,
    *,
    dtype: Any = jnp.bfloat16,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> Tiling:
    """Default tiles by shape and x's dtype (any given value overrides its default after validation).

    - float32 x with M ≤ 8: the matrix-vector kernel, bm = M rounded up to a power of two. IEEE float32 dots
      run on the CUDA cores anyway, so a 16-row dot tile would multiply the FMA work by 16 / M; the matvec
      does exactly M multiply-adds per weight. bf16/f16 take it with an explicit block_m < 16 (to measure
      against the tensor-core path at decode).
    - M ≤ 16 (decode) otherwise: bm 16, bn 128, bk 128 (a 64 × 128 = 8 KiB packed slab per step), 4 warps,
      4 stages so several slabs are in flight per program; split-K doubles until about
      DECODE_TARGET_PROGRAMS programs run (N alone does not fill 132 SMs at decode), keeping ≥ 2 K tiles
      per program. The matvec kernel uses the same bn, bk, split-K, warps and stages. bf16/f16 x (the
      zero-folded kernel) takes bn 256 with 3 stages where N / 256 programs with split-K still reach the
      target (wide N, e.g. 14336 or 28672): 16.4-16.5 weights per warp-instruction at sm_80 against 15.2.
    - 16 < M ≤ 64: bm = M rounded up to a power of two, bn 128, bk 128, 4 warps, 3 stages; split-K only
      when the grid has fewer programs than about one per SM.
    - M > 64: bm 128, bn 128, bk 64 (two 32-deep dots), 8 warps, 3 stages: Triton's standard tensor-core
      GEMM tile, where dequantization is hidden behind the MMAs.
    bk never exceeds the group size (one scale row per tile) and always divides it.
    """
    if m < 1:
        raise ValueError(f"M={m} must be at least 1")
    decode = m <= 16
    if block_m is None:
        if np.dtype(dtype) == np.float32 and m <= MAX_MATVEC_ROWS:
            block_m = 1 << (m - 1).bit_length()
        elif decode:
            block_m = 16
        else:
            block_m = min(128, 1 << (m - 1).bit_length()) if m <= 64 else 128
    if isinstance(block_m, bool) or not isinstance(block_m, int) or not _is_pow2(block_m):
        raise ValueError(
            f"block_m={block_m!r} must be a power of two (<= {MAX_MATVEC_ROWS}: matvec; >= 16: dots)"
        )
    if MAX_MATVEC_ROWS < block_m < 16:
        raise ValueError(
            f"block_m={block_m} must be <= {MAX_MATVEC_ROWS} (matvec) or >= 16 (tensor-core dots)"
        )
    if block_n is None:
        # 16-bit x at decode (the zero-folded kernel): 256 columns a program, so each warp's pass decodes
        # twice the weights for the same x fragments, addresses and loop control (16.4 weights per
        # warp-instruction at sm_80 against 15.2 at 128). Before Hopper, 16-bit x at M > 16 (the folded
        # kernel on mma.sync) takes 64 columns: at 128 its
        # four column accumulators and unpacked pairs spill on sm_80 (255 registers), at 64 they take 168.
        # 256 only where the grid still reaches DECODE_TARGET_PROGRAMS with split-K (wide N); narrow N keeps
        # 128 columns and more programs.
        wide = np.dtype(dtype) != np.float32 and block_m >= 16
        fills = (n // 256) * min(MAX_SPLIT_K, k // 128 // 2) >= DECODE_TARGET_PROGRAMS
        cap = 64 if m > 16 and wide and before_hopper() else 256 if decode and wide and fills else 128
        block_n = _pow2_divisor(n, cap, MIN_BLOCK_N)
        if block_n is None:
            raise ValueError(f"N={n} has no power-of-two divisor >= {MIN_BLOCK_N} for block_n")
    if not _is_pow2(block_n) or block_n < MIN_BLOCK_N or n % block_n:
        raise ValueError(f"block_n={block_n} must be a power of two >= {MIN_BLOCK_N} dividing N={n}")
    if block_k is None:
        block_k = _pow2_divisor(group_size, 128 if m <= 64 else 64, MIN_BLOCK_K)
        if block_k is None:
            raise ValueError(f"group_size={group_size} has no power-of-two divisor >= {MIN_BLOCK_K}")
    if not _is_pow2(block_k) or block_k < MIN_BLOCK_K or group_size % block_k:
        raise ValueError(
            f"block_k={block_k} must be a power of two >= {MIN_BLOCK_K} dividing group_size={group_size}"
        )
    tiles = k // block_k
    if split_k is None:
        programs = (n // block_n) * -(-m // block_m)
        target = DECODE_TARGET_PROGRAMS if decode else 128
        split_k = 1
        while (
            programs * split_k < target
            and split_k * 2 <= MAX_SPLIT_K
            and tiles % (split_k * 2) == 0
            and tiles // (split_k * 2) >= 2
        ):
            split_k *= 2
    if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1 or tiles % split_k:
        raise ValueError(
            f"split_k={split_k!r} must be a positive int dividing the {tiles} K tiles of {block_k}"
        )
    if decode:
        # The folded kernel's 256-column tiles: 3 stages (40 KiB of shared memory, 3-4 CTAs/SM on sm_80).
        num_warps, num_stages = 4, (3 if block_n >= 256 and np.dtype(dtype) != np.float32 else 4)
    else:
        # Before Hopper a 64x128 tile's accumulator and dequantized operand need 8 warps' registers (with 4,
        # sm_80 spills); Hopper's wgmma keeps 4 warps (one warpgroup) up to 128x128.
        big = 64 * 128 if before_hopper() else 128 * 128
        num_warps, num_stages = (8 if block_m * block_n >= big else 4), 3
    return Tiling(block_m, block_n, block_k, split_k, num_warps, num_stages)


# ---------------------------------------------------------------------------------------------------------
# Tile-level pieces, usable inside any Pallas kernel body (Triton lowering or interpret mode).


def split_even_odd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [..., K] -> (x[..., 0::2], x[..., 1::2]), each [..., K/2]: the activation layout the tile dot reads.

    Plain JAX, called outside the kernel (once per activation), so the kernel never interleaves nibbles.
    """
    return x[..., 0::2], x[..., 1::2]


# Integer-to-float conversion without a conversion instruction: OR a 4-bit code into the mantissa of a
# float whose unit in the last place is 1 (2**23 in float32, 128 in bfloat16, 1024 in float16), reinterpret
# the bits, and subtract that float plus the zero point; every step is exact. GPUs convert int -> float at a
# fraction of their float add rate, and decode streams one code per 4 bits of HBM traffic, so this matters
# (Marlin's dequantization uses the same identity).
_MAGIC = {
    np.dtype(np.float32): (jnp.int32, 0x4B000000, 2.0**23),
    np.dtype(jnp.bfloat16): (jnp.int16, 0x4300, 128.0),
    np.dtype(np.float16): (jnp.int16, 0x6400, 1024.0),
}


def unpack_tile(
    packed_tile: jax.Array, zero_row: jax.Array | int, *, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """packed_tile: [bk/2, bn] uint8 (one K tile of one group) -> (lo − z, hi − z), each [bk/2, bn] dtype.

    `zero_row`: [1, bn] (or [bn]) uint8/int zero points of the tile's group, or a Python int (the symmetric
    zero `2**(bits-1)`). lo holds stored rows 0, 2, 4, ... of the tile and hi rows 1, 3, 5, ...; the values
    are small integers (|q − z| ≤ 15), exact in float16, bfloat16 and float32 (`dtype` is one of those).
    """
    dtype = np.dtype(dtype)
    if dtype not in _MAGIC:
        raise ValueError(f"dtype={dtype} must be one of float32, bfloat16, float16")
    itype, bits, base = _MAGIC[dtype]
    bn = packed_tile.shape[-1]
    if isinstance(zero_row, int):
        offset = base + zero_row  # a Python float: exact, and folded into the subtraction
    else:
        # One [1, bn] row per tile: through float32, the conversion every backend lowers; exact.
        offset = (zero_row.astype(jnp.float32).reshape(1, bn) + base).astype(dtype)
    p = packed_tile.astype(itype)

    def plane(codes):
        return jax.lax.bitcast_convert_type(codes | jnp.asarray(bits, itype), dtype) - offset

    return plane(p & jnp.asarray(0xF, itype)), plane(p >> jnp.asarray(4, itype))


def dequantize_tile(
    packed_tile: jax.Array, scale_row: jax.Array, zero_row: jax.Array | int, *, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """packed_tile: [bk/2, bn] uint8 -> the dequantized even and odd rows `(s·(lo − z), s·(hi − z))` in dtype.

    `scale_row`: [1, bn] (or [bn]) float scales of the tile's group; `zero_row` as in `unpack_tile`. The scale
    multiply runs in float32, then rounds to dtype once. Prefer `int4_tile_dot` when the tile's next use is a
    dot: it applies the scale to the product instead of to every weight (cheaper, and exact weights).
    """
    lo, hi = unpack_tile(packed_tile, zero_row, dtype=jnp.float32)
    s = scale_row.astype(jnp.float32).reshape(1, packed_tile.shape[-1])
    return (lo * s).astype(dtype), (hi * s).astype(dtype)


def dot_precision(dtype: Any) -> Any:
    """The precision policy for a tile dot on `dtype` inputs: IEEE float32 for float32 (never TF32), the
    native low-precision dot otherwise (both accumulate in float32)."""
    return jax.lax.Precision.HIGHEST if np.dtype(dtype) == np.float32 else None


def int4_tile_dot(
    x_even: jax.Array,
    x_odd: jax.Array,
    packed_tile: jax.Array,
    scale_row: jax.Array,
    zero_row: jax.Array | int,
) -> jax.Array:
    """One K tile's contribution `x_tile @ W_tile` as float32 [bm, bn], for use inside a Pallas kernel body.

    x_even, x_odd: [bm, bk/2] float32|bfloat16|float16, the tile's even and odd input channels (from
    `split_even_odd`); packed_tile: [bk/2, bn] uint8, the same K rows of the packed weight; scale_row:
    [1, bn] float and zero_row: [1, bn] uint8 (or a Python int for symmetric weights), the tile's group. The
    tile must lie inside one group. Computes `s ⊙ (x_even @ (lo − z) + x_odd @ (hi − z))` with the dots in x's
    dtype (float32: IEEE precision) and float32 accumulation. Under Triton lowering bm, bk/2 ≥ 16 and bn ≥ 16
    must be powers of two.
    """
    lo, hi = unpack_tile(packed_tile, zero_row, dtype=x_even.dtype)
    precision = dot_precision(x_even.dtype)
    dims = (((1,), (0,)), ((), ()))
    part = jax.lax.dot_general(x_even, lo, dims, precision=precision, preferred_element_type=jnp.float32)
    part = part + jax.lax.dot_general(
        x_odd, hi, dims, precision=precision, preferred_element_type=jnp.float32
    )
    return part * scale_row.astype(jnp.float32).reshape(1, packed_tile.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# The kernel.


def _kernel(
    xe_ref,
    xo_ref,
    p_ref,
    s_ref,
    *rest,
    block_k: int,
    group_size: int,
    tiles_per_split: int,
    sym_zero: int | None,
    matvec: bool,
    packed_words: bool,
    zeros_words: bool,
):
    """One output tile, over this program's share of K.

    Dot form: xe_ref, xo_ref [bm, K/2]; matvec form: [K/2, bm] (x transposed, so a row of x loads as a
    [bk/2, 1] column that broadcasts along N). p_ref [K/2, bn] uint8, s_ref (z_ref) [G, bn], o_ref [bm, bn];
    p_ref [K/2, bn/2] (z_ref [G, bn/2]) uint16 when packed_words (zeros_words): see `to_words`.
    """
    if sym_zero is None:
        z_ref, o_ref = rest
    else:
        (o_ref,) = rest
    half = block_k // 2
    split = pl.program_id(2)
    bm, bn = o_ref.shape

    def tile(t):
        kt = split * tiles_per_split + t
        rows = pl.ds(pl.multiple_of(kt * half, half), half)
        g = (kt * block_k) // group_size
        if sym_zero is not None:
            z = sym_zero
        else:
            z = z_ref[pl.ds(g, 1), :]
            z = from_words(z, jnp.uint8) if zeros_words else z
        p = p_ref[rows, :]
        p = from_words(p, jnp.uint8) if packed_words else p
        return rows, p, s_ref[pl.ds(g, 1), :], z

    if not matvec:

        def body(t, acc):
            rows, p, s, z = tile(t)
            return acc + int4_tile_dot(xe_ref[:, rows], xo_ref[:, rows], p, s, z)

        acc = jax.lax.fori_loop(0, tiles_per_split, body, jnp.zeros((bm, bn), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)
        return

    def matvec_body(t, accs):
        rows, p, s, z = tile(t)
        lo, hi = unpack_tile(p, z, dtype=jnp.float32)
        s = s.astype(jnp.float32)
        out = []
        for r, acc in enumerate(accs):  # unrolled: bm <= MAX_MATVEC_ROWS
            xe = xe_ref[rows, pl.ds(r, 1)].astype(jnp.float32)  # [bk/2, 1]
            xo = xo_ref[rows, pl.ds(r, 1)].astype(jnp.float32)
            out.append(acc + jnp.sum(xe * lo + xo * hi, axis=0, keepdims=True) * s)
        return tuple(out)

    zero = jnp.zeros((1, bn), jnp.float32)
    accs = jax.lax.fori_loop(0, tiles_per_split, matvec_body, (zero,) * bm)
    for r, acc in enumerate(accs):
        o_ref[pl.ds(r, 1), :] = acc.astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------------------
# The zero-folded kernel for bf16/f16 activations (the tensor-core form).
#
# Per group g, with B the magic base of the dtype (128 for bfloat16, 1024 for float16):
#     x_g @ (s_g ⊙ (q_g − z_g)) = s_g ⊙ (x_g @ (B + q_g)) − s_g ⊙ (B + z_g) ⊙ rowsum_g(x)
# The kernel computes the first term only: B + q is the bit pattern `code | B's exponent` (no conversion,
# no subtraction), and the rank-1 second term is one small XLA product outside the loop,
# rowsums [M, G] @ (s ⊙ (B + z)) [G, N], so the zero points never enter the kernel. The packed weight goes
# in as int32 words [K/2, N/4] (a bitcast of the canonical [K/2, N] bytes: four columns of one row pair a
# word).
#
# Unpacking (`_merged_pairs`): a tensor-core B fragment holds two K-neighbours of one column in one
# register, bf16/f16 halves at bits 0 and 16. The canonical byte puts the two codes of a column 4 bits apart,
# so no single mask reaches both; but the same byte of two words of different row pairs is 16 bits apart
# once one PRMT merges their halves. Each K tile of bk rows is read as two blocks of bk/4 word rows, w0
# (row pairs 0 .. bk/4 − 1 of the tile) and w1 (the next bk/4); t_a = prmt(w0, w1) holds bytes 0, 1 of
# both, t_b bytes 2, 3, and each of the eight nibbles' pairs (nibble j of t at bit 4j with nibble j + 4 at
# bit 16 + 4j) is one LOP3 of t >> 4j: `(t >> 4j) & 0x000F000F | B·0x10001`. That is one PRMT, three SHF and
# four LOP3 for eight weights (Marlin's unpack, which gets the same form by repacking the weight offline),
# against nine a word in the unmerged form. The fragment's K order is then (low half, high half) =
# (row 2r + p, row bk/2 + 2r + p) for parity p: the activation is permuted to that order once outside the
# kernel (`_merge_x`, a transpose of the small x), so each column and parity is a dot of K = bk/2. The four
# bytes of a word are four columns (c, c+4, ... of the tile): four accumulators of bn/4 columns each,
# stored with stride 4. On NVIDIA GPUs the PRMT, LOP3 and the scale's FFMA are written as PTX (ptxas would
# not fuse the multiply-add Triton emits); elsewhere the same bit operations in jnp.
#
# Scales: 16-bit scales go in as int32 words [G, N/2] (a bitcast) so that the eight scales a thread applies
# per group come as four 32-bit loads instead of eight 16-bit ones; the halves are taken apart in registers.
_FOLD_BASE = {np.dtype(jnp.bfloat16): (0x4300, 128.0), np.dtype(np.float16): (0x6400, 1024.0)}
_PRMT_SELECT = (0x5410, 0x7632)  # t_a: bytes 0, 1 of w0 then of w1; t_b: bytes 2, 3


def _asm(asm: str, args: list[jax.Array], constraints: str) -> jax.Array:
    (r,) = pltriton.elementwise_inline_asm(
        asm,
        args=args,
        constraints=constraints,
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)],
    )
    return r


def _prmt_jnp(a: jax.Array, b: jax.Array, sel: int) -> jax.Array:
    """PTX `prmt.b32` (default mode) in plain bit operations: byte i of the result is byte (sel >> 4i) & 7
    of the eight bytes a (0-3), b (4-7)."""
    out = jnp.zeros_like(a)
    for i in range(4):
        src = (sel >> (4 * i)) & 7
        byte = jax.lax.shift_right_logical(a if src < 4 else b, jnp.int32(8 * (src % 4))) & 0xFF
        out = out | (byte << (8 * i))
    return out


def _merged_pairs(w0: jax.Array, w1: jax.Array, magic: int, *, ptx: bool) -> list[list[jax.Array]]:
    """w0, w1 [r, w] int32 (two blocks of word rows) -> pairs[c][p] [r, w] int32, c the byte (column) of the
    word, p the nibble (row parity): low half `magic | nibble p of byte c of w0`, high half the same of w1."""
    out: list[list[Any]] = [[None, None] for _ in range(4)]
    both = hex(magic | magic << 16)
    for h, sel in enumerate(_PRMT_SELECT):
        t = _asm(f"prmt.b32 $0, $1, $2, {hex(sel)};", [w0, w1], "=r,r,r") if ptx else _prmt_jnp(w0, w1, sel)
        for j in range(4):
            v = t if j == 0 else jax.lax.shift_right_logical(t, jnp.int32(4 * j))
            if ptx:
                r = _asm(f"lop3.b32 $0, $1, 0x000F000F, {both}, 0xea;", [v], "=r,r")  # (a & b) | c
            else:
                r = (v & 0x000F000F) | (magic | magic << 16)
            out[2 * h + j // 2][j % 2] = r
    return out


def _merge_x(x: jax.Array, block_k: int) -> jax.Array:
    """x [M, K] -> x in the folded kernel's K order: within each tile of block_k rows (h = block_k / 2),
    position p·h + 2r + s holds row s·h + 2r + p (r < h/2; parity p and half s in {0, 1})."""
    m, k = x.shape
    h = block_k // 2
    return x.reshape(m, k // block_k, 2, h // 2, 2).transpose(0, 1, 4, 3, 2).reshape(m, k)


def _pair_tile(pairs: jax.Array, dtype: Any) -> jax.Array:
    """pairs [r, w] int32 (two 16-bit patterns each) -> [2r, w] dtype, row 2i from the low half and 2i + 1
    from the high half (Triton keeps these in the registers they were computed in)."""
    lo = jax.lax.bitcast_convert_type(pairs.astype(jnp.int16), dtype)
    hi = jax.lax.bitcast_convert_type(
        jax.lax.shift_right_logical(pairs, jnp.int32(16)).astype(jnp.int16), dtype
    )
    r, w = pairs.shape
    return jnp.stack([lo, hi], axis=-1).transpose(0, 2, 1).reshape(2 * r, w)


def _fold_kernel(x_ref, w_ref, s_ref, o_ref, *, block_m, block_n, block_k, group_size, tiles_per_split, m,
                 scale_dtype, ptx):  # fmt: skip
    """One [block_m, block_n] output tile of Σ_g s_g ⊙ (x_g @ (B + q_g)) over this program's share of K.

    x_ref [Mp, K] (in `_merge_x` order), w_ref [K/2, N/4] int32 words, s_ref [G, N] (16-bit scales:
    [G, N/2] int32 words, `scale_dtype` their dtype), o_ref [M, N] float32 (or [split_k, M, N]): rows past M
    (the padding of x to block_m) are never stored."""
    i, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    half, quarter = block_k // 2, block_n // 4
    dtype = x_ref.dtype
    magic = _FOLD_BASE[np.dtype(dtype)][0]
    xrows = pl.ds(pl.multiple_of(i * block_m, block_m), block_m)
    wcols = pl.ds(pl.multiple_of(j * quarter, quarter), quarter)
    col0 = j * block_n
    words_scales = s_ref.dtype == jnp.int32

    def scales(g):
        """The four [1, bn/4] float32 scale rows of group g: columns c, c+4, ... of the tile."""
        if not words_scales:
            return [
                s_ref[pl.ds(g, 1), pl.ds(col0 + c, quarter, stride=4)].astype(jnp.float32) for c in range(4)
            ]
        out = []
        for e in (0, 1):  # word e of a column quad holds columns 2e (low half) and 2e + 1 (high half)
            v = s_ref[pl.ds(g, 1), pl.ds(j * (block_n // 2) + e, quarter, stride=2)]
            for h in (0, 1):
                bits = (v if h == 0 else jax.lax.shift_right_logical(v, jnp.int32(16))) & 0xFFFF
                out.append(
                    jax.lax.bitcast_convert_type(bits.astype(jnp.int16), scale_dtype).astype(jnp.float32)
                )
        return out

    def body(t, accs):
        kt = split * tiles_per_split + t
        g = (kt * block_k) // group_size
        q2 = half // 2
        w0 = w_ref[pl.ds(pl.multiple_of(kt * half, half), q2), wcols]
        w1 = w_ref[pl.ds(pl.multiple_of(kt * half + q2, q2), q2), wcols]
        pairs = _merged_pairs(w0, w1, magic, ptx=ptx)
        xs = [x_ref[xrows, pl.ds(pl.multiple_of(kt * block_k + p * half, half), half)] for p in (0, 1)]
        out = []
        for acc, pc, s in zip(accs, pairs, scales(g), strict=True):
            d = sum(
                jnp.dot(xp, _pair_tile(pp, dtype), preferred_element_type=jnp.float32)
                for xp, pp in zip(xs, pc, strict=True)
            )
            if ptx:  # one FFMA an accumulator
                out.append(
                    _asm("fma.rn.f32 $0, $1, $2, $3;", [jnp.broadcast_to(s, d.shape), d, acc], "=f,f,f,f")
                )
            else:
                out.append(acc + s * d)
        return tuple(out)

    zero = jnp.zeros((block_m, quarter), jnp.float32)
    accs = jax.lax.fori_loop(0, tiles_per_split, body, (zero,) * 4)
    rows = i * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    cols = col0 + 4 * jax.lax.broadcasted_iota(jnp.int32, (1, quarter), 1)
    lead = () if o_ref.ndim == 2 else (split,)
    for c, acc in enumerate(accs):
        pltriton.store(o_ref.at[(*lead, rows, cols + c)], acc, mask=jnp.broadcast_to(rows < m, acc.shape))


def folds(dtype: Any, cfg: Tiling) -> bool:
    """Whether a call runs the zero-folded kernel: bf16/f16 activations on the tensor-core form."""
    return np.dtype(dtype) in _FOLD_BASE and not cfg.matvec


def _fold_call(x, words, scales, *, cfg: Tiling, group_size: int, m: int, scale_dtype: Any, interpret: bool,
               ptx: bool):  # fmt: skip
    mp, k = x.shape
    n = words.shape[1] * 4
    bm, bn, bk, split = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    shape = (m, n) if split == 1 else (split, m, n)
    kernel = functools.partial(
        _fold_kernel, block_m=bm, block_n=bn, block_k=bk, group_size=group_size,
        tiles_per_split=k // bk // split, m=m, scale_dtype=scale_dtype, ptx=ptx,
    )  # fmt: skip

    def whole(a):
        return pl.BlockSpec(a.shape, lambda *_: (0,) * len(a.shape))

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
        grid=(mp // bm, n // bn, split),
        in_specs=[whole(x), whole(words), whole(scales)],
        out_specs=pl.BlockSpec(shape, lambda *_: (0,) * len(shape)),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="int4_matmul_w4a16_folded",
    )(x, words, scales)


def _fold_run(x, packed, scales, *, spec: _Spec, m: int, interpret: bool, ptx: bool) -> jax.Array:
    half, n = packed.shape
    words = jax.lax.bitcast_convert_type(packed.reshape(half, n // 4, 4), jnp.int32)  # XLA: a bitcast
    scale_dtype = scales.dtype
    if scale_dtype.itemsize == 2:  # XLA: a bitcast
        scales = jax.lax.bitcast_convert_type(scales.reshape(scales.shape[0], n // 2, 2), jnp.int32)
    return _fold_call(x, words, scales, cfg=spec.cfg, group_size=spec.group_size, m=m,
                      scale_dtype=scale_dtype, interpret=interpret, ptx=ptx)  # fmt: skip


def _fold_out_shape(x, packed, scales, *, spec, m):
    n = packed.shape[1]
    split = spec.cfg.split_k
    return jax.ShapeDtypeStruct((m, n) if split == 1 else (split, m, n), jnp.float32)


_int4_folded = per_platform_kernel(
    "tokenlab_int4_matmul_folded",
    {
        "cpu": functools.partial(_fold_run, interpret=True, ptx=False),
        "cuda": functools.partial(_fold_run, interpret=False, ptx=True),
        "rocm": functools.partial(_fold_run, interpret=False, ptx=False),
        "tpu": functools.partial(_fold_run, interpret=True, ptx=False),
    },
    kernel="the Pallas Triton INT4 matmul kernel (zero-folded)",
    out_shape=_fold_out_shape,
)


def _folded_forward(x, packed, scales, zeros, *, group_size: int, sym_zero: int, cfg: Tiling, interpret):
    """x: [M, K] bf16/f16 -> [M, N] in x's dtype: the folded kernel's Σ_g s_g ⊙ (x_g @ (B + q_g)) minus the
    rank-1 terms rowsum_g(x) ⊗ s_g ⊙ (B + z_g), in float32."""
    m, k = x.shape
    n = packed.shape[1]
    g = k // group_size
    base = _FOLD_BASE[np.dtype(x.dtype)][1]
    mp = -(-m // cfg.block_m) * cfg.block_m
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    spec = _Spec(cfg, group_size, None, k, n, mp, np.dtype(x.dtype))
    xp = _merge_x(xp, cfg.block_k)  # the kernel's K order (a transpose of the small activation)
    if interpret is None:
        out = _int4_folded(xp, packed, scales, spec=spec, m=m)
    else:
        out = _fold_run(xp, packed, scales, spec=spec, m=m, interpret=interpret, ptx=False)
    if cfg.split_k > 1:
        out = out.sum(axis=0)
    rowsums = x.astype(jnp.float32).reshape(m, g, group_size).sum(axis=-1)  # [M, G]
    z = jnp.float32(sym_zero) if zeros is None else zeros.astype(jnp.float32)
    zs = scales.astype(jnp.float32) * (z + base)  # [G, N]
    corr = jnp.dot(rowsums, zs, precision=jax.lax.Precision.HIGHEST)
    return (out - corr).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one pallas_call: the tiling, the group size, the symmetric zero (None when
    zero points are passed), K, N, the padded rows Mp and x's dtype."""

    cfg: Tiling
    group_size: int
    sym_zero: int | None
    k: int
    n: int
    mp: int
    dtype: np.dtype

    @property
    def out_shape(self) -> jax.ShapeDtypeStruct:
        if self.cfg.split_k == 1:
            return jax.ShapeDtypeStruct((self.mp, self.n), self.dtype)
        return jax.ShapeDtypeStruct((self.cfg.split_k, self.mp, self.n), jnp.float32)


def _pallas_kernel(*args: jax.Array, spec: _Spec, interpret: bool, words: bool | None = None) -> jax.Array:
    """(xe, xo, packed, scales[, zeros]) -> [Mp, N] in x's dtype, or float32 partials [split_k, Mp, N].

    The packed weight and the zero points go in as 16-bit words where their size needs it (`needs_words`,
    counted through vmap, since this runs inside the primitive's lowering); words=True/False forces the
    choice (tests).
    """
    cfg, k, n = spec.cfg, spec.k, spec.n
    bm, bn, bk, split = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
    g = k // spec.group_size
    args = list(args)
    packed_words = needs_words(args[2]) if words is None else bool(words)
    zeros_words = spec.sym_zero is None and (needs_words(args[4]) if words is None else bool(words))
    if packed_words:
        args[2] = to_words(args[2])
    if zeros_words:
        args[4] = to_words(args[4])
    pw, zw = (2 if packed_words else 1), (2 if zeros_words else 1)
    # M blocks vary fastest in launch order: the programs that share one weight tile run together, so a
    # weight byte comes from HBM once and x (the smaller operand up to M ~ K) is re-read from L2.
    grid = (spec.mp // bm, n // bn, split)
    x_spec = (
        pl.BlockSpec((k // 2, bm), lambda i, j, s: (0, i))
        if cfg.matvec
        else pl.BlockSpec((bm, k // 2), lambda i, j, s: (i, 0))
    )
    w_specs = [
        pl.BlockSpec((k // 2, bn // pw), lambda i, j, s: (0, j)),
        pl.BlockSpec((g, bn), lambda i, j, s: (0, j)),
    ]
    if spec.sym_zero is None:
        w_specs.append(pl.BlockSpec((g, bn // zw), lambda i, j, s: (0, j)))
    if split == 1:
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    kernel = functools.partial(
        _kernel,
        block_k=bk,
        group_size=spec.group_size,
        tiles_per_split=k // bk // split,
        sym_zero=spec.sym_zero,
        matvec=cfg.matvec,
        packed_words=packed_words,
        zeros_words=zeros_words,
    )
    return pl.pallas_call(
        kernel,
        out_shape=spec.out_shape,
        grid=grid,
        in_specs=[x_spec, x_spec, *w_specs],
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="int4_matmul_w4a16",
    )(*args)


# The kernel as one primitive whose lowering is chosen per platform (see `kernels.lowering`): the compiled
# Triton kernel on cuda and rocm, interpret mode (plain HLO) on cpu and tpu. Unlike a `platform_dependent`
# around two pallas_calls, this also lowers in a multi-platform module (`jax.export` for ("cpu", "cuda",
# "rocm", "tpu")). Under vmap the primitive stays one primitive: Pallas batches its call with a grid axis.
_int4_pallas = per_platform_kernel(
    "tokenlab_int4_matmul_pallas",
    {
        "cpu": functools.partial(_pallas_kernel, interpret=True),
        "cuda": functools.partial(_pallas_kernel, interpret=False),
        "rocm": functools.partial(_pallas_kernel, interpret=False),
        "tpu": functools.partial(_pallas_kernel, interpret=True),
    },
    kernel="the Pallas Triton INT4 matmul kernel",
    out_shape=lambda *args, spec: spec.out_shape,
)


def _forward(
    x, packed, scales, zeros, *, group_size: int, sym_zero: int, cfg: Tiling, interpret: bool | None
):
    """x: [M, K] -> [M, N] in x's dtype (no custom VJP)."""
    m, k = x.shape
    n = packed.shape[1]
    mp = -(-m // cfg.block_m) * cfg.block_m
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    xe, xo = split_even_odd(x)
    if cfg.matvec:
        xe, xo = xe.T, xo.T  # [K/2, Mp]: tiny at these M
    args = [xe, xo, packed, scales] + ([] if zeros is None else [zeros])
    spec = _Spec(cfg, group_size, sym_zero if zeros is None else None, k, n, mp, np.dtype(x.dtype))
    if interpret is None:
        out = _int4_pallas(*args, spec=spec)
    else:
        out = _pallas_kernel(*args, spec=spec, interpret=interpret)
    if cfg.split_k > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out[:m]


def _any_forward(x, packed, scales, zeros, *, group_size, sym_zero, cfg, interpret):
    fwd = _folded_forward if folds(x.dtype, cfg) else _forward
    return fwd(
        x, packed, scales, zeros, group_size=group_size, sym_zero=sym_zero, cfg=cfg, interpret=interpret
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _matmul(x, packed, scales, zeros, group_size, sym_zero, cfg, interpret):
    return _any_forward(
        x, packed, scales, zeros, group_size=group_size, sym_zero=sym_zero, cfg=cfg, interpret=interpret
    )


def _matmul_fwd(x, packed, scales, zeros, group_size, sym_zero, cfg, interpret):
    y = _any_forward(
        x, packed, scales, zeros, group_size=group_size, sym_zero=sym_zero, cfg=cfg, interpret=interpret
    )
    return y, (x, packed, scales, zeros)


@highest_precision  # the XLA transpose's float32 dots: IEEE on every backend, never TF32
def _matmul_bwd(group_size, sym_zero, cfg, interpret, res, dy):
    x, packed, scales, zeros = res
    zp = jnp.full(scales.shape, sym_zero, jnp.uint8) if zeros is None else zeros
    dy32 = dy.astype(jnp.float32)
    dx = scan_matmul_transposed(dy32, packed, scales, zp, group_size=group_size)
    ds = scan_scale_grad(x.astype(jnp.float32), dy32, packed, zp, group_size=group_size)
    # y, hence dy, has x's dtype; the codes and zero points are integers (float0).
    return dx.astype(dy.dtype), *zero_cotangent((packed,)), ds.astype(scales.dtype), *zero_cotangent((zeros,))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def int4_matmul_pallas(
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
    split_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """x̃: [M, K] float32|bfloat16|float16 @ the packed weight -> [M, N] in x's dtype (float32 accumulation).

    x̃ is already permuted (act-order) and divided by the activation scales (the public `int4_matmul` does
    it). packed: [K/2, N] uint8 (stored row order); scales: [G, N] float; zeros: [G, N] uint8, or None for a
    symmetric weight whose zero point is `sym_zero` (= 2**(bits-1)); G = K / group_size (per-channel:
    group_size = K). Tiles default by shape (`choose_config`); `interpret=None` picks interpret mode on cpu
    and the compiled Triton kernel on cuda/rocm at lowering. Differentiable with respect to x and the scales
    (custom VJP, XLA backward); jittable.
    """
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {getattr(x, 'shape', None)}")
    if np.dtype(x.dtype) not in X_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} must be one of float32, bfloat16, float16")
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits={bits} is not supported by the Pallas kernel; expected one of {SUPPORTED_BITS}"
        )
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
    g = k // group_size
    if tuple(scales.shape) != (g, n):
        raise ValueError(f"scales must be [G, N] = [{g}, {n}], got {tuple(scales.shape)}")
    if zeros is not None and (tuple(zeros.shape) != (g, n) or zeros.dtype != np.uint8):
        raise ValueError(f"zeros must be [G, N] = [{g}, {n}] uint8, got {tuple(zeros.shape)} {zeros.dtype}")
    if group_size % MIN_BLOCK_K:
        raise ValueError(f"group_size={group_size} must be a multiple of {MIN_BLOCK_K} for the Pallas kernel")
    if n % MIN_BLOCK_N:
        raise ValueError(f"N={n} must be a multiple of {MIN_BLOCK_N} for the Pallas kernel")
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be None, True or False")
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    cfg = choose_config(
        m,
        k,
        n,
        group_size,
        dtype=x.dtype,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        split_k=split_k,
    )
    return _matmul(x, packed, scales, zeros, group_size, int(sym_zero), cfg, interpret)


def int4_weight_matmul_pallas(x: jax.Array, w: Int4Weight, **tunables: Any) -> jax.Array:
    """x: [..., K] in input-channel order @ an Int4Weight -> [..., N] in x's dtype, through the kernel.

    Applies the activation scales and the act-order permutation to x (as the public entry does), then calls
    `int4_matmul_pallas`; `tunables` are its keyword tunables (block_m, block_n, block_k, split_k, interpret).
    Jitted (tunables static), so an eager call is one dispatch.
    """
    reason = pallas_unsupported(x, w)
    if reason is not None:
        raise ValueError(f"the Pallas INT4 kernel does not support {reason}")
    unknown = sorted(set(tunables) - {"block_m", "block_n", "block_k", "split_k", "interpret"})
    if unknown:
        raise ValueError(
            f"unknown tunables {unknown}; expected block_m, block_n, block_k, split_k, interpret"
        )
    return _weight_matmul(x, w, **tunables)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "split_k", "interpret"))
def _weight_matmul(x: jax.Array, w: Int4Weight, **tunables: Any) -> jax.Array:
    n = w.shape[1]
    xf = prepare_x(x, w).astype(x.dtype)  # stored row order, AWQ scales divided out (exact round trip)
    y = int4_matmul_pallas(
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
    """Tiles of the Pallas Triton INT4 kernel; a field left None takes `choose_config`'s choice by shape."""

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    split_k: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "block_m", "block_n", "block_k", "split_k")


def shape_class(x: Any, w: Any, **_: Any) -> str:
    """The family of shapes sharing a best configuration: "decode" (M <= 16 rows: the weight stream),
    "mid" (M <= 64) or "prefill" (larger M: tensor-core GEMM tiles), with "-f32" for float32 activations
    (IEEE float32 dots on the CUDA cores: other tiles). The key `kernels.tuning` stores tuned configs by."""
    m = int(np.prod(np.shape(x)[:-1], dtype=np.int64))
    kind = "decode" if m <= 16 else "mid" if m <= 64 else "prefill"
    return kind + ("-f32" if np.dtype(getattr(x, "dtype", np.float32)) == np.float32 else "")


def tune_space(x: Any, w: Any, **_: Any) -> list[Config]:
    """The configurations `benchmarks.accel --tune` times for this call (at most 12), the default first.

    decode: block_n 128/64/256/32 × split_k by default, 2x or 4x the default's (more programs in flight);
    mid/prefill: block_n 128/64/32 × block_k 64/128 (bk capped by the group). Every one divides N, K and the
    group as `choose_config` requires; invalid ones for this weight are dropped."""
    m = int(np.prod(np.shape(x)[:-1], dtype=np.int64))
    k, n = w.shape
    gs = w.group_size
    space = [Config()]
    if m <= 16:
        base = choose_config(m, k, n, gs, dtype=getattr(x, "dtype", jnp.bfloat16))
        for bn in (128, 64, 256, 32):
            for mult in (1, 2, 4):
                space.append(Config(block_n=bn, split_k=base.split_k * mult))
    else:
        for bn in (128, 64, 32):
            for bk in (64, 128):
                space.append(Config(block_n=bn, block_k=bk))
    valid = []
    for cfg in dict.fromkeys(space):
        try:
            choose_config(m, k, n, gs, dtype=getattr(x, "dtype", jnp.bfloat16), **dataclasses.asdict(cfg))
        except ValueError:
            continue
        valid.append(cfg)
    return valid[:12]


def default_config(x: Any, w: Any) -> Config:
    """The configuration a call without one runs: the tuned entry for (shape class, the GPU being lowered
    for) from `kernels.tuning` when there is one, else `Config()` (every field by `choose_config`)."""
    target = target_gpu()
    found = tuning.lookup(
        "int4_matmul", "pallas_triton", shape_class(x, w), None if target is None else target[0]
    )
    return Config() if found is None else Config(**found)


def _pallas(x: jax.Array, w: Int4Weight, *, config: Config) -> jax.Array:
    if config == Config():
        config = default_config(x, w)
    return _weight_matmul(x, w, **dataclasses.asdict(config))


IMPLEMENTATION = registry.Implementation(
    "pallas_triton", _pallas, platforms=("cpu", "cuda", "rocm"), supports=pallas_unsupported, config=Config
)
