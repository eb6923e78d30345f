"""CPU-native kernels (kernels/cpu/, through XLA's FFI) against the references, dispatch, fallback, errors.

Everything but the fallback tests needs the built library; without it those tests are skipped with the
reason (the XLA paths are tested in test_int4_matmul.py and test_paged_attention.py either way).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import cpu, int4_matmul, int4_matmul_reference, paged_attention, paged_attention_reference
from kernels.cpu import loader
from tests.kernels.test_int4_matmul import make_weight
from tests.kernels.test_paged_attention import FEATURES, lens_strategy, make_cache
from tests.tolerances import NATIVE_INT4_NERR, assert_close, normalized_error

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))
needs_lib = pytest.mark.skipif(
    not cpu.available(),
    reason=f"CPU-native library not available: {cpu.load()}",
)
K, N = 256, 96
INT4_VARIANTS = {
    "asym_g64": {},
    "sym": {"sym": True},
    "g32": {"group_size": 32},
    "g128": {"group_size": 128},
    "per_channel": {"group_size": -1},
    "act_order": {"act_order": True},
    "act_scales": {"act_scales": True},
    "act_order_scales_sym": {"act_order": True, "act_scales": True, "sym": True},
    "bits3": {"bits": 3},
}


def _lowered_text(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


# ---------------------------------------------------------------------------------------------------------
# INT4 matmul.


def check_int4(x, qw, **kw):
    expected = int4_matmul_reference(np.asarray(x), qw).astype(np.float64)
    out = int4_matmul(jnp.asarray(x), qw, impl="cpu_native", **kw)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert normalized_error(out, expected) <= NATIVE_INT4_NERR


@needs_lib
@pytest.mark.parametrize("variant", sorted(INT4_VARIANTS))
@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_int4_every_variant(variant, m):
    qw = make_weight(m, **INT4_VARIANTS[variant])
    x = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
    check_int4(x, qw)


@needs_lib
@pytest.mark.parametrize("m,k,n", [(1, 128, 16), (2, 256, 200), (5, 512, 64), (17, 256, 136), (64, 128, 272)])
@FEW
@given(seed=st.integers(0, 2**31), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_int4_shapes_and_values(m, k, n, seed, scale):
    """Column counts off the 16/64-wide SIMD tiles exercise the scalar tails; M spans both paths."""
    qw = make_weight(seed, k=k, n=n, group_size=32)
    x = (np.random.default_rng(seed).standard_normal((m, k)) * scale).astype(np.float32)
    check_int4(x, qw)


@needs_lib
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("asym", [True, False])
def test_int4_scalar_fallback_matches_simd(m, asym):
    rng = np.random.default_rng(m)
    k, n, g = 256, 80, 64
    packed = jnp.asarray(rng.integers(0, 256, (k // 2, n), dtype=np.uint8))
    scales = jnp.asarray(rng.uniform(0.5, 2.0, (k // g, n)).astype(np.float32))
    zeros = jnp.asarray(rng.integers(0, 16, (k // g, n), dtype=np.uint8)) if asym else None
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    outs = [
        jax.jit(
            lambda x, s=s: cpu.int4_matmul_native(x, packed, scales, zeros, group_size=g, sym_zero=8, simd=s)
        )(x)
        for s in (True, False)
    ]
    assert normalized_error(outs[1], np.asarray(outs[0], np.float64)) <= NATIVE_INT4_NERR


@needs_lib
@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_int4_low_precision_x(dtype):
    qw = make_weight(1)
    x = np.random.default_rng(2).standard_normal((4, K)).astype(dtype)
    expected = int4_matmul_reference(np.asarray(x, np.float32), qw).astype(np.float64)
    out = int4_matmul(jnp.asarray(x), qw, impl="cpu_native")
    assert out.dtype == x.dtype
    assert normalized_error(out, expected) <= 1e-2


@needs_lib
def test_int4_grad_and_vmap_through_native():
    qw = make_weight(3, act_order=True)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((5, K)).astype(np.float32))
    dy = rng.standard_normal((5, N)).astype(np.float32)
    for impl in ("auto", "cpu_native"):
        dx = jax.grad(lambda x, impl=impl: jnp.sum(int4_matmul(x, qw, impl=impl) * dy))(x)
        assert normalized_error(dx, dy.astype(np.float64) @ np.asarray(qw.dequantize(), np.float64).T) <= 1e-5
    ws = [make_weight(s) for s in (5, 6)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ws)
    xs = jnp.asarray(rng.standard_normal((2, 3, K)).astype(np.float32))
    out = jax.vmap(lambda x, w: int4_matmul(x, w, impl="cpu_native"))(xs, stacked)
    for i, w in enumerate(ws):
        expected = int4_matmul_reference(np.asarray(xs[i]), w).astype(np.float64)
        assert normalized_error(out[i], expected) <= NATIVE_INT4_NERR


@needs_lib
def test_int4_unsupported_weight_and_bad_shapes():
    qw8 = make_weight(0, bits=8)
    x = jnp.ones((1, K), jnp.float32)
    with pytest.raises(ValueError, match="bits=8"):
        int4_matmul(x, qw8, impl="cpu_native")
    # "auto" quietly keeps such weights on XLA.
    assert "tokenlab_int4_matmul" not in _lowered_text(lambda x: int4_matmul(x, qw8), x)
    # The handler checks its operands itself and names them.
    bad = jax.jit(
        lambda x: cpu.int4_matmul_native(
            x, jnp.zeros((10, 16), jnp.uint8), jnp.ones((2, 16), jnp.float32), None, group_size=8, sym_zero=8
        )
    )
    with pytest.raises(Exception, match=r"tokenlab_int4_matmul: packed has 10 rows; expected K/2 = 8"):
        bad(jnp.ones((1, 16), jnp.float32)).block_until_ready()


# ---------------------------------------------------------------------------------------------------------
# Paged decode.


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


# ---------------------------------------------------------------------------------------------------------
# Dispatch, export and the fallback.


@needs_lib
def test_auto_picks_native_on_cpu_and_xla_forces_portable():
    qw = make_weight(0)
    x = jnp.ones((2, K), jnp.float32)
    assert "tokenlab_int4_matmul" in _lowered_text(lambda x: int4_matmul(x, qw), x)
    assert "tokenlab_int4_matmul" not in _lowered_text(lambda x: int4_matmul(x, qw, impl="xla"), x)
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 1])
    assert "tokenlab_paged_decode" in _lowered_text(lambda *a: paged_attention(*a), q, kp, vp, lens, bt)
    xla_text = _lowered_text(lambda *a: paged_attention(*a, impl="xla"), q, kp, vp, lens, bt)
    assert "tokenlab_paged_decode" not in xla_text


def test_auto_exports_for_other_backends():
    """The platform choice happens at lowering: cuda, rocm and tpu never see the native custom call."""
    spec = jax.ShapeDtypeStruct
    qw = make_weight(0, act_order=True, act_scales=True)
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 1])
    dec_args = [spec(a.shape, a.dtype) for a in (q, kp, vp, lens, bt)]
    for m in (1, 64):
        exp = jax.export.export(jax.jit(lambda x: int4_matmul(x, qw)), platforms=("cuda", "rocm", "tpu"))(
            spec((m, K), jnp.float32)
        )
        assert "tokenlab" not in exp.mlir_module()
    exp = jax.export.export(
        jax.jit(lambda *a: paged_attention(*a, soft_cap=2.0, sliding_window=8)),
        platforms=("cuda", "rocm", "tpu"),
    )(*dec_args)
    assert "tokenlab" not in exp.mlir_module()


@needs_lib
def test_auto_exports_for_all_four_with_the_custom_call_allowed():
    spec = jax.ShapeDtypeStruct
    qw = make_weight(0)
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in cpu.TARGETS]
    exp = jax.export.export(
        jax.jit(lambda x: int4_matmul(x, qw)),
        platforms=("cpu", "cuda", "rocm", "tpu"),
        disabled_checks=checks,
    )(spec((1, K), jnp.float32))
    assert "tokenlab_int4_matmul" in exp.mlir_module()


@pytest.fixture
def no_library(monkeypatch):
    """Simulate a build without the library: the loader finds nothing (registration already done stays)."""
    monkeypatch.setattr(loader, "library_path", lambda: None)
    loader.load.cache_clear()
    yield
    monkeypatch.undo()
    loader.load.cache_clear()


def test_fallback_when_the_library_is_absent(no_library):
    qw = make_weight(0)
    x = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="was not built"):
        assert not cpu.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only: the reason is cached
        assert not cpu.available()
        assert "tokenlab" not in _lowered_text(lambda x: int4_matmul(x, qw), x)
        q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 1])
        assert "tokenlab" not in _lowered_text(lambda *a: paged_attention(*a), q, kp, vp, lens, bt)
        out = int4_matmul(jnp.asarray(x), qw)
        expected = int4_matmul_reference(x, qw).astype(np.float64)
        assert normalized_error(out, expected) <= 1e-5
        assert_close(
            paged_attention(q, kp, vp, lens, bt), paged_attention_reference(q, kp, vp, lens, bt), q.dtype
        )
    with pytest.raises(RuntimeError, match="needs the native CPU library"):
        int4_matmul(jnp.asarray(x), qw, impl="cpu_native")
    with pytest.raises(RuntimeError, match="needs the native CPU library"):
        paged_attention(q, kp, vp, lens, bt, impl="cpu_native")


def test_environment_switch_disables_the_library(monkeypatch):
    monkeypatch.setenv("TOKENLAB_CPU_NATIVE", "0")
    loader.load.cache_clear()
    try:
        assert not cpu.available()
        assert "TOKENLAB_CPU_NATIVE=0" in cpu.load()
    finally:
        monkeypatch.undo()
        loader.load.cache_clear()
