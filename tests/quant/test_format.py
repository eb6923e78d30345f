"""The packed layout: pack/unpack, Int4Weight as a pytree, dequantization, act-order rows, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import quant
from tests.tolerances import assert_close, tolerance

SHAPES = [(8, 8), (16, 24), (64, 40)]


@given(bits=st.sampled_from(quant.SUPPORTED_BITS), shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31))
def test_unpack_pack_is_identity(bits, shape, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, shape).astype(np.uint8)
    packed = quant.pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (shape[0] // quant.codes_per_byte(bits), shape[1])
    np.testing.assert_array_equal(quant.unpack_codes(packed, bits), codes)
    # The JAX path packs and unpacks to the same bytes.
    np.testing.assert_array_equal(np.asarray(quant.pack_codes(jnp.asarray(codes), bits)), packed)
    np.testing.assert_array_equal(np.asarray(quant.unpack_codes(jnp.asarray(packed), bits)), codes)


def test_pack_int4_hand_worked():
    # Column 0 holds rows 0..3 = 1, 2, 3, 15; column 1 holds 0, 15, 7, 8.
    codes = np.array([[1, 0], [2, 15], [3, 7], [15, 8]], np.uint8)
    packed = quant.pack_int4(codes)
    # Low nibble = even row, high nibble = odd row.
    np.testing.assert_array_equal(packed, np.array([[0x21, 0xF0], [0xF3, 0x87]], np.uint8))
    np.testing.assert_array_equal(quant.unpack_int4(packed), codes)


def test_pack_2bit_hand_worked():
    codes = np.array([[1], [2], [3], [0]], np.uint8)
    # Row j of each run of four sits at bits 2j: 0b00_11_10_01.
    np.testing.assert_array_equal(quant.pack_codes(codes, 2), np.array([[0b00111001]], np.uint8))


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="outside"):
        quant.pack_int4(np.array([[16], [0]]))
    with pytest.raises(ValueError, match="packing factor"):
        quant.pack_int4(np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="bits=5"):
        quant.pack_codes(np.zeros((2, 2), np.uint8), 5)
    with pytest.raises(ValueError, match="2-D"):
        quant.pack_int4(np.zeros((4,), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        quant.pack_int4(np.zeros((2, 2), np.float32))


def _weight(seed, k=16, n=8, gs=4, bits=4, sym=False, g_idx=False, act_scales=False):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (k, n))
    scales = rng.uniform(0.01, 1.0, (k // gs, n)).astype(np.float32)
    zeros = None if sym else rng.integers(0, 2**bits, (k // gs, n))
    gi = rng.permutation(np.arange(k) // gs).astype(np.int32) if g_idx else None
    s = rng.uniform(0.5, 2.0, k).astype(np.float32) if act_scales else None
    return quant.Int4Weight.from_codes(
        codes, scales, zeros, bits=bits, group_size=gs, g_idx=gi, act_scales=s
    ), codes


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("g_idx", [False, True])
@pytest.mark.parametrize("act_scales", [False, True])
def test_dequantize_matches_reference(sym, g_idx, act_scales):
    qw, codes = _weight(0, sym=sym, g_idx=g_idx, act_scales=act_scales)
    np.testing.assert_array_equal(qw.codes_in_input_order(), codes)
    assert_close(qw.dequantize(), quant.dequantize_reference(qw), np.float32)


def test_dequantize_hand_worked():
    # K=2, N=1, one group: scale 0.5, zero 3, codes 1 and 6; activation scales 2 and 4.
    qw = quant.Int4Weight.from_codes(
        np.array([[1], [6]]), np.array([[0.5]], np.float32), np.array([[3]]), group_size=2
    )
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), [[-1.0], [1.5]])
    sym = quant.Int4Weight.from_codes(np.array([[1], [9]]), np.array([[0.5]], np.float32), None, group_size=2)
    np.testing.assert_array_equal(np.asarray(sym.dequantize()), [[-3.5], [0.5]])
    scaled = quant.Int4Weight(
        qw.packed, qw.scales, qw.zeros, group_size=2, act_scales=np.array([2.0, 4.0], np.float32)
    )
    np.testing.assert_array_equal(np.asarray(scaled.dequantize()), [[-0.5], [0.375]])


def test_act_order_rows_are_stored_once_in_canonical_order():
    g_idx = np.array([1, 0, 1, 0], np.int32)
    codes = np.array([[10], [11], [12], [13]])
    qw = quant.Int4Weight.from_codes(codes, np.ones((2, 1), np.float32), None, group_size=2, g_idx=g_idx)
    # Group 0 = channels 1, 3 and group 1 = channels 0, 2, each in increasing channel order.
    np.testing.assert_array_equal(np.asarray(qw.perm), [1, 3, 0, 2])
    np.testing.assert_array_equal(np.asarray(qw.codes())[:, 0], [11, 13, 10, 12])
    np.testing.assert_array_equal(qw.g_idx(), g_idx)
    # The matmul permutes x once: x[:, perm] @ W_stored == x @ W.
    x = np.arange(4, dtype=np.float32)[None]
    w_stored = (np.asarray(qw.codes(), np.float32) - 8) * 1.0
    np.testing.assert_allclose(x[:, np.asarray(qw.perm)] @ w_stored, x @ np.asarray(qw.dequantize()))
    # A trivial g_idx needs no permutation.
    plain = quant.Int4Weight.from_codes(codes, np.ones((2, 1), np.float32), group_size=2, g_idx=[0, 0, 1, 1])
    assert plain.perm is None


def test_pytree_roundtrip_and_jit():
    qw, _ = _weight(1, g_idx=True, act_scales=True)
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    assert len(leaves) == 5
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (again.bits, again.group_size) == (qw.bits, qw.group_size)
    out = jax.jit(lambda w: w.dequantize())(qw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(qw.dequantize()))
    sym, _ = _weight(2, sym=True)
    assert jax.tree_util.tree_structure(sym).num_leaves == 2


def test_other_bit_widths_dequantize():
    for bits in (2, 3, 8):
        qw, codes = _weight(3, bits=bits, k=16)
        np.testing.assert_array_equal(qw.codes_in_input_order(), codes)
        assert_close(qw.dequantize(), quant.dequantize_reference(qw), np.float32)
    assert tolerance(np.float32).atol > 0


def test_int4weight_rejects_bad_parts():
    packed = np.zeros((4, 8), np.uint8)  # K=8, N=8
    scales = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="scales must be"):
        quant.Int4Weight(packed, np.ones((3, 8), np.float32), group_size=4)
    with pytest.raises(ValueError, match="zeros must be"):
        quant.Int4Weight(packed, scales, np.zeros((2, 7), np.uint8), group_size=4)
    with pytest.raises(ValueError, match="zeros exceed"):
        quant.Int4Weight(packed, scales, np.full((2, 8), 16, np.uint8), group_size=4)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quant.Int4Weight(packed, scales, group_size=3)
    with pytest.raises(ValueError, match="uint8"):
        quant.Int4Weight(packed.astype(np.int32), scales, group_size=4)
    with pytest.raises(ValueError, match="permutation"):
        quant.Int4Weight(packed, scales, group_size=4, perm=np.zeros(8, np.int32))
    with pytest.raises(ValueError, match="act_scales must be"):
        quant.Int4Weight(packed, scales, group_size=4, act_scales=np.ones(7, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        quant.Int4Weight(packed, np.full((2, 8), np.nan, np.float32), group_size=4)
    with pytest.raises(ValueError, match="bits"):
        quant.Int4Weight(packed, scales, group_size=4, bits=6)
    with pytest.raises(ValueError, match="exactly group_size"):
        quant.Int4Weight.from_codes(np.zeros((8, 8)), scales, group_size=4, g_idx=[0] * 5 + [1] * 3)
