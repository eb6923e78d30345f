"""INT4 dequant-matmul against the float32 matmul of the same shape, with weights rotated out of cache.

Cases: `kernels/int4_matmul/arg_specs.py` (tag "asv": Llama-3-8B's (K, N) = (4096, 4096), (4096, 14336) and
(14336, 4096), and Llama-3-70B's (8192, 28672); M = 1, 4, 16, 64 rows of x; group size 128, asymmetric,
float32; "native": the CPU-native kernel's targets; "accel": bf16 activations for the GPU class).
`track_*` report our time over the float32 time (lower is better), the packed-weight read rate as a fraction
of the host's streaming roof, and, when PyTorch is installed (an optional, benchmark-only peer), our time over
its CPU INT4 kernel's.
"""

import timeit

import jax
import jax.numpy as jnp
import numpy as np

from kernels import int4_matmul, registry
from kernels.int4_matmul import arg_specs
from roofline import measure_host, timing

ASV = [c.name for c in arg_specs.cases("asv")]
# Rotate enough copies of the weight that the set exceeds any last-level cache.
ROTATION_BYTES = 256 << 20


def _copies(nbytes):
    return timing.rotation_copies(nbytes, exceed_bytes=ROTATION_BYTES, min_copies=1, max_copies=1 << 20)


def make_inputs(case_name, seed=0):
    """(case, x, w) for the arg_specs case called `case_name`."""
    case = arg_specs.get(case_name)
    (x, w), _ = arg_specs.make_args(case, seed)
    return case, x, w


def _float_weight(case, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(1).standard_normal((case.k, case.n), dtype=np.float32), dtype)


class Int4Matmul:
    params = ASV
    param_names = ["case"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 900

    def setup(self, case):
        c, self.x, self.w = make_inputs(case)
        self.fn = jax.jit(int4_matmul)
        self.fn(self.x, self.w).block_until_ready()
        self.wf = _float_weight(c)
        self.f32 = jax.jit(jnp.matmul)
        self.f32(self.x, self.wf).block_until_ready()
        self.cost = arg_specs.cost(c)

    def time_int4_matmul(self, case):
        self.fn(self.x, self.w).block_until_ready()

    def time_float32_matmul(self, case):
        self.f32(self.x, self.wf).block_until_ready()

    def _int4_s(self):
        copies = _copies(self.cost.bytes_read)
        return timing.time_fn(self.fn, self.x, self.w, copies=copies, min_time_s=0.3).median_s

    def track_ratio_to_float32(self, case):
        copies = _copies(self.wf.nbytes)
        f32 = timing.time_fn(self.f32, self.x, self.wf, copies=copies, min_time_s=0.3).median_s
        return self._int4_s() / f32

    track_ratio_to_float32.unit = "x (time / float32 time)"

    def track_fraction_of_stream_bandwidth(self, case):
        return self.cost.bytes_read / self._int4_s() / measure_host().bandwidth

    track_fraction_of_stream_bandwidth.unit = "fraction of roofline"


def torch_int4_peer(k, n, m, group=128):
    """PyTorch's CPU INT4 kernel (tinygemm) on the same shape, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    w_int = torch.from_numpy(rng.integers(0, 16, (n, k), dtype=np.int32))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w_int, 2)
    sz = torch.from_numpy(rng.uniform(0.001, 0.01, (k // group, n, 2)).astype(np.float32)).to(torch.bfloat16)
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(torch.bfloat16)

    def run():
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)

    return run


class Int4MatmulVsTorch:
    """Our time over PyTorch's CPU INT4 kernel (bf16 activations, as that kernel takes), when installed."""

    params = [c.name for c in arg_specs.cases("asv") if c.m in (1, 16)]
    param_names = ["case"]
    timer = timeit.default_timer
    timeout = 900

    def setup(self, case):
        c = arg_specs.get(case)
        self.peer = torch_int4_peer(c.k, c.n, c.m, c.group)
        if self.peer is None:
            raise NotImplementedError("torch is not installed")
        self.ours = Int4Matmul()
        self.ours.setup(case)

    def track_ratio_to_torch_int4(self, case):
        return self.ours._int4_s() / _torch_time(self.peer)

    track_ratio_to_torch_int4.unit = "x (time / torch time)"


def _torch_time(run):
    run()
    t0 = timeit.default_timer()
    reps = 0
    while timeit.default_timer() - t0 < 0.3 or reps < 5:
        run()
        reps += 1
    return (timeit.default_timer() - t0) / reps


class Int4MatmulNativeVsXla:
    """The CPU-native kernel (impl="cpu_native") against the portable XLA path and float32; each ratio is
    measured back to back in one call (PyTorch's kernel: Int4MatmulNativeVsTorch)."""

    params = [c.name for c in arg_specs.cases("native")]
    param_names = ["case"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 900

    def setup(self, case):
        why = registry.implementations("int4_matmul")["cpu_native"].unavailable()
        if why is not None:
            raise NotImplementedError(why)
        self.case, self.x, self.w = make_inputs(case)
        self.native = jax.jit(lambda x, w: int4_matmul(x, w, impl="cpu_native"))
        self.xla = jax.jit(lambda x, w: int4_matmul(x, w, impl="xla"))
        self.wf = _float_weight(self.case)
        self.f32 = jax.jit(jnp.matmul)
        for f, w in ((self.native, self.w), (self.xla, self.w), (self.f32, self.wf)):
            f(self.x, w).block_until_ready()
        self.cost = arg_specs.cost(self.case)
        self.copies = _copies(self.cost.bytes_read)

    def _time(self, fn, w, copies):
        return timing.time_fn(fn, self.x, w, copies=copies, min_time_s=0.3).median_s

    def time_native(self, case):
        self.native(self.x, self.w).block_until_ready()

    def track_native_over_float32(self, case):
        f32 = self._time(self.f32, self.wf, _copies(self.wf.nbytes))
        return self._time(self.native, self.w, self.copies) / f32

    track_native_over_float32.unit = "x (time / float32 time)"

    def track_xla_over_float32(self, case):
        f32 = self._time(self.f32, self.wf, _copies(self.wf.nbytes))
        return self._time(self.xla, self.w, self.copies) / f32

    track_xla_over_float32.unit = "x (time / float32 time)"

    def track_native_speedup_over_xla(self, case):
        return self._time(self.xla, self.w, self.copies) / self._time(self.native, self.w, self.copies)

    track_native_speedup_over_xla.unit = "x"

    def track_native_fraction_of_stream_bandwidth(self, case):
        return self.cost.bytes_read / self._time(self.native, self.w, self.copies) / measure_host().bandwidth

    track_native_fraction_of_stream_bandwidth.unit = "fraction of roofline"


class Int4MatmulNativeVsTorch:
    """The CPU-native kernel's time over PyTorch's CPU INT4 kernel's on the same shape. A class of its own so
    that a missing torch (or native library) skips it in `setup`, which asv counts as a skip; raised in the
    timed body it would count as a failure."""

    params = [c.name for c in arg_specs.cases("native")]
    param_names = ["case"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 900

    def setup(self, case):
        c = arg_specs.get(case)
        self.peer = torch_int4_peer(c.k, c.n, c.m, c.group)
        if self.peer is None:
            raise NotImplementedError("torch is not installed")
        self.ours = Int4MatmulNativeVsXla()
        self.ours.setup(case)

    def track_native_over_torch_int4(self, case):
        ours = self.ours
        return ours._time(ours.native, ours.w, ours.copies) / _torch_time(self.peer)

    track_native_over_torch_int4.unit = "x (time / torch time)"


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m benchmarks.int4_matmul",
        description=__doc__.split("\n\n")[0],
        epilog="asv benchmarks, no command-line run of their own: asv run --bench int4_matmul",
    ).parse_args()
    print("benchmarks.int4_matmul holds asv benchmarks only; run them with: asv run --bench int4_matmul")


class Int4MatmulOnGPU:
    """W4A16 on a GPU: the Pallas kernel (impl="pallas") and the XLA path against the bf16 matmul,
    (8192, 28672), group 128, bf16 activations. Skipped (NotImplementedError in setup) on any other backend.

    `track_ratio_to_bf16` is our time over the bf16 matmul's in the same process (lower is better).
    """

    params = ([c.name for c in arg_specs.cases("accel") if (c.k, c.n) == (8192, 28672)], ["pallas", "xla"])
    param_names = ["case", "impl"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 900

    def setup(self, case, impl):
        if jax.default_backend() != "gpu":
            raise NotImplementedError("GPU only")
        c, self.x, self.w = make_inputs(case)
        self.fn = jax.jit(lambda x, w: int4_matmul(x, w, impl=impl))
        self.fn(self.x, self.w).block_until_ready()
        self.wb = _float_weight(c, jnp.bfloat16)
        self.bf16 = jax.jit(jnp.matmul)
        self.bf16(self.x, self.wb).block_until_ready()

    def time_int4_matmul(self, case, impl):
        self.fn(self.x, self.w).block_until_ready()

    def track_ratio_to_bf16(self, case, impl):
        ours = timing.time_fn(self.fn, self.x, self.w, min_time_s=0.5).median_s
        return ours / timing.time_fn(self.bf16, self.x, self.wb, min_time_s=0.5).median_s

    track_ratio_to_bf16.unit = "x"
