"""The MoE expert FFN (kernels.moe.moe_ffn) against its baselines, in float32.

Shapes: Mixtral-like (8 experts, top-2, d=1024, f=2816) and DeepSeek-like fine-grained (64 experts, top-6,
d=1024, f=512), at a 256-token prefill and an 8-token decode batch. The routing is realistic, i.e. not
balanced: router logits are random token features through a random router plus a small per-expert bias
(std ROUTER_BIAS_STD), routed top-k by softmax; `track_load_imbalance` reports the busiest expert's load
over the mean.

Baselines, measured in the same process right beside the MoE FFN (`track_*` return ratios):
- the ideal balanced grouped computation: one batched einsum over all E experts with T·k/E rows each,
  the same FLOPs and weight bytes as the MoE with no routing, sorting or imbalance (target: <= 1.3x);
- the NumPy float32 sort + per-expert loop (`moe_ffn_reference(compute_dtype=float32)`; target: slower);
- decode: the time to read the selected experts' weights at this host's streaming bandwidth
  (`moe_ffn_cost(...).memory_s(measure_host())`; target: <= 1.5x).

`python -m benchmarks.moe` prints the same ratios for every strategy as a table.
"""

import functools
import statistics
import timeit

import jax
import jax.numpy as jnp
import numpy as np

from kernels.moe import moe_ffn, moe_ffn_cost, moe_ffn_reference, route
from roofline import measure_host, timing

SHAPES = {"mixtral": (8, 2, 1024, 2816), "deepseek": (64, 6, 1024, 512)}  # E, k, d, f
ROUTER_BIAS_STD = 0.1
COPIES = 2  # the expert weights (277 MB / 403 MB) already exceed the last-level cache; rotate anyway


def make_case(shape: str, tokens: int, seed: int = 0) -> dict:
    """Inputs, realistic routing and the balanced-baseline operand for one shape."""
    num_experts, top_k, d, f = SHAPES[shape]
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(d)
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    router = rng.standard_normal((d, num_experts), dtype=np.float32) * scale
    logits = x @ router + rng.standard_normal(num_experts).astype(np.float32) * ROUTER_BIAS_STD
    weights, ids = route(jnp.asarray(logits), top_k=top_k)
    w_gate = rng.standard_normal((num_experts, d, f), dtype=np.float32) * scale
    w_up = rng.standard_normal((num_experts, d, f), dtype=np.float32) * scale
    w_down = rng.standard_normal((num_experts, f, d), dtype=np.float32) / np.sqrt(f)
    rows = max(1, tokens * top_k // num_experts)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=num_experts)
    return {
        "args": tuple(jnp.asarray(a) for a in (x, weights, ids, w_gate, w_up, w_down)),
        "balanced_x": jnp.asarray(rng.standard_normal((num_experts, rows, d), dtype=np.float32)),
        "counts": counts,
        "shape": (tokens, num_experts, top_k, d, f),
    }


@jax.jit
def balanced_baseline(xb, w_gate, w_up, w_down):
    """E experts × T·k/E rows each: the MoE's FLOPs and weight bytes with perfect balance."""
    g = jnp.einsum("ecd,edf->ecf", xb, w_gate)
    u = jnp.einsum("ecd,edf->ecf", xb, w_up)
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, w_down)


def numpy_loop(x, weights, ids, w_gate, w_up, w_down):
    return moe_ffn_reference(x, weights, ids, w_gate, w_up, w_down, compute_dtype=np.float32)


@jax.jit
def weight_read(w_gate, w_up, w_down):
    """A streaming read (XLA sums) of every expert's weights. Scaled by touched/E it is the decode
    yardstick measured in the same process, so machine load affects it and the MoE FFN alike (XLA copies
    a slice before summing it, so the touched experts alone cannot be read this way)."""
    return jnp.sum(w_gate) + jnp.sum(w_up) + jnp.sum(w_down)


def interleaved_ratio(fn_a, args_a, fn_b, args_b, rounds: int = 5, copies: int = COPIES) -> float:
    """Median over rounds of time(a)/time(b), each round timing a then b back to back."""
    ratios = []
    for _ in range(rounds):
        ta = timing.time_fn(fn_a, *args_a, copies=copies, min_repeats=2, min_time_s=0.0)
        tb = timing.time_fn(fn_b, *args_b, copies=copies, min_repeats=2, min_time_s=0.0)
        ratios.append(ta.median_s / tb.median_s)
    return statistics.median(ratios)


class MoEPrefill:
    params = (list(SHAPES), ["auto", "grouped", "bucketed"])
    param_names = ["shape", "impl"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    tokens = 256

    def setup(self, shape, impl):
        self.case = make_case(shape, self.tokens)
        self.fn = jax.jit(functools.partial(moe_ffn, impl=impl))
        self.fn(*self.case["args"]).block_until_ready()
        self.base_args = (self.case["balanced_x"], *self.case["args"][3:])
        balanced_baseline(*self.base_args).block_until_ready()

    def time_moe_ffn(self, shape, impl):
        self.fn(*self.case["args"]).block_until_ready()

    def time_balanced_baseline(self, shape, impl):
        balanced_baseline(*self.base_args).block_until_ready()

    def track_ratio_to_balanced_baseline(self, shape, impl):
        return interleaved_ratio(self.fn, self.case["args"], balanced_baseline, self.base_args)

    track_ratio_to_balanced_baseline.unit = "ratio"

    def track_speedup_over_numpy_loop(self, shape, impl):
        host = tuple(np.asarray(a) for a in self.case["args"])
        return interleaved_ratio(numpy_loop, host, self.fn, self.case["args"], rounds=3)

    track_speedup_over_numpy_loop.unit = "ratio"

    def track_load_imbalance(self, shape, impl):
        counts = self.case["counts"]
        return float(counts.max() / counts.mean())

    track_load_imbalance.unit = "ratio"


class MoEOnGPU:
    """The Pallas grouped GEMM (impl="pallas") and the XLA path (ragged_dot) against the balanced batched
    einsum, bf16, T = 256 and 4096. Skipped (NotImplementedError in setup) on any other backend."""

    params = (list(SHAPES), [256, 4096], ["pallas", "xla"])
    param_names = ["shape", "tokens", "impl"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)

    def setup(self, shape, tokens, impl):
        if jax.default_backend() != "gpu":
            raise NotImplementedError("GPU only")
        case = make_case(shape, tokens)
        bf16 = [jnp.asarray(a, jnp.bfloat16) if a.dtype == jnp.float32 else a for a in case["args"]]
        bf16[1] = case["args"][1]  # the routing weights stay float32
        self.args = tuple(bf16)
        self.fn = jax.jit(functools.partial(moe_ffn, impl=impl))
        self.fn(*self.args).block_until_ready()
        self.base_args = (jnp.asarray(case["balanced_x"], jnp.bfloat16), *self.args[3:])
        balanced_baseline(*self.base_args).block_until_ready()

    def time_moe_ffn(self, shape, tokens, impl):
        self.fn(*self.args).block_until_ready()

    def track_ratio_to_balanced_baseline(self, shape, tokens, impl):
        return interleaved_ratio(self.fn, self.args, balanced_baseline, self.base_args)

    track_ratio_to_balanced_baseline.unit = "ratio"


class MoEDecode:
    params = (list(SHAPES), ["auto", "grouped", "bucketed"])
    param_names = ["shape", "impl"]
    timer = timeit.default_timer
    number = 1
    repeat = (5, 20, 10.0)
    tokens = 8

    def setup(self, shape, impl):
        self.case = make_case(shape, self.tokens)
        self.fn = jax.jit(functools.partial(moe_ffn, impl=impl))
        self.fn(*self.case["args"]).block_until_ready()
        tokens, num_experts, top_k, d, f = self.case["shape"]
        touched = int((self.case["counts"] > 0).sum())
        self.cost = moe_ffn_cost(tokens, num_experts, top_k, d, f, experts_touched=touched)

    def time_moe_ffn(self, shape, impl):
        self.fn(*self.case["args"]).block_until_ready()

    def track_ratio_to_weight_read(self, shape, impl):
        """Measured time over (selected experts' weight bytes + activations) / streaming bandwidth."""
        t = timing.time_fn(self.fn, *self.case["args"], copies=COPIES, min_repeats=5)
        return t.median_s / self.cost.memory_s(measure_host())

    track_ratio_to_weight_read.unit = "ratio"

    def track_ratio_to_weight_sum(self, shape, impl):
        """Measured time over (touched/E) x an XLA sum of all expert weights, timed back to back with it."""
        touched, num_experts = int((self.case["counts"] > 0).sum()), self.case["shape"][1]
        ratio = interleaved_ratio(self.fn, self.case["args"], weight_read, self.case["args"][3:])
        return ratio * num_experts / touched

    track_ratio_to_weight_sum.unit = "ratio"


def main(rounds: int = 5) -> None:
    """Print every ratio the targets speak of, for each strategy, each measured back to back with its
    baseline in this process (the median over `rounds` of the per-round ratios)."""
    chip = measure_host()
    print(f"host bandwidth {chip.bandwidth / 1e9:.1f} GB/s, ROUTER_BIAS_STD={ROUTER_BIAS_STD}")
    print(
        "| shape | T | max/mean load | impl | ÷ balanced baseline | NumPy loop ÷ it "
        "| ÷ weight read at host bandwidth | ÷ XLA read of the touched weights |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for shape in SHAPES:
        for tokens in (256, 8):
            case = make_case(shape, tokens)
            args = case["args"]
            host = tuple(np.asarray(a) for a in args)
            base_args = (case["balanced_x"], *args[3:])
            tokens_, num_experts, top_k, d, f = case["shape"]
            touched = int((case["counts"] > 0).sum())
            bound = moe_ffn_cost(tokens_, num_experts, top_k, d, f, experts_touched=touched).memory_s(chip)
            imbalance = case["counts"].max() / case["counts"].mean()
            for impl in ("auto", "grouped", "bucketed", "batched:1.25"):
                kw = {"impl": impl}
                if impl.startswith("batched"):
                    kw = {"impl": "batched", "capacity_factor": float(impl.split(":")[1])}
                fn = jax.jit(functools.partial(moe_ffn, **kw))
                fn(*args).block_until_ready()
                ratio = interleaved_ratio(fn, args, balanced_baseline, base_args, rounds=rounds)
                speedup = interleaved_ratio(numpy_loop, host, fn, args, rounds=max(1, rounds // 2))
                t = timing.time_fn(fn, *args, copies=COPIES, min_repeats=3)
                if tokens <= 16:
                    vs_sum = interleaved_ratio(fn, args, weight_read, args[3:], rounds=rounds)
                    vs_sum = f"{vs_sum * num_experts / touched:.2f}"
                    vs_bw = f"{t.median_s / bound:.2f}"
                else:
                    vs_sum = vs_bw = "-"
                print(
                    f"| {shape} | {tokens} | {imbalance:.2f} | {impl} | {ratio:.2f} | {speedup:.1f} "
                    f"| {vs_bw} | {vs_sum} |",
                    flush=True,
                )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.moe",
        description="Print every MoE FFN ratio against its baselines, per strategy, measured here.",
        epilog="The same ratios run under asv as the track_* benchmarks: asv run --bench moe",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds per ratio (the median is printed); >= 1"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    main(rounds=args.rounds)
