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

Implementations (`impl=`; `kernels.available_impls("int4_matmul")` lists those that run here; each module's
`IMPLEMENTATION` is its entry in `kernels.registry`): reference.py (NumPy in float64), xla.py (the XLA
strategies; `Config(strategy=...)`, or the strategy's name as `impl`), cpu_native.py (the native kernel:
bits 3 and 4, even groups) and pallas_triton.py (the W4A16 Pallas Triton kernel for GPUs, interpreted on the
CPU; `Config(block_m, block_n, block_k, split_k)`). `impl="auto"` is the registry's per-platform choice:
on the CPU the native kernel for the weights it takes where its instruction-set path beats the XLA path
(`kernels.cpu.fast_enough`), on cuda/rocm the Pallas kernel for the weights it takes, else the XLA strategy
for M. `impl="pallas"` is the platform's Pallas kernel. A named implementation that does not serve the call
is a ValueError that says why.

Why blocks: converting a whole 16M-element uint8 matrix to float32 on this CPU costs more than the float32
matmul itself; a block of a few hundred rows is converted in cache and consumed at once. Bits 4 and 3
(3-bit codes share the 4-bit container) use the nibble path; 2- and 8-bit weights use "dense".

Gradients (reverse mode, `jax.grad`/`jax.vjp`) on every implementation, with respect to x and to the weight's
float fields `scales` and `act_scales`; `packed`, `zeros` and `perm` are integer codes and get none (float0).
A custom VJP computes, block by block from the packed weight (no dequantized copy is ever stored),

    dx̃ = dy @ W_storedᵀ                                                 (`scan_matmul_transposed`)
    ds[g, n] = Σ_m Σ_{r∈g} dy[m, n] · x̃[m, r] · (q[r, n] − z[g, n])       (`scan_scale_grad`)

and the gradients of x and `act_scales` follow by autodiff of x̃ = (x / a)[:, perm]. The native and Pallas
forwards share this XLA backward; "dense" differentiates the dequantized weight and agrees. Forward mode
(`jax.jvp`) is only defined for "dense". Under `jax.vmap` over a leading axis of weights (MoE experts), every
strategy batches; the native kernel runs once per batch element. No rows (M = 0) give the empty result.

Axis legend: M rows of x (all leading axes flattened), K input features, N output features, G groups,
bk rows of K per block.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import registry
from kernels.cost import Cost, itemsize
from kernels.int4_matmul.prepared import PreparedInt4Weight, prepare, to_int4_weight
from kernels.int4_matmul.reference import X_DTYPES, int4_matmul_reference, validate_int4_matmul_inputs
from kernels.int4_matmul.xla import GEMM_MIN_M, zero_cotangent
from quant.format import Int4Weight, codes_per_byte

__all__ = [
    "GEMM_MIN_M",
    "X_DTYPES",
    "PreparedInt4Weight",
    "int4_matmul",
    "int4_matmul_cost",
    "int4_matmul_reference",
    "prepare",
    "to_int4_weight",
    "validate_int4_matmul_inputs",
    "zero_cotangent",
]


def int4_matmul(
    x: jax.Array, w: Int4Weight | PreparedInt4Weight, *, impl: str = "auto", config: Any = None
) -> jax.Array:
    """x: [..., K] float32|bfloat16|float16 @ w (an Int4Weight [K, N], or its `prepare(w)` form) -> [..., N]
    in x's dtype.

    `impl`: a name of `kernels.available_impls("int4_matmul")`, "auto", "pallas", or an XLA strategy
    ("codes", "dequant", "dense"; see the module docstring). `config`: the Config of the implementation it
    tunes (`kernels.int4_matmul.xla.Config(strategy=...)`, `...pallas_triton.Config(block_m=...)`); default:
    chosen from the shapes. Jittable, vmappable over a leading axis of stacked weights, differentiable with
    respect to x, `w.scales` and `w.act_scales` (reverse mode; the integer fields get no gradient).

    Prepared weights: the Mosaic GPU kernel reads its own layout (`kernels.int4_matmul.prepared`). Given an
    Int4Weight it prepares it once per concrete weight (cached); a serving loop that passes weights into jit
    calls `prepare(w)` once and passes the PreparedInt4Weight. Where another implementation runs (another
    platform, or a named impl), a prepared weight is turned back into its Int4Weight (exact), so both forms
    work with every impl.
    """
    registry.check_impl("int4_matmul", impl)
    if isinstance(w, PreparedInt4Weight):
        return _prepared_matmul(x, w, impl, config)
    if impl != "reference":  # the reference validates its (concrete) inputs itself
        validate_int4_matmul_inputs(x, w)
        if math.prod(x.shape[:-1]) == 0:  # no rows: the empty result, whatever the implementation
            return jnp.zeros((*x.shape[:-1], w.shape[1]), x.dtype)
    return registry.dispatch("int4_matmul", impl, x, w, config=config)


def _prepared_matmul(x: Any, pw: PreparedInt4Weight, impl: str, config: Any) -> jax.Array:
    """A prepared weight: the Mosaic GPU kernel takes it as it is; anything else gets the Int4Weight back."""
    mgpu = registry.implementations("int4_matmul").get("pallas_mosaic_gpu")
    if impl == "pallas_mosaic_gpu":
        validate_int4_matmul_inputs(x, to_int4_weight_shapes(pw))
        if math.prod(x.shape[:-1]) == 0:
            return jnp.zeros((*x.shape[:-1], pw.n), x.dtype)
        return registry.dispatch("int4_matmul", impl, x, pw, config=config)
    if impl not in ("auto", "pallas") or mgpu is None:
        return int4_matmul(x, to_int4_weight(pw), impl=impl, config=config)
    shapes = to_int4_weight_shapes(pw)
    chosen = registry.choose("int4_matmul", impl, "cuda", x, shapes)
    if chosen is None or chosen.name != "pallas_mosaic_gpu" or math.prod(np.shape(x)[:-1]) == 0:
        return int4_matmul(x, to_int4_weight(pw), impl=impl, config=config)
    validate_int4_matmul_inputs(x, shapes)
    cfg = config if isinstance(config, mgpu.config) else None
    # Only the branch of the platform being lowered for is lowered: on cuda the prepared codes go straight to
    # the kernel; elsewhere the canonical weight is rebuilt for that platform's choice.
    return jax.lax.platform_dependent(
        x,
        pw,
        cuda=lambda x, pw: mgpu(x, pw, config=cfg),
        default=lambda x, pw: int4_matmul(x, to_int4_weight(pw), impl=impl, config=config),
    )


def to_int4_weight_shapes(pw: PreparedInt4Weight) -> Int4Weight:
    """An Int4Weight of the prepared weight's shapes and dtypes (placeholder codes: for validation and the
    registry's choice, which read shapes only)."""
    k, n = pw.shape
    packed = jax.ShapeDtypeStruct((k // 2, n), jnp.uint8)
    return Int4Weight.tree_unflatten(
        (pw.bits, pw.group_size), (packed, pw.scales, pw.zeros, pw.perm, pw.act_scales)
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
