"""Cases for the paged attention suites: caches on shuffled pages, ragged and mixed batches, and the check
of one implementation against the reference."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import strategies as st

from kernels import paged_attention, paged_attention_reference, write_kv
from tests.kernels import suite
from tests.tolerances import assert_close

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
TUNABLES = ("q_tile", "block_pages", "num_splits")


def make_cache(
    seed,
    *,
    lens,
    h=4,
    k=2,
    d=64,
    s=16,
    max_pages=4,
    num_pages=16,
    dtype=np.float32,
    q_lens=None,
    poison=False,
):
    """Pages filled at random, sequences on shuffled pages; with poison, every slot no sequence covers
    holds NaN/Inf and block-table entries past each sequence's pages are out of range."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(lens, np.int32)
    b = len(lens)
    kp = rng.standard_normal((num_pages, s, k, d)).astype(dtype)
    vp = rng.standard_normal((num_pages, s, k, d)).astype(dtype)
    need = -(-lens // s)
    assert need.sum() <= num_pages
    ids = rng.permutation(num_pages)
    t = b if q_lens is None else int(np.sum(q_lens))
    q = rng.standard_normal((t, h, d)).astype(dtype)
    bt = np.zeros((b, max_pages), np.int32)
    used = np.zeros((num_pages, s), bool)
    start = 0
    for i in range(b):
        bt[i, : need[i]] = ids[start : start + need[i]]
        for j in range(need[i]):
            used[bt[i, j], : min(s, lens[i] - j * s)] = True
        if poison:
            bt[i, need[i] :] = rng.choice([-7, num_pages, num_pages + 100, 2**30], size=max_pages - need[i])
        start += need[i]
    if poison:
        bad = np.array([np.nan, np.inf, -np.inf], dtype)
        kp[~used] = bad[rng.integers(0, 3, size=(~used).sum())][:, None, None]
        vp[~used] = bad[rng.integers(0, 3, size=(~used).sum())][:, None, None]
    return q, kp, vp, lens, bt


def lens_strategy(b=3, s=16, max_pages=4):
    edge = st.sampled_from([0, 1, s - 1, s, s + 1, 2 * s, max_pages * s])
    return st.lists(st.one_of(edge, st.integers(0, max_pages * s)), min_size=b, max_size=b)


def unsupported(impl, q, kp, vp, q_lens=None):
    """Why `impl` does not serve these inputs (None when it does)."""
    lens, bt = np.zeros(q.shape[:1], np.int32), np.zeros((q.shape[0], 1), np.int32)  # unused by `supports`
    return suite.unsupported("paged_attention", impl, q, kp, vp, lens, bt, q_lens=q_lens)


def skip_unsupported(impl, q, kp, vp, q_lens=None):
    reason = unsupported(impl, q, kp, vp, q_lens)
    if reason is not None:
        pytest.skip(f"impl={impl!r} does not serve {reason}")


def run(impl, q, kp, vp, lens, bt, *, jit=False, **kw):
    """paged_attention with `impl` (under jax.jit when asked, except the eager reference); TUNABLES among `kw`
    go into `impl`'s config."""
    tunables = {k: kw.pop(k) for k in TUNABLES if k in kw}
    if tunables:
        kw["config"] = suite.config_for("paged_attention", impl, **tunables)
    args = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    arrays = [jnp.asarray(a) for a in (q, kp, vp, lens, bt)]
    if jit and not suite.eager("paged_attention", impl):
        arrays_kw = {k: v for k, v in args.items() if isinstance(v, jax.Array)}
        static = tuple(sorted((k, v) for k, v in args.items() if not isinstance(v, jax.Array)))
        return _jitted(impl, static)(*arrays, **arrays_kw)
    return paged_attention(*arrays, impl=impl, **args)


@functools.cache
def _jitted(impl, static):
    """One jitted function per (impl, static arguments), so hypothesis examples of one shape compile once."""
    return jax.jit(functools.partial(paged_attention, impl=impl, **dict(static)))


def check(impl, q, kp, vp, lens, bt, **kw):
    """`impl` against the reference on one case; skipped when `impl` does not serve it."""
    skip_unsupported(impl, q, kp, vp, kw.get("q_lens"))
    expected = paged_attention_reference(
        q, kp, vp, lens, bt, **{k: v for k, v in kw.items() if k not in TUNABLES}
    )
    out = run(impl, q, kp, vp, lens, bt, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, expected, q.dtype)
    return np.asarray(out)


FEATURES = {
    "soft_cap": {"soft_cap": 1.5},
    "alibi": {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625], np.float32)},
    "window": {"sliding_window": 5},
    "all": {
        "soft_cap": 3.0,
        "alibi_slopes": np.array([0.3, 0.2, 0.1, 0.05], np.float32),
        "sliding_window": 17,
    },
    "scale": {"scale": 0.3},
}

MIXED_T = 48  # fixed so that JAX compiles once per test, whatever hypothesis draws


@st.composite
def mixed_batch(draw, s=16, max_pages=4):
    """Four sequences sharing MIXED_T query tokens: three are idle, decode (1 query), speculative
    verification (2–5) or a prefill chunk (1–12); the last takes the remaining queries, a full prefill
    when its cache holds exactly those tokens, a chunk otherwise."""
    lens, q_lens = [], []
    for _ in range(3):
        kind = draw(st.sampled_from(["idle", "decode", "spec", "chunk"]))
        n_q = {"idle": 0, "decode": 1, "spec": draw(st.integers(2, 5)), "chunk": draw(st.integers(1, 12))}[
            kind
        ]
        n_kv = 0 if kind == "idle" else draw(st.integers(max(n_q, 1), max_pages * s))
        lens.append(n_kv)
        q_lens.append(n_q)
    rest = MIXED_T - sum(q_lens)
    lens.append(draw(st.integers(rest, max_pages * s)))
    q_lens.append(rest)
    return lens, q_lens


def quantize_pages(kp, vp, mode, dtype, seed):
    """Quantize whole float pages through write_kv (every slot written)."""
    p, s, k, d = kp.shape
    slots = np.arange(p * s, dtype=np.int32)
    qk = jnp.zeros(kp.shape, dtype)
    qv = jnp.zeros(vp.shape, dtype)
    if mode == "tensor":
        ks, vs = 0.05, 0.04
    else:
        ks = vs = jnp.zeros((p, s, k), jnp.float32)
    res = write_kv(
        qk,
        qv,
        jnp.asarray(kp.reshape(p * s, k, d)),
        jnp.asarray(vp.reshape(p * s, k, d)),
        slots,
        k_scale=ks,
        v_scale=vs,
    )
    if mode == "tensor":
        return res[0], res[1], ks, vs
    return res
