"""The CPU-native paged decode kernel (kernels/cpu, through XLA's FFI) beyond the shared suite: its scalar
fallback against its SIMD path, handler errors for bad page ids and lengths, poisoned slots and unsupported
inputs. Needs the built library; skipped with the reason otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import cpu, paged_attention, paged_attention_reference
from tests.kernels.paged_attention.cases import FEATURES, lens_strategy, make_cache
from tests.tolerances import assert_close

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))
needs_lib = pytest.mark.skipif(not cpu.available(), reason=f"CPU-native library not available: {cpu.load()}")


def _lowered_text(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def check_decode(q, kp, vp, lens, bt, *, simd=True, **kw):
    expected = paged_attention_reference(q, kp, vp, lens, bt, **kw)
    if simd:
        out = paged_attention(*(jnp.asarray(a) for a in (q, kp, vp, lens, bt)), impl="cpu_native", **kw)
    else:
        slopes = kw.get("alibi_slopes")
        out = cpu.paged_decode_native(
            *(jnp.asarray(a) for a in (q, kp, vp, lens, bt)),
            None if slopes is None else jnp.asarray(slopes),
            scale=kw.get("scale") or 1.0 / np.sqrt(q.shape[-1]),
            soft_cap=kw.get("soft_cap"),
            sliding_window=kw.get("sliding_window"),
            simd=False,
        )
    assert out.dtype == q.dtype and out.shape == q.shape
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, expected, q.dtype)


@needs_lib
@pytest.mark.parametrize("simd", [True, False])
@FEW
@given(seed=st.integers(0, 2**31), lens=lens_strategy())
def test_decode_poisoned_unused_slots(simd, seed, lens):
    check_decode(*make_cache(seed, lens=lens, poison=True), simd=simd)


@needs_lib
@pytest.mark.parametrize("feature", sorted(FEATURES))
@FEW
@given(seed=st.integers(0, 2**31), lens=lens_strategy())
def test_decode_logit_features(feature, seed, lens):
    check_decode(*make_cache(seed, lens=lens, poison=True), **FEATURES[feature])


@needs_lib
@pytest.mark.parametrize(
    "shape",
    [
        {"h": 4, "k": 4},
        {"h": 4, "k": 1},
        {"h": 8, "k": 2, "d": 128},
        {"h": 4, "k": 2, "d": 80},  # not a multiple of 16: the scalar path
        {"s": 1, "max_pages": 40, "num_pages": 128},
        {"s": 64, "max_pages": 2, "num_pages": 8},
        {"s": 8, "max_pages": 64, "num_pages": 200},  # long enough to split the context
    ],
    ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()),
)
@FEW
@given(seed=st.integers(0, 2**31), data=st.data())
def test_decode_shapes(shape, seed, data):
    s, mp = shape.get("s", 16), shape.get("max_pages", 4)
    lens = data.draw(lens_strategy(s=s, max_pages=mp))
    kw = dict(FEATURES.get(data.draw(st.sampled_from(["none", "all"])), {}))
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = np.geomspace(0.5, 0.01, shape.get("h", 4)).astype(np.float32)
    check_decode(*make_cache(seed, lens=lens, poison=True, **shape), **kw)


@needs_lib
@given(seed=st.integers(0, 2**31), lens=lens_strategy())
@FEW
def test_decode_permuting_pages_with_the_table_changes_nothing(seed, lens):
    q, kp, vp, lens, bt = make_cache(seed, lens=lens)
    perm = np.random.default_rng(seed).permutation(kp.shape[0])
    inv = np.argsort(perm)
    fn = jax.jit(lambda *a: paged_attention(*a, impl="cpu_native"))
    a = fn(q, kp, vp, lens, bt)
    b = fn(q, kp[perm], vp[perm], lens, inv[bt].astype(np.int32))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_lib
@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda a: a["block_tables"].__setitem__((0, 1), 10_000),
            r"block_tables\[0, 1\]=10000 is not a page id",
        ),
        (lambda a: a["block_tables"].__setitem__((1, 0), -3), r"block_tables\[1, 0\]=-3 is not a page id"),
        (lambda a: a.update(kv_lens=np.array([20, 65, 1], np.int32)), r"kv_lens\[1\]=65 is outside \[0, "),
        (lambda a: a.update(kv_lens=np.array([20, -1, 1], np.int32)), r"kv_lens\[1\]=-1 is outside"),
    ],
)
def test_decode_handler_errors_surface_as_exceptions(change, match):
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 1])
    args = {"q": q, "k_pages": kp, "v_pages": vp, "kv_lens": lens, "block_tables": bt}
    change(args)
    fn = jax.jit(lambda **a: paged_attention(**a, impl="cpu_native"))  # under jit: no Python value checks
    with pytest.raises(Exception, match=match):
        fn(**args).block_until_ready()


@needs_lib
def test_decode_ignores_table_entries_past_a_sequence():
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 0], poison=True)  # entries past the end out of range
    out = jax.jit(lambda *a: paged_attention(*a, impl="cpu_native"))(q, kp, vp, lens, bt)
    assert_close(out, paged_attention_reference(q, kp, vp, lens, bt), np.float32)
    assert not np.asarray(out[2]).any()  # the empty sequence is zeros


@needs_lib
def test_decode_unsupported_inputs_name_the_reason():
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 1])
    with pytest.raises(ValueError, match="decode-only"):
        paged_attention(q, kp, vp, lens, bt, q_lens=np.array([1, 1, 1], np.int32), impl="cpu_native")
    q16, kp16, vp16 = (a.astype(np.float16) for a in (q, kp, vp))
    with pytest.raises(ValueError, match=r"q.dtype=float16"):
        paged_attention(q16, kp16, vp16, lens, bt, impl="cpu_native")
    # "auto" keeps them on XLA.
    text = _lowered_text(lambda *a: paged_attention(*a), q16, kp16, vp16, lens, bt)
    assert "tokenlab_paged_decode" not in text
