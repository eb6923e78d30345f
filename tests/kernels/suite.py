"""The machinery of the shared per-op suites: every implementation that runs here faces the same tests.

`@for_each_impl(op)` parametrizes a test over `kernels.available_impls(op)` (the test id names the
implementation, e.g. `test_x[pallas-...]`). `@property_for_each_impl(op, n, **strategies)` does the same for a
hypothesis property drawing `n` examples per implementation, fewer for the slow ones (the NumPy reference,
Pallas in interpret mode on the CPU); `--full` with the `thorough` profile raises every count.
An implementation that does not serve a case says why (each op's `cases.unsupported`), and the test is skipped
with that reason.
"""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given, settings

from kernels import available_impls

# Examples per property for implementations that are slow on this machine (interpret mode, NumPy loops).
SLOW_IMPL_EXAMPLES = {"reference": 3, "pallas": 2}


def for_each_impl(op: str):
    return pytest.mark.parametrize("impl", available_impls(op))


def examples_for(impl: str, n: int) -> int:
    """`n` examples under the `ci` profile (25 by default), scaled with the profile's max_examples."""
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
