"""Values derived once from concrete arrays (a weight's prepared layout, say), kept while the arrays live."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class IdentityMemo:
    """Values computed from concrete arrays, keyed on the arrays' identities and held by weak reference: an
    entry goes when any of its arrays is freed. Arrays that cannot be weakly referenced (NumPy arrays) are
    not remembered; the caller keeps tracers out (a traced value has no identity worth keeping)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, ...], tuple[tuple[Any, ...], Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, arrays: Sequence[Any], compute: Callable[[], T]) -> T:
        """The value remembered for exactly these arrays, else `compute()` (remembered when it can be)."""
        arrays = tuple(arrays)
        key = tuple(id(a) for a in arrays)
        hit = self._entries.get(key)
        if hit is not None and all(r() is a for r, a in zip(hit[0], arrays, strict=True)):
            return hit[1]
        value = compute()
        try:
            refs = tuple(weakref.ref(a, lambda _, key=key, d=self._entries: d.pop(key, None)) for a in arrays)
        except TypeError:  # not weak-referenceable: computed every time
            return value
        self._entries[key] = (refs, value)
        return value
