"""The MoE expert FFN as two Pallas Mosaic GPU grouped GEMMs (wgmma + TMA pipelines) for Hopper and newer.

Formula. For the dispatched rows xs: [R, d], sorted by expert with every expert's group padded to a
multiple of `block_m` rows (the packed layout of `dispatch_plan` with row_align=block_m):

    h[r]  = silu(xs[r] · w_gate[e]) ⊙ (xs[r] · w_up[e])        kernel 1 ("moe_gate_up_swiglu"): [R, f]
    ys[r] = h[r] · w_down[e]                                     kernel 2 ("moe_down"): [R, d]

for every row r of expert e's group; `combine` then sums the k weighted rows of each token. Padding rows
read token T (zeros) and give zero rows, which no token reads.

Tile schedule. Since every group is a whole number of row tiles, a row tile belongs to exactly one expert:
`tile_experts(group_sizes, num_tiles, block_m)` gives each tile its expert, or -1 for the tiles past the
routed rows. The grid is (column tiles, row tiles); a program whose tile is -1 returns at once, so an
expert with no rows has no tile and its weights are never read (decode: only the experts that receive
tokens cost bandwidth), and no store is masked. Each program runs `plgpu.emit_pipeline` over the
reduction in `block_k` slices (TMA copies of the x tile and the expert's weight tiles into SMEM,
`max_concurrent_steps` in flight) into wgmma accumulators; kernel 1 holds the gate and up accumulators
side by side and applies the SwiGLU before one SMEM -> GMEM TMA store of h. Kernel 2 uses column tiles
twice as wide (one accumulator).

Configurations (`Config`, `shape_class`, `tune_space`). "decode" (the balanced load T·k/E at most 64
rows per expert): 64-row tiles (wgmma's M per warpgroup; fewer routed rows are padding, the kernel is
bound by the weight bytes), 128 columns; "prefill": 128-row tiles, 64 columns (the two float32
accumulators stay at 64 registers a thread each). `kernels.tuning` entries for (moe_ffn,
pallas_mosaic_gpu, shape class, device kind) override the built-in default.

Dtypes. bfloat16/float16: native wgmma with float32 accumulation, h stored in the input dtype.
float32 (wgmma has only TF32 for 32-bit operands): each operand is split into three bfloat16 pieces
(a = a0 + a1 + a2, 24 significant bits) and the kernels contract the six products a_i·w_j with
i + j <= 2, concatenated along K (6x the reduction; about float32 accuracy, where three products of
two pieces gave 4e-6 normalized error per GEMM); h is kept in float32 and split the same way for
kernel 2. The split is an XLA copy of the expert stacks per call: float32 is the accurate path,
bfloat16 the fast one. Widths d and f that are not multiples of 64 are zero-padded per call (also a
copy of the stacks; every model the lab follows has both multiples of 64).

Quantized experts (stacks of `quant.Int4Weight`, bits 4 or 3, groups of 64 rows or more). Two more
kernels ("moe_int4_gate_up_swiglu", "moe_int4_down") in the INT4 Mosaic GPU kernel's swap-AB form: each
computes a transposed tile (x̃ · W_e)ᵀ [bn, bm] with the expert's codes tile [bn, bk] (int4 holding q − 8,
transposed, in registers after Mosaic GPU's int4 -> bf16 conversion) as wgmma's left operand and x̃ᵀ [bk, bm]
in SMEM as its right one, so the routed rows fill wgmma's narrow N side (int4_block_m = 16, 32 or 64 rows
per tile: decode pads a group to 16 rows, not 64). Codes, group scales and z − 8 arrive by TMA from the
prepared stacks, only for the tile's expert; the zero point is folded out of the loop per segment of L
rows inside one group: s ⊙ (Σ_r x̃ (q − 8) − (z − 8) ⊗ Σ_r x̃), the activation's segment sums computed by
XLA on the small [K, R] operand. Float32 and float16 activations go in as three and two bf16 parts into the
same accumulator (one wgmma each). Kernel 1 writes hᵀ [f, R] (bf16, or float32 for float32/float16 x),
which is kernel 2's right operand as it stands. AWQ activation scales and act-order permutations are applied
per row in XLA (gate and up must share them; w_down's are applied to h between the kernels). The prepared
stacks (`_prepared_experts`: codes [E, Np, K] int4, scales and z − 8 [E, G, Np] float32) are built once
per concrete set of weights and cached (weakly keyed); experts passed into a jitted function as arguments
are prepared inside it on every call. Groups below 64 rows (wgmma on the register tile takes K in
multiples of 64 when compiled), other bit widths and gate/up with different transforms go the old way:
XLA dequantizes every expert (`Int4Weight.dequantize`) into the float kernels.

Platforms. Hopper and newer only (wgmma and TMA: compiling for sm_80 aborts in LLVM), so `supports`
declines a GPU target below compute capability 9.0 and `impl="auto"` takes the Triton kernel there.
The kernels are chosen per lowering platform (`kernels.lowering.per_platform_kernel`): compiled on
cuda, interpreted on the CPU with `plgpu.InterpretGPUParams()` inside a host callback (the interpreter's
ordered effect cannot live in a per-platform lowering; slow: tests at small shapes).

Gradients. A custom VJP whose backward is the XLA path's (`kernels.moe.xla`, the same capacity and drop
priority): reverse mode reaches x, the routing weights, float experts and Int4Weight experts' float
fields, as the XLA path does.

Axis legend: `T` tokens, `k` experts per token, `E` experts, `d` model width, `f` expert hidden width,
`R` dispatched rows (a multiple of block_m).
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

from kernels import lowering, registry, tuning
from kernels.lowering import per_platform_kernel, target_gpu
from kernels.memo import IdentityMemo
from kernels.moe.dispatch import expert_dims
from kernels.moe.reference import capacity_of
from quant.format import Int4Weight

__all__ = [
    "Config",
    "moe_ffn_mosaic_gpu",
    "pallas_unsupported",
    "shape_class",
    "tile_experts",
    "tune_space",
]

OP, IMPL = "moe_ffn", "pallas_mosaic_gpu"
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
ALIGN = 64  # d and f are padded to multiples of this (the smallest tile in any dimension)
DECODE_ROWS = 64  # balanced rows per expert up to which a call is "decode"
MAX_ACC_FLOATS = 64 * 128 * 2  # float32 accumulator elements a 128-thread warpgroup holds without spilling
MIN_CC = 90
INT4_BLOCK_MS = (16, 32, 64)
INT4_BLOCK_KS = (128, 64, 256)  # tried in this order
# A segment (the rows one group scale covers inside a K step) is a multiple of this: wgmma with the converted
# int4 tile in registers takes K in multiples of 64 when compiled (the interpreter would take 16), so groups
# smaller than 64 rows go through the dequantizing path.
SEGMENT_K = 64
SMEM_BUDGET = 200 * 1024  # bytes of pipeline buffers per CTA (sm_90a has 227 KiB; the output tile needs some)
CODE_OFFSET = 8  # the INT4 kernels hold codes as q − 8


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles of the Mosaic GPU grouped GEMMs; a field left None takes the tuned or built-in default.

    block_m: rows per tile (64 or 128; wgmma's M). block_n: kernel 1's column tile over f (kernel 2 takes
    twice as many over d). block_k: reduction slice per pipeline step. max_concurrent_steps: pipeline
    stages in flight (SMEM buffers). Each kernel uses the largest power of two <= its tile that divides its
    (padded) width. int4_block_m: rows per tile of the INT4 kernels (16, 32 or 64: wgmma's N in their swap-AB
    form; None: the smallest that holds the balanced rows per expert T·k/E). The INT4 kernels take their
    column tiles (64 over f; 128 over d when int4_block_m <= 32) and K steps (128 where legal, else 64 or
    256) from the shapes; max_concurrent_steps applies to both paths.
    """

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    max_concurrent_steps: int | None = None
    int4_block_m: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(
            self, "block_m", "block_n", "block_k", "max_concurrent_steps", "int4_block_m"
        )
        if self.int4_block_m is not None and self.int4_block_m not in INT4_BLOCK_MS:
            raise ValueError(
                f"int4_block_m={self.int4_block_m} must be one of {INT4_BLOCK_MS} (wgmma's N, swap-AB)"
            )
        if self.block_m is not None and self.block_m not in (64, 128):
            raise ValueError(f"block_m={self.block_m} must be 64 or 128 (wgmma's M per warpgroup)")
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v is not None and (v < 64 or v & (v - 1) or v > 256):
                raise ValueError(f"{name}={v} must be a power of two in [64, 256]")
        bm, bn = self.block_m or 64, self.block_n or 64
        if 2 * bm * bn > MAX_ACC_FLOATS:
            raise ValueError(
                f"block_m={bm} x block_n={bn}: kernel 1's two float32 accumulators would exceed "
                f"{MAX_ACC_FLOATS // 2} elements each (they would spill)"
            )


BUILTIN = {
    "decode": Config(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4),
    "prefill": Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=4),
}


_dims = expert_dims


def shape_class(x: Any, weights: Any, expert_ids: Any, w_gate: Any, *_: Any, **__: Any) -> str:
    """ "decode" when the balanced load T·k/E is at most 64 rows per expert (one row tile), else "prefill"."""
    num_experts = _dims(w_gate)[0]
    rows = expert_ids.shape[0] * expert_ids.shape[1]
    return "decode" if rows <= DECODE_ROWS * num_experts else "prefill"


def tune_space(x: Any, weights: Any, expert_ids: Any, w_gate: Any, *_: Any, **__: Any) -> list[Config]:
    """The configurations `benchmarks.accel --tune` sweeps (8): block_m 64 with block_n 128 or 256... no:
    (block_m, block_n) in {(64, 64), (64, 128), (128, 64)} x max_concurrent_steps in {2, 3, 4}, block_k 64,
    less (128, 64) at decode (its extra rows are padding there) and less the 2-stage 64x64 one."""
    del x, weights, expert_ids, w_gate
    out = []
    for bm, bn in ((64, 128), (128, 64), (64, 64)):
        for steps in (4, 3, 2):
            if (bm, bn, steps) == (64, 64, 2):
                continue
            out.append(Config(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=steps))
    return out


def default_config(*args: Any, **kwargs: Any) -> Config:
    """The tuned configuration for this call's shape class on the GPU being lowered for, else the built-in."""
    cls = shape_class(*args, **kwargs)
    target = target_gpu()
    found = tuning.lookup(OP, IMPL, cls, None if target is None else target[0])
    return Config(**found) if found is not None else BUILTIN[cls]


def _resolved(config: Config | None, *args: Any, **kwargs: Any) -> Config:
    base = default_config(*args, **kwargs)
    if config is None:
        return base
    return Config(**{f.name: getattr(config, f.name) if getattr(config, f.name) is not None
                     else getattr(base, f.name) for f in dataclasses.fields(Config)})  # fmt: skip


def pallas_unsupported(x: Any, w_gate: Any, w_up: Any, w_down: Any, **_: Any) -> str | None:
    """Why the Mosaic GPU FFN cannot run these operands here (a sentence), or None when it can.

    It declines a GPU target below compute capability 9.0 (wgmma and TMA are Hopper-only), x dtypes other
    than float32/bfloat16/float16 and a mix of float and Int4Weight experts.
    """
    target = target_gpu()
    if target is not None and target[1] < MIN_CC:
        return f"{target[0]} (compute capability {target[1] / 10:.1f} < 9.0: wgmma and TMA are Hopper-only)"
    if np.dtype(x.dtype).name not in FLOAT_DTYPES:
        return f"x.dtype={x.dtype} (it takes {FLOAT_DTYPES})"
    quantized = [isinstance(w, Int4Weight) for w in (w_gate, w_up, w_down)]
    if any(quantized) and not all(quantized):
        return "mixed float and Int4Weight experts"
    return None


# --------------------------------------------------------------------------------------------------
# the tile schedule


def tile_experts(group_sizes: jax.Array, num_tiles: int, block_m: int) -> jax.Array:
    """[num_tiles] int32: the expert of each row tile of a buffer whose groups (group_sizes: [E] rows, each
    padded up to a multiple of block_m, back to back from row 0) are whole tiles; -1 for tiles past them.
    An expert with no rows owns no tile."""
    padded = (jnp.maximum(group_sizes.astype(jnp.int32), 0) + block_m - 1) // block_m
    ends = jnp.cumsum(padded)  # in tiles
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    e = jnp.searchsorted(ends, i, side="right").astype(jnp.int32)
    return jnp.where(i < ends[-1], e, -1)


# --------------------------------------------------------------------------------------------------
# the kernels


def _pow2_tile(width: int, cap: int) -> int:
    b = ALIGN
    while b * 2 <= cap and width % (b * 2) == 0:
        b *= 2
    return b


def _grouped_gemm(a, te, ws, *, swiglu, out_dtype, block_m, block_n, block_k, steps, interpret):
    """a [R, K] (bf16/f16) times the tile's expert's ws[i][e] [K, N] -> [R, N] out_dtype; with swiglu, ws
    is (gate, up) and the result silu(a·gate) ⊙ (a·up)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    num_rows, k = a.shape
    n = ws[0].shape[2]
    bn, bk = _pow2_tile(n, block_n), _pow2_tile(k, block_k)
    bm = block_m

    def body(te_gmem, a_gmem, *refs):
        w_gmems, o_gmem = refs[:-1], refs[-1]
        j, i = lax.axis_index("n"), lax.axis_index("m")
        e = te_gmem[i]

        @pl.when(e >= 0)
        def _():
            def acc_scope(*accs):
                def step(_, a_smem, *w_smems):
                    for acc, w_smem in zip(accs, w_smems, strict=True):
                        plgpu.wgmma(acc, a_smem, w_smem)

                specs = [plgpu.BlockSpec((bm, bk), lambda kk: (i, kk), delay_release=1)]
                specs += [plgpu.BlockSpec((bk, bn), lambda kk: (kk, j), delay_release=1) for _ in w_gmems]
                plgpu.emit_pipeline(step, grid=(k // bk,), in_specs=specs, max_concurrent_steps=steps)(
                    a_gmem, *(w.at[e] for w in w_gmems)
                )
                return tuple(acc[...] for acc in accs)

            accs = pl.run_scoped(acc_scope, *(plgpu.ACC((bm, bn)) for _ in w_gmems))
            if swiglu:
                g, u = accs
                out = g / (1.0 + jnp.exp(-g)) * u
            else:
                (out,) = accs
            out = out.astype(o_gmem.dtype)

            def store(o_smem):
                o_smem[...] = out
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            pl.run_scoped(store, plgpu.SMEM((bm, bn), o_gmem.dtype))

    body.__name__ = body.__qualname__ = "moe_gate_up_swiglu" if swiglu else "moe_down"  # the kernel's name
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_rows, n), out_dtype),
        grid=(n // bn, num_rows // bm),
        grid_names=("n", "m"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return kernel(te, a, *ws)


# float32 as bf16 pieces: a = a0 + a1 + a2 (each the bf16 rounding of what the previous ones leave), and
# a·w ≈ Σ a_i·w_j over i + j <= 2: six bf16 products, concatenated along K, with float32 accumulation.
_PAIRS = ((0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0))


def _pieces(a):
    out, rest = [], a.astype(jnp.float32)
    for _ in range(3):
        p = rest.astype(jnp.bfloat16)
        out.append(p)
        rest = rest - p.astype(jnp.float32)
    return out


def _split_lhs(a, axis):
    """float32 a [..., K] -> bf16 [..., 6K]: the left operands of the six products, along `axis`."""
    p = _pieces(a)
    return jnp.concatenate([p[i] for i, _ in _PAIRS], axis=axis)


def _split_rhs(w, axis):
    """float32 w [.., K, ..] -> bf16 [.., 6K, ..]: the right operands matching `_split_lhs`."""
    p = _pieces(w)
    return jnp.concatenate([p[j] for _, j in _PAIRS], axis=axis)


def _ffn_rows(xs, te, wg, wu, wd, *, blocks, interpret):
    """Both kernels on rows xs [R, d_pad] -> ys [R, d_pad] (xs.dtype). Float32 operands arrive as float32
    and are split here; bf16/f16 go in as they are."""
    block_m, block_n, block_k, steps = blocks
    kw = dict(block_m=block_m, block_k=block_k, steps=steps, interpret=interpret)
    if xs.dtype == jnp.float32:
        h = _grouped_gemm(
            _split_lhs(xs, 1), te, (_split_rhs(wg, 1), _split_rhs(wu, 1)), swiglu=True,
            out_dtype=jnp.float32, block_n=block_n, **kw,
        )  # fmt: skip
        return _grouped_gemm(
            _split_lhs(h, 1), te, (_split_rhs(wd, 1),), swiglu=False, out_dtype=jnp.float32,
            block_n=2 * block_n, **kw,
        )  # fmt: skip
    h = _grouped_gemm(xs, te, (wg, wu), swiglu=True, out_dtype=xs.dtype, block_n=block_n, **kw)
    return _grouped_gemm(h, te, (wd,), swiglu=False, out_dtype=xs.dtype, block_n=2 * block_n, **kw)


@functools.partial(jax.jit, static_argnames=("blocks",))
def _ffn_rows_interpreted(xs, te, wg, wu, wd, *, blocks):
    return _ffn_rows(xs, te, wg, wu, wd, blocks=blocks, interpret=True)


def _ffn_rows_host(xs, te, wg, wu, wd, *, blocks):
    """The CPU lowering: the interpreted kernels run in a host callback. Mosaic GPU's interpreter threads
    an ordered IO effect through the program, which a primitive's lowering (and `lax.platform_dependent`
    beside effect-free branches) cannot carry; from inside a pure callback it is a separate program."""

    def run(xs, te, *ws):
        te_b, xs_b = _bucketed(te, xs)
        return np.asarray(_ffn_rows_interpreted(xs_b, te_b, *ws, blocks=blocks))[: xs.shape[0]]

    return jax.pure_callback(run, jax.ShapeDtypeStruct(xs.shape, xs.dtype), xs, te, wg, wu, wd)


def _ffn_rows_compiled(xs, te, wg, wu, wd, *, blocks):
    return _ffn_rows(xs, te, wg, wu, wd, blocks=blocks, interpret=False)


_ffn_rows_per_platform = per_platform_kernel(
    "tokenlab_moe_mosaic_gpu_ffn",
    {"cpu": _ffn_rows_host, "cuda": _ffn_rows_compiled},
    kernel="the Pallas Mosaic GPU grouped FFN",
    runs_on="cpu (interpreted) and cuda (compute capability >= 9.0)",
    out_shape=lambda xs, *_, **__: jax.ShapeDtypeStruct(xs.shape, xs.dtype),
    # plgpu.kernel has no batching rule: each vmap level runs the kernels once per batch element.
    map_sequentially=("cpu", "cuda"),
)


# --------------------------------------------------------------------------------------------------
# INT4 experts: swap-AB grouped GEMMs on the prepared codes (the INT4 Mosaic GPU kernel's tile code)


def _int4_grouped_gemm(xts, xsum, te, ws, *, swiglu, out_dtype, block_m, block_n, block_k, segment, group,
                       steps, interpret):  # fmt: skip
    """The transposed grouped GEMM over INT4 experts.

    xts: P arrays [K, R] bf16 (x̃ᵀ as bf16 parts summing to it), xsum: [K/L, R] float32 (x̃ᵀ summed over
    each segment of L = `segment` rows), te: [R/bm] int32 (tile experts), ws: tuple of (codes [E, Np, K]
    int4 holding q − 8, scales [E, G, Np] float32, zm [E, G, Np] float32 (z − 8) or None) -> [Np, R]
    out_dtype, per row tile of expert e: (x̃ · W_e)ᵀ, or with swiglu (ws = gate, up) silu(gate) ⊙ up.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    k, num_rows = xts[0].shape
    np_ = ws[0][0].shape[1]
    bm, bn, bk, seg = block_m, block_n, block_k, segment
    nseg = bk // seg
    spg = max(1, group // bk)  # K steps per group (group >= bk) ...
    srows = max(1, bk // group)  # ... or groups per K step (group < bk)
    has_zm = ws[0][2] is not None
    nparts = len(xts)

    def body(te_gmem, *refs):
        x_gmems, xs_gmem = refs[:nparts], refs[nparts]
        w_gmems = refs[nparts + 1 : -2]
        o_gmem, o_smem = refs[-2:]
        j, i = lax.axis_index("n"), lax.axis_index("m")
        e = te_gmem[i]

        @pl.when(e >= 0)
        def _():
            def step(_, *args):
                *smems, totals = args
                x_smems, xs_smem = smems[:nparts], smems[nparts]
                w_smems = smems[nparts + 1 :]
                per = 3 if has_zm else 2
                out = []
                for wi, total in enumerate(totals):
                    c_smem, s_smem, *zm_smem = w_smems[per * wi : per * (wi + 1)]
                    a = c_smem[...].astype(jnp.bfloat16)  # [bn, bk]: q − 8, exact
                    for js in range(nseg):
                        a_j = a if nseg == 1 else a[:, js * seg : (js + 1) * seg]

                        def dot(acc_ref, a_j=a_j, js=js):
                            for x_smem in x_smems:  # the parts of x̃ into one accumulator
                                x_j = x_smem if nseg == 1 else x_smem.at[pl.ds(js * seg, seg)]
                                plgpu.wgmma(acc_ref, a_j, x_j)
                            return acc_ref[...]

                        prod = pl.run_scoped(dot, plgpu.ACC((bn, bm), jnp.float32))  # Σ_r x̃ (q − 8)
                        row = js if srows > 1 else 0
                        if has_zm:
                            prod = prod - zm_smem[0][row][:, None] * xs_smem[js][None, :]
                        total = total + s_smem[row][:, None] * prod
                    out.append(total)
                return tuple(out)

            specs = [
                plgpu.BlockSpec((bk, bm), lambda kk: (kk, i), transforms=_swizzled(bk, bm, 16, "rhs"))
                for _ in xts
            ]
            specs.append(plgpu.BlockSpec((nseg, bm), lambda kk: (kk, i)))
            operands = [*x_gmems, xs_gmem]
            per = 3 if has_zm else 2
            for wi in range(len(ws)):
                c_gmem, s_gmem, *zm_gmem = w_gmems[per * wi : per * (wi + 1)]
                specs.append(
                    plgpu.BlockSpec((bn, bk), lambda kk: (j, kk), transforms=_swizzled(bn, bk, 4, "lhs"))
                )
                specs += [plgpu.BlockSpec((srows, bn), lambda kk: (kk // spg, j)) for _ in range(per - 1)]
                operands += [c_gmem.at[e], s_gmem.at[e], *(z.at[e] for z in zm_gmem)]
            totals = plgpu.emit_pipeline(
                step,
                grid=(k // bk,),
                in_specs=specs,
                max_concurrent_steps=steps,
                init_carry=tuple(jnp.zeros((bn, bm), jnp.float32) for _ in ws),
            )(*operands)
            if swiglu:
                g, u = totals
                res = g / (1.0 + jnp.exp(-g)) * u
            else:
                (res,) = totals
            o_smem[...] = res.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(j * bn, bn), pl.ds(i * bm, bm)])
            plgpu.wait_smem_to_gmem(0)

    body.__name__ = body.__qualname__ = "moe_int4_gate_up_swiglu" if swiglu else "moe_int4_down"
    bits = 8 * np.dtype(out_dtype).itemsize
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((np_, num_rows), out_dtype),
        grid=(np_ // bn, num_rows // bm),
        grid_names=("n", "m"),
        scratch_types=(plgpu.SMEM((bn, bm), out_dtype, transforms=_swizzled(bn, bm, bits, "out")),),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    flat = [a for w in ws for a in w if a is not None]
    return kernel(te, *xts, xsum, *flat)


@dataclasses.dataclass(frozen=True)
class _Int4Spec:
    """Static description of the INT4 path of one call (a primitive parameter: hashable)."""

    d: int
    f: int
    parts: int
    block_m: int
    block_n: tuple[int, int]  # kernel 1 (over f), kernel 2 (over d)
    block_k: tuple[int, int]  # over d, over f
    group: tuple[int, int]  # gate/up, down
    steps: int
    h_dtype: Any
    down_transform: bool  # w_down has a permutation or AWQ activation scales (applied to h per row)


def _bf16_parts(a, parts):
    """float a -> `parts` bf16 arrays summing to it (exact for bf16, f16 in two, float32 in three)."""
    out, rest = [], a.astype(jnp.float32)
    for _ in range(parts):
        p = rest.astype(jnp.bfloat16)
        out.append(p)
        rest = rest - p.astype(jnp.float32)
    return out


def _segment_sums(at, segment):
    """at [K, R] -> [K/L, R] float32: sums over each segment of L rows."""
    k, r = at.shape
    return at.astype(jnp.float32).reshape(k // segment, segment, r).sum(1)


def _row_experts(te, block_m):
    return jnp.maximum(jnp.repeat(te, block_m), 0)  # padding tiles read expert 0's (unused) transform


def _transform_rows(a, row_e, perm, act_scales):
    """a [R, K]: each row divided by its expert's AWQ scales and permuted to its expert's stored order."""
    a = a.astype(jnp.float32)
    if act_scales is not None:
        a = a / act_scales[row_e].astype(jnp.float32)
    if perm is not None:
        a = jnp.take_along_axis(a, perm[row_e].astype(jnp.int32), axis=1)
    return a


def _int4_rows(xs, te, pg, pu, pd, down_tr, *, spec: _Int4Spec, interpret: bool):
    """xs [R, d] float32 (already in gate/up's stored order) -> ys [R, d] float32 or bf16 through both INT4
    kernels; pg/pu/pd are (codes, scales, zm) of the prepared stacks, down_tr (perm, act_scales) of w_down."""
    kw = dict(block_m=spec.block_m, steps=spec.steps, interpret=interpret)
    seg1 = min(spec.block_k[0], spec.group[0])
    xt = xs.T  # [d, R]
    ht = _int4_grouped_gemm(
        tuple(_bf16_parts(xt, spec.parts)), _segment_sums(xt, seg1), te, (pg, pu), swiglu=True,
        out_dtype=spec.h_dtype, block_n=spec.block_n[0], block_k=spec.block_k[0], segment=seg1,
        group=spec.group[0], **kw,
    )[: spec.f]  # fmt: skip
    if spec.down_transform:
        ht = _transform_rows(ht.T, _row_experts(te, spec.block_m), *down_tr).T
    seg2 = min(spec.block_k[1], spec.group[1])
    yt = _int4_grouped_gemm(
        tuple(_bf16_parts(ht, spec.parts)), _segment_sums(ht, seg2), te, (pd,), swiglu=False,
        out_dtype=spec.h_dtype, block_n=spec.block_n[1], block_k=spec.block_k[1], segment=seg2,
        group=spec.group[1], **kw,
    )  # fmt: skip
    return yt[: spec.d].T


@functools.partial(jax.jit, static_argnames=("spec",))
def _int4_rows_interpreted(xs, te, pg, pu, pd, down_tr, *, spec):
    return _int4_rows(xs, te, pg, pu, pd, down_tr, spec=spec, interpret=True)


def _bucketed(te, xs):
    """Row tiles rounded up to a power of two (the extra tiles have no expert and return at once), so that
    calls whose plans differ only in R share one compiled interpreter program."""
    tiles = te.shape[0]
    bucket = 1 << max(0, (tiles - 1).bit_length())
    rows = (bucket - tiles) * (xs.shape[0] // max(tiles, 1))
    return np.pad(te, (0, bucket - tiles), constant_values=-1), np.pad(xs, ((0, rows), (0, 0)))


def _int4_rows_host(xs, te, pg, pu, pd, down_tr, *, spec):
    """The CPU lowering: both interpreted kernels in one host callback (see `_ffn_rows_host`)."""
    out = jax.ShapeDtypeStruct((xs.shape[0], spec.d), spec.h_dtype)

    def run(xs, te, pg, pu, pd, down_tr):
        te_b, xs_b = _bucketed(te, xs)
        y = _int4_rows_interpreted(xs_b, te_b, pg, pu, pd, down_tr, spec=spec)
        return np.asarray(y)[: xs.shape[0]]

    return jax.pure_callback(run, out, xs, te, pg, pu, pd, down_tr)


_int4_rows_per_platform = per_platform_kernel(
    "tokenlab_moe_mosaic_gpu_int4_ffn",
    {"cpu": _int4_rows_host, "cuda": functools.partial(_int4_rows, interpret=False)},
    kernel="the Pallas Mosaic GPU grouped FFN over INT4 experts",
    runs_on="cpu (interpreted) and cuda (compute capability >= 9.0)",
    out_shape=lambda xs, *_, spec: jax.ShapeDtypeStruct((xs.shape[0], spec.d), spec.h_dtype),
    map_sequentially=("cpu", "cuda"),
)


def _swizzled(rows: int, cols: int, bits: int, operand: str) -> tuple:
    """The SMEM transforms of a [rows, cols] tile of `bits`-bit elements for wgmma (as in the INT4 kernel)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    sw = plgpu.find_swizzle(cols * bits, operand)
    return (plgpu.TilingTransform((8, sw * 8 // bits)), plgpu.SwizzleTransform(sw))


def _legal_block_k(bk: int, k: int, group: int) -> bool:
    """A K step divides K and is a whole number of groups (each a multiple of SEGMENT_K rows) or lies inside
    one."""
    return k % bk == 0 and ((bk % group == 0 and group % SEGMENT_K == 0) or group % bk == 0)


def _int4_block_k(k: int, group: int, one_segment: bool = False) -> int | None:
    """The first legal K step of INT4_BLOCK_KS; with one_segment, those inside one group first (kernel 1's
    two running totals and accumulator leave no registers for a second segment's at 64-row tiles: 24 bytes
    of spills at group 64 with 128-row steps)."""
    order = sorted(INT4_BLOCK_KS, key=lambda b: b > group) if one_segment else INT4_BLOCK_KS
    return next((b for b in order if _legal_block_k(b, k, group)), None)


def _expert_codes(packed: jax.Array) -> jax.Array:
    """One expert's canonical `packed [K/2, N] uint8` -> `[Np, K] int4` holding q − 8, transposed (K
    contiguous: a [bn, bk] TMA box is one wgmma A tile; signed, so Mosaic GPU's int4 -> bf16 register
    conversion gives q − 8 exactly), N padded to a multiple of 64 with zero codes."""
    r, n = packed.shape
    q = jnp.stack([packed & 0xF, packed >> 4], axis=1).reshape(2 * r, n)  # row 2i in the low nibble
    signed = jnp.pad(q.astype(jnp.int8) - CODE_OFFSET, ((0, 0), (0, _padded_n(n) - n)))
    return signed.T.astype(jnp.int4)


def _padded_n(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _int4_reason(wg: Int4Weight, wu: Int4Weight, wd: Int4Weight) -> str | None:
    """Why INT4 experts go through XLA's dequantization instead of the INT4 kernels (None: they do not)."""
    _, d, f = _dims(wg)
    if any(w.bits not in (3, 4) for w in (wg, wu, wd)):
        return f"bits={wg.bits}/{wu.bits}/{wd.bits} (the kernels read the 4-bit container: bits 3 and 4)"
    if wg.group_size != wu.group_size:
        return f"gate group_size={wg.group_size} != up group_size={wu.group_size}"
    for name in ("perm", "act_scales"):
        a, b = getattr(wg, name), getattr(wu, name)
        if a is not b and (a is None or b is None or a.shape != b.shape or not _same_values(a, b)):
            return f"gate and up with different {name} (they share one transformed x)"
    if _int4_block_k(d, wg.group_size) is None or _int4_block_k(f, wd.group_size) is None:
        return f"group sizes {wg.group_size}/{wd.group_size} with d={d}, f={f} (no legal K step)"
    return None


def _same_values(a: Any, b: Any) -> bool:
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return False
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _int4_spec(x: Any, expert_ids: Any, wg: Int4Weight, wd: Int4Weight, cfg: Config) -> _Int4Spec:
    num_experts, d, f = _dims(wg)
    parts = {"bfloat16": 1, "float16": 2, "float32": 3}[np.dtype(x.dtype).name]
    bm = cfg.int4_block_m
    if bm is None:
        balanced = -(-expert_ids.shape[0] * expert_ids.shape[1] // num_experts)
        bm = next((b for b in INT4_BLOCK_MS if b >= balanced), INT4_BLOCK_MS[-1])
    bn2 = 128 if bm <= 32 and _padded_n(d) % 128 == 0 else 64
    bk1, bk2 = _int4_block_k(d, wg.group_size, one_segment=True), _int4_block_k(f, wd.group_size)
    # Bytes per pipeline stage: the parts of the x̃ᵀ tile, the codes tiles, the segment sums, scales and zm.
    stage = max(
        parts * bk * bm * 2 + nw * (bn * bk // 2 + 2 * 4 * max(1, bk // g) * bn) + 4 * bk * bm
        for bk, bn, nw, g in ((bk1, 64, 2, wg.group_size), (bk2, bn2, 1, wd.group_size))
    )
    steps = max(2, min(cfg.max_concurrent_steps, SMEM_BUDGET // stage))
    return _Int4Spec(
        d=d, f=f, parts=parts, block_m=bm, block_n=(64, bn2), block_k=(bk1, bk2),
        group=(wg.group_size, wd.group_size), steps=steps,
        h_dtype=np.dtype(jnp.bfloat16) if parts == 1 else np.dtype(np.float32),
        down_transform=wd.perm is not None or wd.act_scales is not None,
    )  # fmt: skip


def _prepare_one(w: Int4Weight, explicit_zm: bool):
    """An expert stack in the kernels' layout: (codes [E, Np, K] int4 holding q − 8, transposed; scales
    [E, G, Np] float32; zm [E, G, Np] float32 = z − 8, or None when it is 0 and not asked for)."""
    from quant.format import symmetric_zero

    n = w.scales.shape[-1]
    pad = ((0, 0), (0, 0), (0, _padded_n(n) - n))
    codes = jax.vmap(_expert_codes)(w.packed)
    scales = jnp.pad(w.scales.astype(jnp.float32), pad)
    zero = symmetric_zero(w.bits)
    if w.zeros is not None:
        zm = jnp.pad(w.zeros.astype(jnp.float32) - CODE_OFFSET, pad)
    elif zero != CODE_OFFSET or explicit_zm:
        zm = jnp.pad(jnp.full(w.scales.shape, zero - CODE_OFFSET, jnp.float32), pad)
    else:
        zm = None
    return codes, scales, zm


def _needs_zm(w: Int4Weight) -> bool:
    from quant.format import symmetric_zero

    return w.zeros is not None or symmetric_zero(w.bits) != CODE_OFFSET


@jax.jit
def _prepare_experts(wg: Int4Weight, wu: Int4Weight, wd: Int4Weight):
    zm = _needs_zm(wg) or _needs_zm(wu)  # gate and up run in one kernel: both or neither carry zm
    return _prepare_one(wg, zm), _prepare_one(wu, zm), _prepare_one(wd, False)


def _prepared_experts(wg: Int4Weight, wu: Int4Weight, wd: Int4Weight):
    """The prepared stacks of (gate, up, down), computed once per concrete set of experts.

    Keyed on the identity of every leaf (`kernels.memo.IdentityMemo`: an entry goes with its weights).
    Traced experts (weights passed into a jitted
    function as arguments) are prepared inside that program, every call: a serving loop that jits over its
    weights should close over them instead.
    """
    leaves = jax.tree_util.tree_leaves((wg, wu, wd))
    if any(isinstance(a, jax.core.Tracer) for a in leaves):
        return _prepare_experts(wg, wu, wd)
    return _PREPARED.get(leaves, lambda: _prepare_experts(wg, wu, wd))


# The prepared INT4 expert stacks of concrete weights (see `_prepared_experts`); like
# kernels.int4_matmul.prepared's cache, the one piece of state the transparent Int4Weight path needs.
_PREPARED = IdentityMemo()


# --------------------------------------------------------------------------------------------------
# the FFN: dispatch, kernels, combine; the XLA path's VJP


def _float_experts(w, dtype):
    return jax.vmap(lambda v: v.dequantize())(w).astype(dtype) if isinstance(w, Int4Weight) else w


def _pad_to(a, axis, size):
    if a.shape[axis] == size:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pad)


def _forward(x, weights, expert_ids, wg, wu, wd, prep, static):
    from kernels.moe.dispatch import combine_rows, plan_rows

    capacity, drop_priority, blocks, interpret, spec4 = static
    if spec4 is not None:
        return _forward_int4(x, weights, expert_ids, wg, wd, prep, static)
    block_m = blocks[0]
    num_experts, d, f = _dims(wg)
    dtype = x.dtype
    wg, wu, wd = (_float_experts(w, dtype) for w in (wg, wu, wd))
    dp, fp = -(-d // ALIGN) * ALIGN, -(-f // ALIGN) * ALIGN
    wg, wu = (_pad_to(_pad_to(w, 1, dp), 2, fp) for w in (wg, wu))
    wd = _pad_to(_pad_to(wd, 1, fp), 2, dp)
    plan = plan_rows(
        expert_ids.astype(jnp.int32), lax.stop_gradient(weights), num_experts=num_experts, capacity=capacity,
        drop_priority=drop_priority, layout="packed", row_align=block_m,
    )  # fmt: skip
    num_rows = plan.row_token.shape[0]
    padded = -(-num_rows // block_m) * block_m
    row_token = jnp.pad(plan.row_token, (0, padded - num_rows), constant_values=x.shape[0])
    xs = _pad_to(jnp.take(x, row_token, axis=0, mode="fill", fill_value=0), 1, dp)
    te = tile_experts(plan.group_sizes, padded // block_m, block_m)
    if interpret is None:
        ys = _ffn_rows_per_platform(xs, te, wg, wu, wd, blocks=blocks)
    else:
        ys = _ffn_rows(xs, te, wg, wu, wd, blocks=blocks, interpret=interpret)
    # Only the plan's R rows: a dropped assignment's position is R, which must read zero, not a padding row.
    return combine_rows(ys[:num_rows, :d], weights, plan.position).astype(dtype)


def _forward_int4(x, weights, expert_ids, wg, wd, prep, static):
    """The INT4 path: only the prepared codes, scales and zero points of experts that own a row tile are
    read (by the kernels' TMA copies)."""
    from kernels.moe.dispatch import combine_rows, plan_rows

    capacity, drop_priority, _, interpret, spec = static
    bm = spec.block_m
    num_experts = _dims(wg)[0]
    plan = plan_rows(
        expert_ids.astype(jnp.int32), lax.stop_gradient(weights), num_experts=num_experts, capacity=capacity,
        drop_priority=drop_priority, layout="packed", row_align=bm,
    )  # fmt: skip
    num_rows = plan.row_token.shape[0]
    padded = -(-num_rows // bm) * bm
    row_token = jnp.pad(plan.row_token, (0, padded - num_rows), constant_values=x.shape[0])
    te = tile_experts(plan.group_sizes, padded // bm, bm)
    xs = jnp.take(x, row_token, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    if wg.perm is not None or wg.act_scales is not None:  # gate and up share them (`_int4_reason`)
        xs = _transform_rows(xs, _row_experts(te, bm), wg.perm, wg.act_scales)
    down_tr = (wd.perm, wd.act_scales) if spec.down_transform else (None, None)
    if interpret is None:
        ys = _int4_rows_per_platform(xs, te, *prep, down_tr, spec=spec)
    else:
        ys = _int4_rows(xs, te, *prep, down_tr, spec=spec, interpret=interpret)
    return combine_rows(ys[:num_rows], weights, plan.position).astype(x.dtype)


def _xla_path(x, weights, expert_ids, wg, wu, wd, static):
    from kernels.moe import xla

    capacity, drop_priority, *_ = static
    num_experts, _, _ = _dims(wg)
    # The XLA path takes capacity_factor; any factor that gives the same C will do.
    cf = None if capacity is None else capacity * num_experts / (expert_ids.shape[0] * expert_ids.shape[1])
    return xla.IMPLEMENTATION(
        x, weights, expert_ids, wg, wu, wd, capacity_factor=cf, drop_priority=drop_priority
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _moe(x, weights, expert_ids, wg, wu, wd, prep, static):
    return _forward(x, weights, expert_ids, wg, wu, wd, prep, static)


def _moe_fwd(x, weights, expert_ids, wg, wu, wd, prep, static):
    out = _forward(x, weights, expert_ids, wg, wu, wd, prep, static)
    return out, (x, weights, expert_ids, wg, wu, wd, prep)


def _moe_bwd(static, res, dy):
    from kernels.int4_matmul.xla import zero_cotangent

    *res, prep = res
    _, vjp = jax.vjp(lambda *a: _xla_path(*a, static), *res)
    return (*vjp(dy), zero_cotangent(prep))


_moe.defvjp(_moe_fwd, _moe_bwd)
# One program per (shapes, static): eagerly, the plan, gather and combine would otherwise each compile per
# new shape, op by op.
_moe_jit = jax.jit(_moe, static_argnums=(7,))


def moe_ffn_mosaic_gpu(
    x: jax.Array,
    weights: jax.Array,
    expert_ids: jax.Array,
    w_gate: Any,
    w_up: Any,
    w_down: Any,
    *,
    capacity: int | None = None,
    drop_priority: str = "choice",
    config: Config | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The MoE FFN through the Mosaic GPU grouped GEMMs: x [T, d] -> y [T, d] (x.dtype).

    x: [T, d] float32|bfloat16|float16; weights: [T, k] float; expert_ids: [T, k] int; w_gate, w_up:
    [E, d, f], w_down: [E, f, d], float of x's dtype or stacks of Int4Weight. capacity: keep at most this
    many assignments per expert in drop_priority order (None: dropless). config: tiles (`Config`; None
    fields from `kernels.tuning` or the built-in default for the call's `shape_class`). interpret: None
    chooses per lowering platform (cpu: interpret mode, cuda: compiled); True/False forces one form.
    Differentiable with respect to x, weights and the experts' float fields (the XLA path's VJP).
    """
    from kernels.moe.reference import validate_moe_ffn_inputs

    validate_moe_ffn_inputs(x, weights, expert_ids, w_gate, w_up, w_down, drop_priority=drop_priority)
    if capacity is not None and (not isinstance(capacity, (int, np.integer)) or capacity < 1):
        raise ValueError(f"capacity={capacity} must be a positive int or None")
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be None, True or False")
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config={config!r} must be a {__name__}.Config")
    reason = pallas_unsupported(x, w_gate, w_up, w_down)
    if reason is not None:
        raise ValueError(f"the Mosaic GPU grouped FFN does not take these operands: {reason}")
    cfg = _resolved(config, x, weights, expert_ids, w_gate, w_up, w_down)
    blocks = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.max_concurrent_steps)
    spec4, prep = None, None
    if isinstance(w_gate, Int4Weight) and _int4_reason(w_gate, w_up, w_down) is None:
        spec4 = _int4_spec(x, expert_ids, w_gate, w_down, cfg)
        prep = _prepared_experts(w_gate, w_up, w_down)
    static = (None if capacity is None else int(capacity), drop_priority, blocks, interpret, spec4)
    return _moe_jit(x, weights, expert_ids, w_gate, w_up, w_down, prep, static)


def _supports(x, weights, expert_ids, w_gate, w_up, w_down, **_):
    return pallas_unsupported(x, w_gate, w_up, w_down)


def _pallas(x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor, drop_priority, config):
    return moe_ffn_mosaic_gpu(
        x, weights, expert_ids, w_gate, w_up, w_down,
        capacity=capacity_of(expert_ids, w_gate, capacity_factor), drop_priority=drop_priority, config=config,
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation(
    IMPL,
    _pallas,
    platforms=("cpu", "cuda"),
    supports=_supports,
    config=Config,
    available=lowering.mosaic_gpu_unavailable,
)
