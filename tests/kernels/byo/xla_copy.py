"""Registers "xla_copy" for every op: a backend that calls the lab's XLA path, as research code that wraps
or rewrites a kernel would. Imported by `pytest tests/kernels/<op> --impl-module tests.kernels.byo.xla_copy`;
it must pass the whole shared suite (jit, vmap, grad included)."""

from typing import Any

from kernels import registry


def _wrap(op: str) -> registry.Implementation:
    xla = registry.implementations(op)["xla"]

    def fn(*args: Any, config: Any = None, **options: Any) -> Any:
        del config  # the XLA path's own heuristics
        return xla(*args, **options)

    return registry.Implementation("xla_copy", fn, platforms=registry.PLATFORMS)


for _op in registry.OPS:
    registry.register(_op, _wrap(_op), replace=True)
