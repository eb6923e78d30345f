"""write_kv, copy_pages and PageAllocator, alone and driving paged_attention end to end."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from kernels import OutOfPages, PageAllocator, copy_pages, paged_attention, write_kv
from kernels.paged_attention import gather_kv
from tests.tolerances import assert_close

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
P, S, K, D = 8, 4, 2, 16


def test_write_kv_writes_slots_and_skips_minus_one():
    kp = jnp.zeros((P, S, K, D))
    vp = jnp.zeros((P, S, K, D))
    k = jnp.arange(3 * K * D, dtype=jnp.float32).reshape(3, K, D)
    slots = np.array([5, -1, 31], np.int32)  # page 1 offset 1; skipped; page 7 offset 3
    kp2, vp2 = write_kv(kp, vp, k, -k, slots)
    assert np.array_equal(kp2[1, 1], k[0]) and np.array_equal(vp2[7, 3], -k[2])
    assert float(jnp.abs(kp2).sum()) == float(jnp.abs(k[0]).sum() + jnp.abs(k[2]).sum())


def test_write_kv_under_jit_drops_out_of_range_slots_and_donates():
    kp = jnp.zeros((P, S, K, D))
    vp = jnp.zeros((P, S, K, D))
    k = jnp.ones((3, K, D))
    f = jax.jit(write_kv, donate_argnums=(0, 1))
    kp2, vp2 = f(kp, vp, k, k, jnp.array([0, P * S, -5], jnp.int32))
    assert float(kp2.sum()) == K * D and float(vp2[0, 0].sum()) == K * D


@pytest.mark.parametrize("dtype,qmax", [(np.dtype(np.int8), 127.0), (FP8, 448.0)])
@settings(max_examples=max(5, settings.default.max_examples // 3))
@given(seed=st.integers(0, 2**31))
def test_write_kv_quantizes_per_token_within_half_a_step(dtype, qmax, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((5, K, D)) * rng.uniform(0.01, 10, size=(5, K, 1))).astype(np.float32)
    x[2, 1] = 0.0  # an all-zero vector must not divide by zero
    kp = jnp.zeros((P, S, K, D), dtype)
    scale = jnp.zeros((P, S, K), jnp.float32)
    slots = np.array([0, 3, 9, 10, 30], np.int32)
    kp2, _, ks, _ = write_kv(kp, kp, x, x, slots, k_scale=scale, v_scale=scale)
    flat_pages = np.asarray(kp2).reshape(P * S, K, D)[slots].astype(np.float32)
    flat_scale = np.asarray(ks).reshape(P * S, K)[slots]
    deq = flat_pages * flat_scale[..., None]
    amax = np.abs(x).max(-1)
    np.testing.assert_allclose(flat_scale, np.where(amax > 0, amax / qmax, 1.0), rtol=1e-6)
    if dtype == np.dtype(np.int8):
        assert (np.abs(deq - x) <= flat_scale[..., None] / 2 * (1 + 1e-5)).all()
    else:  # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 on normal values
        assert (np.abs(deq - x) <= np.abs(x) * 2**-4 + flat_scale[..., None] * 2**-9).all()


def test_write_kv_per_tensor_clips_instead_of_overflowing():
    kp = jnp.zeros((P, S, K, D), jnp.int8)
    x = jnp.full((1, K, D), 1e6)
    kp2, _ = write_kv(kp, kp, x, -x, np.array([0], np.int32), k_scale=0.1, v_scale=0.1)
    assert int(kp2[0, 0].min()) == 127


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"k": np.zeros((2, K + 1, D), np.float32)}, "k.shape"),
        ({"k_pages": np.zeros((P, S, K * D), np.float32)}, r"k_pages must be \[P, S, K, D\]"),
        ({"slot_mapping": np.array([0, P * S], np.int32)}, r"slot_mapping\[1\]=32"),
        ({"slot_mapping": np.array([0, -2], np.int32)}, r"slot_mapping\[1\]=-2"),
        ({"slot_mapping": np.array([0.0, 1.7], np.float32)}, "slot_mapping.dtype=float32 must be an integer"),
        ({"slot_mapping": [0, 1.7]}, "slot_mapping.dtype=float64 must be an integer"),
        (
            {"k_pages": np.zeros((P, S, K, D), np.int8), "v_pages": np.zeros((P, S, K, D), np.int8)},
            "needs k_scale",
        ),
        ({"k_scale": 1.0}, "k_scale is only for"),
        ({"k": np.zeros((2, K, D), np.float64)}, "k.dtype=float64 must be one of float32, bfloat16, float16"),
        (
            {"v": np.zeros((2, K, D), ml_dtypes.bfloat16)},
            "v.dtype=bfloat16 must equal the pages' dtype float32",
        ),
    ],
)
def test_write_kv_bad_input(kw, match):
    args = {
        "k_pages": np.zeros((P, S, K, D), np.float32),
        "v_pages": np.zeros((P, S, K, D), np.float32),
        "k": np.zeros((2, K, D), np.float32),
        "v": np.zeros((2, K, D), np.float32),
        "slot_mapping": np.array([0, 1], np.int32),
    }
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        write_kv(**args)


def test_copy_pages():
    kp = jnp.arange(P, dtype=jnp.float32)[:, None, None, None] * jnp.ones((P, S, K, D))
    kp2, vp2 = copy_pages(kp, kp, np.array([1, 2]), np.array([5, 6]))
    assert float(kp2[5, 0, 0, 0]) == 1.0 and float(vp2[6, 3, 1, 2]) == 2.0 and float(kp2[1, 0, 0, 0]) == 1.0


# ---------------------------------------------------------------------------------------------------------
# The allocator.


def test_allocator_basics_and_errors():
    alloc = PageAllocator(4, 4)
    a = alloc.add()
    assert alloc.append(a, 6).tolist() == [0, 1, 2, 3, 4, 5]  # pages 0 and 1
    b = alloc.fork(a)
    assert alloc.ref_count(0) == 2 and alloc.ref_count(1) == 2
    slots = alloc.append(b, 1)  # b's last page (1) is shared and partly filled: copy-on-write to page 2
    assert slots.tolist() == [2 * 4 + 2]
    assert alloc.pages(b) == [0, 2] and alloc.ref_count(1) == 1
    src, dst = alloc.pop_copies()
    assert src.tolist() == [1] and dst.tolist() == [2]
    assert alloc.pop_copies()[0].size == 0
    with pytest.raises(OutOfPages, match="needs 2 more page"):
        alloc.append(a, 7)  # page 1 has 2 free slots, then 2 new pages; only 1 is free
    assert alloc.length(a) == 6  # unchanged by the failed request
    alloc.free(a)
    with pytest.raises(KeyError, match="already freed"):
        alloc.free(a)
    with pytest.raises(KeyError, match="unknown sequence 99"):
        alloc.append(99)
    assert alloc.block_tables([b]).tolist() == [[0, 2]]
    assert alloc.kv_lens([b]).tolist() == [7]
    alloc.free(b)
    assert alloc.num_free_pages == 4
    alloc.check()
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(0, 4)


class AllocatorMachine(RuleBasedStateMachine):
    """Random add / append / fork / free against a model that tracks every sequence's tokens.

    Each appended token gets a unique id written to a simulated cache (slot -> id), after applying the
    allocator's copy-on-write copies; every sequence must read back exactly its tokens through its pages.
    """

    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(12, 3)
        self.cache = np.full(12 * 3, -1, np.int64)
        self.tokens: dict[int, list[int]] = {}
        self.next_token = 0

    @rule(target=seqs)
    def add(self):
        seq = self.alloc.add()
        self.tokens[seq] = []
        return seq

    @precondition(lambda self: self.tokens)
    @rule(seq=seqs, n=st.integers(0, 7))
    def append(self, seq, n):
        if seq not in self.tokens:
            return
        free_before = self.alloc.num_free_pages
        try:
            slots = self.alloc.append(seq, n)
        except OutOfPages:
            assert self.alloc.num_free_pages == free_before
            return
        src, dst = self.alloc.pop_copies()
        for a, b in zip(src, dst, strict=True):
            self.cache[b * 3 : b * 3 + 3] = self.cache[a * 3 : a * 3 + 3]
        for slot in slots:
            self.cache[slot] = self.next_token
            self.tokens[seq].append(self.next_token)
            self.next_token += 1

    @rule(target=seqs, seq=seqs)
    def fork(self, seq):
        if seq not in self.tokens:
            return seq
        child = self.alloc.fork(seq)
        self.tokens[child] = list(self.tokens[seq])
        return child

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq not in self.tokens:
            with pytest.raises(KeyError):
                self.alloc.free(seq)
            return
        self.alloc.free(seq)
        del self.tokens[seq]

    @invariant()
    def consistent(self):
        self.alloc.check()
        live = list(self.tokens)
        if not live:
            assert self.alloc.num_free_pages == 12
            return
        bt = self.alloc.block_tables(live, max_pages=12)
        lens = self.alloc.kv_lens(live)
        pages = self.cache.reshape(12, 3, 1, 1)
        for i, seq in enumerate(live):
            assert gather_kv(pages, bt[i], lens[i]).ravel().tolist() == self.tokens[seq]


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=max(10, settings.default.max_examples), deadline=None, stateful_step_count=30
)


def test_end_to_end_serving_loop():
    """Prefill two prompts, fork one (shared prefix), decode a few steps, and compare with dense attention
    over each sequence's own tokens."""
    rng = np.random.default_rng(0)
    h, num_pages, s = 4, 16, 4
    alloc = PageAllocator(num_pages, s)
    kp = jnp.zeros((num_pages, s, K, D))
    vp = jnp.zeros((num_pages, s, K, D))
    history: dict[int, tuple[list, list]] = {}
    write = jax.jit(write_kv, donate_argnums=(0, 1))

    def add_tokens(seq, n):
        nonlocal kp, vp
        slots = alloc.append(seq, n)
        src, dst = alloc.pop_copies()
        if src.size:
            kp, vp = copy_pages(kp, vp, src, dst)
        k = rng.standard_normal((n, K, D)).astype(np.float32)
        v = rng.standard_normal((n, K, D)).astype(np.float32)
        kp, vp = write(kp, vp, k, v, slots)
        history[seq][0].extend(k)
        history[seq][1].extend(v)

    a, b = alloc.add(), alloc.add()
    history[a], history[b] = ([], []), ([], [])
    add_tokens(a, 6)
    add_tokens(b, 3)
    c = alloc.fork(a)
    history[c] = (list(history[a][0]), list(history[a][1]))
    for _ in range(3):
        seqs = [a, b, c]
        for seq in seqs:
            add_tokens(seq, 1)
        q = rng.standard_normal((3, h, D)).astype(np.float32)
        out = paged_attention(q, kp, vp, alloc.kv_lens(seqs), alloc.block_tables(seqs, max_pages=4))
        for i, seq in enumerate(seqs):
            keys = np.stack(history[seq][0]).astype(np.float64)  # [n, K, D]
            values = np.stack(history[seq][1]).astype(np.float64)
            kh = np.arange(h) // (h // K)
            logits = np.einsum("hd,nhd->hn", q[i], keys[:, kh]) / np.sqrt(D)
            w = np.exp(logits - logits.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            assert_close(out[i], np.einsum("hn,nhd->hd", w, values[:, kh]), np.float32)
    alloc.free(a)
    alloc.free(b)
    alloc.free(c)
    alloc.check()
    assert alloc.num_free_pages == num_pages
