"""Token-level benchmarks: one measured Llama-3-8B decode step on this machine, priced.

`roofline.measure.measure_step` runs every component's kernel at one layer's shapes (int4 weights,
batch 1, context 1024, the same small case `make report` measures) and the token-cost model turns the
times into tokens/s and $/Mtok. The price is fixed (PRICE_PER_HOUR) so that $/Mtok moves only with speed.
"""

from roofline import get_model, measure_host
from roofline.measure import measure_step

PRICE_PER_HOUR = 0.10  # USD for this machine; any fixed figure serves to compare commits
COMPONENTS = ["qkv_proj", "attention", "o_proj", "mlp", "lm_head"]


def _measure():
    chip = measure_host(price_per_hour=PRICE_PER_HOUR)
    m = measure_step(get_model("llama-3-8b"), chip, batch=1, context=1024, weights="int4", progress=False)
    e = m.estimate
    return {
        "tokens_per_s": e.tokens_per_s,
        "usd_per_mtok": e.usd_per_mtok,
        "fraction": {c.name: c.bound_s / c.time_s for c in e.components},
    }


class DecodeStep:
    timeout = 900

    def setup_cache(self):
        return _measure()

    def track_tokens_per_s(self, result):
        return result["tokens_per_s"]

    track_tokens_per_s.unit = "tokens/s"

    def track_usd_per_mtok(self, result):
        return result["usd_per_mtok"]

    track_usd_per_mtok.unit = "$/Mtok"


class DecodeStepComponents:
    params = [COMPONENTS]
    param_names = ["component"]
    timeout = 900

    def setup_cache(self):
        return _measure()

    def track_fraction_of_roofline(self, result, component):
        return result["fraction"][component]

    track_fraction_of_roofline.unit = "fraction of roofline"


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m benchmarks.tokens",
        description=__doc__.split("\n\n")[0],
        epilog="asv benchmarks, no command-line run of their own: asv run --bench tokens",
    ).parse_args()
    print("benchmarks.tokens holds asv benchmarks only; run them with: asv run --bench tokens")
