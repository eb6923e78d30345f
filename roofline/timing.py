"""The one timing harness: every kernel time in the lab (tests, benchmarks, the CLI) comes from here.

    t = time_fn(f, *args, copies=4)        # compiles and warms up first; never timed
    t.median_s, t.spread                    # median and interquartile range / median
    t.achieved(cost, chip, "fp32")          # FLOP/s, bytes/s and the fraction of the roofline bound

Rules it enforces:
- Compilation and warm-up are excluded: every input copy is run once (and `warmup` times in all) first.
- Each call is timed up to `jax.block_until_ready` on the whole output pytree, so asynchronous dispatch
  cannot make a kernel look free.
- Calls repeat until both `min_repeats` and `min_time_s` are reached (capped by `max_repeats`).
- `copies=n` rotates through n independent copies of the array inputs, so that a weight read by the
  kernel is not served from cache by the previous repeat. Choose n so that n × the working set exceeds
  the last-level cache when you want a main-memory figure.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from roofline.counters import Cost
from roofline.hardware import Chip


@dataclasses.dataclass(frozen=True)
class Achieved:
    """Rates a measured time achieves for a given analytic cost on a chip."""

    flops_per_s: float
    bytes_per_s: float
    bound_s: float
    fraction: float  # bound_s / measured time: 1.0 means at the roofline


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call wall times in seconds, after warm-up."""

    samples: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return float(np.median(self.samples))

    @property
    def min_s(self) -> float:
        return float(np.min(self.samples))

    @property
    def iqr_s(self) -> float:
        q1, q3 = np.percentile(self.samples, [25, 75])
        return float(q3 - q1)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: a unitless noise figure (0.05 = ±2.5%)."""
        return self.iqr_s / self.median_s if self.median_s else 0.0

    @property
    def repeats(self) -> int:
        return len(self.samples)

    def achieved(self, cost: Cost, chip: Chip, dtype: str = "fp32") -> Achieved:
        t = self.median_s
        bound = cost.time_bound(chip, dtype)
        return Achieved(
            flops_per_s=cost.flops / t,
            bytes_per_s=cost.bytes / t,
            bound_s=bound,
            fraction=bound / t,
        )

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.3f} ms ± {self.spread * 50:.1f}% (n={self.repeats})"


def copy_inputs(args: Sequence[Any], copies: int) -> list[tuple[Any, ...]]:
    """`copies` independent copies of every array leaf in `args` (the first is `args` itself)."""
    import jax
    import jax.numpy as jnp

    if copies < 1:
        raise ValueError(f"copies={copies} must be at least 1")

    def clone(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return jnp.copy(leaf)
        if isinstance(leaf, np.ndarray):
            return leaf.copy()
        return leaf

    sets = [tuple(args)]
    for _ in range(copies - 1):
        sets.append(tuple(jax.tree.map(clone, tuple(args))))
    return sets


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    copies: int = 1,
    input_sets: Sequence[Sequence[Any]] | None = None,
    warmup: int = 2,
    min_repeats: int = 5,
    min_time_s: float = 0.2,
    max_repeats: int = 10_000,
) -> Timing:
    """Time `fn(*args)` (or rotate over `input_sets`, or over `copies` copies of `args`)."""
    import jax

    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"need 1 <= min_repeats={min_repeats} <= max_repeats={max_repeats}")
    if input_sets is None:
        input_sets = copy_inputs(args, copies)
    elif args:
        raise ValueError("pass either positional args or input_sets, not both")
    if not input_sets:
        raise ValueError("input_sets must hold at least one set of inputs")
    n_sets = len(input_sets)
    for i in range(max(warmup, n_sets)):
        jax.block_until_ready(fn(*input_sets[i % n_sets]))
    samples: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(samples) < max_repeats and (
        len(samples) < min_repeats or time.perf_counter() - start < min_time_s
    ):
        inputs = input_sets[i % n_sets]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        samples.append(time.perf_counter() - t0)
        i += 1
    return Timing(tuple(samples))
