"""Analytic FLOP and byte counts per op, and a cross-check against XLA's own cost analysis.

A `Cost` is what an op must do at the least: its FLOPs, the bytes it must read from and write to main
memory (each operand once, as a fused kernel would), and its transcendentals (exp, tanh, ...). Its time
bound on a chip is the roofline:

    bound_s = max(flops / peak_flops[dtype], (bytes_read + bytes_written) / bandwidth)

XLA's `compiled.cost_analysis()` counts differently, and `xla_cost` / `compare_with_xla` say how:
- It returns a dict on recent JAX (a one-element list of dicts on older versions); both are accepted.
- Keys: "flops", "transcendentals" (present only when nonzero), "bytes accessed" (total), and per-operand
  "bytes accessed{i}{}" / "bytes accessedout{}". Missing keys read as 0. Some backends report none (and
  Pallas kernels report only their `pl.CostEstimate`); `xla_cost` then returns None.
- Bytes are summed over every HLO instruction of the optimized module: an intermediate that XLA
  materializes (attention scores, a dequantized weight) is counted when written and again when read, so
  XLA's bytes exceed the analytic minimum for unfused programs.
- The body of a `while` loop (`lax.scan`, `fori_loop`) is counted once, not once per trip: multiply the
  analytic cost of one trip, not the whole loop, when comparing such a program.
- Elementwise ops count one FLOP per element; exp/tanh/log are transcendentals, not FLOPs.
- bf16 arithmetic on CPU is upcast to float32, so bf16 byte counts there are inflated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from kernels.cost import Cost, itemsize


def dtype_name(dtype: Any) -> str:
    """The `Chip.peak_flops` key for a NumPy/JAX compute dtype."""
    if isinstance(dtype, str) and dtype in ("fp32", "tf32", "bf16", "fp16", "fp8", "int8"):
        return dtype
    name = np.dtype(dtype).name
    table = {"float32": "fp32", "float64": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}
    if name.startswith("float8"):
        return "fp8"
    if name not in table:
        raise ValueError(f"dtype={name!r} has no roofline peak; expected one of {sorted(table)} or float8")
    return table[name]


# The dtype names `itemsize` knows besides NumPy/JAX dtypes.
DTYPE_NAMES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4", "int32")


def _itemsize(arg: str, dtype: Any) -> float:
    """`itemsize(dtype)`, or a ValueError naming the argument and the valid dtypes."""
    try:
        return itemsize(dtype)
    except (TypeError, ValueError):
        raise ValueError(
            f"{arg}={dtype!r} is not a dtype; valid: {', '.join(DTYPE_NAMES)}, or a NumPy/JAX dtype "
            "such as 'float32', 'bfloat16' or jnp.float16"
        ) from None


def matmul_cost(
    m: int,
    k: int,
    n: int,
    *,
    x_dtype: Any = "fp32",
    w_dtype: Any = None,
    out_dtype: Any = None,
    batch: int = 1,
) -> Cost:
    """x: [batch, m, k] @ w: [batch, k, n] -> [batch, m, n]: 2·m·k·n FLOPs, each operand read once."""
    for arg, v in (("m", m), ("k", k), ("n", n), ("batch", batch)):
        if v < 1:
            raise ValueError(f"{arg}={v} must be at least 1")
    w_dtype = x_dtype if w_dtype is None else w_dtype
    out_dtype = x_dtype if out_dtype is None else out_dtype
    x_size, w_size = _itemsize("x_dtype", x_dtype), _itemsize("w_dtype", w_dtype)
    out_size = _itemsize("out_dtype", out_dtype)
    return Cost(
        flops=2.0 * batch * m * k * n,
        bytes_read=batch * (m * k * x_size + k * n * w_size),
        bytes_written=batch * m * n * out_size,
    )


def attention_cost(
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    *,
    dtype: Any = "fp32",
    kv_dtype: Any = None,
    causal: bool = False,
    v_head_dim: int | None = None,
) -> Cost:
    """Dense attention softmax(scale·q·kᵀ + mask)·v, as a fused (flash) kernel would move memory.

    q: [B, Lq, H, D], k: [B, Lk, K, D], v: [B, Lk, K, Dv] -> o: [B, Lq, H, Dv]. With `causal`, query i
    (the last Lq positions of Lk) sees keys up to its own position. FLOPs: 2·D per q·k product and 2·Dv
    per p·v product over the attended pairs, plus 5 per score for scale, max, subtract, sum and divide;
    one exp per score. Bytes: q, k, v read once, o written once; scores never reach memory.
    """
    for arg, v in (
        ("batch", batch),
        ("num_q_heads", num_q_heads),
        ("num_kv_heads", num_kv_heads),
        ("q_len", q_len),
        ("kv_len", kv_len),
        ("head_dim", head_dim),
    ):
        if v < 1:
            raise ValueError(f"{arg}={v} must be at least 1")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if causal and q_len > kv_len:
        raise ValueError(f"q_len={q_len} cannot exceed kv_len={kv_len} for causal attention")
    dv = head_dim if v_head_dim is None else v_head_dim
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    q_size, kv_size = _itemsize("dtype", dtype), _itemsize("kv_dtype", kv_dtype)
    if causal:
        # Query i of the last q_len sees kv_len - q_len + i + 1 keys.
        pairs = q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2
    else:
        pairs = q_len * kv_len
    scores = batch * num_q_heads * pairs
    return Cost(
        flops=scores * (2.0 * head_dim + 2.0 * dv + 5.0),
        bytes_read=batch
        * (q_len * num_q_heads * head_dim * q_size + kv_len * num_kv_heads * (head_dim + dv) * kv_size),
        bytes_written=batch * q_len * num_q_heads * dv * q_size,
        transcendentals=scores,
    )


# ---------------------------------------------------------------------------------------------------------
# XLA's view.


@dataclasses.dataclass(frozen=True)
class XlaCost:
    """XLA's cost analysis of one compiled program, normalized across JAX versions."""

    flops: float
    bytes_accessed: float
    bytes_written: float
    transcendentals: float
    raw: dict[str, float]


def _normalize_cost_analysis(analysis: Any) -> dict[str, float] | None:
    if analysis is None:
        return None
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        if not analysis:
            return None
        analysis = analysis[0]
    return {str(k): float(v) for k, v in dict(analysis).items()}


def xla_cost(fn: Callable, *args: Any, **kwargs: Any) -> XlaCost | None:
    """Compile `fn(*args, **kwargs)` with jit and read XLA's cost analysis (args may be ShapeDtypeStructs).

    Returns None when the backend reports no analysis.
    """
    import jax

    compiled = jax.jit(fn).lower(*args, **kwargs).compile()
    raw = _normalize_cost_analysis(compiled.cost_analysis())
    if not raw:
        return None
    return XlaCost(
        flops=raw.get("flops", 0.0),
        bytes_accessed=raw.get("bytes accessed", 0.0),
        bytes_written=raw.get("bytes accessedout{}", 0.0),
        transcendentals=raw.get("transcendentals", 0.0),
        raw=raw,
    )


@dataclasses.dataclass(frozen=True)
class CostComparison:
    """Analytic over XLA, per quantity (1.0 = agreement). None where XLA reports nothing to compare."""

    analytic: Cost
    xla: XlaCost
    flops_ratio: float | None
    bytes_ratio: float | None
    transcendentals_ratio: float | None


def compare_with_xla(cost: Cost, fn: Callable, *args: Any, **kwargs: Any) -> CostComparison | None:
    """Compare an analytic `cost` with XLA's count for the same function. See the module docstring for
    what XLA counts differently (materialized intermediates, loop bodies once)."""
    xc = xla_cost(fn, *args, **kwargs)
    if xc is None:
        return None

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    return CostComparison(
        analytic=cost,
        xla=xc,
        flops_ratio=ratio(cost.flops, xc.flops),
        bytes_ratio=ratio(cost.bytes, xc.bytes_accessed),
        transcendentals_ratio=ratio(cost.transcendentals, xc.transcendentals),
    )
