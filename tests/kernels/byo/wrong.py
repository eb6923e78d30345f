"""Registers "wrong" for every op: the XLA path with every output nudged by 1%, which the shared suite must
reject."""

from typing import Any

from kernels import registry


def _wrap(op: str) -> registry.Implementation:
    xla = registry.implementations(op)["xla"]

    def fn(*args: Any, config: Any = None, **options: Any) -> Any:
        del config
        return xla(*args, **options) * 1.01

    return registry.Implementation("wrong", fn, platforms=registry.PLATFORMS)


for _op in registry.OPS:
    registry.register(_op, _wrap(_op), replace=True)
