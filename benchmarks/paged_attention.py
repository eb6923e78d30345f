"""Paged attention on this host: decode over a shuffled paged cache, and a mixed prefill + decode batch.

Decode shape: B=8 sequences, H=32 query heads, K=8 kv heads, D=128, page size 16, float32, pages shuffled
across the cache. The baseline is `jax.nn.dot_product_attention` over the same keys and values laid out
contiguously ([B, L, K, D]), measured in the same run. `track_*` report the KV read rate, its fraction of
the host's streaming-read roof, and the speedup over the baseline.
"""

import timeit

import jax
import jax.numpy as jnp
import numpy as np

from kernels import paged_attention, paged_attention_cost
from roofline import measure_host, timing

B, H, K, D, S = 8, 32, 8, 128, 16


def _decode_inputs(context, seed=0):
    rng = np.random.default_rng(seed)
    pages_per_seq = context // S
    num_pages = B * pages_per_seq + 64
    kp = jnp.asarray(rng.standard_normal((num_pages, S, K, D), dtype=np.float32))
    vp = jnp.asarray(rng.standard_normal((num_pages, S, K, D), dtype=np.float32))
    bt = rng.permutation(num_pages)[: B * pages_per_seq].reshape(B, pages_per_seq).astype(np.int32)
    lens = np.full(B, context, np.int32)
    q = jnp.asarray(rng.standard_normal((B, H, D), dtype=np.float32))
    return q, kp, vp, jnp.asarray(lens), jnp.asarray(bt)


def _contiguous(kp, bt):
    return kp[bt].reshape(bt.shape[0], -1, K, D)


class PagedDecode:
    params = [512, 4096, 16384]
    param_names = ["context"]
    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 600

    def setup(self, context):
        self.args = _decode_inputs(context)
        q, kp, vp, lens, bt = self.args
        self.dense_args = (q[:, None], _contiguous(kp, bt), _contiguous(vp, bt))
        self.paged = jax.jit(paged_attention)
        self.dense = jax.jit(jax.nn.dot_product_attention)
        self.paged(*self.args).block_until_ready()
        self.dense(*self.dense_args).block_until_ready()
        self.cost = paged_attention_cost(B, H, K, D, np.asarray(lens))
        # Below the last-level cache, rotate copies so that each call reads from memory.
        self.copies = 4 if context <= 1024 else 1

    def time_paged_decode(self, context):
        self.paged(*self.args).block_until_ready()

    def time_dense_contiguous_baseline(self, context):
        self.dense(*self.dense_args).block_until_ready()

    def _paged_s(self):
        return timing.time_fn(self.paged, *self.args, copies=self.copies, min_time_s=0.5).median_s

    def track_kv_read_gbps(self, context):
        return self.cost.bytes_read / self._paged_s() / 1e9

    track_kv_read_gbps.unit = "GB/s"

    def track_fraction_of_stream_bandwidth(self, context):
        return self.cost.bytes_read / self._paged_s() / measure_host().bandwidth

    track_fraction_of_stream_bandwidth.unit = "fraction of roofline"

    def track_speedup_vs_dense_contiguous(self, context):
        dense = timing.time_fn(self.dense, *self.dense_args, copies=self.copies, min_time_s=0.5).median_s
        return dense / self._paged_s()

    track_speedup_vs_dense_contiguous.unit = "x"


class PagedMixedBatch:
    """One 512-token prefill chunk beside 7 decodes at context 2048 (T = 519 query tokens)."""

    timer = timeit.default_timer
    number = 1
    repeat = (3, 10, 20.0)

    def setup(self):
        _, kp, vp, _, bt = _decode_inputs(2048, seed=1)
        self.q_lens = np.array([512] + [1] * (B - 1), np.int32)
        lens = np.full(B, 2048, np.int32)
        rng = np.random.default_rng(2)
        qm = jnp.asarray(rng.standard_normal((int(self.q_lens.sum()), H, D), dtype=np.float32))
        self.args = (qm, kp, vp, jnp.asarray(lens), bt, jnp.asarray(self.q_lens))
        self.fn = jax.jit(
            lambda q, kp, vp, lens, bt, q_lens: paged_attention(q, kp, vp, lens, bt, q_lens=q_lens)
        )
        self.fn(*self.args).block_until_ready()
        self.cost = paged_attention_cost(int(self.q_lens.sum()), H, K, D, lens, q_lens=self.q_lens)

    def time_mixed_batch(self):
        self.fn(*self.args).block_until_ready()

    def track_gflops(self):
        t = timing.time_fn(self.fn, *self.args, min_time_s=0.5).median_s
        return self.cost.flops / t / 1e9

    track_gflops.unit = "GFLOP/s"
