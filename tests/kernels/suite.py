"""The machinery of the shared per-op suites: every implementation that runs here faces the same tests.

`@for_each_impl(op)` parametrizes a test over `kernels.available_impls(op)` (the test id names the
implementation, e.g. `test_x[pallas_triton-...]`). `@property_for_each_impl(op, n, **strategies)` does the
same for a hypothesis property drawing `n` examples per implementation, fewer for the slow ones (the NumPy
reference, Pallas in interpret mode on the CPU); `--full` with the `thorough` profile raises every count.
`pytest tests/kernels/<op> --impl-module MODULE` imports MODULE first, so the backends it registers
(`kernels.registry.register`) face the same suite.
An implementation that does not serve a case says why (each op's `cases.unsupported`), and the test is skipped
with that reason.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from hypothesis import given, settings

from kernels import available_impls, registry

# Examples per property for implementations that are slow on this machine (interpret mode, NumPy loops).
SLOW_IMPL_EXAMPLES = {"reference": 3, "pallas_triton": 2, "pallas_mosaic_tpu": 2, "pallas_mosaic_gpu": 1}


def for_each_impl(op: str):
    return pytest.mark.parametrize("impl", available_impls(op))


def examples_for(impl: str, n: int) -> int:
    """`n` examples at 25 max_examples, scaled with the profile's (the `ci` profile's 8: about n / 3)."""
    scale = settings.default.max_examples / 25
    n = max(1, round(n * scale))
    if impl in SLOW_IMPL_EXAMPLES:
        n = min(n, max(1, round(SLOW_IMPL_EXAMPLES[impl] * scale)))
    return n


def property_for_each_impl(op: str, n: int, **strategies):
    """A hypothesis property `fn(impl, <pytest params>, <drawn values>)` run for every implementation."""

    def deco(fn):
        sig = inspect.signature(fn)
        kept = [p for name, p in sig.parameters.items() if name not in strategies]

        def test(impl, **params):
            @settings(max_examples=examples_for(impl, n))
            @given(**strategies)
            def prop(**drawn):
                fn(impl=impl, **params, **drawn)

            prop()

        test.__signature__ = sig.replace(parameters=kept)
        test.__name__, test.__qualname__, test.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        test.__module__ = fn.__module__
        return for_each_impl(op)(test)

    return deco


def unsupported(op: str, impl: str, *args, **kwargs):
    """Why `impl` of `op` does not serve the call (None when it does), as the registry's `supports` says;
    an XLA strategy name serves every call."""
    impl_obj = registry.implementations(op).get(impl)
    return None if impl_obj is None else impl_obj.unsupported(*args, **kwargs)


def config_for(op: str, impl: str, **fields):
    """The Config of `impl` (the XLA path's, for a strategy name) holding those of `fields` it has; None when
    the implementation has no Config or none of the fields."""
    name = "xla" if impl in registry.STRATEGIES[op] else impl
    impl_obj = registry.implementations(op).get(name)
    if impl_obj is None or impl_obj.config is None:
        return None
    names = {f.name for f in dataclasses.fields(impl_obj.config)}
    kept = {k: v for k, v in fields.items() if k in names}
    return impl_obj.config(**kept) if kept else None


def eager(op: str, impl: str) -> bool:
    """Whether `impl` of `op` runs eagerly on the host (the NumPy reference): no jit, vmap or grad."""
    impl_obj = registry.implementations(op).get(impl)
    return impl_obj is not None and not impl_obj.traceable
