"""Checkpoint layouts: exact round trips, hand-worked words, upstream quirks, files, bad input."""

import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import quant
import quant.checkpoints as ckpt

SHAPES = [(16, 8), (32, 16), (64, 24)]


def random_weight(seed, shape, *, bits=4, gs=8, sym=False, act_order=False, act_scales=False, min_zero=0):
    rng = np.random.default_rng(seed)
    k, n = shape
    codes = rng.integers(0, 2**bits, (k, n))
    scales = rng.uniform(1e-3, 2.0, (k // gs, n)).astype(np.float16)
    zeros = None if sym else rng.integers(min_zero, 2**bits, (k // gs, n))
    g_idx = rng.permutation(np.arange(k) // gs).astype(np.int32) if act_order else None
    s = rng.uniform(0.5, 2.0, k).astype(np.float32) if act_scales else None
    return quant.Int4Weight.from_codes(
        codes, scales, zeros, bits=bits, group_size=gs, g_idx=g_idx, act_scales=s
    )


def assert_same_weight(a, b):
    for leaf in ("packed", "scales", "zeros", "perm", "act_scales"):
        x, y = getattr(a, leaf), getattr(b, leaf)
        assert (x is None) == (y is None), leaf
        if x is not None:
            assert np.asarray(x).dtype == np.asarray(y).dtype, leaf
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=leaf)
    assert (a.bits, a.group_size) == (b.bits, b.group_size)


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@given(
    shape=st.sampled_from(SHAPES),
    fmt=st.sampled_from(quant.GPTQ_FORMATS),
    bits=st.sampled_from([4, 2, 8]),
    sym=st.booleans(),
    act_order=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_gptq_layouts_round_trip_exactly(shape, fmt, bits, sym, act_order, seed):
    k, n = shape
    f = 32 // bits
    if k % f or n % f:
        shape = (max(k, f), max(n, f) // f * f)
    # v1 cannot hold a zero point 0: draw zeros from 1 up for it.
    qw = random_weight(seed, shape, bits=bits, gs=8 if bits != 8 else 16, sym=sym, act_order=act_order,
                       min_zero=1 if fmt == "gptq" else 0)  # fmt: skip
    tensors = quant.to_autogptq(qw, format=fmt)
    assert tensors["qweight"].dtype == np.int32 and tensors["qweight"].shape == (shape[0] // f, shape[1])
    assert tensors["qzeros"].dtype == np.int32 and tensors["qzeros"].shape == (qw.num_groups, shape[1] // f)
    assert tensors["scales"].dtype == np.float16 and tensors["g_idx"].dtype == np.int32
    back = quant.from_autogptq(tensors, format=fmt, sym=sym)
    assert_same_weight(back, qw)
    assert_same_tensors(quant.to_autogptq(back, format=fmt), tensors)


@given(shape=st.sampled_from(SHAPES), sym=st.booleans(), seed=st.integers(0, 2**31))
def test_awq_layout_round_trips_exactly(shape, sym, seed):
    qw = random_weight(seed, shape, sym=sym)
    tensors = quant.to_autoawq(qw)
    assert tensors["qweight"].shape == (shape[0], shape[1] // 8) and tensors["qweight"].dtype == np.int32
    back = quant.from_autoawq(tensors, 8, sym=sym)
    assert_same_weight(back, qw)
    assert_same_tensors(quant.to_autoawq(back), tensors)


def test_gptq_v1_and_v2_words_hand_worked():
    # K=8, N=8, per-channel. Column n holds code n in every row; zeros are 1..8 across the columns.
    codes = np.tile(np.arange(8), (8, 1))
    qw = quant.Int4Weight.from_codes(codes, np.ones((1, 8), np.float16), np.arange(1, 9)[None], group_size=8)
    v2 = quant.to_autogptq(qw, format="gptq_v2")
    # qweight word [0, n]: rows 0..7 in nibbles 0..7, all equal to n.
    np.testing.assert_array_equal(v2["qweight"][0].view(np.uint32), [0x11111111 * n for n in range(8)])
    # qzeros word [0, 0]: columns 0..7 in nibbles 0..7.
    assert v2["qzeros"][0, 0].view(np.uint32) == 0x87654321
    v1 = quant.to_autogptq(qw, format="gptq")
    assert v1["qzeros"][0, 0].view(np.uint32) == 0x76543210  # zero - 1
    np.testing.assert_array_equal(v1["g_idx"], np.zeros(8, np.int32))


def test_awq_word_hand_worked():
    # One row, N=8: column c holds code c. Nibble i holds column order[i] = 0, 2, 4, 6, 1, 3, 5, 7.
    qw = quant.Int4Weight.from_codes(
        np.tile(np.arange(8), (2, 1)), np.ones((1, 8), np.float16), np.full((1, 8), 3), group_size=2
    )
    t = quant.to_autoawq(qw)
    assert t["qweight"][0, 0].view(np.uint32) == 0x75316420
    assert t["qzeros"][0, 0].view(np.uint32) == 0x33333333


def test_act_order_g_idx_is_written_in_input_order():
    W = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    H = np.diag(np.arange(1, 33, dtype=np.float32))  # decreasing diagonal order = reversed channels
    qw = quant.gptq_quantize(W, H, group_size=8, act_order=True)
    t = quant.to_autogptq(qw, format="gptq_v2")
    np.testing.assert_array_equal(t["g_idx"], 3 - np.arange(32) // 8)
    back = quant.from_autogptq(t, format="gptq_v2")
    np.testing.assert_array_equal(np.asarray(back.perm), np.asarray(qw.perm))
    np.testing.assert_array_equal(
        np.asarray(back.dequantize()),
        np.asarray(quant.Int4Weight(qw.packed, qw.scales.astype(np.float16), qw.zeros, group_size=8,
                                    perm=qw.perm).dequantize()),
    )  # fmt: skip


def test_gptq_v1_zero_point_quirks():
    qw = random_weight(0, (16, 8), min_zero=1)
    zeros = np.asarray(qw.zeros).copy()
    zeros[0, 3] = 0
    with_zero = quant.Int4Weight(qw.packed, qw.scales, zeros, group_size=8)
    with pytest.raises(ValueError, match="zero point 0"):
        quant.to_autogptq(with_zero, format="gptq")
    v2 = quant.to_autogptq(with_zero, format="gptq_v2")
    assert_same_weight(quant.from_autogptq(v2, format="gptq_v2"), with_zero)
    # A v1 file whose packer wrapped zero - 1 = -1 into an all-ones field is refused, not misread.
    v1 = quant.to_autogptq(qw, format="gptq")
    v1["qzeros"] = v1["qzeros"].copy()
    v1["qzeros"][0, 0] = np.uint32(0xFFFFF000 | (v1["qzeros"][0, 0].view(np.uint32) & 0xFFF)).view(np.int32)
    with pytest.raises(ValueError, match="all-ones"):
        quant.from_autogptq(v1, format="gptq")


def test_act_scales_are_refused_by_upstream_layouts_and_kept_by_ours(tmp_path):
    qw = random_weight(0, (16, 8), act_scales=True, min_zero=1)
    for convert in (lambda w: quant.to_autogptq(w, format="gptq"), quant.to_autoawq):
        with pytest.raises(ValueError, match="act_scales"):
            convert(qw)
    with pytest.raises(ValueError, match="act_scales"):
        quant.save_checkpoint(tmp_path / "awq", {"layer": qw}, format="awq")
    quant.save_checkpoint(tmp_path / "ours", {"layer": qw}, format="tokenlab")
    back = quant.load_checkpoint(tmp_path / "ours")["layer"]
    assert_same_weight(back, qw)
    assert_close_dequant(back, qw)


def assert_close_dequant(a, b):
    np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))


def test_awq_refuses_act_order_and_other_bits():
    with pytest.raises(ValueError, match="g_idx"):
        quant.to_autoawq(random_weight(0, (16, 8), act_order=True))
    with pytest.raises(ValueError, match="4-bit"):
        quant.to_autoawq(random_weight(0, (16, 8), bits=2))
    with pytest.raises(ValueError, match="bits=3"):
        quant.to_autogptq(random_weight(0, (16, 8), bits=3))


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_save_and_load_checkpoint(tmp_path, fmt):
    layers = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")
    weights = {
        name: random_weight(i, (32, 16), act_order=(fmt != "awq" and i == 0), min_zero=1)
        for i, name in enumerate(layers)
    }
    quant.save_checkpoint(tmp_path, weights, format=fmt)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "quantize_config.json"]
    config = json.loads((tmp_path / "quantize_config.json").read_text())
    if fmt == "awq":
        assert (config["quant_method"], config["w_bit"], config["q_group_size"], config["version"]) == (
            "awq", 4, 8, "GEMM",
        )  # fmt: skip
    else:
        assert (config["bits"], config["group_size"], config["desc_act"], config["checkpoint_format"]) == (
            4, 8, True, fmt,
        )  # fmt: skip
    loaded = quant.load_checkpoint(tmp_path)
    assert sorted(loaded) == sorted(layers)
    for name in layers:
        assert_same_weight(loaded[name], weights[name])
    # Upstream files carry other tensors too (biases, norms); they are ignored.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(16, np.float16)
    tensors["model.norm.weight"] = np.ones(16, np.float16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert sorted(quant.load_checkpoint(tmp_path)) == sorted(layers)


def test_save_is_atomic(tmp_path, monkeypatch):
    weights = {"layer": random_weight(0, (16, 8))}
    quant.save_checkpoint(tmp_path, weights, format="gptq_v2")
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        quant.save_checkpoint(tmp_path, {"layer": random_weight(1, (16, 8))}, format="gptq_v2")
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "quantize_config.json"]
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_save_rejects_mixed_or_bad_weights(tmp_path):
    with pytest.raises(ValueError, match="group_size"):
        quant.save_checkpoint(
            tmp_path, {"a": random_weight(0, (16, 8)), "b": random_weight(0, (16, 8), gs=4)}, format="gptq_v2"
        )
    with pytest.raises(ValueError, match="format='safetensors'"):
        quant.save_checkpoint(tmp_path, {"a": random_weight(0, (16, 8))}, format="safetensors")
    with pytest.raises(ValueError, match="empty"):
        quant.save_checkpoint(tmp_path, {}, format="gptq")
    with pytest.raises(ValueError, match="not an Int4Weight"):
        quant.save_checkpoint(tmp_path, {"a": np.zeros((4, 4))}, format="gptq")
    assert not list(tmp_path.iterdir())


def test_bad_checkpoint_tensors():
    good = quant.to_autogptq(random_weight(0, (16, 8), min_zero=1), format="gptq")
    for missing in ("qweight", "qzeros", "scales"):
        with pytest.raises(ValueError, match=f"'{missing}' is missing"):
            quant.from_autogptq({k: v for k, v in good.items() if k != missing})
    with pytest.raises(ValueError, match="'scales' has shape"):
        quant.from_autogptq({**good, "scales": good["scales"][:, :4]})
    with pytest.raises(ValueError, match="'qzeros' has shape"):
        quant.from_autogptq({**good, "qzeros": good["qzeros"][:1]})
    with pytest.raises(ValueError, match="'qweight' has dtype"):
        quant.from_autogptq({**good, "qweight": good["qweight"].astype(np.float32)})
    with pytest.raises(ValueError, match="fits no GPTQ bit width"):
        quant.from_autogptq({**good, "g_idx": np.zeros(12, np.int32)})
    with pytest.raises(ValueError, match="format='marlin'"):
        quant.from_autogptq(good, format="marlin")
    with pytest.raises(ValueError, match="sym=True"):
        quant.from_autogptq(good, sym=True)
    awq = quant.to_autoawq(random_weight(0, (16, 8)))
    with pytest.raises(ValueError, match="not divisible by group_size"):
        quant.from_autoawq(awq, 5)
    with pytest.raises(ValueError, match="'scales' has shape"):
        quant.from_autoawq(awq, 4)


def test_bad_checkpoint_directory(tmp_path):
    with pytest.raises(ValueError, match="quantize_config.json is missing"):
        quant.load_checkpoint(tmp_path)
    quant.save_checkpoint(tmp_path, {"layer": random_weight(0, (16, 8))}, format="gptq_v2")
    config = json.loads((tmp_path / "quantize_config.json").read_text())
    (tmp_path / "quantize_config.json").write_text(json.dumps({**config, "checkpoint_format": "exl2"}))
    with pytest.raises(ValueError, match="unknown format"):
        quant.load_checkpoint(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["layer.scales"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layer 'layer'.*'scales' is missing"):
        quant.load_checkpoint(tmp_path)
    assert ckpt.TENSORS_NAME == "model.safetensors"
