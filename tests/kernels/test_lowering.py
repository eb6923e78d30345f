"""kernels.lowering.per_platform_kernel: a primitive with one lowering per platform, checked from the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.lowering import per_platform_kernel

# x + 1 on cpu, x + 2 on cuda (constants that show in the lowered text), nothing for rocm and tpu.
plus = per_platform_kernel(
    "tokenlab_test_lowering_plus",
    {"cpu": lambda x, *, k=0: x + 1 + k, "cuda": lambda x, *, k=0: x + 2 + k},
    kernel="the test kernel",
)
# A pytree in, a pytree out, a static parameter; sequential under vmap on cpu.
pair = per_platform_kernel(
    "tokenlab_test_lowering_pair",
    {
        "cpu": lambda xy, *, scale: {"sum": (xy[0] + xy[1]) * scale, "x": xy[0]},
        "cuda": lambda xy, *, scale: {"sum": (xy[0] + xy[1]) * scale, "x": xy[0]},
    },
    kernel="the pair kernel",
    runs_on="cpu (interpreted) and cuda",
    advice=None,
    map_sequentially=("cpu",),
)
# Its cuda lowering disagrees with the abstract eval (the cpu lowering's shapes).
wrong = per_platform_kernel(
    "tokenlab_test_lowering_wrong",
    {"cpu": lambda x: x, "cuda": lambda x: x.astype(jnp.float16)},
    kernel="the wrong kernel",
)

X = np.arange(6, dtype=np.float32).reshape(2, 3)


def _text(f, *args, platforms):
    return jax.jit(f).trace(*args).lower(lowering_platforms=platforms).as_text()


def test_eager_and_jit_run_the_cpu_lowering():
    np.testing.assert_array_equal(plus(jnp.asarray(X)), X + 1)
    np.testing.assert_array_equal(jax.jit(plus)(X), X + 1)
    np.testing.assert_array_equal(jax.jit(lambda x: plus(x, k=10))(X), X + 11)


def test_vmap_maps_the_lowerings():
    np.testing.assert_array_equal(jax.vmap(plus)(X), X + 1)
    np.testing.assert_array_equal(jax.jit(jax.vmap(jax.vmap(plus), in_axes=1))(X), (X + 1).T)
    text = _text(jax.vmap(plus, in_axes=1), X, platforms=("cuda",))
    assert "2.000000e+00" in text


def test_pytrees_static_params_and_sequential_vmap():
    x, y = jnp.asarray(X), jnp.asarray(X[::-1])
    out = pair((x, y), scale=2.0)
    assert set(out) == {"sum", "x"}
    np.testing.assert_array_equal(out["sum"], (X + X[::-1]) * 2)
    # y unmapped: closed over by the sequential map on cpu, vmapped on cuda.
    out = jax.jit(jax.vmap(lambda x: pair((x, y[0]), scale=3.0)))(x)
    np.testing.assert_array_equal(out["sum"], (X + X[::-1][0]) * 3)
    np.testing.assert_array_equal(out["x"], X)
    assert "stablehlo.while" in _text(jax.vmap(lambda x: pair((x, y[0]), scale=3.0)), x, platforms=("cpu",))
    assert "stablehlo.while" not in _text(
        jax.vmap(lambda x: pair((x, y[0]), scale=3.0)), x, platforms=("cuda",)
    )


def test_lowers_each_platform_with_its_own_rule():
    cpu, cuda = _text(plus, X, platforms=("cpu",)), _text(plus, X, platforms=("cuda",))
    assert "1.000000e+00" in cpu and "2.000000e+00" not in cpu
    assert "2.000000e+00" in cuda and "1.000000e+00" not in cuda


def test_a_platform_without_a_lowering_alone_is_a_clear_error():
    with pytest.raises(ValueError, match=r"the test kernel runs on cpu and cuda, not tpu; use impl='auto'"):
        _text(plus, X, platforms=("tpu",))
    with pytest.raises(ValueError, match=r"^the pair kernel runs on cpu \(interpreted\) and cuda, not rocm$"):
        _text(lambda x: pair((x, x), scale=1.0), X, platforms=("rocm",))


def test_exports_for_every_platform_inside_a_platform_dependent():
    def f(x):
        return jax.lax.platform_dependent(x, cpu=plus, cuda=plus, default=lambda x: x * 0)

    platforms = ("cpu", "cuda", "rocm", "tpu")
    exported = jax.export.export(jax.jit(f), platforms=platforms)(jax.ShapeDtypeStruct(X.shape, X.dtype))
    assert exported.platforms == platforms
    np.testing.assert_array_equal(exported.call(X), X + 1)
    # The kernel alone: rocm and tpu lower to NaN (a branch a caller's per-platform choice never takes).
    exported = jax.export.export(jax.jit(plus), platforms=platforms)(jax.ShapeDtypeStruct(X.shape, X.dtype))
    assert "0x7FC00000" in exported.mlir_module()
    np.testing.assert_array_equal(exported.call(X), X + 1)


def test_lowerings_must_agree_with_the_abstract_eval():
    with pytest.raises(TypeError, match="the cuda lowering returns"):
        _text(wrong, X, platforms=("cuda",))


def test_bad_definitions_and_reserved_parameters():
    with pytest.raises(ValueError, match="lowerings for"):
        per_platform_kernel("tokenlab_test_lowering_bad", {"gpu": lambda x: x}, kernel="k")
    with pytest.raises(ValueError, match="map_sequentially"):
        per_platform_kernel(
            "tokenlab_test_lowering_bad", {"cpu": lambda x: x}, kernel="k", map_sequentially=("tpu",)
        )
    with pytest.raises(TypeError, match="reserved"):
        plus(X, vmaps=())
