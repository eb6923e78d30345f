"""The paged attention suite every implementation faces (`kernels.available_impls("paged_attention")`).

Each test id names the implementation (`[xla-...]`, `[cpu_native-...]`, `[pallas-...]`); cases an
implementation does not serve (the native kernel is decode-only, float32) are skipped with the reason.
Properties vary one axis at a time around a base case: 3 sequences, H=4, K=2, D=64, pages of 16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from kernels import paged_attention, paged_attention_reference
from tests.kernels import suite
from tests.kernels.paged_attention.cases import (
    FEATURES,
    FP8,
    check,
    lens_strategy,
    make_cache,
    mixed_batch,
    quantize_pages,
    run,
    skip_unsupported,
)
from tests.kernels.suite import for_each_impl, property_for_each_impl
from tests.tolerances import DIRECTIONAL_GRAD_RTOL, assert_close

OP = "paged_attention"
SEED = st.integers(0, 2**31)
FEW, SOME = 6, 12


@property_for_each_impl(OP, SOME, seed=SEED, lens=lens_strategy())
def test_base_case_ragged_lengths(impl, seed, lens):
    check(impl, *make_cache(seed, lens=lens))


@pytest.mark.parametrize("h,k", [(4, 4), (4, 2), (4, 1), (8, 2)])
@property_for_each_impl(OP, FEW, seed=SEED, lens=lens_strategy())
def test_mha_gqa_mqa(impl, h, k, seed, lens):
    check(impl, *make_cache(seed, lens=lens, h=h, k=k))


@pytest.mark.parametrize("d", [80, 128, 256])
@property_for_each_impl(OP, FEW, seed=SEED, lens=lens_strategy())
def test_head_dims(impl, d, seed, lens):
    check(impl, *make_cache(seed, lens=lens, d=d))


@pytest.mark.parametrize("s,max_pages,num_pages", [(1, 40, 128), (64, 2, 8)])
@property_for_each_impl(OP, FEW, seed=SEED, data=st.data())
def test_page_sizes(impl, s, max_pages, num_pages, seed, data):
    lens = data.draw(lens_strategy(s=s, max_pages=max_pages))
    check(impl, *make_cache(seed, lens=lens, s=s, max_pages=max_pages, num_pages=num_pages))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
@property_for_each_impl(OP, FEW, seed=SEED, lens=lens_strategy())
def test_low_precision_inputs(impl, dtype, seed, lens):
    check(impl, *make_cache(seed, lens=lens, dtype=np.dtype(dtype)))


@pytest.mark.parametrize("feature", sorted(FEATURES))
@property_for_each_impl(OP, FEW, seed=SEED, lens=lens_strategy())
def test_logit_features(impl, feature, seed, lens):
    check(impl, *make_cache(seed, lens=lens), **FEATURES[feature])


@pytest.mark.parametrize("features", ["none", "all"])
@property_for_each_impl(OP, SOME, seed=SEED, batch=mixed_batch())
def test_mixed_decode_spec_prefill(impl, features, seed, batch):
    lens, q_lens = batch
    q_lens = np.asarray(q_lens, np.int32)
    check(impl, *make_cache(seed, lens=lens, q_lens=q_lens), q_lens=q_lens, **FEATURES.get(features, {}))


@pytest.mark.parametrize("dtype", [np.dtype(np.int8), FP8])
@pytest.mark.parametrize("mode", ["tensor", "token"])
@property_for_each_impl(OP, FEW, seed=SEED, lens=lens_strategy())
def test_quantized_kv(impl, dtype, mode, seed, lens):
    q, kp, vp, lens, bt = make_cache(seed, lens=lens)
    qk, qv, ks, vs = quantize_pages(kp, vp, mode, dtype, seed)
    # The kernel must match the reference on the same stored values and scales.
    check(impl, q, np.asarray(qk), np.asarray(qv), lens, bt, k_scale=np.asarray(ks), v_scale=np.asarray(vs))


@property_for_each_impl(OP, SOME, seed=SEED, lens=lens_strategy(), perm_seed=SEED)
def test_permuting_pages_with_the_block_table_changes_nothing(impl, seed, lens, perm_seed):
    q, kp, vp, lens, bt = make_cache(seed, lens=lens)
    skip_unsupported(impl, q, kp, vp)
    perm = np.random.default_rng(perm_seed).permutation(kp.shape[0])  # new position of each page
    inv = np.argsort(perm)
    out = run(impl, q, kp, vp, lens, bt)
    out_perm = run(impl, q, kp[inv], vp[inv], lens, perm[bt].astype(np.int32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_perm))


@property_for_each_impl(OP, SOME, seed=SEED, batch=mixed_batch())
def test_poisoned_unused_slots_do_not_change_the_output(impl, seed, batch):
    lens, q_lens = batch
    q_lens = np.asarray(q_lens, np.int32)
    clean = make_cache(seed, lens=lens, q_lens=q_lens)
    dirty = make_cache(seed, lens=lens, q_lens=q_lens, poison=True)
    skip_unsupported(impl, *clean[:3], q_lens)
    # Under jit the out-of-range entries past each sequence's pages are masked, not validated.
    a = run(impl, *clean, q_lens=q_lens, jit=True)
    b = run(impl, *dirty, q_lens=q_lens, jit=True)
    assert np.isfinite(np.asarray(b)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@for_each_impl(OP)
def test_foreign_pages_cannot_reach_the_output_under_jit(impl):
    if suite.eager(OP, impl):
        pytest.skip(
            "the reference runs eagerly and rejects a foreign page id (test_bad_input_names_the_argument)"
        )
    if impl == "cpu_native":
        pytest.skip("the native kernel rejects a foreign page id with an error (test_cpu_native.py)")
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5])
    skip_unsupported(impl, q, kp, vp)
    bt_bad = bt.copy()
    bt_bad[0, 1] = 10_000  # a covered page with an id outside [0, P)
    other = np.random.default_rng(1).standard_normal(kp.shape).astype(np.float32)
    mine = np.zeros(kp.shape[0], bool)
    mine[bt[0, 0]] = mine[bt[1, 0]] = True
    kp2, vp2 = np.where(mine[:, None, None, None], kp, other), np.where(mine[:, None, None, None], vp, other)
    a = run(impl, q, kp, vp, lens, bt_bad, jit=True)
    b = run(
        impl, q, kp2, vp2, lens, bt_bad, jit=True
    )  # every page but the two legitimately used ones changed
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@property_for_each_impl(
    OP,
    FEW,
    seed=SEED,
    prefix=st.integers(1, 3),
    tails=st.lists(st.integers(0, 16), min_size=3, max_size=3),
)
def test_shared_prefix_pages(impl, seed, prefix, tails):
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
    check(impl, q, kp, vp, lens, bt)


@pytest.mark.parametrize("b,q_lens", [(0, None), (0, []), (2, [0, 0])], ids=["decode_B0", "prefill_B0", "T0"])
@for_each_impl(OP)
def test_empty_batch_gives_the_empty_result(impl, b, q_lens):
    """B = 0 or T = 0 (normal in a serving loop) returns [T, H, D] zeros, eagerly and under jit."""
    _, kp, vp, _, _ = make_cache(0, lens=[0])
    q = np.zeros((0, 4, 64), np.float32)
    lens, bt = np.full(b, 5, np.int32), np.zeros((b, 4), np.int32)
    q_lens = None if q_lens is None else np.asarray(q_lens, np.int32)
    for jit in (False, True):
        out = run(impl, q, kp, vp, lens, bt, q_lens=q_lens, jit=jit)
        assert out.shape == q.shape and out.dtype == q.dtype


def window_edge_lens(q_len, window, block_k, capacity):
    """kv_lens whose first query tile puts the window's oldest key on the last key of a block of block_k
    keys, (p_first − W + 1) % block_k == block_k − 1 with p_first = kv_len − q_len (for decode:
    (kv_len − W) % block_k == block_k − 1), and one key either side of it."""
    lens = []
    for j in (1, 2):
        edge = q_len + window - 2 + j * block_k
        lens += [n for n in (edge - 1, edge, edge + 1) if q_len <= n <= capacity]
    return lens


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
# Blocks of 16 and 32 keys (pages of 8), windows shorter and longer than a block.
@pytest.mark.parametrize("window,block_pages", [(11, 2), (11, 4), (21, 2)])
@for_each_impl(OP)
def test_sliding_window_oldest_key_on_a_block_edge(impl, window, block_pages, decode):
    """A kernel that skips blocks outside the window must keep the block holding the window's oldest key when
    that key is the block's last one (a lower bound one key late loses it)."""
    s, max_pages, q_len = 8, 12, 1 if decode else 3
    block_k = block_pages * s
    lens = window_edge_lens(q_len, window, block_k, max_pages * s)
    q_lens = None if decode else np.full(len(lens), q_len, np.int32)
    q, kp, vp, lens, bt = make_cache(
        window * block_pages, lens=lens, q_lens=q_lens, h=2, k=1, d=16, s=s, max_pages=max_pages, num_pages=64
    )
    check(impl, q, kp, vp, lens, bt, q_lens=q_lens, sliding_window=window, block_pages=block_pages)


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
        (lambda a: a.update(kv_lens=a["kv_lens"][:2]), r"kv_lens.shape=\(2,\) must be \(B=3,\)"),
        (
            lambda a: a.update(block_tables=a["block_tables"][:2]),
            r"block_tables.shape=\(2, 4\) must be \[B=3",
        ),
        (lambda a: a["block_tables"].__setitem__((2, 0), 99), r"block_tables\[2, 0\]=99 is not a page id"),
        (lambda a: a["block_tables"].__setitem__((0, 0), -1), r"block_tables\[0, 0\]=-1"),
        (lambda a: a.update(q_lens=np.array([1, 1, 2], np.int32)), r"q_lens\[2\]=2 exceeds kv_lens\[2\]=1"),
        (lambda a: a.update(q_lens=np.array([2, 1, 1], np.int32)), r"sum\(q_lens\)=4 must equal"),
        (lambda a: a.update(alibi_slopes=np.ones(3, np.float32)), "alibi_slopes.shape"),
        (lambda a: a.update(sliding_window=0), "sliding_window=0"),
        (lambda a: a.update(soft_cap=-1.0), "soft_cap=-1.0"),
    ],
)
@for_each_impl(OP)
def test_bad_input_names_the_argument(impl, change, match):
    q, kp, vp, lens, bt = make_cache(0, lens=[5, 20, 1])
    args = {"q": q, "k_pages": kp, "v_pages": vp, "kv_lens": lens, "block_tables": bt}
    change(args)
    with pytest.raises(ValueError, match=match):
        paged_attention(**args, impl=impl)
    with pytest.raises(ValueError, match=match):
        paged_attention_reference(**args)


def test_unknown_impl_lists_the_valid_ones():
    q, kp, vp, lens, bt = make_cache(0, lens=[5, 20, 1])
    with pytest.raises(ValueError, match=r"impl='cuda' is not an implementation of paged_attention.*'xla'"):
        paged_attention(q, kp, vp, lens, bt, impl="cuda")


def test_reference_impl_refuses_tracing():
    q, kp, vp, lens, bt = make_cache(0, lens=[5, 20, 1])
    with pytest.raises(ValueError, match="impl='reference' runs the NumPy reference"):
        jax.jit(lambda q: paged_attention(q, kp, vp, lens, bt, impl="reference"))(q)


@pytest.mark.parametrize("where", ["q", "used_key", "used_value", "unused_slot"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
@for_each_impl(OP)
def test_non_finite_inputs_reach_exactly_the_outputs_they_feed(impl, where, value):
    """As in the reference: a NaN/Inf in q or in a used key/value reaches the outputs it feeds (and only
    those); one in a slot past kv_len reaches nothing."""
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 0])
    skip_unsupported(impl, q, kp, vp)
    q, kp, vp = q.copy(), kp.copy(), vp.copy()
    if where == "q":
        q[1, 0, 0] = value  # sequence 1, head 0
    elif where == "used_key":
        kp[bt[0, 1], 2, 1, 0] = value  # sequence 0's token 18, kv head 1
    elif where == "used_value":
        vp[bt[0, 0], 3, 0, 5] = value  # sequence 0's token 3, kv head 0
    else:
        kp[bt[1, 0], 7, :, :] = value  # past sequence 1's 5 tokens
        vp[bt[1, 0], 7, :, :] = value
    expected = paged_attention_reference(q, kp, vp, lens, bt)
    out = np.asarray(run(impl, q, kp, vp, lens, bt, jit=True), np.float64)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(out), finite)
    assert_close(out[finite], expected[finite], np.float32)


GRAD_CASES = {
    # name: (lens, q_lens, options)
    "decode": ([20, 5, 0], None, {}),
    "decode_window_alibi_cap": ([37, 3, 16], None, {**FEATURES["all"], "sliding_window": 5}),
    "prefill_all_features": ([20, 9, 0], [6, 2, 0], FEATURES["all"]),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
@for_each_impl(OP)
def test_grad_matches_finite_differences_of_the_reference(impl, case):
    """jax.grad with respect to q, k_pages, v_pages (and the ALiBi slopes): directional derivatives against
    central differences of the float64 reference; unused slots get exactly zero gradient, even when they
    hold NaN."""
    if suite.eager(OP, impl):
        pytest.skip("the reference runs eagerly: it cannot be differentiated")
    lens, q_lens, options = GRAD_CASES[case]
    q_lens = None if q_lens is None else np.asarray(q_lens, np.int32)
    q, kp, vp, lens, bt = make_cache(3, lens=lens, q_lens=q_lens, d=16, s=8, num_pages=12, max_pages=5,
                                     poison=True)  # fmt: skip
    skip_unsupported(impl, q, kp, vp, q_lens)
    rng = np.random.default_rng(4)
    cot = rng.standard_normal(q.shape).astype(np.float32)
    slopes = options.get("alibi_slopes")
    rest = {k: v for k, v in options.items() if k != "alibi_slopes"}

    def loss(q, kp, vp, slopes):
        out = paged_attention(q, kp, vp, lens, bt, q_lens=q_lens, alibi_slopes=slopes, impl=impl, **rest)
        return jnp.sum(out * cot)

    argnums = (0, 1, 2) if slopes is None else (0, 1, 2, 3)
    grads = jax.grad(loss, argnums=argnums)(q, kp, vp, slopes)
    clean = [np.where(np.isfinite(a), a, 0.0) for a in (q, kp, vp)]
    used = np.isfinite(kp)  # make_cache poisons exactly the slots no sequence covers
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    assert not np.asarray(grads[1])[~used].any() and not np.asarray(grads[2])[~used].any()

    def ref_loss(q, kp, vp, slopes):
        out = paged_attention_reference(q, kp, vp, lens, bt, q_lens=q_lens, alibi_slopes=slopes, **rest)
        return float(np.sum(out * cot))

    args = [a.astype(np.float64) for a in clean] + [None if slopes is None else slopes.astype(np.float64)]
    eps = 1e-6
    for i, g in zip(argnums, grads, strict=True):
        v = rng.standard_normal(args[i].shape)
        plus, minus = list(args), list(args)
        plus[i], minus[i] = args[i] + eps * v, args[i] - eps * v
        fd = (ref_loss(*plus) - ref_loss(*minus)) / (2 * eps)
        assert float(np.sum(np.asarray(g, np.float64) * v)) == pytest.approx(fd, rel=DIRECTIONAL_GRAD_RTOL), i
