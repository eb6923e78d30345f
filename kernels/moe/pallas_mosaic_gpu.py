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

Quantized experts (stacks of `quant.Int4Weight`): dequantized to the activation dtype by XLA
(`Int4Weight.dequantize`: group scales, zero points, act-order and AWQ activation scales) and run
through the float kernels. This reads every expert's packed codes once per call; an in-kernel unpack
is future work.

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

from kernels import registry, tuning
from kernels.lowering import per_platform_kernel, target_gpu
from kernels.moe.reference import capacity_of
from quant.format import Int4Weight, codes_per_byte

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


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles of the Mosaic GPU grouped GEMMs; a field left None takes the tuned or built-in default.

    block_m: rows per tile (64 or 128; wgmma's M). block_n: kernel 1's column tile over f (kernel 2 takes
    twice as many over d). block_k: reduction slice per pipeline step. max_concurrent_steps: pipeline
    stages in flight (SMEM buffers). Each kernel uses the largest power of two <= its tile that divides its
    (padded) width.
    """

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    max_concurrent_steps: int | None = None

    def __post_init__(self) -> None:
        registry.check_positive_ints(self, "block_m", "block_n", "block_k", "max_concurrent_steps")
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


def _dims(w: Any) -> tuple[int, int, int]:
    """(E, K, N) of a float stack [E, K, N] or of a stack of Int4Weight experts."""
    if isinstance(w, Int4Weight):
        e, r, n = w.packed.shape
        return e, r * codes_per_byte(w.bits), n
    return tuple(w.shape)


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
    return Config(**{f: getattr(config, f) if getattr(config, f) is not None else getattr(base, f)
                     for f in ("block_m", "block_n", "block_k", "max_concurrent_steps")})  # fmt: skip


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
        # Row tiles rounded up to a power of two (the extra tiles have no expert and return at once), so
        # that calls whose plans differ only in R share one compiled interpreter program.
        tiles = te.shape[0]
        bucket = 1 << max(0, (tiles - 1).bit_length())
        xs_b = np.pad(xs, ((0, (bucket - tiles) * (xs.shape[0] // max(tiles, 1))), (0, 0)))
        te_b = np.pad(te, (0, bucket - tiles), constant_values=-1)
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
# the FFN: dispatch, kernels, combine; the XLA path's VJP


def _float_experts(w, dtype):
    return jax.vmap(lambda v: v.dequantize())(w).astype(dtype) if isinstance(w, Int4Weight) else w


def _pad_to(a, axis, size):
    if a.shape[axis] == size:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pad)


def _forward(x, weights, expert_ids, wg, wu, wd, static):
    from kernels.moe.dispatch import combine_rows, plan_rows

    capacity, drop_priority, blocks, interpret = static
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


def _xla_path(x, weights, expert_ids, wg, wu, wd, static):
    from kernels.moe import xla

    capacity, drop_priority, _, _ = static
    num_experts, _, _ = _dims(wg)
    # The XLA path takes capacity_factor; any factor that gives the same C will do.
    cf = None if capacity is None else capacity * num_experts / (expert_ids.shape[0] * expert_ids.shape[1])
    return xla.IMPLEMENTATION(
        x, weights, expert_ids, wg, wu, wd, capacity_factor=cf, drop_priority=drop_priority
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _moe(x, weights, expert_ids, wg, wu, wd, static):
    return _forward(x, weights, expert_ids, wg, wu, wd, static)


def _moe_fwd(x, weights, expert_ids, wg, wu, wd, static):
    return _forward(x, weights, expert_ids, wg, wu, wd, static), (x, weights, expert_ids, wg, wu, wd)


def _moe_bwd(static, res, dy):
    _, vjp = jax.vjp(lambda *a: _xla_path(*a, static), *res)
    return vjp(dy)


_moe.defvjp(_moe_fwd, _moe_bwd)
# One program per (shapes, static): eagerly, the plan, gather and combine would otherwise each compile per
# new shape, op by op.
_moe_jit = jax.jit(_moe, static_argnums=(6,))


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
    static = (None if capacity is None else int(capacity), drop_priority, blocks, interpret)
    return _moe_jit(x, weights, expert_ids, w_gate, w_up, w_down, static)


def _supports(x, weights, expert_ids, w_gate, w_up, w_down, **_):
    return pallas_unsupported(x, w_gate, w_up, w_down)


def _pallas(x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor, drop_priority, config):
    return moe_ffn_mosaic_gpu(
        x, weights, expert_ids, w_gate, w_up, w_down,
        capacity=capacity_of(expert_ids, w_gate, capacity_factor), drop_priority=drop_priority, config=config,
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation(
    IMPL, _pallas, platforms=("cpu", "cuda"), supports=_supports, config=Config
)
