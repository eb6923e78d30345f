"""The MoE expert FFN through the CPU-native grouped SwiGLU kernel (kernels/cpu/moe_ffn*.cc, XLA's FFI).

The rows are planned and gathered as by the XLA "grouped" strategy; the forward then runs the native kernel,
which reads each touched expert's weights in place (no per-expert weight copy); the backward is the XLA
grouped loop. Float32 x and float32 experts, dropless or with a capacity; CPU only.

`impl="auto"` takes it on the CPU for dropless calls where its instruction-set path beats XLA's grouped
loop (`prefer`): a vector path (NATIVE_ISAS) that `kernels.cpu.fast_enough("moe_ffn")` accepts, and at most
NATIVE_MAX_TOKENS tokens unless the path is in NATIVE_PREFILL_ISAS (the measurements behind the rule are in
docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu, registry
from kernels.moe.reference import capacity_of
from kernels.moe.xla import check_row_blocks, ffn_grouped
from kernels.precision import highest_precision
from quant.format import Int4Weight

# The native grouped FFN's prefill (its register-blocked algorithm) beats XLA only on the AVX-512 path; the
# other vector paths take it up to this many tokens.
NATIVE_MAX_TOKENS = 128
NATIVE_PREFILL_ISAS = ("avx512",)
# The paths with vector code in the native grouped FFN (its aarch64 build runs the scalar code: not taken).
NATIVE_ISAS = ("avx512", "avx2")


@dataclasses.dataclass(frozen=True)
class Config:
    """The row blocks of the plan and of the XLA backward: powers of two, row_align <= block_rows."""

    row_align: int = 8
    block_rows: int = 64

    def __post_init__(self) -> None:
        check_row_blocks(self.row_align, self.block_rows)


def native_unsupported(x: Any, weights: Any, expert_ids: Any, w_gate: Any, w_up: Any, w_down: Any, **_: Any):
    """Why the native grouped FFN cannot serve these inputs (None when it can)."""
    if isinstance(w_gate, Int4Weight):
        return (
            "Int4Weight experts: it needs float32 x and float32 experts (impl='auto' runs quantized experts"
            " through the native INT4 kernel)"
        )
    for name, a in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if np.dtype(a.dtype) != np.float32:
            return f"{name}.dtype={np.dtype(a.dtype)}: it needs float32 x and float32 experts"
    return None


def _prefer(x: Any = None, *_args: Any, capacity_factor: Any = None, **_: Any) -> str | None:
    """Why impl="auto" passes the native forward over for this call on this CPU (None: it takes it); without
    arguments, for the calls it serves at all."""
    if capacity_factor is not None:
        return "a capacity: impl='auto' runs the batched XLA strategy"
    slower = registry.native_slower("moe_ffn")
    if slower is not None:
        return slower
    if cpu.isa() not in NATIVE_ISAS:
        return f"the {cpu.isa()} path has no vector code for the grouped FFN"
    if x is not None and x.shape[0] > NATIVE_MAX_TOKENS and cpu.isa() not in NATIVE_PREFILL_ISAS:
        return f"T={x.shape[0]} > {NATIVE_MAX_TOKENS} tokens on the {cpu.isa()} path (XLA's loop is faster)"
    return None


@functools.partial(jax.jit, static_argnames=("capacity", "drop_priority", "row_align", "block_rows"))
@highest_precision
def moe_ffn_native(x, weights, expert_ids, wg, wu, wd, *, capacity, drop_priority, row_align, block_rows):
    """x [T, d] float32 -> [T, d] through the native grouped forward (CPU only)."""
    return ffn_grouped(
        x, weights, expert_ids.astype(jnp.int32), wg, wu, wd, capacity, drop_priority, row_align, block_rows,
        native=True,
    )  # fmt: skip


def _native(x, weights, expert_ids, w_gate, w_up, w_down, *, capacity_factor, drop_priority, config):
    return moe_ffn_native(
        x, weights, expert_ids, w_gate, w_up, w_down,
        capacity=capacity_of(expert_ids, w_gate, capacity_factor), drop_priority=drop_priority,
        row_align=int(config.row_align), block_rows=int(config.block_rows),
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation(
    "cpu_native",
    _native,
    platforms=("cpu",),
    supports=native_unsupported,
    config=Config,
    available=registry.native_library_missing,
    prefer=_prefer,
)
