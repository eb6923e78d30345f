"""The kernels' implementations as values, one table per op, and the one place that decides what runs.

An op (`OPS`) has a table name -> `Implementation`. Its public entry (`kernels.paged_attention`, ...)
validates its arguments once, then calls `dispatch(op, impl, *args, config=config, **kwargs)`, which runs:

    a named implementation  "reference", "xla", "cpu_native", "pallas_triton", or one a user registered;
    "auto"                  per platform, at lowering, the first implementation of AUTO_ORDER[platform]
                            that is in the table, lowers for that platform, can run here (`available`),
                            serves the call (`supports`) and is preferred here (`prefer`); the XLA path
                            serves every call. The choices for all platforms are joined by
                            `jax.lax.platform_dependent`, so one jitted function exports for cpu, cuda,
                            rocm and tpu;
    "pallas"                this platform's Pallas kernel, from PALLAS_ORDER the same way (on the CPU the
                            Triton kernel, interpreted);
    an XLA strategy name    ("codes", "grouped", ...): the XLA path with that `Config(strategy=...)`.

`auto_impl(op, *args, **kwargs)` answers which implementation "auto" runs for a call, so the roofline and
the benchmarks ask instead of re-deriving it.

Each built-in implementation is the `IMPLEMENTATION` of one module of the op's package (file name = impl
name); `_BUILTIN` lists them. Research code adds its own with `register(op, Implementation(...))`: the
entry, the op's shared test suite (`pytest tests/kernels/<op> --impl-module MODULE`) and
`benchmarks.accel --impl-module MODULE` then run it beside the built-in ones (docs/backends.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import numpy as np

OPS = ("paged_attention", "int4_matmul", "moe_ffn")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

# Each op's package and its built-in implementations, in table order; each is
# `<package>.<name>.IMPLEMENTATION`.
_BUILTIN = {
    "paged_attention": (
        "kernels.paged_attention",
        ("reference", "xla", "cpu_native", "pallas_triton", "pallas_mosaic_gpu", "pallas_mosaic_tpu"),
    ),
    "int4_matmul": (
        "kernels.int4_matmul",
        ("reference", "xla", "cpu_native", "pallas_triton", "pallas_mosaic_gpu", "pallas_mosaic_tpu"),
    ),
    "moe_ffn": (
        "kernels.moe",
        ("reference", "xla", "cpu_native", "pallas_triton", "pallas_mosaic_gpu", "pallas_mosaic_tpu"),
    ),
}
# The XLA path's strategies, selectable by name: impl=s is impl="xla" with the XLA Config's strategy=s.
STRATEGIES = {
    "paged_attention": (),
    "int4_matmul": ("codes", "dequant", "dense"),
    "moe_ffn": ("grouped", "bucketed", "ragged", "batched", "dense"),
}
# What impl="auto" tries, in order, on each platform (names an op does not have are skipped).
AUTO_ORDER = {
    "cpu": ("cpu_native", "xla"),
    "cuda": ("pallas_mosaic_gpu", "pallas_triton", "xla"),
    "rocm": ("pallas_triton", "xla"),
    "tpu": ("pallas_mosaic_tpu", "xla"),
}
# What impl="pallas" means on each platform: its Pallas kernels, in order (interpreted on the CPU).
PALLAS_ORDER = {
    "cpu": ("pallas_triton",),
    "cuda": ("pallas_mosaic_gpu", "pallas_triton"),
    "rocm": ("pallas_triton",),
    "tpu": ("pallas_mosaic_tpu",),
}
_ALIASES = ("auto", "pallas")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of an op.

    name       what `impl=` calls it.
    fn         fn(*args, config=config, **kwargs) with the entry's own arguments after validation and defaults
               (the positional arrays and keyword options the public function takes) and the resolved config.
    platforms  the platforms it lowers for, a subset of PLATFORMS, e.g. ("cpu",) or ("cuda", "rocm").
    supports   supports(*args, **kwargs) -> None when it serves the call, else the reason it does not (shapes
               and dtypes only: arguments may be jax.ShapeDtypeStruct); None: it serves every call.
    config     its Config dataclass type, or None. `Config()` (every field None, or a default) means "by
               heuristic": a `resolve(*args, **kwargs)` method on the Config, where it has one, fills the
               fields from the call's shapes and the device. Its `__post_init__` checks the fields.
    available  available() -> None when it can run on this machine, else why not (e.g. a library not built).
    prefer     prefer(*args, **kwargs) -> None when impl="auto" should take it for this call here, else why
               not (e.g. slower than the XLA path on this CPU). Only "auto" asks; `auto_impl(op)` asks
               it without arguments (what it prefers for the calls it serves).
    traceable  False for an implementation that runs eagerly on the host (the NumPy reference).
    """

    name: str
    fn: Callable[..., Any]
    platforms: tuple[str, ...] = dataclasses.field(kw_only=True)
    supports: Callable[..., str | None] | None = dataclasses.field(default=None, kw_only=True)
    config: type | None = dataclasses.field(default=None, kw_only=True)
    available: Callable[[], str | None] | None = dataclasses.field(default=None, kw_only=True)
    prefer: Callable[..., str | None] | None = dataclasses.field(default=None, kw_only=True)
    traceable: bool = dataclasses.field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"name={self.name!r} must be a Python identifier")
        if not callable(self.fn):
            raise TypeError(f"fn={self.fn!r} must be callable")
        platforms = (self.platforms,) if isinstance(self.platforms, str) else tuple(self.platforms)
        if not platforms or any(p not in PLATFORMS for p in platforms):
            raise ValueError(f"platforms={self.platforms!r} must be a non-empty subset of {PLATFORMS}")
        object.__setattr__(self, "platforms", platforms)
        if self.config is not None and not (
            isinstance(self.config, type) and dataclasses.is_dataclass(self.config)
        ):
            raise TypeError(f"config={self.config!r} must be a dataclass type (the implementation's Config)")
        for field in ("supports", "available", "prefer"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise TypeError(f"{field}={value!r} must be callable or None")

    def unavailable(self) -> str | None:
        """None when this implementation can run on this machine, else why not."""
        return None if self.available is None else self.available()

    def unsupported(self, *args: Any, **kwargs: Any) -> str | None:
        """None when this implementation serves the call, else the reason."""
        return None if self.supports is None else self.supports(*args, **kwargs)

    def resolve_config(self, config: Any, *args: Any, **kwargs: Any) -> Any:
        """The config this call runs with: `config` (or the default Config), heuristic fields filled."""
        if self.config is None:
            if config is not None:
                raise TypeError(f"config={config!r}: impl={self.name!r} takes no config")
            return None
        if config is None:
            config = self.config()
        elif not isinstance(config, self.config):
            raise TypeError(
                f"config={config!r} is not a {self.config.__module__}.{self.config.__qualname__}, "
                f"the config of impl={self.name!r}"
            )
        resolve = getattr(config, "resolve", None)
        return config if resolve is None else resolve(*args, **kwargs)

    def __call__(self, *args: Any, config: Any = None, **kwargs: Any) -> Any:
        return self.fn(*args, config=self.resolve_config(config, *args, **kwargs), **kwargs)


# The tables: built lazily (the backends import this module), then extended by `register`.
_TABLES: dict[str, dict[str, Implementation]] = {}


def _missing_lowering(name: str, err: ImportError) -> Implementation:
    """A built-in backend whose JAX lowering this JAX lacks (a Pallas backend JAX has removed, say): listed,
    never available, so impl="auto" passes over it and naming it says why."""
    reason = f"a lowering this JAX ({jax.__version__}) lacks: {err}"

    def fn(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"impl={name!r} cannot run: {reason}")

    return Implementation(name, fn, platforms=PLATFORMS, available=lambda: reason)


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"op={op!r} is not a kernel of the lab; expected one of {OPS}")


def _table(op: str) -> dict[str, Implementation]:
    _check_op(op)
    if op not in _TABLES:
        package, names = _BUILTIN[op]
        table = {}
        for name in names:
            try:
                impl = importlib.import_module(f"{package}.{name}").IMPLEMENTATION
            except (
                ImportError
            ) as err:  # a Pallas backend's lowering (or what it imports) absent from this JAX
                if not name.startswith("pallas_"):
                    raise
                impl = _missing_lowering(name, err)
            assert impl.name == name, (package, name, impl.name)
            table[name] = impl
        _TABLES.setdefault(op, table)
    return _TABLES[op]


def implementations(op: str) -> Mapping[str, Implementation]:
    """The op's table, name -> Implementation (a read-only view): the built-in ones first, then registered."""
    return MappingProxyType(_table(op))


def register(op: str, impl: Implementation, *, replace: bool = False) -> Implementation:
    """Add `impl` to the op's table, so `impl=impl.name` runs it through the op's entry.

    A name already in the table is a ValueError unless `replace`; "auto", "pallas" and the XLA strategy names
    are reserved. Returns `impl` (usable as a decorator's result).
    """
    table = _table(op)
    if not isinstance(impl, Implementation):
        raise TypeError(f"impl={impl!r} must be a kernels.registry.Implementation")
    if impl.name in _ALIASES or impl.name in STRATEGIES[op]:
        raise ValueError(f"impl.name={impl.name!r} is reserved for {op}: {(*_ALIASES, *STRATEGIES[op])}")
    if impl.name in table and not replace:
        raise ValueError(
            f"{op} already has an implementation named {impl.name!r}; pass replace=True to replace it"
        )
    table[impl.name] = impl
    return impl


def unregister(op: str, name: str) -> None:
    """Remove a registered implementation (the built-in ones stay)."""
    table = _table(op)  # checks op
    if name in _BUILTIN[op][1]:
        raise ValueError(f"{name!r} is a built-in implementation of {op} and cannot be removed")
    if name not in table:
        raise ValueError(f"{op} has no registered implementation named {name!r}")
    del table[name]


def current_platform() -> str:
    """The platform of the default backend: "cpu", "cuda", "rocm" or "tpu"."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


def available_impls(op: str) -> tuple[str, ...]:
    """The implementations of `op` that run on the default backend (not the XLA path's strategies).

    On this CPU: "reference", "xla", "cpu_native" where the native library is built, "pallas_triton"
    (interpreted), and any registered implementation that lowers for the CPU. Each is a valid `impl=`.
    """
    platform = current_platform()
    return tuple(
        name
        for name, impl in _table(op).items()
        if (platform in impl.platforms or not impl.traceable) and impl.unavailable() is None
    )


def valid_impls(op: str) -> tuple[str, ...]:
    """Every name `impl=` accepts for `op` (whether or not it can run here)."""
    return (*_ALIASES, *_table(op), *STRATEGIES[op])


def check_impl(op: str, impl: Any) -> str:
    """`impl` when it names an implementation of `op`; otherwise a ValueError listing the valid ones."""
    valid = valid_impls(op)
    if not isinstance(impl, str) or impl not in valid:
        raise ValueError(f"impl={impl!r} is not an implementation of {op}; expected one of {valid}")
    return impl


def choose(op: str, impl: str, platform: str, *args: Any, **kwargs: Any) -> Implementation | None:
    """What `impl` ("auto" or "pallas") runs for this call when lowered for `platform`; None if nothing does.

    The one decision: the first name of AUTO_ORDER (or PALLAS_ORDER) for the platform whose implementation
    is in the op's table, lowers for the platform, is available here, serves the call and, for "auto", is
    preferred. With no arguments, `supports` is not asked and `prefer` is asked without them (what it
    prefers for the calls it serves).
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} must be one of {PLATFORMS}")
    table = _table(op)
    order = AUTO_ORDER if impl == "auto" else PALLAS_ORDER
    per_call = bool(args or kwargs)
    for name in order[platform]:
        cand = table.get(name)
        if cand is None or platform not in cand.platforms or cand.unavailable() is not None:
            continue
        if per_call and cand.unsupported(*args, **kwargs) is not None:
            continue
        if impl == "auto" and cand.prefer is not None and cand.prefer(*args, **kwargs) is not None:
            continue
        return cand
    return None


def auto_impl(op: str, *args: Any, platform: str | None = None, **kwargs: Any) -> str:
    """The name of the implementation impl="auto" runs for this call (the entry's own arguments; arrays may
    be jax.ShapeDtypeStruct) when lowered for `platform` (default: this machine's). Without arguments, the
    implementation it prefers for the calls it serves (`prefer` is then called without arguments)."""
    chosen = choose(op, "auto", platform or current_platform(), *args, **kwargs)
    return "xla" if chosen is None else chosen.name


def _named(op: str, impl: str, config: Any) -> tuple[str, Any]:
    """A strategy name as the XLA path with that strategy in its Config; other names unchanged."""
    if impl not in STRATEGIES[op]:
        return impl, config
    cfg_type = _table(op)["xla"].config
    if config is None:
        return "xla", cfg_type(strategy=impl)
    if not isinstance(config, cfg_type):
        raise TypeError(
            f"config={config!r}: impl={impl!r} is the XLA path and takes a {cfg_type.__qualname__}"
        )
    if config.strategy not in (None, impl):
        raise ValueError(f"impl={impl!r} and config.strategy={config.strategy!r} disagree")
    return "xla", dataclasses.replace(config, strategy=impl)


def dispatch(op: str, impl: str, *args: Any, config: Any = None, **kwargs: Any) -> Any:
    """Run `impl` of `op` on the entry's validated arguments (see the module docstring)."""
    check_impl(op, impl)
    name, config = _named(op, impl, config)
    table = _table(op)
    if name not in _ALIASES:
        chosen = table[name]
        why = chosen.unavailable()
        if why is not None:
            raise RuntimeError(f"impl={name!r} needs {why}")
        reason = chosen.unsupported(*args, **kwargs)
        if reason is not None:
            raise ValueError(f"impl={name!r} does not support {reason}; use impl='auto' or 'xla'")
        return chosen(*args, config=config, **kwargs)

    per_platform = {p: choose(op, name, p, *args, **kwargs) for p in PLATFORMS}
    if name == "pallas":
        if all(c is None for c in per_platform.values()):
            reasons = "; ".join(
                f"{c.name}: {c.unavailable() or c.unsupported(*args, **kwargs)}"
                for c in table.values()
                if c.name.startswith("pallas")
            )
            raise ValueError(
                f"impl='pallas' does not support this call ({reasons}); use impl='auto' or 'xla'"
            )
        default = per_platform["cpu"] or next(c for c in per_platform.values() if c is not None)
    else:
        default = table["xla"]
    if config is not None and not any(
        c is not None and c.config is not None and isinstance(config, c.config)
        for c in (default, *per_platform.values())
    ):
        raise TypeError(
            f"config={config!r} is not the config of any implementation impl={name!r} runs for this call: "
            f"{sorted({c.name for c in per_platform.values() if c is not None})}"
        )

    def branch(chosen: Implementation) -> Callable[..., Any]:
        cfg = config if chosen.config is not None and isinstance(config, chosen.config) else None
        return lambda *a: chosen(*a, config=cfg, **kwargs)

    branches = {p: branch(c) for p, c in per_platform.items() if c is not None and c is not default}
    if not branches:
        return branch(default)(*args)
    return jax.lax.platform_dependent(*args, default=branch(default), **branches)


def require_concrete(op: str, *arrays: Any) -> None:
    """impl="reference" runs NumPy: refuse traced arguments with an error that says what to do instead."""
    leaves = jax.tree_util.tree_leaves(arrays)
    if any(isinstance(a, jax.core.Tracer) for a in leaves):
        raise ValueError(
            f"impl='reference' runs the NumPy reference of {op} eagerly and cannot be traced (jit, vmap, "
            "grad); call it outside the transformation or use impl='xla'"
        )


def check_positive_ints(config: Any, *names: str) -> None:
    """For a Config's `__post_init__`: each named field is None (by heuristic) or an integer >= 1."""
    for name in names:
        v = getattr(config, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name}={v!r} must be an integer >= 1")


def native_library_missing() -> str | None:
    """`available` of the native CPU kernels: None when the library is loaded, else why it is not."""
    from kernels import cpu

    why = cpu.load()
    return None if why is None else f"the native CPU library: {why}"


def native_slower(op: str) -> str | None:
    """`prefer` of the native CPU kernels: None when this CPU's instruction-set path beats the XLA path."""
    from kernels import cpu

    if cpu.fast_enough(op):
        return None
    return f"the native {op} kernel's {cpu.isa()} path is not faster than the XLA path on this CPU"
