"""INT4 dequant-matmul through the CPU-native kernel (kernels/cpu/int4_matmul.cc, XLA's FFI).

A matrix-vector path for small M and a tiled path for larger M, packed weights dequantized in SIMD registers,
both cores. Bits 4 and 3 with an even group size; x arrives permuted and scaled (act-order, AWQ) already.
The caller chooses the platform (the entry's `impl="auto"` puts this in the CPU branch of its per-platform
choice), so one jitted function exports everywhere. The backward pass is the XLA path's: the transposed
scan for x, `scan_scale_grad` for the scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu, registry
from kernels.int4_matmul.xla import prepare_x, scan_matmul_transposed, scan_scale_grad
from kernels.precision import highest_precision
from quant.format import Int4Weight, symmetric_zero


def _native(x, packed, scales, zeros, group_size, sym_zero):
    return cpu.int4_matmul_native(x, packed, scales, zeros, group_size=group_size, sym_zero=sym_zero)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def native_matmul(x, packed, scales, zeros, group_size, sym_zero):
    """x [M, K] float32 @ the packed weight through the native kernel (CPU only: the caller chooses the
    platform); the backward (x and the scales) is the XLA path's blocked scans."""
    return _native(x, packed, scales, zeros, group_size, sym_zero)


def _native_matmul_fwd(x, packed, scales, zeros, group_size, sym_zero):
    return _native(x, packed, scales, zeros, group_size, sym_zero), (x, packed, scales, zeros)


@highest_precision
def _native_matmul_bwd(group_size, sym_zero, res, dy):
    x, packed, scales, zeros = res
    zp = jnp.full(scales.shape, sym_zero, jnp.uint8) if zeros is None else zeros
    dx = scan_matmul_transposed(dy, packed, scales, zp, group_size=group_size)
    ds = scan_scale_grad(x, dy, packed, zp, group_size=group_size)
    zeros_ct = None if zeros is None else np.zeros(zeros.shape, jax.dtypes.float0)
    return dx, np.zeros(packed.shape, jax.dtypes.float0), ds.astype(scales.dtype), zeros_ct


native_matmul.defvjp(_native_matmul_fwd, _native_matmul_bwd)


def native_unsupported(w: Int4Weight) -> str | None:
    """Why the native CPU kernel cannot take this weight (None when it can)."""
    if w.bits not in (3, 4):
        return f"bits={w.bits} (the native kernel reads the 4-bit container: bits 3 and 4)"
    if w.group_size % 2:
        return f"group_size={w.group_size} (must be even: a packed byte holds two rows of one group)"
    return None


@jax.jit
@highest_precision
def int4_matmul_native(x: jax.Array, w: Int4Weight) -> jax.Array:
    """x: [..., K] @ w -> [..., N] in x's dtype through the native kernel (CPU only)."""
    n = w.shape[1]
    y = native_matmul(
        prepare_x(x, w), w.packed, w.scales.astype(jnp.float32), w.zeros, w.group_size, symmetric_zero(w.bits)
    )
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


IMPLEMENTATION = registry.Implementation(
    "cpu_native",
    lambda x, w, *, config: int4_matmul_native(x, w),
    platforms=("cpu",),
    supports=lambda x, w: native_unsupported(w),
    available=registry.native_library_missing,
    prefer=lambda *args, **kwargs: registry.native_slower("int4_matmul"),
)
