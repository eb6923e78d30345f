"""The XLA path of paged_attention beyond the shared suite: its tunables, its export to every backend, and
its cost against XLA's own count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import paged_attention, paged_attention_cost
from kernels.paged_attention.xla import Config
from roofline import compare_with_xla
from tests.kernels.paged_attention.cases import check, make_cache
from tests.tolerances import COST_FLOPS_RTOL


@pytest.mark.parametrize("q_tile,block_pages,num_splits", [(1, 1, 1), (3, 2, 2), (16, 4, 1), (5, 1, 4)])
def test_tunables_do_not_change_the_result(q_tile, block_pages, num_splits):
    lens, q_lens = [40, 1, 64, 17], np.array([7, 1, 20, 17], np.int32)
    q, kp, vp, lens, bt = make_cache(3, lens=lens, q_lens=q_lens)
    check(
        "xla",
        q,
        kp,
        vp,
        lens,
        bt,
        q_lens=q_lens,
        q_tile=q_tile,
        block_pages=block_pages,
        num_splits=num_splits,
    )


def test_lowers_for_every_backend():
    q, kp, vp, lens, bt = make_cache(0, lens=[5, 33, 64])
    ql = np.array([2, 10, 1], np.int32)

    def decode(q, kp, vp, lens, bt):
        # impl="xla" for all four platforms: "auto" adds the native CPU custom call on the cpu platform, which
        # export refuses without disabled_checks (exported for cuda/rocm/tpu in test_cpu_native.py).
        return paged_attention(
            q, kp, vp, lens, bt, soft_cap=2.0, alibi_slopes=jnp.ones(4) * 0.1, sliding_window=8, impl="xla"
        )

    def mixed(q, kp, vp, lens, bt, ql):
        return paged_attention(q, kp, vp, lens, bt, q_lens=ql, impl="xla")

    spec = jax.ShapeDtypeStruct
    platforms = ("cpu", "cuda", "rocm", "tpu")
    args = [spec(x.shape, x.dtype) for x in (q, kp, vp, lens, bt)]
    jax.export.export(jax.jit(decode), platforms=platforms)(*args)
    margs = [spec((13, 4, 64), np.float32), *args[1:], spec(ql.shape, ql.dtype)]
    jax.export.export(jax.jit(mixed), platforms=platforms)(*margs)


def test_cost_matches_xla_when_one_block_covers_the_context():
    b, h, k, d, s, mp = 4, 8, 2, 128, 16, 8
    lens = np.full(b, mp * s, np.int32)  # full pages: no masked work for XLA to count
    q, kp, vp, lens, bt = make_cache(0, lens=lens, h=h, k=k, d=d, s=s, max_pages=mp, num_pages=b * mp)
    cost = paged_attention_cost(b, h, k, d, lens)

    def fn(q, kp, vp, lens, bt):
        return paged_attention(q, kp, vp, lens, bt, config=Config(block_pages=mp, num_splits=1), impl="xla")

    cmp = compare_with_xla(cost, fn, q, kp, vp, lens, bt)
    # One loop trip, counted once. XLA's dots equal ours; it also counts elementwise work that the analytic
    # count leaves out: zeroing masked values (D / G per score) and the mask selects, about 8% here.
    assert cmp.flops_ratio == pytest.approx(1.0, rel=5 * COST_FLOPS_RTOL)
    assert cmp.transcendentals_ratio == pytest.approx(1.0, rel=0.1)
    kv = 2 * b * mp * s * k * d * 4
    assert cost.bytes_read == kv + b * h * d * 4
