"""W4A16 INT4 matmul as a Pallas Mosaic GPU kernel for Hopper (sm_90a): wgmma on the prepared weight layout.

What it computes
----------------
With stored rows r, group g(r) = r // group_size, codes q, scales s and zero points z (quant/format.py), and
x̃ = (x / a)[:, perm] (the AWQ division and act-order permutation, done once on the small activation):

    y[m, n] = Σ_g s[g, n] · ( Σ_{r∈g} x̃[m, r] (q[r, n] + d)  −  (z[g, n] + d) · Σ_{r∈g} x̃[m, r] )

with d = 128 (bf16 and float16 x) or d = −8 (float32 x). The weight is read in the prepared layout
(`kernels.int4_matmul.prepared`: `codes [K/64, Np, 16] uint16`, four codes of one output feature per word),
computed once per weight and cached, so the inner loop holds no zero point and no per-weight scale: the zero
point and the bias d are the rank-1 term (z + d) ⊗ Σ_r x̃ from the activation's per-segment sums, and both it
and the group scale are applied to the small [bn, cols] product of each segment.

Swap-AB wgmma
-------------
The kernel computes yᵀ = Wᵀ x̃ᵀ: the weight is wgmma's left operand in registers and x̃ᵀ [bk, cols] the right
operand in shared memory, so N fills the 64-row side of the tensor core and the rows of x only its narrow side
(16 columns at M ≤ 16). Each 64-row block of a step's codes is loaded once ([bn, 16] uint16 in the wgmma
layout, `ldmatrix`) and unpacked in 32-bit registers into the [bn, 64] bf16 operand 128 + q: one SHF and one
LOP3 per two weights (`_unpack`, inline Mosaic GPU: a uint16 shift in Pallas compiles to an unpack, two
shifts and a repack of each register; `_codes_to_bf16` is the same map written in jnp, which the interpreter
runs). float32 x subtracts 136 (one packed bf16 op per two weights) and feeds q − 8, keeping the sums small.
One kernel serves decode (M ≤ 16: the weight streams through a TMA pipeline once, K steps of 512 rows when K
allows) and larger M (wgmma with up to 128 columns, a grid axis over tiles of M). Per grid step: TMA brings
the codes, x̃ᵀ, the segments' sums of x̃ and one [rows, 2, bn] box of the prepared planes (the scales and
the zero-point terms z + 128 in the scales' dtype, built once by `prepare`: no XLA kernel runs over the
weight per call; never per-element loads); each segment of L = min(bk, group) rows is one wgmma group into a
fresh accumulator, folded into the running total as s ⊙ (P − (z + d) ⊗ Σx̃). Each output element is
written once by one CTA (no split-K, no atomics): deterministic. The output is [Np, Mp] in x's dtype for bf16
activations (no float32 rows for padding).

A decode call launches 4 kernels: this one, and three small XLA ones over x and the output (x̃ᵀ, its
segment sums, the output slice).

Precision: bf16 activations go in as they are. float16 activations are split into two bf16 parts and float32
into three (x = hi + mid + lo, exact to float32's 24 bits); the parts sit side by side along wgmma's N (free
at decode: the tensor core is idle), the codes are exact in bf16, accumulation is float32, and the parts'
results are summed in float32 after the kernel.

Lowering
--------
`kernels.lowering.per_platform_kernel`: on cuda the compiled Mosaic GPU kernel (`plgpu.kernel`, lane
semantics: explicit wgmma layouts, which `plgpu.inline_mgpu` needs), on cpu the same kernel in Mosaic GPU's
interpreter (`plgpu.InterpretGPUParams`, inside a host callback: the interpreter's ordered IO effect cannot
sit in a primitive's lowering), which the shared suite runs; the interpreter cannot run `inline_mgpu`, so
there the unpack is `_codes_to_bf16` (tests pin `_unpack`'s register arithmetic to it). wgmma and TMA are
sm_90a: `pallas_unsupported` declines any other GPU target (A100 falls to the Triton kernel under
impl="auto"; Blackwell's tcgen05 is not written yet). `jax.vmap` over stacked weights maps the kernel
sequentially.

Gradients: custom VJP; the backward is the XLA path's (`scan_matmul_transposed`, `scan_scale_grad`) on the
canonical codes rebuilt from the prepared ones; x, the scales and the AWQ activation scales get gradients.

Axis legend: M rows of x (Mp padded to whole tiles), K input features (stored order), N output features (Np
padded to 64), G groups, bn/bk/bm the tiles along N, K and M, P the bf16 parts of x (1, 2 or 3), cols = P·bm
the wgmma N, L the segment (rows per wgmma group, inside one group).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import registry, tuning
from kernels.int4_matmul.prepared import (
    CODE_OFFSET,
    K_BLOCK,
    PLANE_BIAS,
    SUPPORTED_BITS,
    WORDS,
    PreparedInt4Weight,
    cached_prepare,
    padded_n,
    unprepare_codes,
)
from kernels.int4_matmul.xla import prepare_x, scan_matmul_transposed, scan_scale_grad, zero_cotangent
from kernels.lowering import per_platform_kernel, target_gpu
from kernels.precision import highest_precision
from quant.format import Int4Weight, symmetric_zero

OP, NAME = "int4_matmul", "pallas_mosaic_gpu"
X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
PARTS = {np.dtype(jnp.bfloat16): 1, np.dtype(np.float16): 2, np.dtype(np.float32): 3}
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
WGMMA_K = 16  # bf16 wgmma K: a segment is a multiple of it
BLOCK_KS = (512, 256, 128, 64)
MAX_COLS = 128  # wgmma N per CTA (accumulator + running total in registers)
DECODE_M = 16
# block_n·block_k: the step's words (bn·bk/1024 registers a thread) and the converted pieces stay in registers
# beside the accumulators (P·block_m·block_n/128 a thread, twice). The default keeps to TILE_BY_COLS for the
# wgmma N (sm_90a: 222 registers at 16 columns and 128x512; at 32 columns 128x512 took 255, at 128 columns
# 64x256 took 255).
MAX_TILE = 65536
TILE_BY_COLS = ((16, 65536), (32, 32768), (64, 16384), (MAX_COLS, 8192))
SMEM_BUDGET = 160 * 1024  # the pipeline's stages (of 227 KiB on Hopper), for the default number of stages
BF16_BIAS = 128  # 0x4300 | q is the bf16 128 + q
HOPPER = 90


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles of the Mosaic GPU INT4 kernel; a field left None takes the default for the shape (`choose`):
    block_n output features per CTA (64, 128 or 256: one, two or four wgmma row blocks), block_k stored
    rows per pipeline step (64-512; block_n·block_k ≤ 65536 so the step's codes fit the registers), block_m
    rows of x per CTA (P·block_m a multiple of 16 and ≤ 128), max_concurrent_steps TMA stages in flight
    (2-6)."""

    block_n: int | None = None
    block_k: int | None = None
    block_m: int | None = None
    max_concurrent_steps: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "block_n", "block_k", "block_m", "max_concurrent_steps")


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_n: int
    block_k: int
    block_m: int
    segment: int
    steps: int


def _m(x: Any) -> int:
    return int(np.prod(np.shape(x)[:-1], dtype=np.int64))


def _parts(x: Any) -> int:
    return PARTS[np.dtype(getattr(x, "dtype", np.float32))]


def shape_class(x: Any, w: Any) -> str:
    """The family of shapes sharing a best configuration: "decode" (M ≤ 16), "small" (M ≤ 64), "prefill"."""
    m = _m(x)
    return "decode" if m <= DECODE_M else ("small" if m <= 64 else "prefill")


def _m_granule(parts: int) -> int:
    """Rows of x per tile come in multiples of this: wgmma's bf16 B operand rows are swizzled in 32-byte
    units at least, so P·block_m is a multiple of 16."""
    return 16 // int(np.gcd(16, parts))


def _legal_block_k(bk: int, k: int, group: int) -> bool:
    return k % bk == 0 and ((bk % group == 0 and group % WGMMA_K == 0) or group % bk == 0)


def choose(x: Any, w: Any, config: Config | None = None) -> Tiling:
    """The tiling for this call: the given fields, else the tuned entry for (shape class, the GPU being
    lowered for) from `kernels.tuning`, else the built-in default. ValueError for an illegal given value."""
    config = config or Config()
    k, n = w.shape
    m, parts = _m(x), _parts(x)
    np_ = padded_n(n)
    target = target_gpu()
    tuned = tuning.lookup(OP, NAME, shape_class(x, w), target[0] if target else None) or {}
    fields = {
        f: getattr(config, f) if getattr(config, f) is not None else tuned.get(f)
        for f in ("block_n", "block_k", "block_m", "max_concurrent_steps")
    }
    gran = _m_granule(parts)
    bm = fields["block_m"]
    if bm is None:
        bm = min(-(-m // gran) * gran, MAX_COLS // parts // gran * gran)
    if bm % gran or parts * bm > MAX_COLS:
        raise ValueError(f"block_m={bm} must be a multiple of {gran} with {parts}·block_m ≤ {MAX_COLS}")
    narrow = parts * bm <= 32
    limit = next(t for c, t in TILE_BY_COLS if parts * bm <= c)
    bn = fields["block_n"]
    if bn is None:
        # Decode: 128 rows and K steps of 512 (sm_90a, 4096x14336 at M = 1 and 16, f16 planes: 976 SASS
        # instructions per pass, 16.8 weights per warp-instruction; steps of 256: 520, 15.8; 256x256: 17.9 at
        # half the CTAs, which would leave most SMs idle at these N). 64 rows would fill the 132 SMs of an
        # H100 where 128 leave a partial wave (112 CTAs at N = 14336), but cost issue slots: 64x512 14.3
        # (122 registers), 64x1024 15.9 (186 registers, 2 stages), below the 16 decode needs.
        bn = 128 if narrow and np_ % 128 == 0 else 64
    if bn not in (64, 128, 256) or np_ % bn:
        raise ValueError(f"block_n={bn} must be 64, 128 or 256 and divide N padded to 64 ({np_})")
    bk = fields["block_k"]
    if bk is None:
        bk = next((b for b in BLOCK_KS if b * bn <= limit and _legal_block_k(b, k, w.group_size)), None)
        if bk is None:
            bk = next(b for b in BLOCK_KS if _legal_block_k(b, k, w.group_size))
    if bk not in BLOCK_KS or not _legal_block_k(bk, k, w.group_size) or bk * bn > MAX_TILE:
        raise ValueError(
            f"block_k={bk} must be one of {BLOCK_KS}, divide K={k}, be a multiple or divisor of "
            f"group_size={w.group_size}, and block_n·block_k ≤ {MAX_TILE}"
        )
    steps = fields["max_concurrent_steps"]
    if steps is None:
        stage = bn * bk // 2 + bk * parts * bm * 2  # codes and x of one step, bytes
        steps = max(2, min(4, SMEM_BUDGET // stage))
    if not 2 <= steps <= 6:
        raise ValueError(f"max_concurrent_steps={steps} must be between 2 and 6")
    return Tiling(bn, bk, bm, min(bk, w.group_size), steps)


def tune_space(x: Any, w: Any) -> list[Config]:
    """The configurations `benchmarks.accel --tune` times for this call (legal ones only, ≤ 12): column tiles
    64/128, K steps 128/256/512, 3 or 4 stages, at the default block_m."""
    out = []
    for bn in (64, 128):
        for bk in (128, 256, 512):
            for steps in (3, 4):
                cfg = Config(block_n=bn, block_k=bk, max_concurrent_steps=steps)
                try:
                    choose(x, w, cfg)
                except ValueError:
                    continue
                out.append(cfg)
    return out


def _target_reason() -> str | None:
    target = target_gpu()
    if target is not None and target[1] != HOPPER:
        return (
            f"the GPU being lowered for ({target[0]}, compute capability {target[1] / 10:.1f}): the kernel "
            "is wgmma + TMA, Hopper (sm_90a) only"
        )
    return None


def pallas_unsupported(x: Any, w: Any) -> str | None:
    """Why the Mosaic GPU kernel cannot take `x @ w` (None when it can): bits 3 and 4 only, a single weight,
    a group size that is a multiple of 16 and divides or is divided by a K step of 64-256 rows dividing K,
    x float32/bfloat16/float16, float scales, and a Hopper target (or the CPU interpreter)."""
    if not isinstance(w, Int4Weight | PreparedInt4Weight):
        return f"w is a {type(w).__name__}, not a quant.Int4Weight"
    if w.bits not in SUPPORTED_BITS:
        return f"bits={w.bits} (the Mosaic GPU kernel reads the 4-bit container: bits 3 and 4)"
    codes, ndim = (w.packed, 2) if isinstance(w, Int4Weight) else (w.codes, 3)
    if codes.ndim != ndim:
        return f"a weight of shape {tuple(codes.shape)}; the kernel takes one weight at a time"
    k, _ = w.shape
    if not any(_legal_block_k(b, k, w.group_size) for b in BLOCK_KS):
        return (
            f"group_size={w.group_size} with K={k} (needs a K step of {BLOCK_KS} rows dividing K that the "
            f"group size divides, as a multiple of {WGMMA_K}, or that divides the group size)"
        )
    if np.dtype(w.scales.dtype) not in SCALE_DTYPES:
        return f"scales.dtype={w.scales.dtype} (float32, bfloat16 or float16)"
    if isinstance(w, PreparedInt4Weight) and np.dtype(w.planes.dtype) not in SCALE_DTYPES:
        return f"planes.dtype={w.planes.dtype} (float32, bfloat16 or float16)"
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    if dtype not in X_DTYPES:
        return f"x.dtype={dtype} (must be float32, bfloat16 or float16)"
    return _target_reason()


# ---------------------------------------------------------------------------------------------------------
# The kernel


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one call (hashable: a primitive parameter)."""

    np_: int
    k: int
    group: int
    nm: int
    parts: int
    tiling: Tiling
    correct_zeros: bool
    out_dtype: Any
    offset: int  # the kernel's bf16 weight is q + offset (BF16_BIAS, or −CODE_OFFSET for float32 x)

    @property
    def cols(self) -> int:
        return self.parts * self.tiling.block_m

    @property
    def xs_rows(self) -> int:
        """Rows of segment sums per K step: the step's segments, padded so that the step's box is a multiple
        of 128 bytes (a Mosaic GPU TMA copy is split evenly over the warpgroup's threads)."""
        nseg = self.tiling.block_k // self.tiling.segment
        unit = 128 // int(np.gcd(128, 4 * self.cols))
        return -(-nseg // unit) * unit

    @property
    def out_shape(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.np_, self.nm * self.cols), self.out_dtype)


def _swizzled(rows: int, cols: int, bits: int, operand: str) -> tuple:
    sw = plgpu.find_swizzle(cols * bits, operand)
    return (plgpu.TilingTransform((8, sw * 8 // bits)), plgpu.SwizzleTransform(sw))


def _codes_to_bf16(words: jax.Array, nibs: range) -> jax.Array:
    """words [bn, 16] uint16 -> [bn, 16·len(nibs)] bf16: for each nibble j of `nibs` in turn, the 16 columns
    128 + q of the codes in bits 4j..4j+3 (OR-ing a code into the low mantissa bits of 128's bf16 pattern,
    0x4300, gives 128 + q exactly). The definition, which the interpreter runs; `_unpack` is the compiled
    form."""
    pieces = []
    for j in nibs:
        v = words if j == 0 else lax.shift_right_logical(words, jnp.uint16(4 * j))
        v = lax.bitwise_or(lax.bitwise_and(v, jnp.uint16(0xF)), jnp.uint16(0x4300))
        pieces.append(lax.bitcast_convert_type(v, jnp.bfloat16))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def _unpack(words: jax.Array, nibs: range) -> jax.Array:
    """`_codes_to_bf16` on 32-bit registers. Mosaic GPU holds a uint16 array in the wgmma layout as pairs of
    row neighbours, one 32-bit register each, and a 16-bit shift of such a pair compiles to an unpack, two
    shifts and a repack; shifting the whole register lets the neighbour's bits into the top of the low half,
    where the mask 0x000F000F drops them: one SHF and one LOP3 (and + or) per two weights, no SHF for j = 0.
    The output's 8-column register tiles are the input's, repeated once per nibble (the layout's registers
    are indexed [row tile, column tile, ...])."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm

    layout = plgpu.Layout.WGMMA
    rows, cols = words.shape

    @plgpu.inline_mgpu(
        arg_types=(layout,),
        return_type=plgpu.ShapeDtypeStruct((rows, cols * len(nibs)), jnp.bfloat16, layout=layout),
    )
    def unpack(_, w):
        i32 = ir.IntegerType.get_signless(32)
        out_ty = ir.VectorType.get((2,), ir.BF16Type.get())
        ins = w.registers
        tiles = ins.shape[1]
        out = np.empty((ins.shape[0], tiles * len(nibs), *ins.shape[2:]), dtype=object)
        for idx, reg in np.ndenumerate(ins):
            r = mgpu_utils.bitcast(reg, i32)
            for t, j in enumerate(nibs):
                v = arith.shrui(r, mgpu_utils.c(4 * j, i32)) if j else r
                # (v & 0x000F000F) | 0x43004300 in one LOP3 (ptxas does not merge two immediates itself)
                v = llvm.inline_asm(i32, [v], "lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xea;", "=r,r")
                out[(idx[0], t * tiles + idx[1], *idx[2:])] = mgpu_utils.bitcast(v, out_ty)
        return mgpu.FragmentedArray(_registers=out, _layout=w.layout, _is_signed=None)

    return unpack(words)


def _run(codes, xt, xs, sz, *, spec: _Spec, interpret: bool):
    """codes [K/64, Np, 16] uint16, xt [K, nm·cols] bf16, xs [K/bk·xs_rows, nm·cols] f32 (None when there is
    no zero-point term), sz [G, 2, Np] float32|bfloat16|float16 (the prepared planes: the scales, then the
    zero-point terms z + PLANE_BIAS) -> yᵀ [Np, nm·cols] (out_dtype). One plgpu.kernel launch."""
    t = spec.tiling
    bn, bk, seg, cols = t.block_n, t.block_k, t.segment, spec.cols
    nseg = bk // seg
    spg = max(1, spec.group // bk)  # K steps per group (group ≥ bk) ...
    srows = max(1, bk // spec.group)  # ... or groups per K step (group < bk)
    has_zm = xs is not None
    unpack = _codes_to_bf16 if interpret else _unpack
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    piece = min(seg, K_BLOCK)  # stored rows per wgmma: a 64-row block of words, or the part a segment holds

    def int4_w4a16(w_gmem, x_gmem, *rest):
        xs_gmem, sz_gmem, o_gmem, o_smem = rest if has_zm else (None, *rest)
        ni, mi = lax.axis_index("n"), lax.axis_index("m")

        def body(_, w_smem, x_smem, *rest):
            xs_smem, sz_smem, total = rest if has_zm else (None, *rest)
            # Segments shorter than a block share its words: load them once. Otherwise each block's words are
            # loaded where they are used, which keeps fewer of them live.
            shared = (
                [plgpu.load(w_smem.at[b], layout=plgpu.Layout.WGMMA) for b in range(bk // K_BLOCK)]
                if seg < K_BLOCK
                else None
            )
            for j in range(nseg):

                def dot(acc_ref, j=j):
                    for k0 in range(j * seg, (j + 1) * seg, piece):
                        b, r0 = divmod(k0, K_BLOCK)
                        words = shared[b] if shared else plgpu.load(w_smem.at[b], layout=plgpu.Layout.WGMMA)
                        nibs = range(r0 // WGMMA_K, (r0 + piece) // WGMMA_K)
                        a = unpack(words, nibs)  # [bn, piece] bf16: 128 + q
                        if spec.offset != BF16_BIAS:
                            a = a - jnp.bfloat16(BF16_BIAS - spec.offset)
                        plgpu.wgmma(acc_ref, a, x_smem.at[pl.ds(k0, piece)])
                    return acc_ref[...]

                p = pl.run_scoped(dot, plgpu.ACC((bn, cols), jnp.float32))  # Σ_r x̃ (q + d) over the segment
                row = j if srows > 1 else 0
                if has_zm:
                    zr = plgpu.load(sz_smem.at[row, 1], layout=row_layout).astype(jnp.float32)
                    if spec.offset != PLANE_BIAS:  # float32 x: z + d = (z + 128) + (d − 128)
                        zr = zr + jnp.float32(spec.offset - PLANE_BIAS)
                    xr = plgpu.load(xs_smem.at[j], layout=col_layout)
                    p = p - lax.broadcast_in_dim(zr, p.shape, [0]) * lax.broadcast_in_dim(xr, p.shape, [1])
                sr = plgpu.load(sz_smem.at[row, 0], layout=row_layout).astype(jnp.float32)
                total = total + lax.broadcast_in_dim(sr, p.shape, [0]) * p
            return total

        nsz = 2 if has_zm else 1
        pipeline = plgpu.emit_pipeline(
            body,
            grid=(int(spec.k // bk),),
            in_specs=[
                plgpu.BlockSpec(
                    (bk // K_BLOCK, bn, WORDS),
                    lambda kk: (kk, 0, 0),
                    transforms=_swizzled(bn, WORDS, 16, "lhs"),
                ),
                plgpu.BlockSpec((bk, cols), lambda kk: (kk, 0), transforms=_swizzled(bk, cols, 16, "rhs")),
            ]
            + ([plgpu.BlockSpec((spec.xs_rows, cols), lambda kk: (kk, 0))] if has_zm else [])
            + [plgpu.BlockSpec((srows, nsz, bn), lambda kk: (kk // spg, 0, 0))],
            max_concurrent_steps=t.steps,
            init_carry=plgpu.layout_cast(jnp.zeros((bn, cols), jnp.float32), plgpu.Layout.WGMMA),
        )
        n_sl, m_sl = pl.ds(ni * bn, bn), pl.ds(mi * cols, cols)
        total = pipeline(
            w_gmem.at[:, n_sl],
            x_gmem.at[:, m_sl],
            *([xs_gmem.at[:, m_sl]] if has_zm else []),
            sz_gmem.at[:, :, n_sl],
        )
        # Through shared memory and one TMA store: a thread's registers hold 4-8 byte pieces of the tile, and
        # a direct store would not write whole 32-byte sectors.
        o_smem[...] = total.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[n_sl, m_sl])
        plgpu.wait_smem_to_gmem(0)

    extra = dict(interpret=plgpu.InterpretGPUParams()) if interpret else {}
    fn = plgpu.kernel(
        int4_w4a16,
        out_type=spec.out_shape,
        grid=(int(spec.np_ // bn), int(spec.nm)),
        grid_names=("n", "m"),
        scratch_types=(
            plgpu.SMEM(
                (bn, cols),
                spec.out_dtype,
                transforms=_swizzled(bn, cols, 8 * np.dtype(spec.out_dtype).itemsize, "out"),
            ),
        ),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **extra,
    )
    return fn(codes, xt, *((xs,) if has_zm else ()), sz)


@functools.partial(jax.jit, static_argnames=("spec",))
def _run_interpreted(codes, xt, xs, sz, *, spec: _Spec):
    return _run(codes, xt, xs, sz, spec=spec, interpret=True)


def _run_host(codes, xt, xs, sz, *, spec: _Spec):
    """The cpu lowering: the interpreted kernel inside a host callback. Mosaic GPU's interpreter threads an
    ordered IO effect through its program, which a primitive's lowering cannot carry; inside a pure callback
    it is a program of its own."""

    def run(*arrays):
        return np.asarray(_run_interpreted(*arrays, spec=spec))

    return jax.pure_callback(run, spec.out_shape, codes, xt, xs, sz)


_int4_mgpu = per_platform_kernel(
    "tokenlab_int4_matmul_pallas_mosaic_gpu",
    {"cpu": _run_host, "cuda": functools.partial(_run, interpret=False)},
    kernel="the Pallas Mosaic GPU INT4 matmul kernel",
    runs_on="cpu (interpreted) and cuda (sm_90a)",
    out_shape=lambda *args, spec: spec.out_shape,
    # plgpu.kernel has no batching rule: each vmap level runs the kernel once per weight.
    map_sequentially=("cpu", "cuda"),
)


def _split_parts(xf: jax.Array, parts: int) -> list[jax.Array]:
    """x (float32) as `parts` bf16 arrays summing to it (exactly for bf16, f16 in two, f32 in three)."""
    out, rest = [], xf
    for _ in range(parts):
        p = rest.astype(jnp.bfloat16)
        out.append(p)
        rest = rest - p.astype(jnp.float32)
    return out


def _forward(xf, codes, planes, *, spec: _Spec, n: int):
    """xf: [M, K] float32 (stored order, AWQ divided), the prepared codes and planes -> [M, N] float32. The
    weight goes to the kernel as prepared: only x is rearranged here."""
    m, k = xf.shape
    t, parts = spec.tiling, spec.parts
    bm, seg = t.block_m, t.segment
    mp = spec.nm * bm
    xp = jnp.pad(xf, ((0, mp - m), (0, 0))) if mp != m else xf
    ps = jnp.stack(_split_parts(xp, parts))  # [P, Mp, K] bf16
    xt = ps.reshape(parts, spec.nm, bm, k).transpose(3, 1, 0, 2).reshape(k, spec.nm * parts * bm)
    xs = None
    if spec.correct_zeros:
        sums = ps.astype(jnp.float32).reshape(parts, spec.nm, bm, k // seg, seg).sum(-1)  # [P, nm, bm, K/L]
        xs = sums.transpose(3, 1, 0, 2).reshape(k // t.block_k, t.block_k // seg, spec.nm * parts * bm)
        xs = jnp.pad(xs, ((0, 0), (0, spec.xs_rows - xs.shape[1]), (0, 0))).reshape(-1, xs.shape[2])
    yt = _int4_mgpu(codes, xt, xs, planes, spec=spec).astype(jnp.float32)  # [Np, nm·P·bm]
    y = yt.reshape(spec.np_, spec.nm, parts, bm).sum(2).reshape(spec.np_, mp)
    return y[:n, :m].T


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _matmul(xf, codes, scales, zeros, planes, spec, sym_zero):
    """The forward reads the prepared planes; the scale gradient goes to the canonical scales (the planes are
    derived from them: their cotangent is zero, so a traced prepare(w) still sends it back to w.scales)."""
    return _forward(xf, codes, planes, spec=spec, n=scales.shape[1])


def _matmul_fwd(xf, codes, scales, zeros, planes, spec, sym_zero):
    y = _forward(xf, codes, planes, spec=spec, n=scales.shape[1])
    return y, (xf, codes, scales, zeros, planes)


@highest_precision
def _matmul_bwd(spec, sym_zero, res, dy):
    xf, codes, scales, zeros, planes = res
    n = scales.shape[1]
    packed = unprepare_codes(codes, n)
    zp = jnp.full(scales.shape, sym_zero, jnp.uint8) if zeros is None else zeros
    dy32 = dy.astype(jnp.float32)
    dx = scan_matmul_transposed(dy32, packed, scales, zp, group_size=spec.group)
    ds = scan_scale_grad(xf, dy32, packed, zp, group_size=spec.group)
    return dx, *zero_cotangent((codes,)), ds.astype(scales.dtype), *zero_cotangent((zeros, planes))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def int4_matmul_mosaic_gpu(x: jax.Array, w: Int4Weight | PreparedInt4Weight, config: Config | None = None):
    """x: [..., K] float32|bfloat16|float16 (input-channel order) @ w -> [..., N] in x's dtype.

    `w` is a canonical Int4Weight (prepared once and cached: `prepared.cached_prepare`) or a
    PreparedInt4Weight. Differentiable with respect to x, the scales and the activation scales (reverse mode).
    """
    reason = pallas_unsupported(x, w)
    if reason is not None:
        raise ValueError(f"the Pallas Mosaic GPU INT4 kernel does not support {reason}")
    pw = w if isinstance(w, PreparedInt4Weight) else cached_prepare(w)
    k, n = pw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension {x.shape[-1]} must equal the weight's K={k}")
    tiling = choose(x, pw, config)
    m = _m(x)
    zero = symmetric_zero(pw.bits)
    # float32 x keeps the weight small in the tensor core (q − 8, one packed subtract more per two weights):
    # with the bias of 128 folded out, P − (z + 128)·Σx cancels about five bits of the float32 sums.
    offset = -CODE_OFFSET if _parts(x) == 3 else BF16_BIAS
    spec = _Spec(
        np_=padded_n(n),
        k=k,
        group=pw.group_size,
        nm=-(-max(m, 1) // tiling.block_m),
        parts=_parts(x),
        tiling=tiling,
        correct_zeros=pw.zeros is not None or zero + offset != 0,
        out_dtype=np.dtype(jnp.bfloat16) if _parts(x) == 1 else np.dtype(np.float32),
        offset=offset,
    )
    return _weight_matmul(x, pw, spec=spec, sym_zero=zero)


@functools.partial(jax.jit, static_argnames=("spec", "sym_zero"))
def _weight_matmul(x, pw: PreparedInt4Weight, *, spec: _Spec, sym_zero: int):
    n = pw.n
    # prepare_x reads only the canonical small fields (perm, act_scales) that both layouts share.
    xf = prepare_x(x, pw)
    y = _matmul(xf, pw.codes, pw.scales, pw.zeros, pw.planes, spec, sym_zero)
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


def _pallas(x: jax.Array, w: Any, *, config: Config) -> jax.Array:
    return int4_matmul_mosaic_gpu(x, w, config)


IMPLEMENTATION = registry.Implementation(
    NAME, _pallas, platforms=("cpu", "cuda"), supports=pallas_unsupported, config=Config
)
