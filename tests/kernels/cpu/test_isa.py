"""The native kernels' instruction-set paths: `kernels.cpu.isa()`, TOKENLAB_CPU_ISA, every path this CPU runs
against the references, and the rule `fast_enough` states. Needs the built library (skipped with the reason
otherwise), except the checks of what happens without it."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu, int4_matmul_reference, paged_attention_reference
from kernels.cpu import loader
from quant import Int4Weight
from tests.kernels.paged_attention.cases import FEATURES, make_cache
from tests.tolerances import NATIVE_INT4_NERR, assert_close, normalized_error

needs_lib = pytest.mark.skipif(not cpu.available(), reason=f"CPU-native library not available: {cpu.load()}")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def runs(name):
    return pytest.mark.skipif(
        name not in cpu.supported_isas(),
        reason=f"this CPU does not run the {name} path ({cpu.supported_isas()})",
    )


EVERY_PATH = [pytest.param(name, marks=runs(name)) for name in cpu.ISAS]


def in_subprocess(env_isa):
    """isa(), detected_isa(), warnings of a new process with TOKENLAB_CPU_ISA=env_isa (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TOKENLAB_CPU_ISA"}
    if env_isa is not None:
        env["TOKENLAB_CPU_ISA"] = env_isa
    code = textwrap.dedent(
        """
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from kernels import cpu
            first, again = cpu.isa(), cpu.isa()
            fast = cpu.fast_enough("int4_matmul")
        print(json.dumps({"isa": first, "again": again, "detected": cpu.detected_isa(), "fast": fast,
                          "warnings": [str(w.message) for w in caught if "tokenlab" in str(w.message)]}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# isa() and TOKENLAB_CPU_ISA.


@needs_lib
def test_isa_names_the_detected_path_by_default():
    got = in_subprocess(None)
    assert got["isa"] in {"avx512", "avx2", "neon", "scalar"}
    assert got["isa"] == got["again"] == got["detected"] == cpu.supported_isas()[-1]
    assert got["warnings"] == []
    assert cpu.supported_isas()[0] == "scalar"


@needs_lib
@pytest.mark.parametrize("name", EVERY_PATH)
def test_environment_selects_each_path_this_cpu_runs(name):
    got = in_subprocess(name)
    assert got["isa"] == name and got["warnings"] == []
    assert got["fast"] == (name != "scalar")


@needs_lib
@pytest.mark.parametrize("kind", ["unknown", "not_here"])
def test_bad_environment_value_warns_once_and_uses_the_best_path(kind):
    if kind == "unknown":
        value, why = "avx1024", "is not one of"
    else:
        absent = [n for n in cpu.ISAS if n not in cpu.supported_isas()]
        value, why = absent[0], "is not a path this CPU runs"
    got = in_subprocess(value)
    assert got["isa"] == got["detected"] == cpu.supported_isas()[-1]
    assert len(got["warnings"]) == 1
    assert f"TOKENLAB_CPU_ISA={value!r} {why}" in got["warnings"][0]


@pytest.fixture
def no_library(monkeypatch):
    monkeypatch.setattr(loader, "library_path", lambda: None)
    loader.load.cache_clear()
    yield
    monkeypatch.undo()
    loader.load.cache_clear()


def test_no_isa_without_the_library(no_library):
    with pytest.warns(RuntimeWarning, match="was not built"):
        assert cpu.isa() is None
    assert cpu.detected_isa() is None
    assert cpu.supported_isas() == ()
    assert not cpu.fast_enough("paged_attention")


def test_no_isa_when_disabled(monkeypatch):
    monkeypatch.setenv("TOKENLAB_CPU_NATIVE", "0")
    loader.load.cache_clear()
    try:
        assert cpu.isa() is None
        assert not cpu.fast_enough("int4_matmul")
    finally:
        monkeypatch.undo()
        loader.load.cache_clear()


# ---------------------------------------------------------------------------------------------------------
# fast_enough: the rule impl="auto" follows.


@needs_lib
@pytest.mark.parametrize("op", cpu.NATIVE_OPS)
def test_fast_enough_is_the_vector_paths_only(op):
    assert cpu.fast_enough(op) == (cpu.isa() in {"avx512", "avx2", "neon"})
    with pytest.raises(ValueError, match=r"op='rmsnorm' must be one of int4_matmul, paged_attention, moe_"):
        cpu.fast_enough("rmsnorm")


# ---------------------------------------------------------------------------------------------------------
# Every path against the references.


def _int4_operands(seed, m, k, n, g, asym):
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (k // 2, n), dtype=np.uint8)
    scales = rng.uniform(0.5, 2.0, (k // g, n)).astype(np.float32)
    zeros = rng.integers(0, 16, (k // g, n), dtype=np.uint8) if asym else None
    x = rng.standard_normal((m, k)).astype(np.float32)
    return x, packed, scales, zeros


@needs_lib
@pytest.mark.parametrize("name", EVERY_PATH)
@pytest.mark.parametrize(
    "m,k,n,g,asym",
    [
        (1, 256, 96, 64, True),
        (1, 128, 200, 128, False),  # N off every vector width: tails
        (3, 256, 40, 32, True),
        (4, 512, 136, 64, False),
        (16, 256, 272, 64, True),  # the tiled path, with a tile tail
        (23, 128, 64, 32, False),
    ],
)
def test_int4_every_path_matches_the_reference(name, m, k, n, g, asym):
    x, packed, scales, zeros = _int4_operands(m * n + k, m, k, n, g, asym)
    zeros_for_ref = zeros if asym else np.full((k // g, n), 8, np.uint8)
    weight = Int4Weight(jnp.asarray(packed), jnp.asarray(scales), jnp.asarray(zeros_for_ref), group_size=g)
    expected = int4_matmul_reference(x, weight).astype(np.float64)
    out = jax.jit(
        lambda x: cpu.int4_matmul_native(
            x,
            jnp.asarray(packed),
            jnp.asarray(scales),
            None if zeros is None else jnp.asarray(zeros),
            group_size=g,
            sym_zero=8,
            isa=name,
        )
    )(jnp.asarray(x))
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert normalized_error(out, expected) <= NATIVE_INT4_NERR


@needs_lib
@pytest.mark.parametrize("name", EVERY_PATH)
@pytest.mark.parametrize(
    "shape",
    [
        {"h": 4, "k": 2, "d": 64},
        {"h": 8, "k": 2, "d": 128},
        {"h": 4, "k": 4, "d": 80},  # a multiple of 8 and of 4, not of 16
        {"h": 4, "k": 1, "d": 36},  # a multiple of 4 only
        {"h": 4, "k": 2, "d": 64, "s": 8, "max_pages": 64, "num_pages": 200},  # split contexts
    ],
    ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()),
)
@pytest.mark.parametrize("feature", ["none", "all"])
def test_decode_every_path_matches_the_reference(name, shape, feature):
    s, mp = shape.get("s", 16), shape.get("max_pages", 4)
    lens = [mp * s, 1, s + 3, 0] if mp * s > s + 3 else [mp * s, 1, 0]
    q, kp, vp, lens, bt = make_cache(len(lens) + shape["d"], lens=lens, poison=True, **shape)
    kw = dict(FEATURES.get(feature, {}))
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = np.geomspace(0.5, 0.01, shape["h"]).astype(np.float32)
    expected = paged_attention_reference(q, kp, vp, lens, bt, **kw)
    slopes = kw.get("alibi_slopes")
    out = cpu.paged_decode_native(
        *(jnp.asarray(a) for a in (q, kp, vp, lens, bt)),
        None if slopes is None else jnp.asarray(slopes),
        scale=1.0 / np.sqrt(q.shape[-1]),
        soft_cap=kw.get("soft_cap"),
        sliding_window=kw.get("sliding_window"),
        isa=name,
    )
    assert out.shape == q.shape and np.isfinite(np.asarray(out)).all()
    assert_close(out, expected, np.float32)


# ---------------------------------------------------------------------------------------------------------
# The isa argument of the raw calls.


@needs_lib
def test_isa_argument_is_checked():
    x, packed, scales, zeros = (jnp.asarray(a) for a in _int4_operands(0, 1, 64, 16, 32, True))
    call = dict(group_size=32, sym_zero=8)
    with pytest.raises(ValueError, match=r"isa='avx1024' must be a path this CPU runs: one of scalar"):
        cpu.int4_matmul_native(x, packed, scales, zeros, isa="avx1024", **call)
    absent = [n for n in cpu.ISAS if n not in cpu.supported_isas()]
    if absent:
        with pytest.raises(ValueError, match=f"isa='{absent[0]}' must be a path this CPU runs"):
            cpu.int4_matmul_native(x, packed, scales, zeros, isa=absent[0], **call)
    with pytest.raises(ValueError, match=r"isa='avx2' contradicts simd=False"):
        cpu.int4_matmul_native(x, packed, scales, zeros, isa="avx2", simd=False, **call)
    a = cpu.int4_matmul_native(x, packed, scales, zeros, isa="scalar", **call)
    b = cpu.int4_matmul_native(x, packed, scales, zeros, simd=False, **call)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_lib
def test_handler_rejects_a_path_this_cpu_does_not_run():
    """The handler checks its `isa` attribute itself (a caller bypassing the Python checks gets an error)."""
    x, packed, scales, zeros = (jnp.asarray(a) for a in _int4_operands(0, 1, 64, 16, 32, True))
    call = jax.ffi.ffi_call("tokenlab_int4_matmul", jax.ShapeDtypeStruct((1, 16), jnp.float32))
    fn = jax.jit(
        lambda x: call(
            x, packed, scales, zeros, group_size=np.int64(32), sym_zero=np.int64(-1), isa=np.int64(99)
        )
    )
    with pytest.raises(Exception, match=r"tokenlab_int4_matmul: isa=99 is not an instruction-set path"):
        fn(x).block_until_ready()
