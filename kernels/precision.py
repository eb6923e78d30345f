"""The precision policy of the lab's XLA paths: float32 data is computed to float32 accuracy on every backend.

XLA's default precision for float32 dots is backend-dependent: exact on the CPU, TF32 (10-bit mantissa) on
NVIDIA GPUs, bf16 passes on TPUs. The lab's own dots on float32 data therefore ask for HIGHEST; for bfloat16
and float16 operands it changes no result (their products are exact in float32), though a dot carries it into
the HLO, and a backend kernel may reject it: libtpu's Mosaic ragged-dot kernel does, so the MoE path's
`ragged_dot`s of low-precision operands ask for DEFAULT explicitly. A user who wants TF32 speed passes bf16
data.

`highest_precision(fn)` traces `fn` with `jax.default_matmul_precision("highest")`, so every dot it builds
carries that precision in the HLO. Apply it inside `jax.jit` and to each custom VJP's forward and backward
rule (those are traced separately, possibly outside the caller's context).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def highest_precision(fn: Callable[..., Any]) -> Callable[..., Any]:
    import jax

    @functools.wraps(fn)
    def traced_at_highest(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return traced_at_highest
