"""A kernel primitive with one lowering per platform: the shared helper of the Pallas backends.

`per_platform_kernel(name, lowerings, ...)` defines a JAX primitive whose lowering rule is chosen by the
platform being lowered for, never by `jax.default_backend()` at trace time:

    kernel = per_platform_kernel(
        "tokenlab_my_kernel",
        {"cpu": run_interpreted, "cuda": run_compiled, "rocm": run_compiled},
        kernel="the Pallas Triton paged attention kernel",
    )
    out = kernel(x, y, block=128)      # arrays (pytrees of them), then static keyword parameters

Each lowering is a plain JAX function `fn(*args, **params)` returning an array or a pytree of arrays; every
platform's function must return the same shapes and dtypes. The primitive gets:

- an abstract eval: `out_shape(*args, **params)` (a pytree of jax.ShapeDtypeStruct), by default
  `jax.eval_shape` of the first lowering, computed once per call;
- an eager impl that dispatches through `jax.jit`, so an eager call runs the rule of the platform it runs on;
- one lowering rule per platform of `lowerings` (`mlir.register_lowering(..., platform=p)`, built with
  `mlir.lower_fun`). A multi-platform lowering (`jax.export` for cpu, cuda, rocm and tpu) lowers each rule
  only for its own platforms, which `jax.lax.platform_dependent` cannot do: it lowers every branch for every
  platform, and a compiled `pallas_call` refuses to lower for cpu or tpu;
- for a platform without a lowering: a ValueError naming the kernel and the platforms it runs on when that
  platform is the only one being lowered for, and NaN-filled outputs inside a multi-platform lowering (a
  branch that the caller's own per-platform choice, e.g. `impl="auto"`, never takes there; NaN so that a wrong
  choice could not pass for a result);
- a batching rule: `jax.vmap` records its in_axes in the primitive's `vmaps` parameter, and each lowering
  applies `jax.vmap` to its function once per level, so the batched kernel stays one primitive with one rule
  per platform (`pallas_call` batches by adding a grid axis; unmapped operands are not broadcast). A platform
  in `map_sequentially` (a lowering that does not batch, e.g. `lax.ragged_dot` with unbatched weights) runs
  each level as a `lax.map` over the mapped axis instead, the unmapped operands closed over.

Static parameters become primitive parameters: they must be hashable and compare by value (or be the same
object), as for any JAX primitive. `in_tree`, `out_avals` and `vmaps` are reserved.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_RESERVED = ("in_tree", "out_avals", "vmaps")


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class PerPlatformKernel:
    """A primitive with one lowering per platform (see the module docstring), as a callable:
    `kernel(*args, **params)` binds the primitive. args: arrays or pytrees of arrays (None leaves allowed);
    params: static keyword parameters passed to the lowerings. Returns the lowerings' output pytree.
    `primitive` is the JAX primitive, `platforms` the platforms with a lowering.

    name       the primitive's name (unique in the process: its rules are registered with JAX at definition).
    lowerings  platform -> fn(*args, **params) -> array or pytree of arrays, for platforms in PLATFORMS.
    kernel     what the error calls the kernel, e.g. "the Pallas Triton paged attention kernel".
    runs_on    how the error names the platforms it runs on (default: the lowerings' platforms), e.g.
               "cpu (interpreted), cuda and rocm".
    advice     appended to the error, e.g. "use impl='auto' or 'xla'" (None: nothing).
    out_shape  out_shape(*args, **params) -> pytree of jax.ShapeDtypeStruct, args as ShapeDtypeStructs
               (default: jax.eval_shape of the first lowering).
    map_sequentially  platforms whose lowering does not batch under jax.vmap: each vmap level runs a lax.map.
    """

    def __init__(
        self,
        name: str,
        lowerings: Mapping[str, Callable[..., Any]],
        *,
        kernel: str,
        runs_on: str | None = None,
        advice: str | None = "use impl='auto' or 'xla'",
        out_shape: Callable[..., Any] | None = None,
        map_sequentially: Collection[str] = (),
    ) -> None:
        lowerings = dict(lowerings)
        if isinstance(map_sequentially, str):
            map_sequentially = (map_sequentially,)
        if not lowerings:
            raise ValueError(f"{name}: lowerings must name at least one platform")
        unknown = [p for p in lowerings if p not in PLATFORMS]
        if unknown:
            raise ValueError(f"{name}: lowerings for {unknown}; platforms are {PLATFORMS}")
        if any(p not in lowerings for p in map_sequentially):
            raise ValueError(
                f"{name}: map_sequentially={map_sequentially!r} names a platform without a lowering"
            )
        self.name = name
        self.kernel = kernel
        self.platforms = tuple(lowerings)
        self.runs_on = runs_on or _join(list(self.platforms))
        self.advice = advice
        self._lowerings = lowerings
        self._sequential = frozenset(map_sequentially)
        self._out_shape = out_shape or self._first_lowering_shape

        p = jex_core.Primitive(name)
        p.multiple_results = True
        p.def_abstract_eval(lambda *avals, out_avals, **_: list(out_avals))
        p.def_impl(lambda *args, **params: jax.jit(functools.partial(p.bind, **params))(*args))
        for platform, fn in lowerings.items():
            mlir.register_lowering(p, functools.partial(self._lower, platform, fn), platform=platform)
        if any(q not in lowerings for q in PLATFORMS):
            mlir.register_lowering(p, self._lower_elsewhere)
        batching.primitive_batchers[p] = self._batch
        self.primitive = p

    def __repr__(self) -> str:
        return f"<per-platform kernel {self.name}: {self.runs_on}>"

    def _first_lowering_shape(self, *args: Any, **params: Any) -> Any:
        return jax.eval_shape(functools.partial(next(iter(self._lowerings.values())), **params), *args)

    def __call__(self, *args: Any, **params: Any) -> Any:
        clash = [k for k in params if k in _RESERVED]
        if clash:
            raise TypeError(f"{self.name}: parameter names {clash} are reserved")
        leaves, in_tree = jax.tree.flatten(args)
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), args)
        out_leaves, out_tree = jax.tree.flatten(self._out_shape(*shapes, **params))
        out_avals = tuple(jax.core.ShapedArray(o.shape, o.dtype) for o in out_leaves)
        outs = self.primitive.bind(*leaves, in_tree=in_tree, out_avals=out_avals, vmaps=(), **params)
        return jax.tree.unflatten(out_tree, outs)

    @staticmethod
    def _flat(
        fn: Callable[..., Any], in_tree: Any, vmaps: tuple, params: dict, sequential: bool
    ) -> Callable[..., list]:
        """fn on flat leaves, returning flat outputs, mapped once per level of `vmaps` (innermost first)."""

        def flat(*leaves):
            return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, leaves), **params))

        for in_axes in vmaps:
            flat = _map_over(flat, in_axes) if sequential else jax.vmap(flat, in_axes=in_axes)
        return flat

    def _lower(self, platform: str, fn: Callable[..., Any], ctx: Any, *args: Any, **params: Any) -> Any:
        in_tree, out_avals, vmaps = (params.pop(k) for k in _RESERVED)
        flat = self._flat(fn, in_tree, vmaps, params, platform in self._sequential)

        def checked(*xs):
            outs = flat(*xs)
            got = [(tuple(o.shape), jnp.dtype(o.dtype)) for o in outs]
            want = [(tuple(a.shape), jnp.dtype(a.dtype)) for a in out_avals]
            if got != want:
                raise TypeError(
                    f"{self.kernel}: the {platform} lowering returns {got}, the abstract eval {want}; "
                    "every platform's lowering must return the same shapes and dtypes"
                )
            return outs

        return mlir.lower_fun(checked, multiple_results=True)(ctx, *args)

    def _lower_elsewhere(self, ctx: Any, *args: Any, out_avals: tuple, **_: Any) -> Any:
        platforms = tuple(ctx.module_context.platforms)
        if len(platforms) == 1:
            advice = f"; {self.advice}" if self.advice else ""
            raise ValueError(f"{self.kernel} runs on {self.runs_on}, not {platforms[0]}{advice}")
        # Inside a multi-platform lowering: a branch the caller's per-platform choice never takes here.
        return mlir.lower_fun(
            lambda *xs: [jnp.full(a.shape, jnp.nan, a.dtype) for a in out_avals], multiple_results=True
        )(ctx, *args)

    def _batch(self, args: Any, dims: Any, *, vmaps: tuple, out_avals: tuple, **params: Any) -> Any:
        in_axes = tuple(None if d is None else int(d) for d in dims)  # None: not mapped
        size = next(a.shape[d] for a, d in zip(args, in_axes, strict=True) if d is not None)
        out_avals = tuple(a.update(shape=(size, *a.shape)) for a in out_avals)
        outs = self.primitive.bind(*args, vmaps=(*vmaps, in_axes), out_avals=out_avals, **params)
        return outs, [0] * len(outs)


def _map_over(fn: Callable[..., list], in_axes: tuple) -> Callable[..., list]:
    """fn over the mapped axis as a sequential lax.map (outputs stacked on axis 0); unmapped operands are
    closed over rather than broadcast."""

    def mapped(*xs):
        moved = [jnp.moveaxis(x, d, 0) for x, d in zip(xs, in_axes, strict=True) if d is not None]

        def one(slices):
            it = iter(slices)
            return fn(*[x if d is None else next(it) for x, d in zip(xs, in_axes, strict=True)])

        return jax.lax.map(one, moved)

    return mapped


# The public name: `per_platform_kernel(name, lowerings, *, kernel, ...)` builds one.
per_platform_kernel = PerPlatformKernel


def target_gpu() -> tuple[str, int] | None:
    """(device kind, compute capability as an int, e.g. 80 or 90) of the NVIDIA GPU being lowered for, as
    JAX's Triton lowering finds it: the abstract device of the current mesh when there is one (a compile-only
    target such as "NVIDIA A100-SXM4-40GB", or `kernels.targets`' abstract H100), else the default device.
    None when that is no NVIDIA GPU (a CPU host without a GPU target, ROCm) or JAX cannot say."""
    try:
        from jax._src import gpu_info  # what the Pallas Triton lowering itself asks (JAX >= 0.11)
    except ImportError:
        gpu_info = None
    try:
        if gpu_info is not None:
            cc = int(gpu_info.get_gpu_info().compute_capability)
            return (gpu_info.get_device_kind(), cc) if cc else None
        device = jax.config.jax_default_device or jax.devices()[0]
        cc = getattr(device, "compute_capability", None)  # a CUDA device: "9.0"
        return (device.device_kind, int(str(cc).replace(".", ""))) if cc else None
    except (ValueError, RuntimeError, TypeError, AttributeError):
        return None


def before_hopper() -> bool:
    """Whether the NVIDIA GPU being lowered for (`target_gpu`) is older than Hopper (compute capability
    below 9.0: A100, Ada). There a CTA's tensor-core accumulators live in its warps' registers (no wgmma),
    so the lab's Triton kernels give large tiles 8 warps instead of 4, or they spill."""
    target = target_gpu()
    return target is not None and target[1] < 90


# The Mosaic GPU kernels are written against JAX 0.12's `plgpu` surface (plgpu.kernel, inline_mgpu, the
# interpreter's InterpretGPUParams); the API moved between 0.10 and 0.12.
MOSAIC_GPU_MIN_JAX = (0, 12)


def mosaic_gpu_unavailable() -> str | None:
    """None when this JAX has the Mosaic GPU surface the lab's kernels are written for, else why not."""
    if jax.__version_info__[:2] < MOSAIC_GPU_MIN_JAX:
        need = ".".join(map(str, MOSAIC_GPU_MIN_JAX))
        return f"the Mosaic GPU kernels need JAX >= {need} (this is {jax.__version__})"
    return None


def tpu_chip(table: Mapping[str, Any], default: Any) -> tuple[Any, int | None]:
    """(table's entry for the TPU being lowered for, its per-core VMEM in bytes), read with
    `pltpu.get_tpu_info()` (a TPU, a compile-only TPU device, or an abstract mesh of one): the tiling
    defaults a Mosaic TPU kernel keys by chip version. (`default`, None) when there is no TPU to ask;
    `default` and the VMEM for a chip the table lacks."""
    from jax.experimental.pallas import tpu as pltpu

    try:
        info = pltpu.get_tpu_info()
    except (ValueError, RuntimeError, NotImplementedError):
        return default, None
    return table.get(str(info.chip_version), default), int(info.vmem_capacity_bytes)
