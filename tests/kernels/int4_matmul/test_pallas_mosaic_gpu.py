"""The Mosaic GPU INT4 kernel: interpreted against the reference at decode and wgmma sizes, what it declines,
its tiling and tuning hooks, and its code compiled for an H100 (deviceless) when the CUDA plugin is here.
The shared suite (test_shared.py) runs the weight variants, gradients and vmap on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import compile_only
from kernels.int4_matmul import int4_matmul, int4_matmul_reference, prepare
from kernels.int4_matmul import pallas_mosaic_gpu as mg
from quant import Int4Weight
from tests.kernels.int4_matmul.cases import VARIANTS, K, make_weight
from tests.tolerances import normalized_error, tolerance

IMPL = "pallas_mosaic_gpu"


@pytest.mark.parametrize(
    "m,dtype", [(1, np.float32), (16, jnp.bfloat16), (64, np.float16), (64, np.float32), (40, jnp.bfloat16)]
)
def test_interpreted_matches_the_reference(m, dtype):
    w = make_weight(7, **VARIANTS["g32"])
    x = np.random.default_rng(m).standard_normal((m, K)).astype(dtype)
    out = int4_matmul(jnp.asarray(x), w, impl=IMPL)
    expected = int4_matmul_reference(np.asarray(x), w).astype(np.float64)
    assert out.dtype == x.dtype and normalized_error(out, expected) <= tolerance(dtype).nerr


def test_unpack_gives_128_plus_the_code_in_block_order():
    # Block words [rows, 16] -> [rows, 64] bf16: column 16j + c is 128 + nibble j of word c.
    words = np.random.default_rng(0).integers(0, 1 << 16, (8, 16), dtype=np.uint16)
    got = np.asarray(mg._codes_to_bf16(jnp.asarray(words), range(4)).astype(np.float32))
    want = np.concatenate([128 + ((words >> (4 * j)) & 0xF) for j in range(4)], axis=1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        np.asarray(mg._codes_to_bf16(jnp.asarray(words), range(2, 4)).astype(np.float32)), want[:, 32:]
    )


def test_the_compiled_unpack_is_the_definition_on_32_bit_registers():
    # `_unpack` shifts a 32-bit register holding two uint16 neighbours (low half first) and applies one
    # LOP3: (r >> 4j) & 0x000F000F | 0x43004300. Its two halves must be `_codes_to_bf16`'s two lanes.
    lanes = np.random.default_rng(1).integers(0, 1 << 16, (1000, 2), dtype=np.uint16)
    regs = lanes.view(np.uint32)[:, 0]
    for j in range(4):
        out = (((regs >> np.uint32(4 * j)) & np.uint32(0x000F000F)) | np.uint32(0x43004300)).astype(np.uint32)
        halves = out.view(np.uint16).reshape(-1, 2)
        np.testing.assert_array_equal(halves, ((lanes >> (4 * j)) & 0xF) | 0x4300)


def test_scale_gradient_through_an_explicitly_prepared_weight():
    # The kernel reads the planes; the custom VJP sends the scale gradient to the prepared weight's canonical
    # scales (and a zero cotangent to the planes), as the XLA path gives it for the Int4Weight.
    w = make_weight(5, **VARIANTS["g32"])
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, K)).astype(np.float32))
    dy = jnp.asarray(np.random.default_rng(6).standard_normal((2, w.shape[1])).astype(np.float32))

    def loss(weight, impl):
        return (int4_matmul(x, weight, impl=impl) * dy).sum()

    got = jax.grad(loss, allow_int=True)(prepare(w), IMPL)
    want = jax.grad(loss, allow_int=True)(w, "xla")
    assert normalized_error(got.scales, np.asarray(want.scales, np.float64)) <= tolerance(np.float32).nerr
    assert not np.asarray(got.planes).any()


def test_several_column_and_row_tiles():
    # N = 192 in three 64-column tiles, M = 40 rows in tiles of 16 (block_m), K in steps of 64.
    w = make_weight(8, n=192)
    x = np.random.default_rng(0).standard_normal((40, K)).astype(np.float32)
    cfg = mg.Config(block_n=64, block_k=64, block_m=16, max_concurrent_steps=2)
    out = int4_matmul(jnp.asarray(x), w, impl=IMPL, config=cfg)
    expected = int4_matmul_reference(x, w).astype(np.float64)
    assert normalized_error(out, expected) <= tolerance(np.float32).nerr


def test_tiling_defaults_and_bad_configs():
    w = make_weight(0, **VARIANTS["g128"])
    decode = mg.choose(jax.ShapeDtypeStruct((1, K), jnp.bfloat16), w)
    assert (decode.block_m, decode.block_n, decode.block_k) == (16, 128, 256)  # N = 96 pads to 128
    prefill = mg.choose(jax.ShapeDtypeStruct((300, K), jnp.float32), w)
    assert prefill.block_m * 3 <= mg.MAX_COLS and prefill.segment == 128
    with pytest.raises(ValueError, match="block_n=96"):
        mg.choose(jax.ShapeDtypeStruct((1, K), jnp.bfloat16), w, mg.Config(block_n=96))
    with pytest.raises(ValueError, match="block_k=512"):  # does not divide K = 256
        mg.choose(jax.ShapeDtypeStruct((1, K), jnp.bfloat16), w, mg.Config(block_k=512))
    with pytest.raises(ValueError, match="block_m=8"):
        mg.choose(jax.ShapeDtypeStruct((1, K), jnp.bfloat16), w, mg.Config(block_m=8))
    with pytest.raises(ValueError, match="block_n"):
        mg.Config(block_n=0)


def test_tune_space_and_shape_class():
    w = make_weight(0)
    x = jax.ShapeDtypeStruct((1, K), jnp.bfloat16)
    space = mg.tune_space(x, w)
    assert 1 <= len(space) <= 12 and all(isinstance(c, mg.Config) for c in space)
    assert mg.shape_class(x, w) == "decode"
    assert mg.shape_class(jax.ShapeDtypeStruct((64, K), jnp.bfloat16), w) == "small"
    assert mg.shape_class(jax.ShapeDtypeStruct((4, 512, K), jnp.bfloat16), w) == "prefill"


def test_declines():
    x = np.zeros((2, K), np.float32)
    assert "bits=2" in mg.pallas_unsupported(x, make_weight(0, bits=2))
    assert "group_size=24" in mg.pallas_unsupported(x, make_weight(0, group_size=24, k=240))
    assert "x.dtype=float64" in mg.pallas_unsupported(np.zeros((2, K)), make_weight(0))
    assert mg.pallas_unsupported(x, prepare(make_weight(0))) is None
    with pytest.raises(ValueError, match="does not support bits=8"):
        int4_matmul(x, make_weight(0, bits=8), impl=IMPL)


def _h100_case(m, k, n, dtype=jnp.bfloat16):
    g = k // 128
    canonical = Int4Weight.tree_unflatten(
        (4, 128),
        (
            jax.ShapeDtypeStruct((k // 2, n), jnp.uint8),
            jax.ShapeDtypeStruct((g, n), jnp.float16),
            jax.ShapeDtypeStruct((g, n), jnp.uint8),
            None,
            None,
        ),
    )
    return jax.ShapeDtypeStruct((m, k), dtype), jax.eval_shape(prepare, canonical)


@pytest.mark.parametrize("target", ["sm_80", "sm_100a"])
def test_declines_gpus_other_than_hopper(target):
    if compile_only.missing(target):
        pytest.skip(compile_only.missing(target))
    x, w = _h100_case(1, 256, 128)
    with compile_only.on_target(target):
        assert "Hopper (sm_90a) only" in mg.pallas_unsupported(x, w)


@pytest.mark.parametrize(
    "m,k,n",
    [(64, 256, 128), pytest.param(64, 4096, 14336, marks=pytest.mark.slow), (1, 4096, 14336)],
)
def test_compiles_for_h100_without_spills(m, k, n):
    if compile_only.missing("sm_90a"):
        pytest.skip(compile_only.missing("sm_90a"))
    from benchmarks import compiled as report

    x, w = _h100_case(m, k, n)
    with compile_only.on_target("sm_90a"):
        assert mg.pallas_unsupported(x, w) is None
    program = compile_only.compile_for("sm_90a", lambda x, w: int4_matmul(x, w, impl=IMPL), x, w)
    launched = report.gpu_report(program, "sm_90a")
    kernels = [k for k in launched if k["pallas"]]
    assert len(kernels) == 1, kernels
    # The prepared weight goes to the kernel as it is: the XLA kernels around it work on x and the output only
    # (x̃ᵀ, its segment sums, the output slice), none over the codes, scales or zero points.
    assert len(launched) <= 4, [k["name"] for k in launched]
    (kern,) = kernels
    assert kern["spill_bytes"] == 0 and kern["tma"]
    assert kern["tensor_core"] == "wgmma"  # HGMMA in the SASS, at M = 64 and at decode (swap-AB)
    if m <= mg.DECODE_M:
        # the decode target: ≥ 16 weights decoded per warp-instruction of the main loop
        with compile_only.on_target("sm_90a"):
            tiles = mg.choose(x, w)
        wpi = tiles.block_n * tiles.block_k / (kern["threads"] / 32) / kern["loop_instructions"]
        assert wpi >= 16, (wpi, kern["loop_instructions"])
