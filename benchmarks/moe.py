"""The MoE expert FFN (kernels.moe.moe_ffn) against its baselines, in float32.

Cases: `kernels/moe/arg_specs.py`, tag "asv": Mixtral-like (8 experts, top-2, d=1024, f=2816) and
DeepSeek-like fine-grained (64 experts, top-6, d=1024, f=512), at a 256-token prefill and an 8-token decode
batch (the GPU class takes the "accel" cases, bf16 at the models' full widths). The routing is realistic, i.e.
not balanced: softmax top-k of random logits plus a small per-expert bias (std ROUTER_BIAS_STD);
`track_load_imbalance` reports the busiest expert's load over the mean.

Baselines, measured in the same process right beside the MoE FFN (`track_*` return ratios, each the median
of interleaved rounds, `roofline.timing.interleaved_ratio`):
- the ideal balanced grouped computation: one batched einsum over all E experts with T·k/E rows each,
  the same FLOPs and weight bytes as the MoE with no routing, sorting or imbalance (target: <= 1.3x);
- the NumPy float32 sort + per-expert loop (`moe_ffn_reference(compute_dtype=float32)`; target: slower);
- decode: the time to read the selected experts' weights at this host's streaming bandwidth
  (`moe_ffn_cost(...).memory_s(measure_host())`; target: <= 1.5x).

`python -m benchmarks.moe` prints the same ratios for every strategy as a table.
"""

import functools
import timeit

import jax
import jax.numpy as jnp
import numpy as np

from kernels.moe import arg_specs, moe_ffn, moe_ffn_reference
from roofline import measure_host, timing

SHAPES = arg_specs.ASV_MODELS  # name -> (E, k, d, f)
ROUTER_BIAS_STD = arg_specs.ROUTER_BIAS_STD
COPIES = 2  # the expert weights (277 MB / 403 MB) already exceed the last-level cache; rotate anyway


def make_case(shape: str, tokens: int, seed: int = 0, tag: str = "asv") -> dict:
    """Inputs, routing and the balanced-baseline operand for one model shape at `tokens` (the arg_specs case
    "{shape} T{tokens} f32", or "... bf16" with tag="accel")."""
    case = next(c for c in arg_specs.cases(tag) if c.name.startswith(f"{shape} T{tokens} "))
    args, _ = arg_specs.make_args(case, seed)
    rows = max(1, tokens * case.top_k // case.num_experts)
    xb = jax.random.normal(jax.random.key(seed + 1), (case.num_experts, rows, case.d_model), args[0].dtype)
    return {
        "args": args,
        "balanced_x": xb,
        "counts": np.bincount(np.asarray(args[2]).ravel(), minlength=case.num_experts),
        "shape": (tokens, case.num_experts, case.top_k, case.d_model, case.d_ff),
        "cost": arg_specs.cost(case, args),
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
    return timing.interleaved_ratio(fn_a, args_a, fn_b, args_b, rounds=rounds, copies=copies)


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
    einsum, bf16 at the models' full widths (arg_specs "accel"), T = 256 and 4096. Skipped
    (NotImplementedError in setup) on any other backend."""

    params = (list(SHAPES), [256, 4096], ["pallas", "xla"])
    param_names = ["shape", "tokens", "impl"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)

    def setup(self, shape, tokens, impl):
        if jax.default_backend() != "gpu":
            raise NotImplementedError("GPU only")
        case = make_case(shape, tokens, tag="accel")  # bf16 at the model's full widths
        self.args = case["args"]
        self.fn = jax.jit(functools.partial(moe_ffn, impl=impl))
        self.fn(*self.args).block_until_ready()
        self.base_args = (case["balanced_x"], *self.args[3:])
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
        self.cost = self.case["cost"]

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
            num_experts = case["shape"][1]
            touched = int((case["counts"] > 0).sum())
            bound = case["cost"].memory_s(chip)
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
