"""INT4 dequant-matmul, the portable XLA path: K-blocked scans over the packed weight ("codes", "dequant").

"codes" multiplies x by the raw nibble codes of each block and applies the group scale and zero to the
small [M, N] partial product of each group; "dequant" dequantizes each block in full and multiplies it in
one dot (cheaper once M is large). Both convert a block of a few hundred rows to float32 while it is in
cache. The backward pass (dx = dy @ Wᵀ) walks the same blocks transposed, and the scales' gradient
(`scan_scale_grad`) walks them once more, so no dequantized copy of the weight is ever stored. Axes as in
the package docstring; bk rows of K per block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels import registry
from kernels.precision import highest_precision
from quant.format import Int4Weight

# Rows of x at and above which "xla" picks "dequant" over "codes". Measured on a 2-core CPU (time / float32
# time, one run): at M=1, codes 0.64-0.71 against dequant 0.92-1.04 for N=4096, but 2.5-3.3 against
# 1.8-2.1 for N=14336; at M=16 dequant was as fast or faster for both (0.82-0.95 and 1.8-2.5).
GEMM_MIN_M = 16
_BLOCK_CANDIDATES = (512, 256, 1024, 128, 2048, 64, 32, 16, 8, 4, 2)


def _block_k(k: int, group_size: int) -> int:
    """Rows per block: even, dividing K, and either a multiple or a divisor of the group size."""
    for bk in _BLOCK_CANDIDATES:
        if k % bk == 0 and (bk % group_size == 0 or group_size % bk == 0):
            return bk
    return k


def _planes(block: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed rows [bk/2, N] uint8 -> (even rows, odd rows) as float32 codes."""
    return (block & 0xF).astype(jnp.float32), (block >> 4).astype(jnp.float32)


class _Blocks(NamedTuple):
    """The packed weight cut into blocks of bk rows of K, each of ns sub-blocks of `sub` rows that share
    one (scale, zero) row: packed [nb, bk/2, N], scales and zeros [nb, ns, N] float32."""

    bk: int
    sub: int
    packed: jax.Array
    scales: jax.Array
    zeros: jax.Array


def _blocks(packed: jax.Array, scales: jax.Array, zeros: jax.Array, group_size: int) -> _Blocks:
    r, n = packed.shape
    k = 2 * r
    bk = _block_k(k, group_size)
    sub = min(bk, group_size)
    nb, ns = k // bk, bk // sub
    # Scale/zero row of every sub-block: a gather of at most K/sub small rows.
    group_of_sub = (np.arange(nb * ns) * sub) // group_size
    s_blk = scales.astype(jnp.float32)[group_of_sub].reshape(nb, ns, n)
    z_blk = zeros.astype(jnp.float32)[group_of_sub].reshape(nb, ns, n)
    return _Blocks(bk, sub, packed.reshape(nb, bk // 2, n), s_blk, z_blk)


def _dequantized_planes(pk: jax.Array, sk: jax.Array, zk: jax.Array, sub: int) -> tuple[jax.Array, jax.Array]:
    """One block's even and odd rows [bk/2, N] as float32 weights, (q − z) · s per sub-block."""
    half, n = pk.shape
    ns = sk.shape[0]
    lo, hi = _planes(pk)

    def scale(plane):
        return ((plane.reshape(ns, sub // 2, n) - zk[:, None]) * sk[:, None]).reshape(half, n)

    return scale(lo), scale(hi)


def _split_rows(x: jax.Array, nb: int, bk: int) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> its even and odd columns, blocked: two [nb, M, bk/2] arrays.

    The deinterleave happens once, outside the loop, behind an optimization barrier: XLA's GPU GEMM fusion
    otherwise pulls the stride-2 slice, together with whatever computed x (AWQ's division by the activation
    scales), into the dot's operand and aborts in its tiling analysis (`subdim_size_accumulator == dim_size`).
    Inside the loop each dot then reads a contiguous block.
    """
    m = x.shape[0]
    xe, xo = jax.lax.optimization_barrier((x[:, 0::2], x[:, 1::2]))
    return tuple(p.reshape(m, nb, bk // 2).transpose(1, 0, 2) for p in (xe, xo))


def scan_matmul(
    x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array, *, group_size: int, dequant: bool
) -> jax.Array:
    """x: [M, K] float32 (already permuted and scaled), packed [K/2, N] -> [M, N] float32."""
    m, k = x.shape
    n = packed.shape[1]
    blk = _blocks(packed, scales, zeros, group_size)
    bk, sub = blk.bk, blk.sub
    nb, ns = k // bk, bk // sub
    xe_blk, xo_blk = _split_rows(x, nb, bk)  # rows 0, 2, 4, ... and 1, 3, 5, ... of each block

    def body(acc, xs):
        xe, xo, pk, sk, zk = xs
        if dequant:
            lo, hi = _dequantized_planes(pk, sk, zk, sub)
            return acc + xe @ lo + xo @ hi, None
        lo, hi = (p.reshape(ns, sub // 2, n) for p in _planes(pk))
        xe, xo = xe.reshape(m, ns, sub // 2), xo.reshape(m, ns, sub // 2)
        part = jnp.einsum("msk,skn->smn", xe, lo) + jnp.einsum("msk,skn->smn", xo, hi)  # [ns, M, N]
        xsum = xe.sum(-1) + xo.sum(-1)  # [M, ns]
        return acc + jnp.einsum("smn,sn->mn", part, sk) - xsum @ (sk * zk), None

    init = jnp.zeros((m, n), jnp.float32)
    acc, _ = jax.lax.scan(body, init, (xe_blk, xo_blk, blk.packed, blk.scales, blk.zeros))
    return acc


def scan_matmul_transposed(
    dy: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array, *, group_size: int
) -> jax.Array:
    """dy: [M, N] float32 -> dy @ W_storedᵀ: [M, K], one dequantized block at a time (reduction over N,
    the contiguous axis)."""
    m = dy.shape[0]
    k = packed.shape[0] * 2
    blk = _blocks(packed, scales, zeros, group_size)

    def body(_, xs):
        lo, hi = _dequantized_planes(*xs, blk.sub)
        return None, jnp.stack([dy @ lo.T, dy @ hi.T], axis=-1).reshape(m, blk.bk)  # interleave even/odd

    _, out = jax.lax.scan(body, None, (blk.packed, blk.scales, blk.zeros))  # [nb, M, bk]
    return out.transpose(1, 0, 2).reshape(m, k)


def scan_scale_grad(
    x: jax.Array, dy: jax.Array, packed: jax.Array, zeros: jax.Array, *, group_size: int
) -> jax.Array:
    """The gradient of Σ dy ⊙ (x @ W_stored) with respect to the scales: [G, N] float32.

        ds[g, n] = Σ_m Σ_{r ∈ g} dy[m, n] · x[m, r] · (q[r, n] − z[g, n])

    x: [M, K] float32 (permuted and scaled, as the forward saw it), dy: [M, N] float32. One block of bk rows
    at a time: t = x_blkᵀ @ dy ([bk, N], the weight gradient of the block, never the whole [K, N]) is
    weighted by the block's codes minus zeros and summed over each sub-block's rows; the sub-blocks of a group
    are then summed. The same FLOPs as one matmul, so a backward pass costs about twice a forward.
    """
    k = x.shape[1]
    n = packed.shape[1]
    ones = jnp.ones(zeros.shape, jnp.float32)  # the scales' values do not enter their own gradient
    blk = _blocks(packed, ones, zeros, group_size)
    bk, sub = blk.bk, blk.sub
    nb, ns = k // bk, bk // sub
    xe_blk, xo_blk = _split_rows(x, nb, bk)  # [nb, M, bk/2] each

    def body(_, xs):
        xe, xo, pk, sk, zk = xs
        lo, hi = _dequantized_planes(pk, sk, zk, sub)  # q − z, as sk is 1
        te, to = xe.T @ dy, xo.T @ dy  # [bk/2, N]
        per_row = te * lo + to * hi
        return None, per_row.reshape(ns, sub // 2, n).sum(1)  # [ns, N]

    _, ds = jax.lax.scan(body, None, (xe_blk, xo_blk, blk.packed, blk.scales, blk.zeros))  # [nb, ns, N]
    return ds.reshape(k // group_size, group_size // sub, n).sum(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def packed_matmul(x, packed, scales, zeros, group_size, dequant):
    return scan_matmul(x, packed, scales, zeros, group_size=group_size, dequant=dequant)


@highest_precision
def _packed_matmul_fwd(x, packed, scales, zeros, group_size, dequant):
    y = scan_matmul(x, packed, scales, zeros, group_size=group_size, dequant=dequant)
    return y, (x, packed, scales, zeros)


def zero_cotangent(tree: Any) -> Any:
    """Zero cotangents for a frozen quantized weight's leaves: zeros for float leaves, float0 for the
    integer ones (codes and zero points), as custom VJPs must return."""

    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


@highest_precision
def _packed_matmul_bwd(group_size, dequant, res, dy):
    x, packed, scales, zeros = res
    dx = scan_matmul_transposed(dy, packed, scales, zeros, group_size=group_size)
    ds = scan_scale_grad(x, dy, packed, zeros, group_size=group_size)
    # The codes and zero points are integers: no gradient (float0).
    return dx, *zero_cotangent((packed,)), ds.astype(scales.dtype), *zero_cotangent((zeros,))


packed_matmul.defvjp(_packed_matmul_fwd, _packed_matmul_bwd)


def choose_strategy(impl: str, m: int, bits: int, group_size: int) -> str:
    """The XLA strategy for `impl` (a strategy name is itself; any other name picks by M)."""
    if bits not in (3, 4) or group_size % 2:  # the nibble planes need an even number of rows per group
        return "dense"
    if impl in ("codes", "dequant", "dense"):
        return impl
    return "dequant" if m >= GEMM_MIN_M else "codes"


STRATEGIES = ("codes", "dequant", "dense")


@dataclasses.dataclass(frozen=True)
class Config:
    """The XLA strategy: "codes", "dequant" or "dense"; None picks by M ("codes" below GEMM_MIN_M rows of x,
    "dequant" from there; "dense" for weights the nibble planes do not take: bits 2 and 8, odd groups)."""

    strategy: str | None = None

    def __post_init__(self) -> None:
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} must be None or one of {STRATEGIES}")

    def resolve(self, x: Any, w: Int4Weight) -> Config:
        m = int(np.prod(np.shape(x)[:-1], dtype=np.int64))
        return Config(choose_strategy(self.strategy or "xla", m, w.bits, w.group_size))


def prepare_x(x: jax.Array, w: Int4Weight) -> jax.Array:
    """x: [..., K] -> [M, K] float32 in the weight's stored row order, divided by its activation scales."""
    xf = x.reshape(-1, w.shape[0]).astype(jnp.float32)
    if w.act_scales is not None:
        xf = xf / w.act_scales.astype(jnp.float32)
    if w.perm is not None:
        xf = xf[:, w.perm]  # act-order: stored row r is input channel perm[r]
    return xf


@functools.partial(jax.jit, static_argnames=("strategy",))
@highest_precision
def int4_matmul_xla(x: jax.Array, w: Int4Weight, strategy: str) -> jax.Array:
    """x: [..., K] @ w -> [..., N] in x's dtype through one XLA strategy."""
    k, n = w.shape
    if strategy == "dense":
        y = x.reshape(-1, k).astype(jnp.float32) @ w.dequantize()  # act scales and order are folded in
    else:
        y = packed_matmul(
            prepare_x(x, w), w.packed, w.scales, w.zero_points(), w.group_size, strategy == "dequant"
        )
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


def _xla(x: jax.Array, w: Int4Weight, *, config: Config) -> jax.Array:
    return int4_matmul_xla(x, w, config.strategy)


IMPLEMENTATION = registry.Implementation("xla", _xla, platforms=registry.PLATFORMS, config=Config)
