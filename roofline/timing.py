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
  the last-level cache when you want a main-memory figure (`rotation_copies` does).

On an accelerator a host-timed call is mostly launch overhead for small kernels, so the device-side figure
comes from running many calls inside one program instead:

    runners = {"lab": in_program_loop(f, copy_inputs(args, n)), "base": in_program_loop(g, ...)}
    times = interleave(runners, rounds=3)  # {"lab": LoopTiming, "base": LoopTiming}
    times["lab"].device.median_s           # per call, inside one jitted loop
    times["lab"].dispatch.median_s         # per call, dispatched one by one from Python

- `in_program_loop` jits one `lax.fori_loop` whose body calls `f` once on each rotated input set; every call
  takes its inputs through an optimization barrier with the loop carry and the carry takes a sum of the
  output, so XLA can neither hoist part of a call out of the loop nor drop it (the sum adds one read of the
  output). `cuda_graph_loop` is the same for a PyTorch callable: one CUDA graph of the calls, timed with
  CUDA events.
- `interleave` runs one round of every runner before the next round of any, so that a slow spell on a
  shared or throttling device hits every candidate and its baselines alike; `interleaved_ratio` does the
  same for two host-timed functions and returns the median of the per-round ratios.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from roofline.counters import Cost
from roofline.hardware import Chip

K = TypeVar("K", bound=Hashable)


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


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array leaf of `tree` (JAX, NumPy or anything with `nbytes`)."""
    import jax

    return int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree)))


def rotation_copies(
    per_copy_bytes: float,
    *,
    exceed_bytes: float = 128 << 20,
    max_bytes: float = 40 << 30,
    max_copies: int = 8,
    min_copies: int = 2,
) -> int:
    """How many copies of a working set of `per_copy_bytes` to rotate through so that together they exceed
    `exceed_bytes` (well past a 50-60 MB GPU L2 by default), but at least `min_copies` and at most
    `max_copies`, and never more than fit in `max_bytes` (always at least one)."""
    per = max(float(per_copy_bytes), 1.0)
    want = max(min_copies, math.ceil(exceed_bytes / per))
    fit = max(1, int(max_bytes // per))
    return max(1, min(want, max_copies, fit))


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


def interleaved_ratio(
    fn_a: Callable[..., Any],
    args_a: Sequence[Any],
    fn_b: Callable[..., Any],
    args_b: Sequence[Any],
    *,
    rounds: int = 5,
    copies: int = 1,
    min_repeats: int = 2,
    min_time_s: float = 0.0,
) -> float:
    """Median over `rounds` of time(a) / time(b), each round timing `a` then `b` back to back with `time_fn`
    (so load changes on a shared machine hit both alike)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    ratios = []
    for _ in range(rounds):
        kw = {"copies": copies, "min_repeats": min_repeats, "min_time_s": min_time_s}
        ta = time_fn(fn_a, *args_a, **kw)
        tb = time_fn(fn_b, *args_b, **kw)
        ratios.append(ta.median_s / tb.median_s)
    return statistics.median(ratios)


# --------------------------------------------------------------------------------------------------
# device-side time: many calls inside one program


@dataclasses.dataclass(frozen=True)
class LoopTiming:
    """Per-call seconds of one runner: `device` from whole-program runs (one sample per run), `dispatch`
    from the same calls dispatched one by one from Python with one sync at the end (it includes the host's
    dispatch cost per call); `calls` per run over `copies` rotated input sets."""

    device: Timing
    dispatch: Timing | None
    calls: int
    copies: int


class Runner(Protocol):
    """A prepared measurement: `device_s()` and `dispatch_s()` each run `calls` calls and return seconds."""

    calls: int
    copies: int

    def device_s(self) -> float: ...

    def dispatch_s(self) -> float: ...


def _loop_calls(one_call_s: float, copies: int, target_s: float, max_calls: int) -> int:
    iters = max(1, min(max_calls // copies, math.ceil(target_s / max(one_call_s, 1e-6) / copies)))
    return iters * copies


class _JaxLoop:
    def __init__(
        self, fn: Callable[..., Any], sets: Sequence[Sequence[Any]], target_s: float, max_calls: int
    ):
        import jax
        import jax.numpy as jnp
        from jax import lax

        self.sets = [tuple(s) for s in sets]
        self.copies = len(self.sets)
        self.jfn = jax.jit(fn)
        jax.block_until_ready(self.jfn(*self.sets[0]))  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(self.jfn(*self.sets[0]))
        self.calls = _loop_calls(time.perf_counter() - t0, self.copies, target_s, max_calls)
        iters = self.calls // self.copies

        def loop(all_sets):
            def body(_, acc):
                for s in all_sets:
                    # Tie every input to the carry (free: the barrier only orders), so that no part of the
                    # call (a page gather, a dequantized weight) is loop-invariant and hoisted out.
                    acc, s = lax.optimization_barrier((acc, s))
                    out = fn(*s)
                    total = sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(out))
                    acc = acc + total * 1e-30
                return acc

            return lax.fori_loop(0, iters, body, jnp.float32(0.0))

        self.jloop = jax.jit(loop)
        jax.block_until_ready(self.jloop(self.sets))  # compile

    def device_s(self) -> float:
        import jax

        t0 = time.perf_counter()
        jax.block_until_ready(self.jloop(self.sets))
        return time.perf_counter() - t0

    def dispatch_s(self) -> float:
        import jax

        t0 = time.perf_counter()
        out = None
        for i in range(self.calls):
            out = self.jfn(*self.sets[i % self.copies])
        jax.block_until_ready(out)
        return time.perf_counter() - t0


def in_program_loop(
    fn: Callable[..., Any],
    input_sets: Sequence[Sequence[Any]],
    *,
    target_s: float = 0.02,
    max_calls: int = 400,
) -> Runner:
    """A runner for the traceable `fn` that calls it, inside one jitted `lax.fori_loop`, once per input set
    per iteration, for about `target_s` of device time (at most `max_calls` calls, a whole number of passes
    over the sets). Compiles both the loop and `jax.jit(fn)` now, so that timing excludes compilation."""
    if not input_sets:
        raise ValueError("input_sets must hold at least one set of inputs")
    return _JaxLoop(fn, input_sets, target_s, max_calls)


class _CudaGraph:
    def __init__(
        self, fn: Callable[..., Any], sets: Sequence[Sequence[Any]], target_s: float, max_calls: int
    ):
        import torch

        self.fn, self.sets, self.copies = fn, [tuple(s) for s in sets], len(sets)
        fn(*self.sets[0])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*self.sets[0])
        torch.cuda.synchronize()
        self.calls = _loop_calls(time.perf_counter() - t0, self.copies, target_s, max_calls)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for s in self.sets:  # warm up on a side stream, as graph capture requires
                fn(*s)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for i in range(self.calls):
                fn(*self.sets[i % self.copies])
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def device_s(self) -> float:
        self.graph.replay()  # warm, as every timed replay follows another row's work
        self.start.record()
        self.graph.replay()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3

    def dispatch_s(self) -> float:
        import torch

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(self.calls):
            self.fn(*self.sets[i % self.copies])
        torch.cuda.synchronize()
        return time.perf_counter() - t0


def cuda_graph_loop(
    fn: Callable[..., Any],
    input_sets: Sequence[Sequence[Any]],
    *,
    target_s: float = 0.02,
    max_calls: int = 400,
) -> Runner:
    """`in_program_loop` for a PyTorch callable on a CUDA device: the calls are captured once into a CUDA
    graph, whose replay is timed with CUDA events."""
    if not input_sets:
        raise ValueError("input_sets must hold at least one set of inputs")
    return _CudaGraph(fn, input_sets, target_s, max_calls)


def interleave(
    runners: Mapping[K, Runner],
    rounds: int = 3,
    *,
    dispatch: bool = True,
    errors: dict[K, BaseException] | None = None,
) -> dict[K, LoopTiming]:
    """Per-call timings of every runner, from `rounds` rounds that each run every runner once (device side,
    then, with `dispatch`, dispatched), so that the device's slow and fast spells are shared by all of them
    and ratios between them stay honest. Without `dispatch`, `LoopTiming.dispatch` is None.

    With an `errors` dict, a runner that raises is left out of the rest of the run and its exception stored
    there under its key, so that one broken candidate does not cost the others their timings; without it,
    the exception propagates.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    device: dict[K, list[float]] = {key: [] for key in runners}
    dispatched: dict[K, list[float]] = {key: [] for key in runners}
    for _ in range(rounds):
        for key, runner in runners.items():
            if errors is not None and key in errors:
                continue
            try:
                device[key].append(runner.device_s() / runner.calls)
                if dispatch:
                    dispatched[key].append(runner.dispatch_s() / runner.calls)
            except Exception as err:
                if errors is None:
                    raise
                errors[key] = err
    return {
        key: LoopTiming(
            Timing(tuple(device[key])),
            Timing(tuple(dispatched[key])) if dispatch else None,
            r.calls,
            r.copies,
        )
        for key, r in runners.items()
        if errors is None or key not in errors
    }
