"""Round-to-nearest (RTN) quantization onto GPTQ's min-max grid, and the grid itself.

For each group `g` (`group_size` consecutive input channels) and output column `n`, over the group's
weights `x = W[g*gs:(g+1)*gs, n]` (the grid of IST-DASLab/gptq `Quantizer.find_params`, weight mode):

    xmin = min(min(x), 0),  xmax = max(max(x), 0)              # the grid always contains 0
    sym:  xmax = max(|xmin|, xmax); xmin = -xmax if xmin < 0    # (xmin stays 0 when all x >= 0)
    xmin = -1, xmax = +1 where both are 0                        # an all-zero group still gets a scale
    scale = (xmax - xmin) / maxq,  maxq = 2**bits - 1
    zero  = 2**(bits-1) if sym else round(-xmin / scale)        # an integer in [0, maxq]
    q     = clip(round(x / scale) + zero, 0, maxq),  W_q = scale * (q - zero)

`round` is round-half-to-even, as in PyTorch and NumPy. Inside the clip range the error is at most
scale / 2. Quirk kept from the reference: in symmetric mode a group with no negative weight keeps
xmin = 0, so scale = xmax / maxq with zero 2**(bits-1), and its largest weights clip at
(2**(bits-1) - 1) * scale.

Scale dtype: a checkpoint stores the scales in one dtype (float16 in the AutoGPTQ, GPTQModel and AutoAWQ
layouts), so the quantizers round each scale to `scale_dtype` *before* the zero point and the codes are
chosen (`round_scale`), and return scales of that dtype. The weight that is quantized is then exactly the
weight a checkpoint holds; rounding afterwards would shift every weight of a group by up to 2^-11 of its
value. The rounding is upward (the smallest `scale_dtype` value >= scale, at least its smallest positive
value), so the grid still spans [xmin, xmax] (up to the half step that rounding the zero point costs, as
on the unrounded grid), even where float16 is subnormal and its nearest value may be a third too small.
`scale_dtype=float32` keeps the float32 scales (the lab's own format stores them as they are). A
scale above the dtype's largest finite value is an error.

Axes: `K` input features, `N` output features, `G = K / group_size`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quant.format import (
    SCALE_DTYPES,
    Int4Weight,
    codes_per_byte,
    max_code,
    pack_codes,
    validate_bits,
    validate_group_size,
)


def validate_quantize_inputs(w: Any, *, bits: int, group_size: int, name: str = "w") -> tuple[int, int, int]:
    """Checks a float weight `[K, N]` for quantization; returns (K, N, resolved group_size)."""
    bits = validate_bits(bits)
    shape = getattr(w, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D [K, N] (in, out) weight, got shape {shape}")
    k, n = (int(d) for d in shape)
    if k == 0 or n == 0:
        raise ValueError(f"{name} has an empty shape {tuple(shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {w.dtype}")
    gs = validate_group_size(group_size, k)
    per = codes_per_byte(bits)
    if k % per:
        raise ValueError(f"K={k} is not divisible by the packing factor {per} for bits={bits}")
    if gs % per:
        raise ValueError(f"group_size={gs} is not divisible by the packing factor {per} for bits={bits}")
    if not isinstance(w, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(w, dtype=np.float32))):
        raise ValueError(f"{name} contains NaN or Inf")
    return k, n, gs


def validate_scale_dtype(scale_dtype: Any) -> np.dtype:
    """`scale_dtype` must name one of SCALE_DTYPES (float16, float32); returns it as a NumPy dtype."""
    try:
        dt = np.dtype(scale_dtype)
    except TypeError:
        dt = None
    if scale_dtype is None or dt is None or dt.name not in SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype={scale_dtype!r} is not supported; expected one of {SCALE_DTYPES} (float16 is what "
            "the AutoGPTQ, GPTQModel and AutoAWQ layouts store; float32 only the lab's own format keeps)"
        )
    return dt


def round_scale(scale: Any, scale_dtype: Any) -> Any:
    """Round `scale` (NumPy or JAX, any shape) up to a positive value representable in `scale_dtype`.

    Returns the rounded values in `scale`'s own dtype (float32 in the jitted paths, float64 in the
    references): the smallest `scale_dtype` value >= scale, and at least the smallest positive one. A
    scale above the dtype's largest finite value becomes inf (the callers raise on it).
    """
    xp = jnp if isinstance(scale, jax.Array) else np
    sd = validate_scale_dtype(scale_dtype)
    r = scale.astype(sd)
    up = (r.astype(scale.dtype) < scale) | (r == 0)
    r = xp.where(up, xp.nextafter(r, xp.asarray(np.inf, sd)), r)
    return r.astype(scale.dtype)


def check_scales_fit(scale: Any, scale_dtype: Any, *, name: str = "w") -> None:
    """Raise if a (concrete) rounded scale overflowed `scale_dtype`: the weights' range is too wide."""
    s = np.asarray(scale, np.float64)
    if not np.all(np.isfinite(s)):
        sd = validate_scale_dtype(scale_dtype)
        raise ValueError(
            f"{name}: a group's scale exceeds the largest {sd.name} ({float(np.finfo(sd).max):g}); its "
            f"weights span more than {sd.name} scales can step over. Pass scale_dtype=np.float32 (only the "
            "lab's own checkpoint format, format='tokenlab', stores float32 scales)"
        )


def grid_params(xmin: Any, xmax: Any, *, bits: int, sym: bool, scale_dtype: Any = None) -> tuple[Any, Any]:
    """Scale and zero point of the min-max grid from per-column minima/maxima (NumPy or JAX arrays).

    Returns `(scale, zero)` in the input's float dtype; zero holds integers in [0, maxq]. With a
    `scale_dtype`, the scale is first rounded up to that dtype (`round_scale`) and the zero point is chosen
    for the rounded scale; `None` keeps the scale as computed.
    """
    xp = jnp if isinstance(xmin, jax.Array) else np
    maxq = max_code(bits)
    xmin = xp.minimum(xmin, 0)
    xmax = xp.maximum(xmax, 0)
    if sym:
        xmax = xp.maximum(xp.abs(xmin), xmax)
        xmin = xp.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = xp.where(both_zero, -1, xmin).astype(xmax.dtype)
    xmax = xp.where(both_zero, 1, xmax).astype(xmin.dtype)
    scale = (xmax - xmin) / maxq
    if scale_dtype is not None:
        scale = round_scale(scale, scale_dtype)
    if sym:
        zero = xp.full_like(scale, (maxq + 1) / 2)
    else:
        zero = xp.round(-xmin / scale)
    return scale, zero


def quantize_codes(x: Any, scale: Any, zero: Any, *, bits: int) -> Any:
    """`clip(round(x / scale) + zero, 0, maxq)` as floats (NumPy or JAX, broadcasting)."""
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.clip(xp.round(x / scale) + zero, 0, max_code(bits))


@partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype"))
def _rtn(w: jax.Array, *, bits: int, group_size: int, sym: bool, scale_dtype: str):
    k, n = w.shape
    x = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    scale, zero = grid_params(x.min(axis=1), x.max(axis=1), bits=bits, sym=sym, scale_dtype=scale_dtype)
    q = quantize_codes(x, scale[:, None, :], zero[:, None, :], bits=bits)
    return pack_codes(q.reshape(k, n).astype(jnp.uint8), bits), scale, zero.astype(jnp.uint8)


def quantize_rtn(
    w: Any, *, bits: int = 4, group_size: int = 128, sym: bool = False, scale_dtype: Any = np.float16
) -> Int4Weight:
    """Round-to-nearest quantization of `w: [K, N] float` (in, out) onto the min-max grid.

    `group_size=-1` (or K) is per-channel. Computes in float32. Scales are rounded up to `scale_dtype`
    (float16, as upstream checkpoints store them, or float32) before the codes are chosen, and returned
    in that dtype, so saving in any checkpoint layout that stores them keeps the weight exactly.
    """
    _, _, gs = validate_quantize_inputs(w, bits=bits, group_size=group_size)
    sd = validate_scale_dtype(scale_dtype)
    packed, scale, zero = _rtn(
        jnp.asarray(w), bits=validate_bits(bits), group_size=gs, sym=bool(sym), scale_dtype=sd.name
    )
    check_scales_fit(scale, sd)
    return Int4Weight(packed, scale.astype(sd), None if sym else zero, bits=bits, group_size=gs)


def rtn_reference(
    w: Any, *, bits: int = 4, group_size: int = 128, sym: bool = False, scale_dtype: Any = np.float16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy float64 RTN, one group and column at a time. Returns codes [K, N], scales and zeros [G, N].

    Scales are float64 arrays holding values of `scale_dtype` (rounded up before the codes are chosen).
    """
    k, n, gs = validate_quantize_inputs(w, bits=bits, group_size=group_size)
    sd = validate_scale_dtype(scale_dtype)
    w = np.asarray(w, dtype=np.float64)
    g = k // gs
    codes = np.empty((k, n), np.int64)
    scales = np.empty((g, n))
    zeros = np.empty((g, n))
    for gi in range(g):
        for col in range(n):
            x = w[gi * gs : (gi + 1) * gs, col]
            s, z = grid_params(np.array(x.min()), np.array(x.max()), bits=bits, sym=sym, scale_dtype=sd)
            scales[gi, col], zeros[gi, col] = s, z
            codes[gi * gs : (gi + 1) * gs, col] = quantize_codes(x, s, z, bits=bits)
    check_scales_fit(scales, sd)
    return codes, scales, zeros
