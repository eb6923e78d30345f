"""The Pallas W4A16 kernel (kernels/int4_matmul/pallas_triton.py) in interpret mode, and its cuda lowering.

Interpret mode is slow on the CPU: tiny shapes (K = 256, N = 96) and one weight variant per test, each
compared against the dequantized float64 reference with the normalized error of tests/tolerances.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import available_impls, int4_matmul, int4_matmul_reference, targets
from kernels.int4_matmul import pallas_triton as pg
from tests.kernels.int4_matmul.cases import VARIANTS as CASE_VARIANTS
from tests.kernels.int4_matmul.cases import K, N, make_weight
from tests.tolerances import normalized_error, tolerance

# The shared suite's weight variants, less the widths the kernel leaves to the XLA path, plus its base case.
VARIANTS = {"g64": {}, **{k: v for k, v in CASE_VARIANTS.items() if k not in ("bits2", "bits8")}}


def activations(seed, m, dtype=np.float32, k=K):
    return np.random.default_rng(seed + 1000).standard_normal((m, k)).astype(dtype)


def check(x, qw, **tunables):
    expected = int4_matmul_reference(np.asarray(x), qw).astype(np.float64)
    out = jax.jit(lambda x, w: pg.int4_weight_matmul_pallas(x, w, **tunables))(jnp.asarray(x), qw)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert normalized_error(out, expected) <= tolerance(x.dtype).nerr


def test_tile_helpers_by_hand():
    # One packed byte 0x69: low nibble 9 (even row), high nibble 6 (odd row); zero 8, scale 0.5
    # -> weights [0.5, -1.0]; x = [2, 3] -> 2·0.5 + 3·(−1) = −2.
    packed = jnp.full((1, 1), 0x69, jnp.uint8)
    zero = jnp.full((1, 1), 8, jnp.uint8)
    scale = jnp.full((1, 1), 0.5, jnp.float32)
    lo, hi = pg.unpack_tile(packed, zero, dtype=jnp.float32)
    assert (float(lo[0, 0]), float(hi[0, 0])) == (1.0, -2.0)
    lo, hi = pg.dequantize_tile(packed, scale, 8, dtype=jnp.bfloat16)  # symmetric zero as a Python int
    assert lo.dtype == jnp.bfloat16 and (float(lo[0, 0]), float(hi[0, 0])) == (0.5, -1.0)
    xe, xo = pg.split_even_odd(jnp.array([[2.0, 3.0]]))
    assert float(pg.int4_tile_dot(xe, xo, packed, scale, zero)[0, 0]) == -2.0


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_unpack_tile_is_exact_for_every_byte_and_zero(dtype):
    # Every packed byte (16 x 16 tile) against every zero point, given as a row and as a Python int.
    tile = jnp.arange(256, dtype=jnp.uint8).reshape(16, 16)
    b = np.arange(256).reshape(16, 16)
    for z in range(16):
        for zero in (jnp.full((1, 16), z, jnp.uint8), z):
            lo, hi = pg.unpack_tile(tile, zero, dtype=dtype)
            assert lo.dtype == dtype and hi.dtype == dtype
            np.testing.assert_array_equal(np.asarray(lo, np.float64), (b & 0xF) - z)
            np.testing.assert_array_equal(np.asarray(hi, np.float64), (b >> 4) - z)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_weight_variants(variant):
    check(activations(0, 5), make_weight(1, **VARIANTS[variant]))


@pytest.mark.parametrize("m", [1, 16, 33])
def test_rows(m):
    check(activations(2, m), make_weight(3))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
@pytest.mark.parametrize("variant", ["g64", "act_order_and_scales"])
def test_low_precision_activations(dtype, variant):
    check(activations(4, 5, dtype), make_weight(5, **VARIANTS[variant]))


@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_split_k(split_k):
    check(activations(6, 3), make_weight(7), block_n=32, block_k=32, split_k=split_k)


@pytest.mark.parametrize(
    "dtype,m,block_m",
    [(np.float32, 5, 16), (np.float32, 1, None), (jnp.bfloat16, 1, 1), (np.float16, 3, 4)],
    ids=["f32-dots", "f32-matvec", "bf16-matvec", "f16-matvec"],
)
def test_matvec_and_dot_kernels(dtype, m, block_m):
    # float32 at M <= 8 takes the matrix-vector kernel by default; block_m picks either kernel explicitly.
    check(activations(13, m, dtype), make_weight(14, group_size=32), block_m=block_m)


def test_no_rows():
    out = pg.int4_weight_matmul_pallas(jnp.zeros((0, K), jnp.bfloat16), make_weight(0))
    assert out.shape == (0, N) and out.dtype == jnp.bfloat16


def test_explicit_tiles():
    check(activations(8, 20), make_weight(9, group_size=128), block_m=32, block_n=16, block_k=64, split_k=2)


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_values(seed):
    # One shape, so the interpreted kernel compiles once; hypothesis draws weights and activations.
    check(activations(seed, 5), make_weight(seed))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_grad_with_respect_to_x(dtype):
    qw = make_weight(10, **VARIANTS["act_order_and_scales"])
    x = activations(11, 5, dtype)
    dy = np.random.default_rng(12).standard_normal((5, N)).astype(dtype)
    dx = jax.grad(lambda x: jnp.sum((pg.int4_weight_matmul_pallas(x, qw) * dy).astype(jnp.float32)))(
        jnp.asarray(x)
    )
    assert dx.dtype == x.dtype
    expected = dy.astype(np.float64) @ np.asarray(qw.dequantize(), np.float64).T
    assert normalized_error(dx, expected) <= tolerance(dtype).nerr


def test_backward_dots_ask_for_full_precision():
    # bf16 forward tiles take the native dot (only the float32 rank-1 zero-point correction outside the
    # kernel asks for HIGHEST); the XLA transpose behind the gradient is float32 at HIGHEST.
    qw = make_weight(15)
    x = jax.ShapeDtypeStruct((3, K), jnp.bfloat16)
    fwd = str(jax.make_jaxpr(lambda x: pg.int4_weight_matmul_pallas(x, qw))(x))
    grad = str(jax.make_jaxpr(jax.grad(lambda x: pg.int4_weight_matmul_pallas(x, qw).sum()))(x))
    dots = re.findall(r"dot_general\[(.*?)\] (\w+) (\w+)", fwd, flags=re.S)
    assert dots
    highest = [d for d in dots if "HIGHEST" in d[0]]
    assert len(highest) == 1 and "float32" in highest[0][0]  # the correction: f32 operands, f32 result
    assert "Precision.HIGHEST" in grad


def test_vmap_over_stacked_expert_weights():
    experts = [make_weight(20 + e) for e in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *experts)
    x = np.stack([activations(30 + e, 4) for e in range(2)])
    out = jax.vmap(pg.int4_weight_matmul_pallas)(jnp.asarray(x), stacked)
    for e in range(2):
        expected = int4_matmul_reference(x[e], experts[e]).astype(np.float64)
        assert normalized_error(out[e], expected) <= tolerance(np.float32).nerr


def _lowered_text(x, qw, platform, **tunables):
    f = lambda x, w: pg.int4_weight_matmul_pallas(x, w, **tunables)  # noqa: E731
    return targets.lower(f, x, qw, platforms=(platform,)).as_text()


@pytest.mark.parametrize("m,block_m", [(1, None), (64, None), (2, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_lowers_for_cuda_as_a_triton_kernel(m, block_m, dtype):
    qw = make_weight(0, **VARIANTS["act_order_and_scales"])
    x = jax.ShapeDtypeStruct((m, K), dtype)
    cuda = _lowered_text(x, qw, "cuda", block_m=block_m)
    calls = re.findall(r"custom_call @__gpu\$xla\.gpu\.triton\(", cuda)
    assert len(calls) == 1
    cfg = pg.choose_config(m, K, N, qw.group_size, dtype=dtype, block_m=block_m)
    assert f"num_warps = {cfg.num_warps}" in cuda and f"num_stages = {cfg.num_stages}" in cuda
    # The CPU lowering of the same function interprets the kernel: no GPU custom call.
    assert "xla.gpu.triton" not in _lowered_text(x, qw, "cpu", block_m=block_m)


def test_exports_for_every_platform_and_runs_the_export_on_the_cpu():
    # One jitted function, serialized for cpu, cuda, rocm and tpu at once (the Triton custom call needs
    # `disabled_checks`); the cuda branch holds the Triton kernel and the CPU runs the interpreted one.
    qw = make_weight(16, **VARIANTS["act_order_and_scales"])
    x = activations(17, 4, jnp.bfloat16)
    exported = targets.export(
        pg.int4_weight_matmul_pallas,
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        qw,
        platforms=("cpu", "cuda", "rocm", "tpu"),
        disabled_checks=["__gpu$xla.gpu.triton"],
    )
    assert "xla.gpu.triton" in exported.mlir_module()
    expected = int4_matmul_reference(x, qw).astype(np.float64)
    assert normalized_error(exported.call(jnp.asarray(x), qw), expected) <= tolerance(x.dtype).nerr


def test_vmapped_kernel_exports_for_every_platform():
    experts = [make_weight(18 + e) for e in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *experts)
    x = np.stack([activations(20 + e, 3) for e in range(2)])
    exported = targets.export(
        jax.vmap(pg.int4_weight_matmul_pallas),
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        stacked,
        platforms=("cpu", "cuda", "rocm", "tpu"),
        disabled_checks=["__gpu$xla.gpu.triton"],
    )
    assert "xla.gpu.triton" in exported.mlir_module()
    out = exported.call(x, stacked)
    for e in range(2):
        expected = int4_matmul_reference(x[e], experts[e]).astype(np.float64)
        assert normalized_error(out[e], expected) <= tolerance(np.float32).nerr


def test_float32_dots_ask_for_full_precision():
    # The precision policy for the tile dot the kernel runs: float32 is IEEE (HIGHEST), never TF32;
    # bf16/f16 take the native dot; both accumulate in float32.
    spec = jax.ShapeDtypeStruct
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        tiles = (spec((16, 32), dtype), spec((16, 32), dtype), spec((32, 64), jnp.uint8))
        rows = (spec((1, 64), jnp.float32), spec((1, 64), jnp.uint8))
        jaxpr = str(jax.make_jaxpr(pg.int4_tile_dot)(*tiles, *rows))
        assert jaxpr.count("dot_general[") == 2
        assert jaxpr.count("preferred_element_type=float32") == 2
        highest = jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)")
        assert highest == (2 if dtype == jnp.float32 else 0)


def test_choose_config_fills_the_gpu_at_decode():
    # Llama-3-8B's shapes at decode: N / 128 programs alone are too few, so K is split.
    # 16-bit x takes 256 columns where N is wide enough to keep the programs (the folded kernel's decode
    # tile).
    for k, n, bn in ((8192, 28672, 256), (4096, 14336, 256), (14336, 4096, 128)):
        cfg = pg.choose_config(1, k, n, 128)
        assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, bn, 128)
        assert cfg.num_stages == (3 if bn == 256 else 4)
        assert (n // bn) * cfg.split_k >= pg.DECODE_TARGET_PROGRAMS
        assert (k // cfg.block_k) % cfg.split_k == 0
    assert pg.choose_config(3, 4096, 14336, 128, dtype=jnp.float32).block_m == 4  # matvec
    assert pg.choose_config(3, 4096, 14336, 128, dtype=jnp.bfloat16).block_m == 16  # tensor cores
    big = pg.choose_config(512, 4096, 14336, 128)
    assert (big.block_m, big.block_n, big.block_k, big.split_k) == (128, 128, 64, 1)
    assert pg.choose_config(40, 4096, 14336, 32).block_k == 32  # a tile never straddles a group
    assert pg.choose_config(1, 256, 96, 256).block_n == 32  # the largest power of two dividing N


def test_unsupported_weights_name_the_reason():
    x = np.zeros((2, K), np.float32)
    assert pg.pallas_unsupported(x, make_weight(0)) is None
    assert "bits=2" in pg.pallas_unsupported(x, make_weight(0, bits=2))
    assert "bits=8" in pg.pallas_unsupported(x, make_weight(0, bits=8))
    assert "group_size=16" in pg.pallas_unsupported(x, make_weight(0, group_size=16))
    assert "N=24" in pg.pallas_unsupported(x, make_weight(0, n=24))
    assert "x.dtype=int32" in pg.pallas_unsupported(x.astype(np.int32), make_weight(0))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"block_k": 48}, "block_k=48"),
        (
            {"block_k": 128, "group_size_override": 64},
            "block_k=128 must be a power of two >= 32 dividing group",
        ),
        ({"split_k": 3}, "split_k=3"),
        ({"block_n": 64}, "block_n=64"),
        ({"block_m": 12}, "block_m=12"),
        ({"block_m": 32, "block_n": 32, "block_k": 32, "split_k": 16}, "split_k=16"),
        ({"interpret": "yes"}, "interpret='yes'"),
    ],
)
def test_bad_tunables(kw, match):
    kw = dict(kw)
    qw = make_weight(0, group_size=kw.pop("group_size_override", 64))
    with pytest.raises(ValueError, match=match):
        pg.int4_weight_matmul_pallas(jnp.zeros((2, K)), qw, **kw)


def test_bad_arrays():
    qw = make_weight(0)
    kw = {"group_size": 64, "bits": 4, "sym_zero": 8}
    with pytest.raises(ValueError, match="x must be 2-D"):
        pg.int4_matmul_pallas(jnp.zeros((K,)), qw.packed, qw.scales, qw.zeros, **kw)
    with pytest.raises(ValueError, match="x's K=128"):
        pg.int4_matmul_pallas(jnp.zeros((1, 128)), qw.packed, qw.scales, qw.zeros, **kw)
    with pytest.raises(ValueError, match="bits=2"):
        pg.int4_matmul_pallas(jnp.zeros((1, K)), qw.packed, qw.scales, qw.zeros, **{**kw, "bits": 2})
    with pytest.raises(ValueError, match="scales must be"):
        pg.int4_matmul_pallas(jnp.zeros((1, K)), qw.packed, qw.scales[:1], qw.zeros, **kw)
    with pytest.raises(ValueError, match="the Pallas INT4 kernel does not support bits=8"):
        pg.int4_weight_matmul_pallas(jnp.zeros((1, K)), make_weight(0, bits=8))


@pytest.mark.skipif(
    "pallas_triton" not in available_impls("int4_matmul"), reason="the Pallas Triton kernel does not run here"
)
def test_public_entry_runs_the_kernel():
    qw = make_weight(40, **VARIANTS["act_order_and_scales"])
    x = activations(41, 3, jnp.bfloat16)
    expected = int4_matmul_reference(np.asarray(x), qw).astype(np.float64)
    assert (
        normalized_error(int4_matmul(jnp.asarray(x), qw, impl="pallas"), expected) <= tolerance(x.dtype).nerr
    )


def test_shape_class_tune_space_and_the_tuned_default(tmp_path, monkeypatch):
    from kernels import tuning

    qw = make_weight(30)
    x = jnp.zeros((3, K), jnp.bfloat16)
    assert pg.shape_class(x, qw) == "decode" and pg.shape_class(jnp.zeros((80, K)), qw) == "prefill-f32"
    for m in (3, 80):
        space = pg.tune_space(jnp.zeros((m, K), jnp.bfloat16), qw)
        assert space[0] == pg.Config() and 1 < len(space) <= 12 and len(set(space)) == len(space)
    monkeypatch.setenv("TOKENLAB_TUNED", str(tmp_path / "tuned.json"))
    monkeypatch.setattr(pg, "target_gpu", lambda: ("NVIDIA A100-SXM4-40GB", 80))
    assert pg.default_config(x, qw) == pg.Config()
    tuning.write(
        [tuning.entry("int4_matmul", "pallas_triton", "decode", "NVIDIA A100-SXM4-40GB", {"split_k": 1}, 0.1)]
    )
    assert pg.default_config(x, qw) == pg.Config(split_k=1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_folded_unpack_in_plain_bit_operations_matches_the_codes(dtype):
    # The folded kernel's merged pairs: for byte c of the words w0 (row pairs 0..7) and w1 (row pairs
    # 8..15), the pair of parity p holds B + nibble p of w0's byte (low half) and of w1's (high half), B the
    # dtype's magic base (128 for bf16, 1024 for f16): rows 2i + p and 16 + 2i + p of columns c::4.
    packed = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    words = jax.lax.bitcast_convert_type(jnp.asarray(packed).reshape(16, 4, 4), jnp.int32)
    magic, base = pg._FOLD_BASE[np.dtype(dtype)]
    pairs = pg._merged_pairs(words[:8], words[8:], magic, ptx=False)
    codes = np.empty((32, 16), np.int64)  # stored rows of the 32-row tile
    codes[0::2], codes[1::2] = packed & 15, packed >> 4
    for c in range(4):
        for p in (0, 1):
            tile = np.asarray(pg._pair_tile(pairs[c][p], dtype), np.float64)  # [16, 4]
            np.testing.assert_array_equal(tile[0::2], base + codes[p:16:2, c::4])
            np.testing.assert_array_equal(tile[1::2], base + codes[16 + p :: 2, c::4])


def test_prmt_in_plain_bit_operations():
    a, b = jnp.int32(0x33221100), jnp.int32(0x77665544)
    assert int(pg._prmt_jnp(a, b, 0x5410)) == 0x55441100
    assert int(pg._prmt_jnp(a, b, 0x7632)) == 0x77663322


def test_merge_x_is_the_kernel_k_order():
    # Within a 32-row tile (h = 16): position p·16 + 2r + s holds row s·16 + 2r + p.
    x = jnp.arange(64.0).reshape(1, 64)
    got = np.asarray(pg._merge_x(x, 32))[0]
    for t in range(2):
        for p in (0, 1):
            for r in range(8):
                for s in (0, 1):
                    assert got[32 * t + 16 * p + 2 * r + s] == 32 * t + 16 * s + 2 * r + p
