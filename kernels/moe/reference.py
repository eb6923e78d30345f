"""The MoE expert FFN, the semantics: input validation and the NumPy reference (float64, dense over
experts). Conventions in the `kernels.moe` docstring."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import registry
from kernels.moe.dispatch import expert_capacity, keep_mask_reference, validate_capacity_args
from kernels.moe.routing import validate_routing
from quant.format import Int4Weight, codes_per_byte, dequantize_reference

# The XLA strategies that need float experts (ragged_dot and the bucketed switch); every other implementation
# takes stacks of Int4Weight experts or says otherwise through its `supports`.
FLOAT_ONLY_IMPLS = ("bucketed", "ragged")


def validate_moe_ffn_inputs(
    x: Any,
    weights: Any,
    expert_ids: Any,
    w_gate: Any,
    w_up: Any,
    w_down: Any,
    *,
    capacity_factor: float | None = None,
    drop_priority: str = "choice",
    impl: str = "auto",
) -> None:
    """Static checks for `moe_ffn` (and expert id range when concrete)."""
    _validate_inputs(
        x, weights, expert_ids, w_gate, w_up, w_down, capacity_factor=capacity_factor,
        drop_priority=drop_priority, impl=impl, reference=False,
    )  # fmt: skip


def _validate_inputs(
    x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor, drop_priority, impl, reference
) -> None:
    registry.check_impl("moe_ffn", impl)
    if len(x.shape) != 2:
        raise ValueError(f"x.shape={tuple(x.shape)} must be [T, d]")
    num_tokens = x.shape[0]
    quantized = [isinstance(w, Int4Weight) for w in (w_gate, w_up, w_down)]
    if any(quantized):
        if not all(quantized):
            raise ValueError("w_gate, w_up and w_down must all be Int4Weight stacks, or all float arrays")
        _validate_quantized_experts(x, w_gate, w_up, w_down, reference)
        num_experts = _expert_dims(w_gate)[0]
        if impl in FLOAT_ONLY_IMPLS:
            raise ValueError(f"impl={impl!r} does not take Int4Weight experts (it needs float experts)")
    else:
        _validate_float_experts(x, w_gate, w_up, w_down, reference)
        num_experts = w_gate.shape[0]
    validate_routing(weights, expert_ids, num_experts, num_tokens)
    if capacity_factor is not None and not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"capacity_factor={capacity_factor} must be a positive number or None")
    validate_capacity_args(None, drop_priority)


X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def _validate_x_dtype(x: Any, reference: bool) -> None:
    # The kernels take float32/bfloat16/float16; the NumPy reference also takes float64 (finite differences).
    allowed = (*X_DTYPES, np.dtype(np.float64)) if reference else X_DTYPES
    if np.dtype(x.dtype) not in allowed:
        names = ", ".join(d.name for d in allowed)
        raise ValueError(f"x.dtype={x.dtype} must be one of {names}")


def _validate_float_experts(x: Any, w_gate: Any, w_up: Any, w_down: Any, reference: bool) -> None:
    d = x.shape[1]
    if len(w_gate.shape) != 3:
        raise ValueError(f"w_gate.shape={tuple(w_gate.shape)} must be [E, d, f]")
    num_experts, dg, f = w_gate.shape
    if dg != d:
        raise ValueError(f"w_gate.shape={tuple(w_gate.shape)} must be [E, d={d}, f]")
    if tuple(w_up.shape) != tuple(w_gate.shape):
        raise ValueError(f"w_up.shape={tuple(w_up.shape)} must equal w_gate.shape={tuple(w_gate.shape)}")
    if tuple(w_down.shape) != (num_experts, f, d):
        raise ValueError(f"w_down.shape={tuple(w_down.shape)} must be [E, f, d]=({num_experts}, {f}, {d})")
    _validate_x_dtype(x, reference)
    for name, a in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if np.dtype(a.dtype) != np.dtype(x.dtype):
            raise ValueError(
                f"{name}.dtype={a.dtype} must equal x.dtype={x.dtype} (or be a stack of Int4Weight)"
            )


def _expert_dims(w: Int4Weight) -> tuple[int, int, int]:
    """(E, K, N) of a stack of Int4Weight experts (leaves with a leading expert axis)."""
    if w.packed.ndim != 3:
        raise ValueError(f"an Int4Weight expert stack needs packed [E, R, N]; got {tuple(w.packed.shape)}")
    e, r, n = w.packed.shape
    return e, r * codes_per_byte(w.bits), n


def _validate_quantized_experts(
    x: Any, w_gate: Int4Weight, w_up: Int4Weight, w_down: Int4Weight, reference: bool
) -> None:
    d = x.shape[1]
    e, dg, f = _expert_dims(w_gate)
    if dg != d:
        raise ValueError(f"w_gate is [E, {dg}, f] but x has d={d}")
    if _expert_dims(w_up) != (e, d, f):
        raise ValueError(f"w_up is {list(_expert_dims(w_up))}; it must match w_gate's [E, d, f]={[e, d, f]}")
    if _expert_dims(w_down) != (e, f, d):
        raise ValueError(f"w_down is {list(_expert_dims(w_down))}; it must be [E, f, d]={[e, f, d]}")
    _validate_x_dtype(x, reference)


def num_experts_of(w: Any) -> int:
    return _expert_dims(w)[0] if isinstance(w, Int4Weight) else w.shape[0]


def expert_weights(w: Any, e: Any) -> Any:
    """Expert e of a stack: an array slice, or an Int4Weight built from its leaves' slices."""
    return jax.tree.map(lambda a: a[e], w)


def dequantize_experts(w: Int4Weight) -> np.ndarray:
    """Layout bridge: a stack of Int4Weight experts -> float64 [E, K, N] (the format's own oracle)."""
    return np.stack([dequantize_reference(expert_weights(w, e)) for e in range(_expert_dims(w)[0])])


def moe_ffn_reference(
    x: Any,
    weights: Any,
    expert_ids: Any,
    w_gate: Any,
    w_up: Any,
    w_down: Any,
    *,
    capacity_factor: float | None = None,
    drop_priority: str = "choice",
    compute_dtype: Any = np.float64,
) -> np.ndarray:
    """The MoE FFN as a NumPy loop over experts, in compute_dtype (float64 by default) -> y [T, d]."""
    x, weights, expert_ids = np.asarray(x), np.asarray(weights), np.asarray(expert_ids)
    _validate_inputs(
        x, weights, expert_ids, w_gate, w_up, w_down, capacity_factor=capacity_factor,
        drop_priority=drop_priority, impl="reference", reference=True,
    )  # fmt: skip
    if isinstance(w_gate, Int4Weight):  # quantized experts: compare against the dequantized weights
        w_gate, w_up, w_down = (dequantize_experts(w) for w in (w_gate, w_up, w_down))
    w_gate, w_up, w_down = np.asarray(w_gate), np.asarray(w_up), np.asarray(w_down)
    num_tokens, top_k = expert_ids.shape
    num_experts = w_gate.shape[0]
    capacity = None
    if capacity_factor is not None:
        capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
    keep = keep_mask_reference(weights, expert_ids, num_experts, capacity, drop_priority)
    xc = x.astype(compute_dtype)
    y = np.zeros((num_tokens, x.shape[1]), dtype=compute_dtype)
    for e in range(num_experts):
        tok, slot = np.nonzero((expert_ids == e) & keep)
        if tok.size == 0:
            continue
        v = xc[tok]
        g = v @ w_gate[e].astype(compute_dtype)
        h = g / (1.0 + np.exp(-g)) * (v @ w_up[e].astype(compute_dtype))
        out = h @ w_down[e].astype(compute_dtype)
        np.add.at(y, tok, weights[tok, slot].astype(compute_dtype)[:, None] * out)
    return y


# --------------------------------------------------------------------------------------------------
# the expert FFN: JAX strategies


def capacity_of(expert_ids: Any, w_gate: Any, capacity_factor: float | None) -> int | None:
    """Rows per expert for `capacity_factor` (None: dropless), as `expert_capacity` computes it."""
    if capacity_factor is None:
        return None
    num_tokens, top_k = expert_ids.shape
    return expert_capacity(num_tokens, num_experts_of(w_gate), top_k, capacity_factor)


def _reference(x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor, drop_priority, config):
    """impl="reference": the NumPy reference on host copies, in float64, returned in x's dtype."""
    del config
    registry.require_concrete("moe_ffn", x, weights, expert_ids, w_gate, w_up, w_down)
    out = moe_ffn_reference(
        np.asarray(x), np.asarray(weights), np.asarray(expert_ids),
        *(w if not isinstance(w, jax.Array) else np.asarray(w) for w in (w_gate, w_up, w_down)),
        capacity_factor=capacity_factor, drop_priority=drop_priority,
    )  # fmt: skip
    return jnp.asarray(out.astype(x.dtype))


IMPLEMENTATION = registry.Implementation(
    "reference", _reference, platforms=registry.PLATFORMS, traceable=False
)
