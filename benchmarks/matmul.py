"""Baseline: the float32 matmul through XLA, the yardstick the INT4 kernels are measured against.

Shapes are Llama-3-8B's projections at decode batch sizes. `track_*` report the fraction of this host's
measured roofline that the matmul reaches.
"""

import timeit

import jax
import jax.numpy as jnp
import numpy as np

from roofline import matmul_cost, measure_host

SHAPES = [(4096, 4096), (4096, 14336)]
BATCHES = [1, 16, 64]


class Float32Matmul:
    params = (SHAPES, BATCHES)
    param_names = ["k_n", "m"]
    timer = timeit.default_timer
    number = 1
    repeat = (5, 20, 10.0)

    def setup(self, k_n, m):
        k, n = k_n
        rng = np.random.default_rng(0)
        self.x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        self.w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
        self.fn = jax.jit(jnp.matmul)
        self.fn(self.x, self.w).block_until_ready()
        self.cost = matmul_cost(m, k, n, x_dtype="fp32")

    def time_matmul(self, k_n, m):
        self.fn(self.x, self.w).block_until_ready()

    def track_fraction_of_roofline(self, k_n, m):
        from roofline import time_fn

        t = time_fn(self.fn, self.x, self.w, min_time_s=0.2)
        return t.achieved(self.cost, measure_host(), "fp32").fraction

    track_fraction_of_roofline.unit = "fraction of roofline"


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m benchmarks.matmul",
        description=__doc__.split("\n\n")[0],
        epilog="asv benchmarks, no command-line run of their own: asv run --bench matmul",
    ).parse_args()
    print("benchmarks.matmul holds asv benchmarks only; run them with: asv run --bench matmul")
