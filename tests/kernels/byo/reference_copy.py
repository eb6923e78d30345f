"""A user's own backend, for `python -m benchmarks.accel --impl-module tests.kernels.byo.reference_copy`.

Importing it registers, for every op, an implementation named "reference_copy": the op's NumPy reference
(`kernels.<op>_reference`) behind `jax.pure_callback`, so that it traces (and runs inside the accelerator
check's jitted loop) like any other backend. `prefer` keeps impl="auto" off it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import kernels
from kernels import registry

NAME = "reference_copy"


def _is_array(v: Any) -> bool:
    return isinstance(v, (jax.Array, np.ndarray))


def _wrap(op: str) -> registry.Implementation:
    reference = getattr(kernels, f"{op}_reference")
    entry = getattr(kernels, op)

    def fn(*args: Any, config: Any = None, **options: Any) -> Any:
        del config
        arrays = {k: v for k, v in options.items() if _is_array(v)}
        static = {k: v for k, v in options.items() if not _is_array(v)}
        # The output's shape and dtype are the XLA path's (scale etc. as already resolved by the entry).
        out = jax.eval_shape(lambda *a, **kw: entry(*a, impl="xla", **static, **kw), *args, **arrays)

        def host(args: tuple, arrays: dict) -> np.ndarray:
            y = reference(*args, **static, **arrays)
            return np.asarray(y).astype(out.dtype)

        return jax.pure_callback(host, out, args, arrays)

    return registry.Implementation(
        NAME, fn, platforms=registry.PLATFORMS, prefer=lambda *a, **kw: "a test backend"
    )


for _op in registry.OPS:
    registry.register(_op, _wrap(_op), replace=True)
