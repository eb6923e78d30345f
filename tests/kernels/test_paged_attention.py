"""paged_attention: the reference pinned by hand, the XLA path against the reference, and bad input."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import paged_attention, paged_attention_cost, paged_attention_reference, write_kv
from roofline import compare_with_xla
from tests.tolerances import COST_FLOPS_RTOL, assert_close

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))
SOME = settings(max_examples=max(6, settings.default.max_examples // 2))
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)

# ---------------------------------------------------------------------------------------------------------
# The reference, by hand.


def _one_seq(keys, values, q, **kw):
    """Single sequence, single kv head, page size 1: keys/values [n, D], q [H, D]."""
    keys = np.asarray(keys, np.float32)[:, None, None, :]
    values = np.asarray(values, np.float32)[:, None, None, :]
    n = keys.shape[0]
    bt = np.arange(max(n, 1), dtype=np.int32)[None]
    if n == 0:
        keys = values = np.zeros((1, 1, 1, np.shape(q)[-1]), np.float32)
    q = np.asarray(q, np.float32)[None]
    return paged_attention_reference(q, keys, values, np.array([n], np.int32), bt, **kw)[0]


def test_reference_two_keys_by_hand():
    # logits = [0·1, 1·1] = [0, 1]; weights = [1, e] / (1 + e); out = (1·1 + 3·e) / (1 + e)
    out = _one_seq([[0.0], [1.0]], [[1.0], [3.0]], [[1.0]], scale=1.0)
    assert out[0, 0] == pytest.approx((1 + 3 * math.e) / (1 + math.e), rel=1e-6)


def test_reference_soft_cap_then_alibi_then_window_by_hand():
    # D = 1, scale 1: raw logits q·k = [4, 2, 0] at positions j = 0, 1, 2; the query is at p = 2.
    # soft cap 2: 2·tanh([2, 1, 0]); ALiBi slope 0.5: + 0.5·(j − 2) = [−1, −0.5, 0];
    # window 2 keeps j ∈ {1, 2}. Weights ∝ exp([2·tanh(1) − 0.5, 0]).
    out = _one_seq(
        [[4.0], [2.0], [0.0]],
        [[100.0], [10.0], [20.0]],
        [[1.0]],
        scale=1.0,
        soft_cap=2.0,
        alibi_slopes=np.array([0.5], np.float32),
        sliding_window=2,
    )
    l1, l2 = 2 * math.tanh(1.0) - 0.5, 0.0
    w1 = math.exp(l1) / (math.exp(l1) + math.exp(l2))
    assert out[0, 0] == pytest.approx(10.0 * w1 + 20.0 * (1 - w1), rel=1e-6)


def test_reference_empty_sequence_is_zero():
    out = _one_seq(np.zeros((0, 2)), np.zeros((0, 2)), [[1.0, 2.0]])
    assert np.array_equal(out, np.zeros((1, 2)))


def test_reference_gqa_head_mapping_and_causal_prefill():
    # H = 2 query heads share K = 1 kv head. Two queries (q_lens = 2) at positions 0 and 1 of 2 tokens:
    # the first sees only key 0, so its output is value 0 exactly, for both heads.
    k = np.array([[[[1.0]]], [[[2.0]]]], np.float32)  # [P=2, S=1, K=1, D=1]
    v = np.array([[[[5.0]]], [[[7.0]]]], np.float32)
    q = np.ones((2, 2, 1), np.float32)
    out = paged_attention_reference(
        q,
        k,
        v,
        np.array([2], np.int32),
        np.array([[0, 1]], np.int32),
        q_lens=np.array([2], np.int32),
        scale=1.0,
    )
    assert np.array_equal(out[0], [[5.0], [5.0]])
    w = math.exp(2) / (math.exp(1) + math.exp(2))
    np.testing.assert_allclose(out[1], [[5 * (1 - w) + 7 * w]] * 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Building cases.


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


TUNABLES = ("q_tile", "block_pages", "num_splits")


def check(q, kp, vp, lens, bt, **kw):
    kw.setdefault("impl", "xla")  # this file tests the XLA path; the native one is in test_cpu_native.py
    expected = paged_attention_reference(
        q, kp, vp, lens, bt, **{k: v for k, v in kw.items() if k not in TUNABLES}
    )
    args = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    out = paged_attention(
        jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(lens), jnp.asarray(bt), **args
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, expected, q.dtype)
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------------------
# The XLA path against the reference: one axis at a time around a base case.


@SOME
@given(seed=st.integers(0, 2**31), lens=lens_strategy())
def test_base_case_ragged_lengths(seed, lens):
    check(*make_cache(seed, lens=lens))


@pytest.mark.parametrize("h,k", [(4, 4), (4, 2), (4, 1), (8, 2)])
@FEW
@given(seed=st.integers(0, 2**31), lens=lens_strategy())
def test_mha_gqa_mqa(h, k, seed, lens):
    check(*make_cache(seed, lens=lens, h=h, k=k))


@pytest.mark.parametrize("d", [80, 128, 256])
@FEW
@given(seed=st.integers(0, 2**31), lens=lens_strategy())
def test_head_dims(d, seed, lens):
    check(*make_cache(seed, lens=lens, d=d))


@pytest.mark.parametrize("s,max_pages,num_pages", [(1, 40, 128), (64, 2, 8)])
@FEW
@given(seed=st.integers(0, 2**31), data=st.data())
def test_page_sizes(s, max_pages, num_pages, seed, data):
    lens = data.draw(lens_strategy(s=s, max_pages=max_pages))
    check(*make_cache(seed, lens=lens, s=s, max_pages=max_pages, num_pages=num_pages))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
@FEW
@given(seed=st.integers(0, 2**31), lens=lens_strategy())
def test_low_precision_inputs(dtype, seed, lens):
    check(*make_cache(seed, lens=lens, dtype=np.dtype(dtype)))


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


@pytest.mark.parametrize("feature", sorted(FEATURES))
@FEW
@given(seed=st.integers(0, 2**31), lens=lens_strategy())
def test_logit_features(feature, seed, lens):
    check(*make_cache(seed, lens=lens), **FEATURES[feature])


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


@pytest.mark.parametrize("features", ["none", "all"])
@SOME
@given(seed=st.integers(0, 2**31), batch=mixed_batch())
def test_mixed_decode_spec_prefill(features, seed, batch):
    lens, q_lens = batch
    q_lens = np.asarray(q_lens, np.int32)
    check(*make_cache(seed, lens=lens, q_lens=q_lens), q_lens=q_lens, **FEATURES.get(features, {}))


@pytest.mark.parametrize("q_tile,block_pages,num_splits", [(1, 1, 1), (3, 2, 2), (16, 4, 1), (5, 1, 4)])
def test_tunables_do_not_change_the_result(q_tile, block_pages, num_splits):
    lens, q_lens = [40, 1, 64, 17], np.array([7, 1, 20, 17], np.int32)
    q, kp, vp, lens, bt = make_cache(3, lens=lens, q_lens=q_lens)
    check(q, kp, vp, lens, bt, q_lens=q_lens, q_tile=q_tile, block_pages=block_pages, num_splits=num_splits)


def _quantize_pages(kp, vp, mode, dtype, seed):
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


@pytest.mark.parametrize("dtype", [np.dtype(np.int8), FP8])
@pytest.mark.parametrize("mode", ["tensor", "token"])
@FEW
@given(seed=st.integers(0, 2**31), lens=lens_strategy())
def test_quantized_kv(dtype, mode, seed, lens):
    q, kp, vp, lens, bt = make_cache(seed, lens=lens)
    qk, qv, ks, vs = _quantize_pages(kp, vp, mode, dtype, seed)
    # The kernel must match the reference on the same stored values and scales.
    check(q, np.asarray(qk), np.asarray(qv), lens, bt, k_scale=np.asarray(ks), v_scale=np.asarray(vs))


# ---------------------------------------------------------------------------------------------------------
# Properties of paged storage.


@SOME
@given(seed=st.integers(0, 2**31), lens=lens_strategy(), perm_seed=st.integers(0, 2**31))
def test_permuting_pages_with_the_block_table_changes_nothing(seed, lens, perm_seed):
    q, kp, vp, lens, bt = make_cache(seed, lens=lens)
    perm = np.random.default_rng(perm_seed).permutation(kp.shape[0])  # new position of each page
    inv = np.argsort(perm)
    out = paged_attention(q, kp, vp, lens, bt)
    out_perm = paged_attention(q, kp[inv], vp[inv], lens, perm[bt].astype(np.int32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_perm))


@SOME
@given(seed=st.integers(0, 2**31), batch=mixed_batch())
def test_poisoned_unused_slots_do_not_change_the_output(seed, batch):
    lens, q_lens = batch
    q_lens = np.asarray(q_lens, np.int32)
    clean = make_cache(seed, lens=lens, q_lens=q_lens)
    dirty = make_cache(seed, lens=lens, q_lens=q_lens, poison=True)
    jitted = jax.jit(paged_attention)  # under jit the out-of-range entries are masked, not validated
    a = jitted(*clean, q_lens=q_lens)
    b = jitted(*dirty, q_lens=q_lens)
    assert np.isfinite(np.asarray(b)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_foreign_pages_cannot_reach_the_output_under_jit():
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5])
    bt_bad = bt.copy()
    bt_bad[0, 1] = 10_000  # a covered page with an id outside [0, P)
    # The XLA path masks such a page; the native CPU kernel rejects it (tests/kernels/test_cpu_native.py).
    jitted = jax.jit(lambda *a: paged_attention(*a, impl="xla"))
    other = np.random.default_rng(1).standard_normal(kp.shape).astype(np.float32)
    mine = np.zeros(kp.shape[0], bool)
    mine[bt[0, 0]] = mine[bt[1, 0]] = True
    kp2, vp2 = np.where(mine[:, None, None, None], kp, other), np.where(mine[:, None, None, None], vp, other)
    a = jitted(q, kp, vp, lens, bt_bad)
    b = jitted(q, kp2, vp2, lens, bt_bad)  # every page but the two legitimately used ones changed
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@FEW
@given(
    seed=st.integers(0, 2**31),
    prefix=st.integers(1, 3),
    tails=st.lists(st.integers(0, 16), min_size=3, max_size=3),
)
def test_shared_prefix_pages(seed, prefix, tails):
    """Three sequences alias the same prefix pages (as after PageAllocator.fork) and diverge after."""
    s = 16
    rng = np.random.default_rng(seed)
    q, kp, vp, _, _ = make_cache(seed, lens=[0, 0, 0], num_pages=16)
    shared = rng.choice(16, size=prefix + 3, replace=False)
    bt = np.zeros((3, 4), np.int32)
    lens = np.zeros(3, np.int32)
    for i in range(3):
        bt[i, :prefix] = shared[:prefix]
        lens[i] = prefix * s + tails[i]
        if tails[i]:
            bt[i, prefix] = shared[prefix + i]
    check(q, kp, vp, lens, bt)


# ---------------------------------------------------------------------------------------------------------
# Every backend, the cost counter, and bad input.


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
        return paged_attention(q, kp, vp, lens, bt, q_lens=ql)

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
        return paged_attention(q, kp, vp, lens, bt, block_pages=mp, num_splits=1, impl="xla")

    cmp = compare_with_xla(cost, fn, q, kp, vp, lens, bt)
    # One loop trip, counted once. XLA's dots equal ours; it also counts elementwise work that the analytic
    # count leaves out: zeroing masked values (D / G per score) and the mask selects, about 8% here.
    assert cmp.flops_ratio == pytest.approx(1.0, rel=5 * COST_FLOPS_RTOL)
    assert cmp.transcendentals_ratio == pytest.approx(1.0, rel=0.1)
    kv = 2 * b * mp * s * k * d * 4
    assert cost.bytes_read == kv + b * h * d * 4


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"][:, :3]), "num_q_heads=3 must be a multiple of num_kv_heads=2"),
        (lambda a: a.update(q=a["q"][:2]), "T=2 != B=3"),
        (lambda a: a.update(v_pages=a["v_pages"][:, :8]), "v_pages.shape"),
        (lambda a: a.update(q=a["q"].astype(np.float64)), "q.dtype=float64"),
        (lambda a: a.update(k_pages=a["k_pages"].astype(np.float16)), "k_pages.dtype=float16 must equal"),
        (lambda a: a.update(k_pages=a["k_pages"].astype(np.int8)), "needs k_scale"),
        (lambda a: a.update(kv_lens=np.array([5, 65, 1], np.int32)), r"kv_lens\[1\]=65 exceeds"),
        (lambda a: a.update(kv_lens=np.array([5, -1, 1], np.int32)), "kv_lens must be >= 0"),
        (lambda a: a["block_tables"].__setitem__((2, 0), 99), r"block_tables\[2, 0\]=99 is not a page id"),
        (lambda a: a["block_tables"].__setitem__((0, 0), -1), r"block_tables\[0, 0\]=-1"),
        (lambda a: a.update(q_lens=np.array([1, 1, 2], np.int32)), r"q_lens\[2\]=2 exceeds kv_lens\[2\]=1"),
        (lambda a: a.update(q_lens=np.array([2, 1, 1], np.int32)), r"sum\(q_lens\)=4 must equal"),
        (lambda a: a.update(alibi_slopes=np.ones(3, np.float32)), "alibi_slopes.shape"),
        (lambda a: a.update(sliding_window=0), "sliding_window=0"),
        (lambda a: a.update(soft_cap=-1.0), "soft_cap=-1.0"),
        (lambda a: a.update(impl="cuda"), "impl='cuda'"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    q, kp, vp, lens, bt = make_cache(0, lens=[5, 20, 1])
    args = {"q": q, "k_pages": kp, "v_pages": vp, "kv_lens": lens, "block_tables": bt}
    change(args)
    with pytest.raises(ValueError, match=match):
        paged_attention(**args)
    if "impl" not in args:
        with pytest.raises(ValueError, match=match):
            paged_attention_reference(**args)
