"""GPTQ on a 4096 x 4096 layer: the jitted JAX path against the plain NumPy path, measured in one run.

Both take the same W [K, N] and H [K, K] and run the whole algorithm (dead channels, dampening, the
inverse factor, every block). The NumPy path runs in float32 (like the JAX path) and in float64 (the
reference's own precision). `track_speedup` is NumPy float32 time over JAX time, both timed here.

    python -m benchmarks.gptq            # prints both times and the ratio once, without asv
"""

import timeit

import jax
import numpy as np

from quant import gptq_quantize, gptq_reference, hessian

SHAPES = [(4096, 4096)]


def _problem(k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * k, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    return w, np.asarray(hessian(x))


def _run_jax(w, H):
    jax.block_until_ready(gptq_quantize(w, H, group_size=128))


class Gptq:
    params = (SHAPES,)
    param_names = ["k_n"]
    timer = timeit.default_timer
    number = 1
    repeat = (1, 3, 60.0)
    timeout = 900

    def setup(self, k_n):
        self.w, self.H = _problem(*k_n)
        _run_jax(self.w, self.H)  # compile outside the timed body

    def time_gptq_jax(self, k_n):
        _run_jax(self.w, self.H)

    def time_gptq_numpy_float32(self, k_n):
        gptq_reference(self.w, self.H, group_size=128, dtype=np.float32)

    def time_gptq_numpy_float64(self, k_n):
        gptq_reference(self.w, self.H, group_size=128, dtype=np.float64)

    def track_speedup(self, k_n):
        from roofline import time_fn

        jax_t = time_fn(_run_jax, self.w, self.H, warmup=1, min_repeats=2, min_time_s=0.0)
        np_t = time_fn(
            lambda w, H: gptq_reference(w, H, group_size=128, dtype=np.float32),
            self.w,
            self.H,
            warmup=1,
            min_repeats=2,
            min_time_s=0.0,
        )
        return np_t.median_s / jax_t.median_s

    track_speedup.unit = "x (NumPy float32 time / JAX time)"


def main() -> None:
    from roofline import time_fn

    k, n = SHAPES[0]
    w, H = _problem(k, n)
    kw = {"warmup": 1, "min_repeats": 3, "min_time_s": 0.0}
    jax_t = time_fn(_run_jax, w, H, **kw)
    np32 = time_fn(lambda w, H: gptq_reference(w, H, group_size=128, dtype=np.float32), w, H, **kw)
    np64 = time_fn(lambda w, H: gptq_reference(w, H, group_size=128, dtype=np.float64), w, H, **kw)
    print(f"GPTQ {k}x{n}, 4 bits, group 128, block 128 (median of {kw['min_repeats']})")
    print(f"  JAX jitted (float32):  {jax_t.median_s:7.2f} s  ± {jax_t.spread * 50:.0f}%")
    print(f"  NumPy float32:         {np32.median_s:7.2f} s  ± {np32.spread * 50:.0f}%")
    print(f"  NumPy float64:         {np64.median_s:7.2f} s  ± {np64.spread * 50:.0f}%")
    print(f"  NumPy f32 / JAX:       {np32.median_s / jax_t.median_s:7.2f}x")
    print(f"  NumPy f64 / JAX:       {np64.median_s / jax_t.median_s:7.2f}x")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m benchmarks.gptq",
        description="Time GPTQ once (JAX jitted, NumPy float32 and float64); print the times and ratios.",
        epilog="The same measurement runs under asv as `track_speedup`: asv run --bench gptq",
    ).parse_args()
    main()
