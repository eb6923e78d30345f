"""Sharded kernels: tensor- and expert-parallel forms of the three kernels over a `jax.sharding.Mesh`.

Each function is a thin `shard_map` around the single-device public kernel (any jittable `impl` passes
through), sharding over one named axis of the mesh, of n devices. Collectives are JAX's own (`psum`,
`psum_scatter`, `all_gather`, `all_to_all`), so they run over NVLink, ICI or the host the same way; the
same code serves one host or many after `jax.distributed.initialize()` (the mesh then spans every process's
devices).

Layouts and what each device holds (axis legend as in the kernels: T tokens, B sequences, H query heads,
K kv heads, D head dim, P pages, S page size, M rows of x, K_in/N the INT4 weight's in/out features, G its
groups, E experts, k experts per token, d model width, f expert hidden width, n devices on `axis`):

- `paged_attention` (tensor parallel over heads, as Megatron-LM and vLLM): device i computes query heads
  [i·H/n, (i+1)·H/n). K % n == 0: it holds kv heads [i·K/n, (i+1)·K/n) of the pages. n % K == 0 (more
  devices than kv heads, e.g. 8 kv heads on 16 chips): kv head j is replicated on the n/K devices
  j·n/K ... (j+1)·n/K - 1, each of which holds that one head (the pages are repeated along the kv-head
  axis before sharding, so the global array is n heads wide, one per device). Block tables, lengths and
  q_lens are replicated; q, alibi_slopes and per-token kv scales are split like their heads; the output
  [T, H, D] is sharded on H. No collective.
- `int4_matmul`: mode "column" splits N (packed codes, scales and zeros along N; x replicated; output
  sharded on N, no collective). Mode "row" splits the stored rows K_in into n blocks of whole groups
  (G % n == 0); x is divided by the activation scales and permuted to stored-row order (act-order) once,
  in float32, before the split, so act-order and AWQ weights work in row mode; each device multiplies
  its block and the float32 partial products are summed with `psum` (output replicated) or
  `psum_scatter` over N (`scatter_output=True`, output sharded on N).
- `moe_ffn` (expert parallel, GShard/DeepSpeed-MoE style): experts [i·E/n, (i+1)·E/n) and tokens
  [i·T/n, (i+1)·T/n) live on device i. Each device packs its T/n·k assignments into a send buffer
  [n, C_send, d] by destination device, one `all_to_all` dispatches them, the device runs the single-
  device `moe_ffn` on the n·C_send received rows (top_k = 1, weight = routing weight, its local experts),
  a second `all_to_all` returns the rows, and each token sums its k rows in float32.
  Buffers: dropless (default) sizes every (source, destination) slot for the worst case, C_send = T/n·k
  (all of a device's assignments may go to one device), so each device receives n·T/n·k = T·k rows of d,
  as many as the whole batch's assignments. Padding rows are zeros with weight 0 and an expert id outside
  the device's [0, E/n), which the single-device kernel drops under jit (no expert's work or capacity), so
  a strategy whose work follows the routed rows ("grouped") does not pay for the worst-case buffer.
  Capacity mode (`capacity_factor`): the same drops as on one device (C = expert_capacity(T, E, k, cf)
  rows per expert, kept in `drop_priority` order over the *global* batch): the routing [T, k] (ids and
  weights, small) is all-gathered so every device computes the global keep mask, and
  C_send = min(T/n·k, E/n·C). Float and INT4 (`Int4Weight` stacks with a leading expert axis) experts.
- `shard_int4_weight`: places an `Int4Weight` (or a stack of experts) on the mesh for a mode, so callers
  need not reach into its fields; the kernels above accept the result (or an unsharded weight).

Inputs may be unsharded arrays (they are laid out on entry) or arrays already sharded as described; the
results are global arrays with the stated sharding. Static shape checks raise ValueError naming the
numbers; value checks (kv_lens, expert ids) are those of the single-device kernels, on the global arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import (
    dispatch_plan,
    expert_capacity,
    validate_int4_matmul_inputs,
    validate_moe_ffn_inputs,
    validate_paged_attention_inputs,
)
from kernels import (
    int4_matmul as _int4_matmul,
)
from kernels import (
    moe_ffn as _moe_ffn,
)
from kernels import (
    paged_attention as _paged_attention,
)
from quant.format import Int4Weight, codes_per_byte

__all__ = [
    "INT4_MODES",
    "WEIGHT_MODES",
    "int4_matmul",
    "kv_head_replication",
    "moe_ffn",
    "paged_attention",
    "shard_int4_weight",
]

INT4_MODES = ("column", "row")
# Modes of shard_int4_weight: the matmul modes, and "expert" for stacks of experts (split on E).
WEIGHT_MODES = ("column", "row", "expert")


def _shard_map(f, mesh: Mesh, in_specs: Any, out_specs: Any):
    """`shard_map` from wherever this JAX has it, without the replication check (the kernels inside use
    custom VJPs and platform-dependent lowering, which the checker does not see through)."""
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # JAX before 0.6

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _axis_size(mesh: Any, axis: Any) -> int:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis={axis!r} is not an axis of the mesh; its axes are {mesh.axis_names}")
    return int(mesh.shape[axis])


def _spec(ndim: int, dim: int | None, axis: Any) -> P:
    """PartitionSpec of an ndim array sharded on `dim` over `axis` (None: replicated)."""
    parts = [None] * ndim
    if dim is not None:
        parts[dim % ndim] = axis
    return P(*parts)


# --------------------------------------------------------------------------------------------------
# paged attention: heads over the axis


def kv_head_replication(num_q_heads: int, num_kv_heads: int, n: int) -> int:
    """How many devices hold each kv head when H query heads and K kv heads are split over n devices:
    1 when K % n == 0 (each device holds K/n kv heads), n/K when n % K == 0; ValueError otherwise."""
    if num_q_heads % n:
        raise ValueError(f"num_q_heads={num_q_heads} must be divisible by the {n} devices of the axis")
    if num_kv_heads % n == 0:
        return 1
    if n % num_kv_heads == 0:
        return n // num_kv_heads
    raise ValueError(
        f"num_kv_heads={num_kv_heads} and the {n} devices of the axis do not fit: the kv heads must split "
        f"evenly (num_kv_heads % {n} == 0) or each be replicated on whole devices ({n} % num_kv_heads == 0)"
    )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    *,
    mesh: Mesh,
    axis: Any,
    **kwargs: Any,
) -> jax.Array:
    """`kernels.paged_attention` with query heads split over the n devices of `mesh` axis `axis`.

    q: [T, H, D] float32|bfloat16|float16; k_pages, v_pages: [P, S, K, D]; kv_lens: [B] int32;
    block_tables: [B, max_pages] int32 -> [T, H, D] in q's dtype, sharded on H.
    kwargs: those of `kernels.paged_attention` (q_lens, scale, soft_cap, sliding_window, alibi_slopes
    [H], k_scale/v_scale () or [P, S, K], impl, ...). H % n == 0 is required, and K % n == 0 (kv heads
    split) or n % K == 0 (each kv head replicated on n/K devices); otherwise ValueError naming the numbers.
    """
    n = _axis_size(mesh, axis)
    array_kw = ("q_lens", "alibi_slopes", "k_scale", "v_scale")
    checked = ("q_lens", "scale", "soft_cap", "sliding_window", "alibi_slopes", "k_scale", "v_scale")
    validate_paged_attention_inputs(
        q, k_pages, v_pages, kv_lens, block_tables, **{k: v for k, v in kwargs.items() if k in checked}
    )
    _, h, _ = q.shape
    kh = k_pages.shape[2]
    rep = kv_head_replication(h, kh, n)
    if rep > 1:
        # Kv head j goes to devices j·rep ... j·rep + rep - 1: repeat it so that the global array has one
        # head per device, then shard one head to each.
        k_pages = jnp.repeat(k_pages, rep, axis=2)
        v_pages = jnp.repeat(v_pages, rep, axis=2)
    arrays = {k: kwargs.pop(k) for k in array_kw if kwargs.get(k) is not None}
    for name in ("k_scale", "v_scale"):
        if name in arrays and np.ndim(arrays[name]) == 3 and rep > 1:
            arrays[name] = jnp.repeat(arrays[name], rep, axis=2)
    specs = {
        "q_lens": P(),
        "alibi_slopes": P(axis),
        "k_scale": None,
        "v_scale": None,
    }
    for name in ("k_scale", "v_scale"):
        if name in arrays:
            specs[name] = _spec(3, 2, axis) if np.ndim(arrays[name]) == 3 else P()
    names = tuple(arrays)

    def local(q, kp, vp, lens, bt, *extra):
        return _paged_attention(q, kp, vp, lens, bt, **dict(zip(names, extra, strict=True)), **kwargs)

    in_specs = (
        P(None, axis, None),
        P(None, None, axis, None),
        P(None, None, axis, None),
        P(),
        P(),
        *(specs[k] for k in names),
    )
    fn = jax.jit(_shard_map(local, mesh, in_specs, P(None, axis, None)))
    return fn(q, k_pages, v_pages, kv_lens, block_tables, *(arrays[k] for k in names))


# --------------------------------------------------------------------------------------------------
# INT4 matmul: column (N) or row (K) parallel


def _weight_specs(w: Int4Weight, mode: str, axis: Any) -> Int4Weight:
    """An Int4Weight-shaped pytree of PartitionSpecs for `mode` (a leading expert axis when stacked)."""
    lead = w.packed.ndim - 2  # 1 for a stack of experts

    def spec(name: str, a: Any) -> Any:
        if a is None:
            return None
        nd = a.ndim
        if mode == "expert":
            return _spec(nd, 0, axis)
        if name in ("packed", "scales", "zeros"):
            return _spec(nd, -1 if mode == "column" else lead, axis)
        return _spec(nd, None, axis)  # perm, act_scales: [.., K_in], needed whole by every device

    names = ("packed", "scales", "zeros", "perm", "act_scales")
    children = [spec(nm, getattr(w, nm)) for nm in names]
    return Int4Weight.tree_unflatten((w.bits, w.group_size), children)


def _check_weight_layout(w: Int4Weight, mode: str, n: int, name: str = "w") -> None:
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode={mode!r} must be one of {WEIGHT_MODES}")
    stacked = w.packed.ndim == 3
    k_in = w.packed.shape[-2] * codes_per_byte(w.bits)
    n_out = w.packed.shape[-1]
    groups = k_in // w.group_size
    if mode == "expert":
        if not stacked:
            raise ValueError(f"mode='expert' needs a stack of experts ({name}.packed [E, R, N]); got 2-D")
        if w.packed.shape[0] % n:
            raise ValueError(f"{name} has E={w.packed.shape[0]} experts, not divisible by the {n} devices")
    elif mode == "column":
        if n_out % n:
            raise ValueError(f"{name} has N={n_out} output features, not divisible by the {n} devices")
    else:
        if groups % n:
            raise ValueError(
                f"mode='row' splits {name}'s K={k_in} rows on group boundaries: its G={groups} groups of "
                f"{w.group_size} are not divisible by the {n} devices"
            )
        if (k_in // n) % codes_per_byte(w.bits):
            raise ValueError(f"mode='row': K/n={k_in // n} rows per device must fill whole packed bytes")


def shard_int4_weight(w: Int4Weight, mesh: Mesh, axis: Any, mode: str) -> Int4Weight:
    """Place `w` on `mesh` for `mode`, without changing what it computes.

    w: an Int4Weight [K, N] or a stack of experts (leaves with a leading axis E, packed [E, R, N]).
    mode "column": packed/scales/zeros split along N; "row": split along K in whole groups (G % n == 0);
    "expert" (stacks only): every leaf split along E (E % n == 0). perm and act_scales [.., K] are
    replicated in "column" and "row" mode (row mode applies them to x before the split).
    Returns an Int4Weight whose leaves are global jax.Arrays with `NamedSharding`s over `mesh`.
    """
    if not isinstance(w, Int4Weight):
        raise ValueError(f"w must be a quant.Int4Weight (or a stack of them), got {type(w).__name__}")
    n = _axis_size(mesh, axis)
    _check_weight_layout(w, mode, n)
    specs = _weight_specs(w, mode, axis)
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), w, specs)


def int4_matmul(
    x: jax.Array,
    w: Int4Weight,
    *,
    mesh: Mesh,
    axis: Any,
    mode: str,
    scatter_output: bool = False,
    impl: str = "auto",
) -> jax.Array:
    """`kernels.int4_matmul` with the weight split over the n devices of `mesh` axis `axis`.

    x: [..., K] float32|bfloat16|float16; w: Int4Weight [K, N] (plain, or placed by `shard_int4_weight`
    for the same mode) -> [..., N] in x's dtype.
    mode "column": N split (N % n == 0); output sharded on N. mode "row": K split in whole groups
    (G % n == 0), partial products summed in float32 over the axis: output replicated, or with
    scatter_output=True reduce-scattered and sharded on N (N % n == 0). Act-order (perm) and activation
    scales work in both modes (row mode applies them to x, in float32, before the split).
    """
    if mode not in INT4_MODES:
        raise ValueError(f"mode={mode!r} must be one of {INT4_MODES}")
    n = _axis_size(mesh, axis)
    validate_int4_matmul_inputs(x, w)
    _check_weight_layout(w, mode, n)
    n_out = w.shape[1]
    lead = x.ndim - 1
    if mode == "column":
        if scatter_output:
            raise ValueError(
                "scatter_output=True applies to mode='row' (column mode is already sharded on N)"
            )

        def local_col(x, w):
            return _int4_matmul(x, w, impl=impl)

        fn = jax.jit(
            _shard_map(local_col, mesh, (P(), _weight_specs(w, "column", axis)), _spec(x.ndim, -1, axis))
        )
        return fn(x, w)

    if scatter_output and n_out % n:
        raise ValueError(f"scatter_output=True needs N={n_out} divisible by the {n} devices")
    # Row mode: x̃ = (x / act_scales)[..., perm] in stored-row order, so each device's block of stored rows
    # meets its own columns of x̃ and the weight shards carry no perm or activation scales.
    xt = x.astype(jnp.float32)
    if w.act_scales is not None:
        xt = xt / w.act_scales.astype(jnp.float32)
    if w.perm is not None:
        xt = jnp.take(xt, w.perm, axis=-1)
    plain = Int4Weight.tree_unflatten((w.bits, w.group_size), (w.packed, w.scales, w.zeros, None, None))

    def local_row(xt, w):
        part = _int4_matmul(xt, w, impl=impl)  # float32 in, float32 partial product out
        if scatter_output:
            return lax.psum_scatter(part, axis, scatter_dimension=lead, tiled=True)
        return lax.psum(part, axis)

    out_spec = _spec(x.ndim, -1, axis) if scatter_output else P()
    fn = jax.jit(
        _shard_map(local_row, mesh, (_spec(x.ndim, -1, axis), _weight_specs(plain, "row", axis)), out_spec)
    )
    return fn(xt, plain).astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# MoE FFN: expert parallel with all_to_all


def _num_experts_of(w: Any) -> int:
    return int((w.packed if isinstance(w, Int4Weight) else w).shape[0])


def _expert_spec(w: Any, axis: Any) -> Any:
    if isinstance(w, Int4Weight):
        return _weight_specs(w, "expert", axis)
    return _spec(w.ndim, 0, axis)


def moe_ffn(
    x: jax.Array,
    weights: jax.Array,
    expert_ids: jax.Array,
    w_gate: Any,
    w_up: Any,
    w_down: Any,
    *,
    mesh: Mesh,
    axis: Any,
    capacity_factor: float | None = None,
    drop_priority: str = "choice",
    impl: str = "auto",
    **kwargs: Any,
) -> jax.Array:
    """`kernels.moe_ffn` with expert parallelism over the n devices of `mesh` axis `axis`.

    x: [T, d] float; weights: [T, k] float; expert_ids: [T, k] int; w_gate, w_up: [E, d, f] and
    w_down: [E, f, d] float arrays, or stacks of Int4Weight experts -> y [T, d] in x's dtype, sharded on T.
    T % n == 0 and E % n == 0 are required. Tokens and experts are split over the axis, rows go to their
    expert's device and back with `all_to_all` (buffer sizes in the module docstring); dropless unless
    capacity_factor is given, in which case the kept assignments are exactly those of the single-device
    kernel. impl and kwargs (row_align, block_rows) go to the per-device `kernels.moe_ffn`.
    """
    n = _axis_size(mesh, axis)
    validate_moe_ffn_inputs(
        x, weights, expert_ids, w_gate, w_up, w_down, capacity_factor=capacity_factor,
        drop_priority=drop_priority, impl=impl,
    )  # fmt: skip
    num_tokens, top_k = expert_ids.shape
    num_experts = _num_experts_of(w_gate)
    if num_tokens % n:
        raise ValueError(f"T={num_tokens} tokens must be divisible by the {n} devices of axis {axis!r}")
    if num_experts % n:
        raise ValueError(f"E={num_experts} experts must be divisible by the {n} devices of axis {axis!r}")
    t_loc, e_loc = num_tokens // n, num_experts // n
    a_loc = t_loc * top_k
    capacity = None
    c_send = a_loc
    if capacity_factor is not None:
        capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
        c_send = min(a_loc, e_loc * capacity)
    d = x.shape[1]

    def local(x, weights, ids, wg, wu, wd):
        me = lax.axis_index(axis)
        ids = ids.astype(jnp.int32)
        flat_ids = ids.reshape(-1)
        if capacity is None:
            keep = jnp.ones((a_loc,), bool)
        else:
            # The global keep mask, as one device would compute it: gather the (small) routing.
            all_ids = lax.all_gather(ids, axis, tiled=True)
            all_w = lax.all_gather(weights, axis, tiled=True)
            plan = dispatch_plan(
                all_ids, num_experts, weights=all_w, capacity=capacity, drop_priority=drop_priority
            )
            rows = plan.row_token.shape[0]
            keep_all = (plan.position < rows).reshape(-1)
            keep = lax.dynamic_slice_in_dim(keep_all, me * a_loc, a_loc)
        dest = flat_ids // e_loc
        # Slot of each kept assignment in its destination's part of the send buffer: its rank among the
        # kept assignments to that destination, in local order.
        onehot = (dest[:, None] == jnp.arange(n)[None, :]) & keep[:, None]
        slot = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        dest_or_drop = jnp.where(keep, dest, n)  # n: out of range, dropped by the scatters
        tok = jnp.arange(a_loc) // top_k
        send_x = jnp.zeros((n, c_send, d), x.dtype).at[dest_or_drop, slot].set(x[tok], mode="drop")
        send_w = (
            jnp.zeros((n, c_send), jnp.float32)
            .at[dest_or_drop, slot]
            .set(weights.reshape(-1).astype(jnp.float32), mode="drop")
        )
        # Padding rows name expert e_loc, outside the local [0, E/n): the kernel drops them under jit.
        send_e = (
            jnp.full((n, c_send), e_loc, jnp.int32).at[dest_or_drop, slot].set(flat_ids % e_loc, mode="drop")
        )
        recv_x = lax.all_to_all(send_x, axis, 0, 0, tiled=True)
        recv_w = lax.all_to_all(send_w, axis, 0, 0, tiled=True)
        recv_e = lax.all_to_all(send_e, axis, 0, 0, tiled=True)
        ys = _moe_ffn(
            recv_x.reshape(n * c_send, d),
            recv_w.reshape(-1, 1),
            recv_e.reshape(-1, 1),
            wg,
            wu,
            wd,
            impl=impl,
            **kwargs,
        )
        back = lax.all_to_all(ys.reshape(n, c_send, d), axis, 0, 0, tiled=True)
        rows = back.at[dest_or_drop, slot].get(mode="fill", fill_value=0).astype(jnp.float32)
        return rows.reshape(t_loc, top_k, d).sum(axis=1).astype(x.dtype)

    tok_spec = P(axis, None)
    in_specs = (
        tok_spec,
        tok_spec,
        tok_spec,
        _expert_spec(w_gate, axis),
        _expert_spec(w_up, axis),
        _expert_spec(w_down, axis),
    )
    fn = jax.jit(_shard_map(local, mesh, in_specs, tok_spec))
    return fn(x, weights, expert_ids, w_gate, w_up, w_down)
