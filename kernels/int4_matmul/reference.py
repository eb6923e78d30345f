"""INT4 dequant-matmul, the semantics: input validation and the NumPy reference (see the package
docstring)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from kernels import registry
from quant.format import Int4Weight, dequantize_reference

X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


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


def _reference(x: Any, w: Int4Weight, *, config: None) -> jnp.ndarray:
    """impl="reference": the NumPy reference on host copies (it validates its arguments itself)."""
    registry.require_concrete("int4_matmul", x, w)
    return jnp.asarray(int4_matmul_reference(np.asarray(x), w))


IMPLEMENTATION = registry.Implementation(
    "reference", _reference, platforms=registry.PLATFORMS, traceable=False
)
