"""The prepared INT4 layout of the Mosaic GPU kernel: round trips, a tile by hand, the cache, the entry."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.int4_matmul import (
    PreparedInt4Weight,
    int4_matmul,
    int4_matmul_reference,
    prepare,
    to_int4_weight,
)
from kernels.int4_matmul import prepared as prep
from quant import Int4Weight
from tests.kernels.int4_matmul.cases import VARIANTS, K, N, make_weight
from tests.tolerances import normalized_error, tolerance


def test_a_small_tile_by_hand():
    # codes [K=64, N=2] -> prepared [K/64=1, Np=64, 16] uint16: word c of row n holds q[c], q[16+c], q[32+c],
    # q[48+c] of column n in its four nibbles (lowest first); padded columns hold zero codes.
    codes = np.stack([np.arange(64) % 16, 15 - np.arange(64) % 13], axis=1).astype(np.uint8)
    w = Int4Weight.from_codes(codes, np.ones((1, 2), np.float32), group_size=64)
    pw = prepare(w)
    assert pw.codes.dtype == jnp.uint16 and pw.codes.shape == (1, 64, 16) and pw.shape == (64, 2)
    got = np.asarray(pw.codes)
    for n in range(2):
        for c in range(16):
            q = [int(codes[16 * j + c, n]) for j in range(4)]
            assert got[0, n, c] == q[0] | q[1] << 4 | q[2] << 8 | q[3] << 12, (n, c)
    assert not got[0, 2:].any()  # padding
    np.testing.assert_array_equal(prep.codes_in_stored_order(pw), codes)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_planes_hold_the_scales_and_zero_point_terms(dtype):
    # planes [G, 2, Np] in the scales' dtype: the scales, then z + 128 (the symmetric zero 2**(bits-1) when
    # the weight has no zero points), padded columns zero; exact in every dtype.
    codes = np.zeros((64, 3), np.uint8)
    scales = np.array([[0.5, 0.25, 3.0], [1.5, 2.0, 0.125]], np.float32).astype(dtype)
    zeros = np.array([[0, 15, 7], [3, 8, 1]], np.uint8)
    w = Int4Weight.from_codes(codes, scales, zeros, group_size=32)
    planes = np.asarray(prepare(w).planes)
    assert planes.dtype == np.dtype(dtype) and planes.shape == (2, 2, 64)
    np.testing.assert_array_equal(planes[:, 0, :3].astype(np.float32), scales.astype(np.float32))
    np.testing.assert_array_equal(planes[:, 1, :3].astype(np.float32), zeros + prep.PLANE_BIAS)
    assert not planes[:, :, 3:].astype(np.float32).any()
    sym = prepare(Int4Weight.from_codes(codes, scales, group_size=32, bits=3))
    np.testing.assert_array_equal(np.asarray(sym.planes)[:, 1, :3].astype(np.float32), 4 + prep.PLANE_BIAS)


def test_k_must_fill_whole_blocks():
    w = Int4Weight.from_codes(np.zeros((32, 2), np.uint8), np.ones((1, 2), np.float32), group_size=32)
    with pytest.raises(ValueError, match="K=32 rows"):
        prepare(w)


@pytest.mark.parametrize("variant", ["g128", "act_order_and_scales", "bits3", "per_channel"])
def test_round_trip(variant):
    w = make_weight(0, **VARIANTS[variant])
    pw = prepare(w)
    back = to_int4_weight(pw)
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(w.packed))
    np.testing.assert_array_equal(prep.codes_in_stored_order(pw), np.asarray(w.codes()))
    assert back.bits == w.bits and back.group_size == w.group_size
    # Traceable: the same under jit.
    jitted = jax.jit(prep.prepare_codes)(w.packed)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(pw.codes))


def test_prepared_weight_is_a_pytree():
    pw = prepare(make_weight(0))
    leaves, tree = jax.tree.flatten(pw)
    again = jax.tree.unflatten(tree, leaves)
    assert isinstance(again, PreparedInt4Weight) and again.shape == (K, N) and again.group_size == 64


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="w must be a quant.Int4Weight"):
        prepare(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="w.bits=8"):
        prepare(make_weight(0, bits=8))
    with pytest.raises(ValueError, match="target='tpu'"):
        prepare(make_weight(0), target="tpu")


def test_cache_prepares_once_per_weight_and_forgets_it():
    cache = prep.PreparedCache()
    w = make_weight(1)
    first = cache.get(w)
    assert cache.get(w) is first and len(cache) == 1
    # New scales on the same codes reuse the prepared codes.
    w2 = Int4Weight.tree_unflatten((w.bits, w.group_size), (w.packed, w.scales * 2, w.zeros, w.perm, None))
    again = cache.get(w2)
    assert again.codes is first.codes
    np.testing.assert_array_equal(np.asarray(again.planes[:, 0, :N]), np.asarray(w.scales) * 2)
    del w, w2, first
    gc.collect()
    assert len(cache) == 0
    # Traced weights are prepared, not cached.
    jax.jit(lambda w: cache.get(w).codes)(make_weight(2))
    assert len(cache) == 0


@pytest.mark.parametrize("impl", ["xla", "auto", "pallas_mosaic_gpu"])
def test_entry_takes_a_prepared_weight(impl):
    w = make_weight(3)
    x = np.random.default_rng(0).standard_normal((2, K)).astype(np.float32)
    expected = int4_matmul_reference(x, w).astype(np.float64)
    out = jax.jit(lambda x, pw: int4_matmul(x, pw, impl=impl))(x, prepare(w))
    assert out.shape == (2, N) and normalized_error(out, expected) <= tolerance(np.float32).nerr
