"""Looking up an op's benchmark and test cases (`kernels/<op>/arg_specs.py`) by tag and by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def with_tag(cases: Sequence[Any], tag: str, op: str) -> tuple[Any, ...]:
    """The cases carrying `tag`, in table order; a ValueError when none does."""
    found = tuple(c for c in cases if tag in c.tags)
    if not found:
        raise ValueError(f"no {op} case has tag={tag!r}")
    return found


def named(cases: Sequence[Any], name: str, op: str) -> Any:
    """The case called `name`; a ValueError listing the known names when none is."""
    for c in cases:
        if c.name == name:
            return c
    raise ValueError(f"no {op} case is named {name!r}; known: {[c.name for c in cases]}")
