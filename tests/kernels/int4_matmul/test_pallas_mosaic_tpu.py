"""The Pallas Mosaic TPU W4A16 kernel (kernels/int4_matmul/pallas_mosaic_tpu.py): its pieces, the kernel
interpreted on the CPU, its tpu lowering, and its compilation for v5e and v6e with libtpu's compile-only
devices (skipped with the reason where libtpu is absent).

The shared suite (test_shared.py) runs the kernel, interpreted, on every weight variant; here: the tile
pieces by hand, float32 to float32 accuracy, several grid steps along M, N and K, what it declines, and what
the TPU compiler makes of it at one small and one benchmark case per chip (`python -m benchmarks.compiled`
covers every benchmark case, forward and backward).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import available_impls, compile_only, int4_matmul, int4_matmul_reference, targets
from kernels.int4_matmul import arg_specs
from kernels.int4_matmul import pallas_mosaic_tpu as pt
from quant.format import unpack_int4
from tests.kernels.int4_matmul.cases import VARIANTS, K, make_weight
from tests.tolerances import normalized_error, tolerance

# The kernel's own platforms choose at lowering (interpreted on the CPU, compiled on a TPU); elsewhere (a GPU
# host) these tests interpret it explicitly.
INTERPRET = None if jax.default_backend() in ("cpu", "tpu") else True


def activations(seed, m, dtype=np.float32, k=K):
    return np.random.default_rng(seed + 1000).standard_normal((m, k)).astype(dtype)


def check(x, qw, **tunables):
    expected = int4_matmul_reference(np.asarray(x), qw).astype(np.float64)
    out = pt.int4_weight_matmul_tpu(jnp.asarray(x), qw, interpret=INTERPRET, **tunables)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert normalized_error(out, expected) <= tolerance(x.dtype).nerr


def test_f16_bits_decode_exactly():
    # Every float16 bit pattern: normals, subnormals, ±0, ±inf and NaNs.
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = np.asarray(pt.f16_bits_to_f32(jnp.asarray(bits)))
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # signed zeros too


def test_planes_and_arranged_x_by_hand():
    # One segment of 64 stored rows: the planes hold 128 + q in the row order arrange_x gives x's columns.
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (64, 8), dtype=np.uint8)
    packed = jnp.asarray(codes[0::2] | (codes[1::2] << 4))
    tile = np.asarray(jax.jit(pt.planes_tile)(packed), np.float64)  # [64, 8]
    x = rng.standard_normal((3, 64)).astype(np.float32)
    xa = np.asarray(pt.arrange_x(jnp.asarray(x), 64), np.float64)[0]  # [3, 64], a permutation of x's columns
    np.testing.assert_array_equal(np.sort(tile - 128, axis=0), np.sort(codes.astype(np.float64), axis=0))
    np.testing.assert_allclose(xa @ (tile - 128), x.astype(np.float64) @ codes, rtol=1e-12)
    assert np.array_equal(np.asarray(unpack_int4(packed)), codes)  # the layout the kernel reads


@pytest.mark.parametrize("variant", ["base", "per_channel", "act_order_and_scales"])
def test_float32_to_float32_accuracy(variant):
    qw = make_weight(1, **({} if variant == "base" else VARIANTS[variant]))
    check(activations(2, 5), qw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_low_precision_activations_and_float32_scales(dtype):
    # The test weights carry float16 scales (decoded from their bits in the kernel); float32 ones load as is.
    qw = make_weight(3)
    assert qw.scales.dtype == np.float16
    wide = type(qw).tree_unflatten(
        qw.tree_flatten()[1], (qw.packed, qw.scales.astype(np.float32), qw.zeros, qw.perm, qw.act_scales)
    )
    check(activations(4, 3, dtype), wide)


@pytest.mark.parametrize("k,group", [(2048, 1024), (8192, -1)], ids=["g1024", "per_channel_K8192"])
def test_groups_longer_than_a_segment(k, group):
    # Segments of 512 rows: two per group of 1024 (static path), sixteen per channel at K = 8192 (the loop).
    check(activations(9, 3, k=k), make_weight(10, k=k, group_size=group))


def test_group_128_bfloat16_at_a_model_width():
    # 32 segments of 128 rows (the loop, four iterations): the 128 + q planes against the dequantized weight.
    check(activations(11, 2, jnp.bfloat16, k=4096), make_weight(12, k=4096, n=128, group_size=128))


def test_several_grid_steps_along_m_n_and_k():
    # K = 1024 in two blocks of 512 (8 segments of 64 each: the loop path), N = 256 in two column tiles,
    # 20 rows in two row tiles of 16 (padded).
    qw = make_weight(5, k=1024, n=256)
    check(activations(6, 20, k=1024), qw, block_m=16, block_n=128, block_k=512)
    assert pt.choose_tiling(20, 1024, 256, 64, block_m=16, block_n=128, block_k=512).block_k == 512


def test_choose_tiling_by_chip():
    v5e, v6e = pt.CHIPS["v5e"], pt.CHIPS["v6e"]
    for k, n in ((4096, 14336), (8192, 28672)):
        for m in (1, 16, 64):
            for chip in (v5e, v6e):
                t = pt.choose_tiling(m, k, n, 128, chip=chip, vmem_capacity=128 << 20)
                assert t.block_m == m and t.segment == 128 and n % t.block_n == 0
                assert t.block_n % pt.LANES == 0 and (t.block_k // 2) * t.block_n <= chip.max_block_bytes
                assert t.block_k == k or (t.block_k // t.segment) % pt.SEGMENTS_PER_ITERATION == 0
                assert 16 << 20 <= t.vmem_limit <= chip.vmem_limit
    assert pt.choose_tiling(5, 256, 96, 64, chip=pt.INTERPRET_CHIP).vmem_limit is None
    assert pt.choose_tiling(5, 256, 96, 64, chip=pt.INTERPRET_CHIP).block_n == 96  # N itself
    assert pt.choose_tiling(40, 4096, 14336, 128, chip=v5e).block_m == 48  # padded to 16 rows
    assert pt.choose_tiling(1, 8192, 4096, 8192, chip=v5e).segment == 512  # per-channel


def test_chip_is_read_from_the_tpu_being_lowered_for():
    if jax.default_backend() != "tpu":
        assert pt.chip_tiles() == (pt.DEFAULT_CHIP, None)  # no TPU to ask
    with targets.device_context("tpu", device_kind="TPU v5 lite"):
        assert pt.chip_tiles() == (pt.CHIPS["v5e"], 128 << 20)
    with targets.device_context("tpu", device_kind="TPU v6 lite"):
        assert pt.chip_tiles() == (pt.CHIPS["v6e"], 128 << 20)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_float32_dots_ask_for_full_precision(dtype):
    # float32 and float16 activations run the kernel's dots on float32 at HIGHEST (fp32 contraction in
    # Mosaic); bfloat16 takes the native dot. Both accumulate in float32.
    qw = make_weight(13)
    x = jax.ShapeDtypeStruct((3, K), dtype)
    jaxpr = str(jax.make_jaxpr(lambda x: pt.int4_weight_matmul_tpu(x, qw, interpret=True))(x))
    highest = jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)")
    assert "preferred_element_type=float32" in jaxpr
    assert (highest > 0) == (dtype != jnp.bfloat16)


def _lowered_text(x, qw, platform):
    return targets.lower(pt.int4_weight_matmul_tpu, x, qw, platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_lowers_for_tpu_as_one_mosaic_kernel(dtype):
    qw = make_weight(0, **VARIANTS["act_order_and_scales"])
    x = jax.ShapeDtypeStruct((3, K), dtype)
    tpu = _lowered_text(x, qw, "tpu")
    assert len(re.findall(r"tpu_custom_call", tpu)) == 1
    assert "dot_general" not in tpu  # no XLA dot over the weight: the MXU work is inside the kernel
    assert "tpu_custom_call" not in _lowered_text(x, qw, "cpu")  # interpreted there


def test_exports_for_cpu_and_tpu_and_runs_the_export_on_the_cpu():
    qw = make_weight(7, **VARIANTS["act_order_and_scales"])
    x = activations(8, 4, jnp.bfloat16)
    exported = targets.export(
        pt.int4_weight_matmul_tpu,
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        qw,
        platforms=("cpu", "tpu"),
        disabled_checks=["tpu_custom_call"],
    )
    assert "tpu_custom_call" in exported.mlir_module()
    expected = int4_matmul_reference(x, qw).astype(np.float64)
    assert normalized_error(exported.call(jnp.asarray(x), qw), expected) <= tolerance(x.dtype).nerr


# One small case and one benchmark case per chip (benchmarks.compiled compiles the full set).
COMPILE_CASES = ("256x128 M1 bf16", "4096x14336 M16 bf16")


@pytest.mark.parametrize("case", COMPILE_CASES)
@pytest.mark.parametrize("target", ["v5e", "v6e"])
def test_compiles_for_tpu(target, case):
    reason = compile_only.missing(target)
    if reason:
        pytest.skip(f"{target}: {reason}")
    args, _ = arg_specs.arg_shapes(arg_specs.get(case))
    fn = lambda x, w: int4_matmul(x, w, impl="pallas_mosaic_tpu")  # noqa: E731
    compiled = compile_only.compile_for(target, fn, *args)
    assert "tpu_custom_call" in compiled.as_text()


def test_unsupported_weights_name_the_reason(monkeypatch):
    x = np.zeros((2, K), np.float32)
    assert pt.pallas_unsupported(x, make_weight(0)) is None
    assert pt.pallas_unsupported(x, make_weight(0, bits=3)) is None
    assert "bits=2" in pt.pallas_unsupported(x, make_weight(0, bits=2))
    assert "bits=8" in pt.pallas_unsupported(x, make_weight(0, bits=8))
    assert "group_size=32" in pt.pallas_unsupported(x, make_weight(0, group_size=32))
    assert "x.dtype=int32" in pt.pallas_unsupported(x.astype(np.int32), make_weight(0))
    # N = 96 is one column tile; an N that is not a multiple of 128 and too wide for one tile is declined.
    monkeypatch.setattr(pt, "DEFAULT_CHIP", pt.Chip(128, max_block_bytes=8 << 10, vmem_limit=16 << 20))
    assert "N=96" in pt.pallas_unsupported(x, make_weight(0))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="impl='pallas_mosaic_tpu' does not support group_size=32"):
        int4_matmul(x, make_weight(0, group_size=32), impl="pallas_mosaic_tpu")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"block_n": 64}, "block_n=64"),
        ({"block_k": 192}, "block_k=192"),
        ({"block_m": 12}, "block_m=12"),
        ({"interpret": "yes"}, "interpret='yes'"),
        ({"split_k": 2}, "unknown tunables"),
    ],
)
def test_bad_tunables(kw, match):
    with pytest.raises(ValueError, match=match):
        pt.int4_weight_matmul_tpu(jnp.zeros((40, K)), make_weight(0, n=256), **{"interpret": INTERPRET, **kw})


@pytest.mark.skipif(
    "pallas_mosaic_tpu" not in available_impls("int4_matmul"), reason="the TPU kernel does not run here"
)
def test_public_entry_runs_the_kernel():
    qw = make_weight(40, **VARIANTS["act_order_and_scales"])
    x = activations(41, 3, jnp.bfloat16)
    expected = int4_matmul_reference(np.asarray(x), qw).astype(np.float64)
    out = int4_matmul(jnp.asarray(x), qw, impl="pallas_mosaic_tpu", config=pt.Config(block_n=96))
    assert normalized_error(out, expected) <= tolerance(x.dtype).nerr
