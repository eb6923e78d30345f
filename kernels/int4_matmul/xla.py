"""INT4 dequant-matmul: y = x @ W for a weight stored as `quant.Int4Weight`.

With stored rows r (input channel perm[r]), group g(r) = r // group_size, codes q, scales s, zero points z and
optional AWQ activation scales a (see quant/format.py for the packed layout, bit by bit):

    y[m, n] = Σ_r  x̃[m, r] · s[g(r), n] · (q[r, n] − z[g(r), n]),      x̃ = (x / a)[:, perm]

Both the permutation and the activation scales act on x, which is small: the weight is never reordered per
call (act-order rows were reordered once, when the weight was built or loaded).

Strategies (all portable XLA; `impl="auto"`/`"xla"` picks by M, the number of rows of x):
- "codes" (matrix-vector regime, small M): a `lax.scan` over blocks of K. Each step unpacks the block's two
  nibble planes with a shift and a mask, converts them to float32 while they are in cache, and multiplies
  x by the *raw codes*: x_even @ lo + x_odd @ hi. The group scale and zero are applied to the small [M, N]
  partial product of each group, using
      Σ_r x̃_r s (q_r − z) = s · (Σ_r x̃_r q_r) − s · z · Σ_r x̃_r,
  so no per-weight scale multiply is ever done.
- "dequant" (GEMM regime, large M): the same scan, but each block is dequantized to float32 in full and
  multiplied by x in one dot, which is cheaper once the [M, N] work per group exceeds the block's.
- "dense": dequantize the whole weight, then one matmul; the simplest correct path, kept as a baseline.
- "cpu_native": the C++ kernel of kernels/cpu/int4_matmul.cc, called through XLA's FFI (a matrix-vector path
  for small M, a tiled path for larger M; packed weights dequantized in SIMD registers, both cores). Bits 4
  and 3 with an even group size; x is permuted and scaled here first, as for the XLA strategies.
Every strategy accumulates in float32 and returns x's dtype.

Dispatch: `impl="auto"` uses the native kernel when the CPU library is built (`kernels.cpu.available()`) and
the weight is supported, chosen per platform at lowering (`jax.lax.platform_dependent`): the CPU runs the
native kernel, every other backend the XLA strategy for M, so the same jitted function still exports for
cuda, rocm and tpu. `impl="xla"` (or a named strategy) forces the portable path; `impl="cpu_native"` forces
the native kernel (CPU only; an error when the library is absent or the weight unsupported).

Why blocks: converting a whole 16M-element uint8 matrix to float32 on this CPU costs more than the float32
matmul itself; a block of a few hundred rows is converted in cache and consumed at once. Bits 4 and 3
(3-bit codes share the 4-bit container) use the nibble path; 2- and 8-bit weights use "dense".

Gradients: `jax.grad` with respect to x goes through a custom VJP, dx = dy @ Wᵀ, computed block by block
from the packed weight, so the backward pass never stores a dequantized copy (the native forward shares this
XLA backward). Under `jax.vmap` over a leading axis of weights (MoE experts), every strategy batches; the
native kernel runs once per batch element.

Axis legend: M rows of x (all leading axes flattened), K input features, N output features, G groups,
bk rows of K per block.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu
from quant.format import Int4Weight, codes_per_byte, dequantize_reference, symmetric_zero
from roofline.counters import Cost, itemsize

IMPLS = ("auto", "xla", "codes", "dequant", "dense", "cpu_native")
X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
# Rows of x at and above which "xla" picks "dequant" over "codes". Measured on a 2-core CPU (time / float32
# time, one run): at M=1, codes 0.64-0.71 against dequant 0.92-1.04 for N=4096, but 2.5-3.3 against
# 1.8-2.1 for N=14336; at M=16 dequant was as fast or faster for both (0.82-0.95 and 1.8-2.5).
GEMM_MIN_M = 16
_BLOCK_CANDIDATES = (512, 256, 1024, 128, 2048, 64, 32, 16, 8, 4, 2)


def validate_int4_matmul_inputs(x: Any, w: Any) -> None:
    if not isinstance(w, Int4Weight):
        raise ValueError(f"w must be a quant.Int4Weight; got {type(w).__name__}")
    x_shape = tuple(np.shape(x))
    x_dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    if len(x_shape) < 1:
        raise ValueError("x must have at least one axis [..., K]")
    if x_dtype not in X_DTYPES:
        raise ValueError(f"x.dtype={x_dtype} must be one of float32, bfloat16, float16")
    k, n = w.shape
    if x_shape[-1] != k:
        raise ValueError(f"x's last dimension {x_shape[-1]} must equal the weight's K={k} (in_features)")
    if w.packed.ndim != 2:
        raise ValueError(f"w.packed must be [R, N]; got shape {tuple(w.packed.shape)} (vmap over a stack)")
    g = w.num_groups
    if tuple(w.scales.shape) != (g, n):
        raise ValueError(f"w.scales.shape={tuple(w.scales.shape)} must be (G={g}, N={n})")
    if w.zeros is not None and tuple(w.zeros.shape) != (g, n):
        raise ValueError(f"w.zeros.shape={tuple(w.zeros.shape)} must be (G={g}, N={n})")
    if w.perm is not None and tuple(w.perm.shape) != (k,):
        raise ValueError(f"w.perm.shape={tuple(w.perm.shape)} must be (K={k},)")
    if w.act_scales is not None and tuple(w.act_scales.shape) != (k,):
        raise ValueError(f"w.act_scales.shape={tuple(w.act_scales.shape)} must be (K={k},)")


def int4_matmul_reference(x: Any, w: Int4Weight) -> np.ndarray:
    """NumPy: dequantize in float64 (the format's own oracle), then matmul. Output in x's dtype."""
    validate_int4_matmul_inputs(x, w)
    x = np.asarray(x)
    return (x.astype(np.float64) @ dequantize_reference(w)).astype(x.dtype)


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


def _scan_matmul(
    x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array, *, group_size: int, dequant: bool
) -> jax.Array:
    """x: [M, K] float32 (already permuted and scaled), packed [K/2, N] -> [M, N] float32."""
    m, k = x.shape
    n = packed.shape[1]
    blk = _blocks(packed, scales, zeros, group_size)
    bk, sub = blk.bk, blk.sub
    nb, ns = k // bk, bk // sub
    x_blk = x.reshape(m, nb, bk).transpose(1, 0, 2)  # [nb, M, bk]

    def body(acc, xs):
        xk, pk, sk, zk = xs
        xe, xo = xk[:, 0::2], xk[:, 1::2]  # rows 0, 2, 4, ... and 1, 3, 5, ... of the block
        if dequant:
            lo, hi = _dequantized_planes(pk, sk, zk, sub)
            return acc + xe @ lo + xo @ hi, None
        lo, hi = (p.reshape(ns, sub // 2, n) for p in _planes(pk))
        xe, xo = xe.reshape(m, ns, sub // 2), xo.reshape(m, ns, sub // 2)
        part = jnp.einsum("msk,skn->smn", xe, lo) + jnp.einsum("msk,skn->smn", xo, hi)  # [ns, M, N]
        xsum = xk.reshape(m, ns, sub).sum(-1)  # [M, ns]
        return acc + jnp.einsum("smn,sn->mn", part, sk) - xsum @ (sk * zk), None

    acc, _ = jax.lax.scan(body, jnp.zeros((m, n), jnp.float32), (x_blk, blk.packed, blk.scales, blk.zeros))
    return acc


def _scan_matmul_transposed(
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _packed_matmul(x, packed, scales, zeros, group_size, dequant):
    return _scan_matmul(x, packed, scales, zeros, group_size=group_size, dequant=dequant)


def _packed_matmul_fwd(x, packed, scales, zeros, group_size, dequant):
    y = _scan_matmul(x, packed, scales, zeros, group_size=group_size, dequant=dequant)
    return y, (packed, scales, zeros)


def zero_cotangent(tree: Any) -> Any:
    """Zero cotangents for a frozen quantized weight's leaves: zeros for float leaves, float0 for the
    integer ones (codes and zero points), as custom VJPs must return."""

    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def _packed_matmul_bwd(group_size, dequant, res, dy):
    packed, scales, zeros = res
    dx = _scan_matmul_transposed(dy, packed, scales, zeros, group_size=group_size)
    return (dx, *zero_cotangent((packed, scales, zeros)))  # the weight is frozen


_packed_matmul.defvjp(_packed_matmul_fwd, _packed_matmul_bwd)


def _native_or_xla(x, packed, scales, zeros, group_size, dequant, sym_zero, force):
    """The native kernel on the CPU; under `force=False` every other platform runs the XLA scan."""

    def native(x, packed, scales, zeros):
        return cpu.int4_matmul_native(x, packed, scales, zeros, group_size=group_size, sym_zero=sym_zero)

    if force:
        return native(x, packed, scales, zeros)

    def xla(x, packed, scales, zeros):
        zp = jnp.full(scales.shape, sym_zero, jnp.uint8) if zeros is None else zeros
        return _scan_matmul(x, packed, scales, zp, group_size=group_size, dequant=dequant)

    return jax.lax.platform_dependent(x, packed, scales, zeros, cpu=native, default=xla)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _native_matmul(x, packed, scales, zeros, group_size, dequant, sym_zero, force):
    return _native_or_xla(x, packed, scales, zeros, group_size, dequant, sym_zero, force)


def _native_matmul_fwd(x, packed, scales, zeros, group_size, dequant, sym_zero, force):
    y = _native_or_xla(x, packed, scales, zeros, group_size, dequant, sym_zero, force)
    return y, (packed, scales, zeros)


def _native_matmul_bwd(group_size, dequant, sym_zero, force, res, dy):
    packed, scales, zeros = res
    zp = jnp.full(scales.shape, sym_zero, jnp.uint8) if zeros is None else zeros
    dx = _scan_matmul_transposed(dy, packed, scales, zp, group_size=group_size)
    zeros_ct = None if zeros is None else np.zeros(zeros.shape, jax.dtypes.float0)
    return dx, np.zeros(packed.shape, jax.dtypes.float0), jnp.zeros_like(scales), zeros_ct


_native_matmul.defvjp(_native_matmul_fwd, _native_matmul_bwd)


def native_unsupported(w: Int4Weight) -> str | None:
    """Why the native CPU kernel cannot take this weight (None when it can)."""
    if w.bits not in (3, 4):
        return f"bits={w.bits} (the native kernel reads the 4-bit container: bits 3 and 4)"
    if w.group_size % 2:
        return f"group_size={w.group_size} (must be even: a packed byte holds two rows of one group)"
    return None


def _choose(impl: str, m: int, bits: int, group_size: int) -> str:
    if bits not in (3, 4) or group_size % 2:  # the nibble planes need an even number of rows per group
        return "dense"
    if impl in ("auto", "xla", "cpu_native"):
        return "dequant" if m >= GEMM_MIN_M else "codes"
    return impl


def _native_mode(impl: str, w: Int4Weight) -> str:
    """ "off" (XLA only), "auto" (native on the CPU, chosen at lowering) or "force"."""
    if impl == "cpu_native":
        reason = native_unsupported(w)
        if reason is not None:
            raise ValueError(f"impl='cpu_native' does not support {reason}; use impl='auto' or 'xla'")
        why = cpu.load()
        if why is not None:
            raise RuntimeError(f"impl='cpu_native' needs the native CPU library: {why}")
        return "force"
    if impl == "auto" and native_unsupported(w) is None and cpu.available():
        return "auto"
    return "off"


@functools.partial(jax.jit, static_argnames=("strategy", "native"))
def _int4_matmul(x: jax.Array, w: Int4Weight, strategy: str, native: str = "off") -> jax.Array:
    k, n = w.shape
    xf = x.reshape(-1, k).astype(jnp.float32)
    if strategy == "dense":
        y = xf @ w.dequantize()  # activation scales and act-order are folded into the dequantized weight
    else:
        if w.act_scales is not None:
            xf = xf / w.act_scales.astype(jnp.float32)
        if w.perm is not None:
            xf = xf[:, w.perm]  # act-order: stored row r is input channel perm[r]
        if native != "off":
            y = _native_matmul(
                xf,
                w.packed,
                w.scales.astype(jnp.float32),
                w.zeros,
                w.group_size,
                strategy == "dequant",
                symmetric_zero(w.bits),
                native == "force",
            )
        else:
            y = _packed_matmul(xf, w.packed, w.scales, w.zero_points(), w.group_size, strategy == "dequant")
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


def int4_matmul(x: jax.Array, w: Int4Weight, *, impl: str = "auto") -> jax.Array:
    """x: [..., K] float32|bfloat16|float16 @ w (an Int4Weight [K, N]) -> [..., N] in x's dtype.

    `impl`: "auto" (native on the CPU when built, else by M), "xla" (pick by M), "codes", "dequant", "dense"
    or "cpu_native" (see the module docstring).
    Jittable, vmappable over a leading axis of stacked weights, differentiable with respect to x.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    validate_int4_matmul_inputs(x, w)
    m = int(np.prod(np.shape(x)[:-1], dtype=np.int64))
    native = _native_mode(impl, w)
    return _int4_matmul(x, w, _choose(impl, m, w.bits, w.group_size), native)


def int4_matmul_cost(
    m: int,
    k: int,
    n: int,
    *,
    group_size: int,
    bits: int = 4,
    sym: bool = False,
    x_dtype: Any = "fp32",
    scale_dtype: Any = "fp32",
    act_order: bool = False,
    act_scales: bool = False,
) -> Cost:
    """FLOPs (2·M·K·N) and bytes: packed codes (K·N·bits/8 in the stored container), scales and uint8 zero
    points per (group, column), the permutation and activation scales when present, x and the output."""
    if k % group_size:
        raise ValueError(f"K={k} must be divisible by group_size={group_size}")
    g = k // group_size
    packed = k * n / codes_per_byte(bits)
    weights = packed + g * n * itemsize(scale_dtype) + (0 if sym else g * n)
    extras = (k * 4 if act_order else 0) + (k * 4 if act_scales else 0)
    return Cost(
        flops=2.0 * m * k * n,
        bytes_read=weights + extras + m * k * itemsize(x_dtype),
        bytes_written=m * n * itemsize(x_dtype),
    )
