"""The cost record every op reports: FLOPs, main-memory bytes and transcendentals of one call.

It sits below both `kernels` (each op's `<op>_cost` returns one) and `roofline` (which turns it into time
on a chip), so neither package imports the other for it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from roofline.hardware import Chip

__all__ = ["Cost", "itemsize"]


def itemsize(dtype: Any) -> float:
    """Bytes per element of a NumPy/JAX dtype or one of the names "fp32", "bf16", "fp16", "fp8", "int8",
    "int4" (0.5 byte)."""
    names = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5, "int32": 4}
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    return float(np.dtype(dtype).itemsize)


@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs, main-memory bytes and transcendentals of one op (all plain counts, not rates)."""

    flops: float
    bytes_read: float
    bytes_written: float
    transcendentals: float = 0.0

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP per byte of main-memory traffic."""
        return self.flops / self.bytes if self.bytes else math.inf

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.flops + other.flops,
            self.bytes_read + other.bytes_read,
            self.bytes_written + other.bytes_written,
            self.transcendentals + other.transcendentals,
        )

    def scale(self, factor: float) -> Cost:
        return Cost(
            self.flops * factor,
            self.bytes_read * factor,
            self.bytes_written * factor,
            self.transcendentals * factor,
        )

    def compute_s(self, chip: Chip, dtype: str = "bf16") -> float:
        return self.flops / chip.peak(dtype)

    def memory_s(self, chip: Chip) -> float:
        return self.bytes / chip.bandwidth

    def time_bound(self, chip: Chip, dtype: str = "bf16") -> float:
        """Roofline lower bound on the op's time on `chip`, computing in `dtype`."""
        return max(self.compute_s(chip, dtype), self.memory_s(chip))

    def bound(self, chip: Chip, dtype: str = "bf16") -> str:
        """ "compute" or "memory": which roof sets `time_bound`."""
        return "compute" if self.compute_s(chip, dtype) >= self.memory_s(chip) else "memory"
