"""Lowering and exporting for accelerators from a host that has none: the one place that knows how the JAX
versions the lab supports differ in this.

JAX 0.10 lowers a GPU kernel (a Pallas Triton custom call) for cuda or rocm from a CPU-only host as it is.
From JAX 0.11 on, the Triton lowering asks the device it lowers for ("No supported GPU devices found, please
specify an abstract GPU device"), and Pallas TPU kernels that ask the TPU generation need one too, so the
lowering runs under an abstract mesh of one abstract device of the target platform (`device_context`).

    lower(fn, *args, platforms=("cuda",))                         jax.jit(fn).trace(*args).lower(...)
    export(fn, *args, platforms=("cpu", "cuda", "rocm", "tpu"))   jax.export.export(jax.jit(fn), ...)(*args)

`args` may be arrays or `jax.ShapeDtypeStruct`s. A function whose cuda/rocm lowering holds a Pallas custom
call, or whose cpu lowering holds a native FFI call, exports only with those calls' safety checks disabled:
`export(..., disabled_checks=KERNEL_CALLS)` allows every custom call the lab's kernels make.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax import export as jax_export

from kernels.cpu.loader import TARGETS as NATIVE_TARGETS

# The device each platform is lowered for when none is attached: the abstract device's `device_kind`.
DEVICE_KINDS = {"cuda": "NVIDIA H100", "rocm": "AMD Instinct MI300X", "tpu": "TPU v6 lite"}
# The custom call that holds a Pallas Triton kernel (cuda/rocm).
TRITON_CALL = "__gpu$xla.gpu.triton"
# The custom calls of the lab's kernels: Pallas Triton, Mosaic (tpu) and the native CPU library's FFI targets.
KERNEL_CALLS = (TRITON_CALL, "tpu_custom_call", *NATIVE_TARGETS)


def _needs_abstract_device() -> bool:
    return jax.__version_info__ >= (0, 11) and hasattr(jax.sharding, "AbstractDevice")


@contextlib.contextmanager
def device_context(*platforms: str, device_kind: str | None = None) -> Iterator[None]:
    """Lower for `platforms` under this context. On JAX >= 0.11 it holds an abstract mesh of one abstract
    device of the first accelerator platform among them (cuda, then rocm, then tpu), of `device_kind`
    (default DEVICE_KINDS); with only "cpu", or on JAX 0.10, it does nothing."""
    accel = [p for p in ("cuda", "rocm", "tpu") if p in platforms]
    if not accel or not _needs_abstract_device():
        yield
        return
    platform = accel[0]
    device = jax.sharding.AbstractDevice(
        device_kind=device_kind or DEVICE_KINDS[platform], num_cores=1, platform=platform
    )
    # Auto axes: the lab's kernels shard nothing themselves, so the mesh must not make their arrays Explicit.
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.sharding.AbstractMesh((1,), ("targets",), axis_types=auto, abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower(
    fn: Callable[..., Any], *args: Any, platforms: Sequence[str], device_kind: str | None = None
) -> Any:
    """`jax.jit(fn)` traced on `args` and lowered for `platforms` (a `jax.stages.Lowered`)."""
    platforms = tuple(platforms)
    with device_context(*platforms, device_kind=device_kind):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=platforms)


def export(
    fn: Callable[..., Any],
    *args: Any,
    platforms: Sequence[str],
    disabled_checks: Sequence[str] = (),
    device_kind: str | None = None,
) -> jax_export.Exported:
    """`jax.export.export(jax.jit(fn), platforms=...)(*args)`, allowing the named custom calls."""
    platforms = tuple(platforms)
    checks = [jax_export.DisabledSafetyCheck.custom_call(name) for name in disabled_checks]
    with device_context(*platforms, device_kind=device_kind):
        return jax_export.export(jax.jit(fn), platforms=platforms, disabled_checks=checks)(*args)
