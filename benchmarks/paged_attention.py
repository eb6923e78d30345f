"""Paged attention on this host: decode over a shuffled paged cache, and a mixed prefill + decode batch.

Cases: `kernels/paged_attention/arg_specs.py` (tag "asv": B=8 sequences, H=32 query heads, K=8 kv heads,
D=128, page size 16, float32, pages shuffled across the cache; "native": the CPU-native kernel's contexts;
"accel": the bf16 GPU shapes). The baseline is `jax.nn.dot_product_attention` over the same keys and values
laid out contiguously ([B, L, K, D]), measured in the same run. `track_*` report the KV read rate, its
fraction of the host's streaming-read roof, and the speedup over the baseline.
"""

import timeit

import jax
import numpy as np

from kernels import paged_attention, registry
from kernels.paged_attention import arg_specs
from roofline import measure_host, timing

DECODE = [c.name for c in arg_specs.cases("asv") if c.q_lens is None]
MIXED = next(c.name for c in arg_specs.cases("asv") if c.q_lens is not None)


def _decode_inputs(case_name, seed=0):
    args, _ = arg_specs.make_args(arg_specs.get(case_name), seed)
    return args


def _contiguous(pages, bt):
    """[P, S, K, D] pages gathered by the block table into a [B, W * S, K, D] cache."""
    return pages[bt].reshape(bt.shape[0], -1, *pages.shape[2:])


class PagedDecode:
    params = DECODE
    param_names = ["case"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 600

    def setup(self, case):
        self.args = _decode_inputs(case)
        q, kp, vp, _, bt = self.args
        self.dense_args = (q[:, None], _contiguous(kp, bt), _contiguous(vp, bt))
        self.paged = jax.jit(paged_attention)
        self.dense = jax.jit(jax.nn.dot_product_attention)
        self.paged(*self.args).block_until_ready()
        self.dense(*self.dense_args).block_until_ready()
        self.cost = arg_specs.cost(arg_specs.get(case))
        # Below the last-level cache, rotate copies so that each call reads from memory.
        self.copies = timing.rotation_copies(timing.tree_nbytes(self.args), min_copies=1)

    def time_paged_decode(self, case):
        self.paged(*self.args).block_until_ready()

    def time_dense_contiguous_baseline(self, case):
        self.dense(*self.dense_args).block_until_ready()

    def _paged_s(self):
        return timing.time_fn(self.paged, *self.args, copies=self.copies, min_time_s=0.5).median_s

    def track_kv_read_gbps(self, case):
        return self.cost.bytes_read / self._paged_s() / 1e9

    track_kv_read_gbps.unit = "GB/s"

    def track_fraction_of_stream_bandwidth(self, case):
        return self.cost.bytes_read / self._paged_s() / measure_host().bandwidth

    track_fraction_of_stream_bandwidth.unit = "fraction of roofline"

    def track_speedup_vs_dense_contiguous(self, case):
        dense = timing.time_fn(self.dense, *self.dense_args, copies=self.copies, min_time_s=0.5).median_s
        return dense / self._paged_s()

    track_speedup_vs_dense_contiguous.unit = "x"


class PagedMixedBatch:
    """One 512-token prefill chunk beside 7 decodes at context 2048 (T = 519 query tokens)."""

    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)

    def setup(self):
        case = arg_specs.get(MIXED)
        args, kwargs = arg_specs.make_args(case, seed=1)
        self.args = (*args, kwargs["q_lens"])
        self.fn = jax.jit(
            lambda q, kp, vp, lens, bt, q_lens: paged_attention(q, kp, vp, lens, bt, q_lens=q_lens)
        )
        self.fn(*self.args).block_until_ready()
        self.cost = arg_specs.cost(case)

    def time_mixed_batch(self):
        self.fn(*self.args).block_until_ready()

    def track_gflops(self):
        t = timing.time_fn(self.fn, *self.args, min_time_s=0.5).median_s
        return self.cost.flops / t / 1e9

    track_gflops.unit = "GFLOP/s"


def torch_sdpa_peer(q, kp, vp, bt):
    """PyTorch's CPU scaled_dot_product_attention (GQA) over the same keys and values laid out contiguously,
    [B, K, L, D], or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None

    def dense(pages):
        return torch.from_numpy(np.array(_contiguous(pages, bt))).permute(0, 2, 1, 3).contiguous()

    kc, vc = dense(kp), dense(vp)
    qt = torch.from_numpy(np.array(q))[:, :, None, :]  # [B, H, 1, D]

    def run():
        return torch.nn.functional.scaled_dot_product_attention(qt, kc, vc, enable_gqa=True)

    return run


class PagedDecodeNativeVsXla:
    """The CPU-native decode kernel (impl="cpu_native") against the portable XLA path; ratios measured back to
    back (PyTorch's scaled_dot_product_attention: PagedDecodeNativeVsTorch)."""

    params = [c.name for c in arg_specs.cases("native")]
    param_names = ["case"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 900

    def setup(self, case):
        why = registry.implementations("paged_attention")["cpu_native"].unavailable()
        if why is not None:
            raise NotImplementedError(why)
        self.args = _decode_inputs(case)
        self.native = jax.jit(lambda *a: paged_attention(*a, impl="cpu_native"))
        self.xla = jax.jit(lambda *a: paged_attention(*a, impl="xla"))
        self.native(*self.args).block_until_ready()
        self.xla(*self.args).block_until_ready()
        self.cost = arg_specs.cost(arg_specs.get(case))

    def _time(self, fn):
        return timing.time_fn(fn, *self.args, min_time_s=0.5).median_s

    def time_native_decode(self, case):
        self.native(*self.args).block_until_ready()

    def track_native_kv_read_gbps(self, case):
        return self.cost.bytes_read / self._time(self.native) / 1e9

    track_native_kv_read_gbps.unit = "GB/s"

    def track_native_fraction_of_stream_bandwidth(self, case):
        return self.cost.bytes_read / self._time(self.native) / measure_host().bandwidth

    track_native_fraction_of_stream_bandwidth.unit = "fraction of roofline"

    def track_native_speedup_over_xla(self, case):
        return self._time(self.xla) / self._time(self.native)

    track_native_speedup_over_xla.unit = "x"


class PagedDecodeNativeVsTorch:
    """The CPU-native decode kernel against PyTorch's scaled_dot_product_attention over a contiguous cache. A
    class of its own so that a missing torch (or native library) skips it in `setup`, which asv counts as a
    skip; raised in the timed body it would count as a failure."""

    params = [c.name for c in arg_specs.cases("native")]
    param_names = ["case"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 900

    def setup(self, case):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        self.ours = PagedDecodeNativeVsXla()
        self.ours.setup(case)
        q, kp, vp, _, bt = self.ours.args
        self.peer = torch_sdpa_peer(q, kp, vp, bt)

    def track_native_speedup_over_torch_sdpa(self, case):
        peer = self.peer
        peer()
        t0 = timeit.default_timer()
        reps = 0
        while timeit.default_timer() - t0 < 0.5 or reps < 3:
            peer()
            reps += 1
        return (timeit.default_timer() - t0) / reps / self.ours._time(self.ours.native)

    track_native_speedup_over_torch_sdpa.unit = "x"


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        prog="python -m benchmarks.paged_attention",
        description=__doc__.split("\n\n")[0],
        epilog="asv benchmarks, no command-line run of their own: asv run --bench paged_attention",
    ).parse_args()
    print(
        "benchmarks.paged_attention holds asv benchmarks only; run them with: asv run --bench paged_attention"
    )


class PagedDecodeOnGPU:
    """The Pallas kernel (impl="pallas") against the XLA path on a GPU, bf16, B=8/64 sequences at 4096 tokens.

    Skipped (NotImplementedError in setup) on any other backend, where Pallas runs interpreted.
    `track_fraction_of_hbm` is the KV read rate over the measured device bandwidth.
    """

    params = ([c.name for c in arg_specs.cases("accel") if c.kv_lens[0] == 4096], ["pallas", "xla"])
    param_names = ["case", "impl"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 600

    def setup(self, case, impl):
        if jax.default_backend() != "gpu":
            raise NotImplementedError("GPU only")
        self.args = _decode_inputs(case)
        self.fn = jax.jit(lambda *a: paged_attention(*a, impl=impl))
        self.fn(*self.args).block_until_ready()
        self.cost = arg_specs.cost(arg_specs.get(case))

    def time_paged_decode(self, case, impl):
        self.fn(*self.args).block_until_ready()

    def track_fraction_of_hbm(self, case, impl):
        seconds = timing.time_fn(self.fn, *self.args, min_time_s=0.5).median_s
        return self.cost.bytes_read / seconds / measure_host().bandwidth

    track_fraction_of_hbm.unit = "fraction of roofline"
