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

Implementations (`impl=`; `kernels.available_impls("int4_matmul")` lists those that run here): the
reference (reference.py, NumPy in float64), the XLA strategies (xla.py), the native kernel (cpu_native.py)
and the W4A16 Pallas kernel for GPUs (pallas_gpu.py, interpreted on the CPU).

Dispatch: `impl="auto"` is chosen per platform at lowering (`jax.lax.platform_dependent`, so the same jitted
function exports for every platform): the CPU runs the native kernel when the library is built, the weight
is supported and the instruction-set path beats the XLA path (`kernels.cpu.fast_enough`); cuda/rocm run the
Pallas kernel for the weights it takes; everything else the XLA strategy for M. `impl="xla"` (or a named
strategy) forces the portable path; `impl="cpu_native"` forces the native kernel (CPU only; an error when
the library is absent or the weight unsupported); `impl="pallas"` forces the Pallas kernel (interpreted on
the CPU; an error for a weight it does not take).

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu, registry
from kernels.int4_matmul.cpu_native import native_matmul, native_unsupported
from kernels.int4_matmul.pallas_gpu import int4_weight_matmul_pallas, pallas_unsupported
from kernels.int4_matmul.reference import X_DTYPES, int4_matmul_reference, validate_int4_matmul_inputs
from kernels.int4_matmul.xla import GEMM_MIN_M, choose_strategy, packed_matmul, zero_cotangent
from kernels.precision import highest_precision
from quant.format import Int4Weight, codes_per_byte, symmetric_zero
from roofline.counters import Cost, itemsize

__all__ = [
    "GEMM_MIN_M",
    "X_DTYPES",
    "int4_matmul",
    "int4_matmul_cost",
    "int4_matmul_reference",
    "validate_int4_matmul_inputs",
    "zero_cotangent",
]


def _native_wanted(impl: str, w: Int4Weight) -> bool:
    """Whether the native kernel serves this call: always for impl="cpu_native" (or an error saying why it
    cannot), for impl="auto" where it takes the weight and beats the XLA path on this CPU."""
    if impl == "cpu_native":
        reason = native_unsupported(w)
        if reason is not None:
            raise ValueError(f"impl='cpu_native' does not support {reason}; use impl='auto' or 'xla'")
        why = cpu.load()
        if why is not None:
            raise RuntimeError(f"impl='cpu_native' needs the native CPU library: {why}")
        return True
    # auto never picks a native path slower than the XLA path on this CPU (the scalar fallback).
    return (
        impl == "auto"
        and native_unsupported(w) is None
        and cpu.available()
        and cpu.fast_enough("int4_matmul")
    )


@functools.partial(jax.jit, static_argnames=("strategy", "native"))
@highest_precision
def _int4_matmul(x: jax.Array, w: Int4Weight, strategy: str, native: bool = False) -> jax.Array:
    k, n = w.shape
    xf = x.reshape(-1, k).astype(jnp.float32)
    if strategy == "dense":
        y = xf @ w.dequantize()  # activation scales and act-order are folded into the dequantized weight
    else:
        if w.act_scales is not None:
            xf = xf / w.act_scales.astype(jnp.float32)
        if w.perm is not None:
            xf = xf[:, w.perm]  # act-order: stored row r is input channel perm[r]
        if native:
            y = native_matmul(
                xf, w.packed, w.scales.astype(jnp.float32), w.zeros, w.group_size, symmetric_zero(w.bits)
            )
        else:
            y = packed_matmul(xf, w.packed, w.scales, w.zero_points(), w.group_size, strategy == "dequant")
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


def int4_matmul(
    x: jax.Array,
    w: Int4Weight,
    *,
    impl: str = "auto",
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> jax.Array:
    """x: [..., K] float32|bfloat16|float16 @ w (an Int4Weight [K, N]) -> [..., N] in x's dtype.

    `impl`: "auto" (the native kernel on the CPU when built, the Pallas kernel on GPUs, else the XLA
    strategy for M), "reference", "xla" (pick by M), "codes", "dequant", "dense", "cpu_native" or "pallas"
    (see the module docstring). `block_m`, `block_n`, `block_k`, `split_k`: the Pallas kernel's tiles
    (keyword-only, static; defaults by shape, see kernels/int4_matmul/pallas_gpu.py).
    Jittable, vmappable over a leading axis of stacked weights, differentiable with respect to x.
    """
    registry.check_impl("int4_matmul", impl)
    if impl == "reference":  # the reference validates its inputs itself
        registry.require_concrete("int4_matmul", x, w)
        return jnp.asarray(int4_matmul_reference(np.asarray(x), w))
    validate_int4_matmul_inputs(x, w)
    tiles = dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k)
    pallas_reason = pallas_unsupported(x, w)
    if impl == "pallas":
        if pallas_reason is not None:
            raise ValueError(f"impl='pallas' does not support {pallas_reason}; use impl='auto' or 'xla'")
        return int4_weight_matmul_pallas(x, w, **tiles)
    m = int(np.prod(np.shape(x)[:-1], dtype=np.int64))
    native = _native_wanted(impl, w)
    strategy = choose_strategy(impl, m, w.bits, w.group_size)
    if impl != "auto":
        return _int4_matmul(x, w, strategy, native)
    return registry.per_platform(
        x,
        w,
        xla=lambda x, w: _int4_matmul(x, w, strategy),
        cpu=(lambda x, w: _int4_matmul(x, w, strategy, True)) if native else None,
        gpu=(lambda x, w: int4_weight_matmul_pallas(x, w, **tiles)) if pallas_reason is None else None,
    )


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
