"""The MoE expert FFN, the portable XLA strategies: grouped, bucketed, ragged, batched, dense (see the
`kernels.moe` docstring for when each wins). The grouped loop also carries the native forward of
`kernels/moe/cpu_native.py` (`native=True`), whose backward stays this loop."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import cpu, registry
from kernels.int4_matmul import int4_matmul, zero_cotangent
from kernels.moe.dispatch import combine_rows, gather_rows, plan_rows
from kernels.moe.reference import capacity_of, expert_weights, num_experts_of
from kernels.precision import highest_precision
from quant.format import Int4Weight


def _swiglu(v, wg, wu, wd):
    """One expert on a block of rows v: [n, d] -> [n, d] float32 (float32 accumulation)."""
    if isinstance(wg, Int4Weight):
        v = v.astype(jnp.float32)
        h = jax.nn.silu(int4_matmul(v, wg)) * int4_matmul(v, wu)
        return int4_matmul(h, wd)
    g = jnp.dot(v, wg, preferred_element_type=jnp.float32)
    u = jnp.dot(v, wu, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(wd.dtype)
    return jnp.dot(h, wd, preferred_element_type=jnp.float32)


def _block_sizes(block_rows: int, row_align: int) -> list[int]:
    """Remainder block sizes, largest first: block_rows/2, block_rows/4, ..., row_align."""
    sizes, s = [], block_rows // 2
    while s >= row_align:
        sizes.append(s)
        s //= 2
    return sizes


def _for_each_block(sizes, offsets, row_align, block_rows, init, expert_init, block_fn, expert_done):
    """Drive a loop over the non-empty experts and their row blocks (static block sizes).

    For expert e with padded size p (a multiple of row_align): p // block_rows full blocks, then the
    binary decomposition of the remainder. block_fn(state, local, e, row0, n) -> (state, local) with a
    static n; expert_init(e) -> local; expert_done(state, local, e) -> state.
    """
    num_experts = sizes.shape[0]
    padded = (sizes + row_align - 1) // row_align * row_align
    active = jnp.nonzero(sizes > 0, size=num_experts, fill_value=0)[0].astype(jnp.int32)
    n_active = jnp.sum(sizes > 0).astype(jnp.int32)

    def per_expert(i, state):
        e = active[i]
        off, p = offsets[e], padded[e]
        local = expert_init(e)
        n_full = p // block_rows

        def full(j, carry):
            return block_fn(*carry, e, off + j * block_rows, block_rows)

        state, local = lax.fori_loop(0, n_full, full, (state, local))
        row = off + n_full * block_rows
        rem = p - n_full * block_rows
        for n in _block_sizes(block_rows, row_align):

            def take(carry, row=row, n=n):
                return block_fn(*carry, e, row, n)

            state, local = lax.cond((rem & n) != 0, take, lambda carry: carry, (state, local))
            row = row + jnp.where((rem & n) != 0, n, 0)
        return expert_done(state, local, e)

    return lax.fori_loop(0, n_active, per_expert, init)


def _grouped_fwd_impl(xs, sizes, offsets, wg, wu, wd, row_align, block_rows):
    out0 = jnp.zeros(xs.shape, jnp.float32)

    def expert_init(e):
        return (expert_weights(wg, e), expert_weights(wu, e), expert_weights(wd, e))

    def block_fn(out, w, e, row0, n):
        v = lax.dynamic_slice_in_dim(xs, row0, n)
        return lax.dynamic_update_slice_in_dim(out, _swiglu(v, *w), row0, 0), w

    return _for_each_block(
        sizes, offsets, row_align, block_rows, out0, expert_init, block_fn, lambda out, w, e: out
    )


def _grouped_fwd_any(xs, sizes, offsets, wg, wu, wd, row_align, block_rows, native):
    """The grouped forward: the XLA loop, or with `native` the C++ kernel (CPU only: the caller chooses the
    platform at lowering)."""
    if native:
        return cpu.moe_ffn_native(xs, sizes, offsets, wg, wu, wd)
    return _grouped_fwd_impl(xs, sizes, offsets, wg, wu, wd, row_align, block_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _grouped_ffn(xs, sizes, offsets, wg, wu, wd, row_align, block_rows, native):
    return _grouped_fwd_any(xs, sizes, offsets, wg, wu, wd, row_align, block_rows, native)


@highest_precision
def _grouped_ffn_fwd(xs, sizes, offsets, wg, wu, wd, row_align, block_rows, native):
    out = _grouped_fwd_any(xs, sizes, offsets, wg, wu, wd, row_align, block_rows, native)
    return out, (xs, sizes, offsets, wg, wu, wd)


@highest_precision
def _grouped_ffn_bwd(row_align, block_rows, native, res, d_out):
    xs, sizes, offsets, wg, wu, wd = res
    f32 = jnp.float32
    init = (
        jnp.zeros(xs.shape, f32),
        jnp.zeros(wg.shape, f32),
        jnp.zeros(wu.shape, f32),
        jnp.zeros(wd.shape, f32),
    )

    def expert_init(e):
        w = (wg[e], wu[e], wd[e])
        acc = (jnp.zeros(wg.shape[1:], f32), jnp.zeros(wu.shape[1:], f32), jnp.zeros(wd.shape[1:], f32))
        return w, acc

    def block_fn(state, local, e, row0, n):
        dxs, dwg, dwu, dwd = state
        w, acc = local
        v = lax.dynamic_slice_in_dim(xs, row0, n)
        dy = lax.dynamic_slice_in_dim(d_out, row0, n)
        _, vjp = jax.vjp(_swiglu, v, *w)
        dv, *dw = vjp(dy)
        dxs = lax.dynamic_update_slice_in_dim(dxs, dv.astype(f32), row0, 0)
        acc = tuple(a + b.astype(f32) for a, b in zip(acc, dw, strict=True))
        return (dxs, dwg, dwu, dwd), (w, acc)

    def expert_done(state, local, e):
        dxs, *dws = state
        _, acc = local
        dws = [lax.dynamic_update_index_in_dim(dw, a, e, 0) for dw, a in zip(dws, acc, strict=True)]
        return (dxs, *dws)

    dxs, dwg, dwu, dwd = _for_each_block(
        sizes, offsets, row_align, block_rows, init, expert_init, block_fn, expert_done
    )
    return (
        dxs.astype(xs.dtype),
        None,
        None,
        dwg.astype(wg.dtype),
        dwu.astype(wu.dtype),
        dwd.astype(wd.dtype),
    )


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _grouped_ffn_quantized(xs, sizes, offsets, wg, wu, wd, row_align, block_rows):
    return _grouped_fwd_impl(xs, sizes, offsets, wg, wu, wd, row_align, block_rows)


@highest_precision
def _grouped_ffn_quantized_fwd(xs, sizes, offsets, wg, wu, wd, row_align, block_rows):
    out = _grouped_fwd_impl(xs, sizes, offsets, wg, wu, wd, row_align, block_rows)
    return out, (xs, sizes, offsets, wg, wu, wd)


def _float_fields(w: Int4Weight) -> tuple[Any, Any]:
    """The differentiable leaves of an Int4Weight (stack): (scales, act_scales or None)."""
    return w.scales, w.act_scales


def _with_float_cotangents(w: Int4Weight, scales: Any, act_scales: Any) -> Int4Weight:
    """The cotangent of a (stacked) Int4Weight: float0 for the integer leaves, the given float ones."""
    zero = zero_cotangent(w)
    return type(w).tree_unflatten(
        w.tree_flatten()[1], (zero.packed, scales.astype(w.scales.dtype), zero.zeros, zero.perm,
                              None if act_scales is None else act_scales.astype(w.act_scales.dtype))
    )  # fmt: skip


@highest_precision
def _grouped_ffn_quantized_bwd(row_align, block_rows, res, d_out):
    """The gradient reaches the rows (and, through combine, the routing weights and x) and each expert's
    float fields (scales, act_scales) through int4_matmul's own VJP; never the integer codes. Experts
    without rows get exact zeros."""
    xs, sizes, offsets, wg, wu, wd = res
    f32 = jnp.float32
    stacks = (wg, wu, wd)

    def zeros_like_fields(w, lead=()):
        return tuple(None if a is None else jnp.zeros((*lead, *a.shape[len(lead) or 1 :]), f32)
                     for a in _float_fields(w))  # fmt: skip

    init = (jnp.zeros(xs.shape, f32), tuple(zeros_like_fields(w, (w.scales.shape[0],)) for w in stacks))

    def expert_init(e):
        return tuple(expert_weights(w, e) for w in stacks), tuple(zeros_like_fields(w) for w in stacks)

    def block_fn(state, local, e, row0, n):
        dxs, dws = state
        w, acc = local
        v = lax.dynamic_slice_in_dim(xs, row0, n)
        dy = lax.dynamic_slice_in_dim(d_out, row0, n)
        _, vjp = jax.vjp(_swiglu, v, *w)
        dv, *dw = vjp(dy)
        acc = tuple(
            tuple(
                None if a is None else a + b.astype(f32)
                for a, b in zip(fields, _float_fields(d), strict=True)
            )
            for fields, d in zip(acc, dw, strict=True)
        )
        return (lax.dynamic_update_slice_in_dim(dxs, dv.astype(f32), row0, 0), dws), (w, acc)

    def expert_done(state, local, e):
        dxs, dws = state
        _, acc = local
        dws = tuple(
            tuple(None if s is None else lax.dynamic_update_index_in_dim(s, a, e, 0)
                  for s, a in zip(stack, fields, strict=True))
            for stack, fields in zip(dws, acc, strict=True)
        )  # fmt: skip
        return dxs, dws

    dxs, dws = _for_each_block(
        sizes, offsets, row_align, block_rows, init, expert_init, block_fn, expert_done
    )
    return (
        dxs.astype(xs.dtype), None, None,
        *(_with_float_cotangents(w, *fields) for w, fields in zip(stacks, dws, strict=True)),
    )  # fmt: skip


_grouped_ffn_quantized.defvjp(_grouped_ffn_quantized_fwd, _grouped_ffn_quantized_bwd)


def ffn_grouped(
    x, weights, expert_ids, wg, wu, wd, capacity, drop_priority, row_align, block_rows, native=False
):
    plan = plan_rows(
        expert_ids,
        weights,
        num_experts=num_experts_of(wg),
        capacity=capacity,
        drop_priority=drop_priority,
        layout="packed",
        row_align=row_align,
        min_rows=block_rows,  # every block, a static size, must fit in the buffer
    )
    xs = gather_rows(x, plan.row_token)
    sizes, offsets = plan.group_sizes, plan.group_offsets
    if isinstance(wg, Int4Weight):
        ys = _grouped_ffn_quantized(xs, sizes, offsets, wg, wu, wd, row_align, block_rows)
    else:
        ys = _grouped_ffn(xs, sizes, offsets, wg, wu, wd, row_align, block_rows, native)
    return combine_rows(ys, weights, plan.position).astype(x.dtype)


# Fine steps near balance, where realistic routing lands; past 2x the grouped loop is cheaper on the CPU.
BUCKET_FACTORS = (1.0, 1.0625, 1.125, 1.1875, 1.25, 1.3125, 1.375, 1.5, 1.625, 1.75, 2.0)
# "auto" on the CPU: the bucketed batched einsum for few, large experts (a weight copy per expert, which
# the grouped loop pays, costs more than padding rows); the grouped loop for many small experts.
BUCKETED_MAX_EXPERTS = 16
# "auto" on a TPU: the grouped loop. Not "ragged": XLA's TPU lowering of `lax.ragged_dot` (libtpu 0.0.52,
# default flags) is a dense convolution over every expert for every row, E times the FLOPs (51.6 GFLOP
# instead of 6.5 at T=256, E=8, k=2, d=1024, f=2048), and its float32 weight gradient runs out of scoped VMEM
# on v6e at that shape. Not "bucketed": its switch over bucket capacities holds a dozen GEMM chains, and
# libtpu takes 5-9x longer to compile it (30-800 s at that shape on the compile-only devices, against 6-71 s).
# "grouped" reads only the experts that have rows, each sliced expert kept in VMEM across its row blocks.
TPU_STRATEGY = "grouped"


def _bucket_capacities(num_assign: int, num_experts: int, row_align: int) -> list[int]:
    """Static capacities for the "bucketed" strategy: the balanced load times BUCKET_FACTORS, rounded up
    to row_align, capped at num_assign, without repeats."""
    caps = []
    for s in BUCKET_FACTORS:
        c = math.ceil(num_assign / num_experts * s - 1e-9)
        c = min(num_assign, -(-c // row_align) * row_align)
        if c not in caps:
            caps.append(c)
    return caps


def _ffn_bucketed(x, weights, expert_ids, wg, wu, wd, drop_priority, row_align, block_rows):
    """Dropless: the batched einsum at the smallest static capacity that holds the busiest expert, or
    the grouped loop when none does. No weight copies while the routing is near balance."""
    num_experts = wg.shape[0]
    caps = _bucket_capacities(expert_ids.size, num_experts, row_align)
    counts = jnp.zeros((num_experts,), jnp.int32).at[expert_ids.reshape(-1)].add(1)
    index = jnp.sum(jnp.asarray(caps, jnp.int32) < jnp.max(counts))
    branches = [functools.partial(_ffn_batched, capacity=c, drop_priority=drop_priority) for c in caps] + [
        functools.partial(
            ffn_grouped,
            capacity=None,
            drop_priority=drop_priority,
            row_align=row_align,
            block_rows=block_rows,
        )
    ]
    return lax.switch(index, branches, x, weights, expert_ids, wg, wu, wd)


def _map_under_vmap(fn):
    """fn, whose `jax.vmap` runs it once per batch element (`lax.map`) instead of batching its primitives.

    `lax.ragged_dot` has no batching rule unless every operand is batched along axis 0 (JAX 0.10 to 0.12:
    "ragged_dot vmap over any dim but 0 - NYI"), so a vmapped MoE layer with shared experts could not use it.
    `custom_vmap` does not support reverse-mode autodiff, so callers wrap it in a custom VJP (`_ragged_dot`).
    """
    mapped = jax.custom_batching.custom_vmap(fn)

    @mapped.def_vmap
    def rule(axis_size, in_batched, *args):
        del axis_size
        batched = [a for a, b in zip(args, in_batched, strict=True) if b]

        def one(elems):
            it = iter(elems)
            return mapped(*[next(it) if b else a for a, b in zip(args, in_batched, strict=True)])

        out = lax.map(one, batched)
        return out, jax.tree.map(lambda _: True, out)

    return mapped


def _ragged_dot_precision(x, w):
    """HIGHEST for float32 operands (the precision policy), DEFAULT (native bf16/f16 passes) otherwise.

    Explicit, so the `highest_precision` context around the strategies does not ask for float32 contraction
    of low-precision operands: XLA's TPU ragged-dot kernel (Mosaic, libtpu's
    `xla_tpu_enable_ragged_dot_kernel`) rejects a float32 contract precision on a bf16 operand ("Mosaic failed
    to compile TPU kernel: Bad lhs type" in its `matmul`; "Bad rhs type" in the gradient's f32 x bf16 dot).
    The transpose rule reuses this precision, so the backward dots follow the forward operands' dtype.
    """
    f32 = jnp.dtype(jnp.float32)
    if jnp.dtype(x.dtype) == f32 and jnp.dtype(w.dtype) == f32:
        return lax.Precision.HIGHEST
    return lax.Precision.DEFAULT


@highest_precision
def _ragged_dot_fwd_core(x, w, sizes):
    return lax.ragged_dot(
        x, w, sizes, precision=_ragged_dot_precision(x, w), preferred_element_type=jnp.float32
    )


@highest_precision
def _ragged_dot_bwd_core(x, w, sizes, dy):
    _, vjp = jax.vjp(lambda x, w: _ragged_dot_fwd_core(x, w, sizes), x, w)
    return vjp(dy.astype(jnp.float32))


_ragged_dot_fwd_mapped = _map_under_vmap(_ragged_dot_fwd_core)
_ragged_dot_bwd_mapped = _map_under_vmap(_ragged_dot_bwd_core)


@jax.custom_vjp
def _ragged_dot(x, w, sizes):
    """`lax.ragged_dot(x, w, sizes)` in float32 that also runs under `jax.vmap` (and its gradient)."""
    return _ragged_dot_fwd_mapped(x, w, sizes)


@highest_precision
def _ragged_dot_fwd(x, w, sizes):
    return _ragged_dot_fwd_mapped(x, w, sizes), (x, w, sizes)


@highest_precision
def _ragged_dot_bwd(res, dy):
    x, w, sizes = res
    dx, dw = _ragged_dot_bwd_mapped(x, w, sizes, dy)
    return dx, dw, np.zeros(sizes.shape, jax.dtypes.float0)


_ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


def _unused_experts_zeroed(sizes, *ws):
    """The expert weights with every expert that has no rows replaced by zeros.

    Where `ragged_dot` is lowered as a dense product with masked rows (the CPU; every expert meets every row),
    and in "dense", an unused expert's weights still enter a product with zeros, and 0 · Inf = NaN would reach
    every output. Zeroing them keeps the guarantee paged attention gives for unused slots: an expert no token
    is routed to touches no output (nor any gradient of x)."""
    used = sizes > 0
    return tuple(jnp.where(used.reshape(-1, *([1] * (w.ndim - 1))), w, jnp.zeros((), w.dtype)) for w in ws)


def _ffn_ragged(x, weights, expert_ids, wg, wu, wd, capacity, drop_priority):
    plan = plan_rows(
        expert_ids,
        weights,
        num_experts=wg.shape[0],
        capacity=capacity,
        drop_priority=drop_priority,
        layout="packed",
        row_align=1,
    )
    xs = gather_rows(x, plan.row_token)
    sizes = plan.group_sizes
    wg, wu, wd = _unused_experts_zeroed(sizes, wg, wu, wd)
    g = _ragged_dot(xs, wg, sizes)
    u = _ragged_dot(xs, wu, sizes)
    h = (jax.nn.silu(g) * u).astype(wd.dtype)
    ys = _ragged_dot(h, wd, sizes)
    return combine_rows(ys, weights, plan.position).astype(x.dtype)


def _ffn_batched(x, weights, expert_ids, wg, wu, wd, capacity, drop_priority):
    num_tokens, top_k = expert_ids.shape
    num_experts = num_experts_of(wg)
    cap = num_tokens * top_k if capacity is None else capacity
    plan = plan_rows(
        expert_ids,
        weights,
        num_experts=num_experts,
        capacity=cap,
        drop_priority=drop_priority,
        layout="padded",
        row_align=1,
    )
    xs = gather_rows(x, plan.row_token).reshape(num_experts, cap, -1)
    if isinstance(wg, Int4Weight):
        ys = jax.vmap(_swiglu)(xs, wg, wu, wd)
        return combine_rows(ys.reshape(num_experts * cap, -1), weights, plan.position).astype(x.dtype)
    g = jnp.einsum("ecd,edf->ecf", xs, wg, preferred_element_type=jnp.float32)
    u = jnp.einsum("ecd,edf->ecf", xs, wu, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(wd.dtype)
    ys = jnp.einsum("ecf,efd->ecd", h, wd, preferred_element_type=jnp.float32)
    return combine_rows(ys.reshape(num_experts * cap, -1), weights, plan.position).astype(x.dtype)


def _ffn_dense(x, weights, expert_ids, wg, wu, wd, capacity, drop_priority):
    if isinstance(wg, Int4Weight):
        wg, wu, wd = (jax.vmap(lambda w: w.dequantize())(w) for w in (wg, wu, wd))
    num_experts = wg.shape[0]
    plan = plan_rows(
        expert_ids,
        weights,
        num_experts=num_experts,
        capacity=capacity,
        drop_priority=drop_priority,
        layout="packed",
        row_align=1,
    )
    keep = plan.position < plan.row_token.shape[0]
    wg, wu, wd = _unused_experts_zeroed(plan.group_sizes, wg, wu, wd)
    g = jnp.einsum("td,edf->etf", x, wg, preferred_element_type=jnp.float32)
    u = jnp.einsum("td,edf->etf", x, wu, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(wd.dtype)
    out = jnp.einsum("etf,efd->etd", h, wd, preferred_element_type=jnp.float32)
    onehot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)  # [T, k, E]
    gate = jnp.einsum("tk,tke->et", jnp.where(keep, weights.astype(jnp.float32), 0.0), onehot)
    # Select, not multiply by a zero gate: expert e's output for a token not routed to it (Inf or NaN when
    # its weights hold them) must not reach that token.
    routed = jnp.einsum("tk,tke->et", keep.astype(jnp.float32), onehot) > 0
    return jnp.where(routed[..., None], gate[..., None] * out, 0.0).sum(0).astype(x.dtype)


STRATEGIES = ("grouped", "bucketed", "ragged", "batched", "dense")


@dataclasses.dataclass(frozen=True)
class Config:
    """The XLA path's strategy and the grouped loop's row blocks.

    strategy    one of STRATEGIES; None: with a capacity "batched"; dropless, on the CPU "bucketed" for
                E <= BUCKETED_MAX_EXPERTS, else "grouped", on a TPU "grouped" (TPU_STRATEGY), on GPUs
                "ragged" (for quantized experts: "grouped", with a capacity "batched").
    row_align, block_rows  powers of two, row_align <= block_rows: the grouped loop's row granularity and
                largest block.
    """

    strategy: str | None = None
    row_align: int = 8
    block_rows: int = 64

    def __post_init__(self) -> None:
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} must be None or one of {STRATEGIES}")
        check_row_blocks(self.row_align, self.block_rows)


def check_row_blocks(row_align: Any, block_rows: Any) -> None:
    """row_align and block_rows: powers of two with row_align <= block_rows."""
    for name, v in (("row_align", row_align), ("block_rows", block_rows)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two")
    if row_align > block_rows:
        raise ValueError(f"row_align={row_align} must not exceed block_rows={block_rows}")


@functools.partial(
    jax.jit, static_argnames=("capacity", "drop_priority", "strategy", "row_align", "block_rows")
)
@highest_precision
def moe_ffn_xla(
    x, weights, expert_ids, wg, wu, wd, *, capacity, drop_priority, strategy, row_align, block_rows
):
    """The MoE FFN through one XLA strategy (None: by platform, see Config): x [T, d] -> [T, d] (x.dtype)."""
    impl = strategy or "xla"
    args = (x, weights, expert_ids.astype(jnp.int32), wg, wu, wd)
    common = dict(capacity=capacity, drop_priority=drop_priority)
    grouped = functools.partial(ffn_grouped, row_align=row_align, block_rows=block_rows, **common)
    ragged = functools.partial(_ffn_ragged, **common)
    bucketed = functools.partial(
        _ffn_bucketed, drop_priority=drop_priority, row_align=row_align, block_rows=block_rows
    )
    if impl == "bucketed" and capacity is not None:
        impl = "batched"
    if isinstance(wg, Int4Weight) and impl == "xla":
        # Quantized experts on every backend: the grouped loop reads only the experts that have rows.
        impl = "batched" if capacity is not None else "grouped"
    if impl == "xla":
        if capacity is not None:
            return _ffn_batched(*args, **common)
        on_cpu = bucketed if wg.shape[0] <= BUCKETED_MAX_EXPERTS else grouped
        return lax.platform_dependent(*args, cpu=on_cpu, tpu=grouped, default=ragged)
    if impl == "grouped":
        return grouped(*args)
    if impl == "bucketed":
        return bucketed(*args)
    if impl == "ragged":
        return ragged(*args)
    if impl == "batched":
        return _ffn_batched(*args, **common)
    return _ffn_dense(*args, **common)


def _xla(x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor, drop_priority, config):
    return moe_ffn_xla(
        x, weights, expert_ids, w_gate, w_up, w_down,
        capacity=capacity_of(expert_ids, w_gate, capacity_factor), drop_priority=drop_priority,
        strategy=config.strategy, row_align=int(config.row_align), block_rows=int(config.block_rows),
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation("xla", _xla, platforms=registry.PLATFORMS, config=Config)
