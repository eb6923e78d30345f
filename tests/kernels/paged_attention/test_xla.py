"""The XLA path of paged_attention beyond the shared suite: its tunables, its export to every backend, and
its cost against XLA's own count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import paged_attention, paged_attention_cost, paged_attention_reference
from kernels.paged_attention.xla import Config
from roofline import compare_with_xla
from tests.kernels.paged_attention.cases import FP8, check, make_cache, quantize_pages
from tests.tolerances import COST_FLOPS_RTOL, DIRECTIONAL_GRAD_RTOL


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


@pytest.mark.parametrize("dtype,mode", [(np.dtype(np.int8), "token"), (FP8, "tensor")])
def test_grad_through_quantized_pages(dtype, mode):
    """With int8 / fp8 pages the gradient reaches q and the scales (against central differences of the
    float64 reference); int8 pages are integers and get none."""
    lens, q_lens = [21, 9], np.array([4, 1], np.int32)
    q, kp, vp, lens, bt = make_cache(5, lens=lens, q_lens=q_lens, d=16, s=8, num_pages=8, max_pages=4)
    qk, qv, ks, vs = (np.asarray(a) for a in quantize_pages(kp, vp, mode, dtype, 5))
    ks, vs = np.asarray(ks, np.float32), np.asarray(vs, np.float32)
    cot = np.random.default_rng(6).standard_normal(q.shape).astype(np.float32)

    def loss(q, ks, vs):
        return jnp.sum(cot * paged_attention(q, qk, qv, lens, bt, q_lens=q_lens, k_scale=ks, v_scale=vs))

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, ks, vs)

    def ref_loss(q, ks, vs):
        out = paged_attention_reference(q, qk, qv, lens, bt, q_lens=q_lens, k_scale=ks, v_scale=vs)
        return float(np.sum(out * cot))

    args = [q.astype(np.float64), np.float64(ks) if ks.ndim == 0 else ks.astype(np.float64),
            np.float64(vs) if vs.ndim == 0 else vs.astype(np.float64)]  # fmt: skip
    rng = np.random.default_rng(7)
    for i, g in enumerate(grads):
        v = rng.standard_normal(np.shape(args[i]))
        plus, minus = list(args), list(args)
        plus[i], minus[i] = args[i] + 1e-6 * v, args[i] - 1e-6 * v
        fd = (ref_loss(*plus) - ref_loss(*minus)) / 2e-6
        assert float(np.sum(np.asarray(g, np.float64) * v)) == pytest.approx(fd, rel=DIRECTIONAL_GRAD_RTOL), i


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
