"""Which implementations of each op exist, which run on this backend, and how `impl=` is checked.

Every public kernel takes `impl=`:

    "auto"        the fastest implementation for the platform the call is lowered for, chosen per platform at
                  lowering (`jax.lax.platform_dependent`), so one jitted function exports for cpu, cuda, rocm
                  and tpu
    "reference"   the NumPy reference, run eagerly through the same entry point (not traceable)
    "xla"         the portable jitted path (every backend)
    "cpu_native"  C++ through XLA's FFI (kernels/cpu), on the CPU, where the op has one
    "pallas"      Pallas kernels: compiled on cuda/rocm, interpreted on cpu (slow: for tests)
    + the XLA path's own strategies, by name (`codes`/`dequant`/`dense` for INT4, `grouped`/`bucketed`/
      `ragged`/`batched`/`dense` for MoE), which stay selectable as before.

Adding a backend to an op is one file in the op's package and one entry in `_OPS` below; the op's shared
test suite then runs against it (tests/kernels/<op>/ parametrizes over `available_impls`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from kernels import cpu


@dataclasses.dataclass(frozen=True)
class OpImpls:
    """What one op has beyond the reference and the XLA path."""

    native: bool  # a CPU-native kernel (kernels/cpu)
    pallas: bool  # a Pallas kernel (pallas_gpu.py in the op's package)
    strategies: tuple[str, ...] = ()  # the XLA path's internal strategies, selectable by name


_OPS = {
    "paged_attention": OpImpls(native=True, pallas=True),
    "int4_matmul": OpImpls(native=True, pallas=True, strategies=("codes", "dequant", "dense")),
    "moe_ffn": OpImpls(
        native=True, pallas=True, strategies=("grouped", "bucketed", "ragged", "batched", "dense")
    ),
}
OPS = tuple(_OPS)


def op_impls(op: str) -> OpImpls:
    if op not in _OPS:
        raise ValueError(f"op={op!r} is not a kernel of the lab; expected one of {OPS}")
    return _OPS[op]


def available_impls(op: str) -> tuple[str, ...]:
    """The implementations of `op` (backends, not the XLA path's strategies) that run on the default backend.

    Always "reference" and "xla"; "cpu_native" where the op has a native kernel, the default backend is the
    CPU and the library is loaded; "pallas" where the op has a Pallas kernel and the backend is a GPU (or the
    CPU, where it runs in interpret mode). Every name is a valid `impl=` for the op.
    """
    spec = op_impls(op)
    backend = jax.default_backend()
    names = ["reference", "xla"]
    if spec.native and backend == "cpu" and cpu.available():
        names.append("cpu_native")
    if spec.pallas and backend in ("cpu", "gpu"):
        names.append("pallas")
    return tuple(names)


def auto_impl(op: str, platform: str | None = None) -> str:
    """The backend `impl="auto"` prefers for `op` on `platform` ("cpu", "cuda", "rocm", "tpu"; default: the
    default backend's), for inputs that backend serves; inputs it does not serve fall back to "xla".

    On the CPU the native kernel where the op has one, the library is loaded and its instruction-set path
    is faster than the XLA path (`kernels.cpu.fast_enough`: not the scalar fallback); on cuda/rocm the
    Pallas kernel where the op has one; everywhere else the XLA path.
    """
    spec = op_impls(op)
    if platform is None:
        platform = jax.devices()[0].platform
    if platform == "cpu" and spec.native and cpu.available() and cpu.fast_enough(op):
        return "cpu_native"
    if platform in ("cuda", "rocm", "gpu") and spec.pallas:
        return "pallas"
    return "xla"


def valid_impls(op: str) -> tuple[str, ...]:
    """Every name `impl=` accepts for `op` (whether or not it can run here)."""
    spec = op_impls(op)
    names = ["auto", "reference", "xla"]
    if spec.native:
        names.append("cpu_native")
    if spec.pallas:
        names.append("pallas")
    return (*names, *spec.strategies)


def check_impl(op: str, impl: Any) -> str:
    """`impl` when it names an implementation of `op`; otherwise a ValueError listing the valid ones."""
    valid = valid_impls(op)
    if not isinstance(impl, str) or impl not in valid:
        raise ValueError(f"impl={impl!r} is not an implementation of {op}; expected one of {valid}")
    return impl


def per_platform(
    *args: Any,
    xla: Callable[..., Any],
    cpu: Callable[..., Any] | None = None,
    gpu: Callable[..., Any] | None = None,
) -> Any:
    """impl="auto": `cpu` when lowered for the CPU, `gpu` for cuda and rocm, `xla` everywhere else (and where
    a branch is None), chosen at lowering so one jitted function exports for every platform."""
    branches = {}
    if cpu is not None:
        branches["cpu"] = cpu
    if gpu is not None:
        branches["cuda"] = branches["rocm"] = gpu
    if not branches:
        return xla(*args)
    return jax.lax.platform_dependent(*args, default=xla, **branches)


def require_concrete(op: str, *arrays: Any) -> None:
    """impl="reference" runs NumPy: refuse traced arguments with an error that says what to do instead."""
    leaves = jax.tree_util.tree_leaves(arrays)
    if any(isinstance(a, jax.core.Tracer) for a in leaves):
        raise ValueError(
            f"impl='reference' runs the NumPy reference of {op} eagerly and cannot be traced (jit, vmap, "
            "grad); call it outside the transformation or use impl='xla'"
        )
