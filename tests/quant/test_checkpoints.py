"""Checkpoint layouts: exact round trips, hand-worked words, upstream quirks, files, bad input."""

import json
import os
import re
import warnings

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
    with pytest.raises(ValueError, match="group_size=4 disagrees with the tensors.*imply group_size=8"):
        quant.from_autoawq(awq, 4)
    with pytest.raises(ValueError, match="'scales' has shape"):
        quant.from_autoawq({**awq, "scales": awq["scales"][:, :4]}, 8)


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


# -- quantize -> save -> load is exact, in every layout ----------------------------------------------------


def _calibration(seed, k=64, n=16, samples=96):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, k)).astype(np.float32)
    x[:, rng.choice(k, 4, replace=False)] *= 12  # outlier channels, so AWQ's scales are not all 1
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return w, x


def _quantized(method, w, x, *, fmt, **kw):
    """`{name: Int4Weight}` from one quantizer, in the form `fmt` stores (AWQ's scales folded upstream)."""
    if method == "rtn":
        return {"rtn": quant.quantize_rtn(w, group_size=16, **kw)}
    if method == "gptq":
        # act-order where the layout has a g_idx for it.
        act_order = fmt != "awq"
        return {"gptq": quant.gptq_quantize(w, quant.hessian(x), group_size=16, act_order=act_order, **kw)}
    if fmt == "tokenlab":
        return {"awq": quant.awq_quantize(w, x, group_size=16, grid=8, **kw)}  # act_scales kept
    qws = quant.awq_quantize_shared([w, w[:, :8]], x, group_size=16, grid=8, **kw)
    _, _, folded = quant.fold_scales_into_norm(np.ones(w.shape[0], np.float32), None, qws)
    return {"awq.q": folded[0], "awq.k": folded[1]}


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantize_save_load_is_exact(tmp_path, fmt, method):
    # The quantizers choose codes for float16 scales, the dtype every upstream layout stores: the loaded
    # weight is the quantized one, field for field and in dequantize(), bit for bit.
    w, x = _calibration(1)
    weights = _quantized(method, w, x, fmt=fmt)
    if fmt == "gptq":
        assert all(np.all(np.asarray(qw.zero_points()) > 0) for qw in weights.values())  # v1 holds no 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rounding warning: nothing is rounded on the way out
        quant.save_checkpoint(tmp_path, weights, format=fmt)
    loaded = quant.load_checkpoint(tmp_path)
    assert sorted(loaded) == sorted(weights)
    for name, qw in weights.items():
        assert qw.scales.dtype == np.float16
        assert_same_weight(loaded[name], qw)
        assert_close_dequant(loaded[name], qw)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_float32_scales_round_trip_exactly_in_the_lab_format(tmp_path, method):
    w, x = _calibration(2)
    weights = _quantized(method, w, x, fmt="tokenlab", scale_dtype=np.float32)
    quant.save_checkpoint(tmp_path, weights, format="tokenlab")
    loaded = quant.load_checkpoint(tmp_path)
    for name, qw in weights.items():
        assert qw.scales.dtype == np.float32
        assert_same_weight(loaded[name], qw)
        assert_close_dequant(loaded[name], qw)


@pytest.mark.parametrize("fmt", ["gptq_v2", "awq"])
def test_float32_scales_in_a_float16_layout_warn(tmp_path, fmt):
    w, _ = _calibration(3)
    qw = quant.quantize_rtn(w, group_size=16, scale_dtype=np.float32)
    with pytest.warns(RuntimeWarning, match=f"format='{fmt}' stores float16 scales.*scale_dtype=np.float16"):
        quant.save_checkpoint(tmp_path, {"layer": qw}, format=fmt)
    back = quant.load_checkpoint(tmp_path)["layer"]
    np.testing.assert_array_equal(np.asarray(back.scales), np.asarray(qw.scales).astype(np.float16))
    # Scales that are float16 values already, in a float32 array, are stored without a word.
    exact = quant.Int4Weight(qw.packed, np.asarray(back.scales, np.float32), qw.zeros, group_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quant.save_checkpoint(tmp_path, {"layer": exact}, format=fmt)


# -- checkpoint errors name the file and what is wrong ---------------------------------------------------


def _saved(tmp_path, fmt="gptq_v2", **kw):
    quant.save_checkpoint(tmp_path, {"layer": random_weight(0, (32, 16), min_zero=1, **kw)}, format=fmt)
    return tmp_path


def test_truncated_tensors_file_names_the_file(tmp_path):
    path = _saved(tmp_path) / "model.safetensors"
    data = path.read_bytes()
    for cut in (len(data) - 8, 20, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(
            ValueError, match=rf"^{re.escape(str(path))} cannot be read as safetensors .*truncated"
        ):
            quant.load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{\n  "bits": 4,\n  "group_size": 8,,\n}\n', r" is not valid JSON: .* at line 3, column 19"),
        ("", r" is not valid JSON: .* at line 1, column 1"),
        ("[4, 8]", r" must hold a JSON object, got a JSON list"),
        ('{"bits": 5, "checkpoint_format": "gptq_v2"}', r": bits=5 is not supported"),
        ('{"bits": 4, "group_size": "128", "checkpoint_format": "gptq_v2"}', r": group_size='128' must be"),
        ('{"bits": 4, "group_size": 0, "checkpoint_format": "gptq_v2"}', r": group_size=0 must be"),
        ('{"checkpoint_format": "exl2"}', r": unknown format"),
    ],
)
def test_bad_config_names_the_file(tmp_path, text, match):
    config = _saved(tmp_path) / "quantize_config.json"
    config.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(config))}{match}"):
        quant.load_checkpoint(tmp_path)


def test_path_to_the_tensors_file_reads_its_directory(tmp_path):
    _saved(tmp_path)
    whole = quant.load_checkpoint(tmp_path)
    assert_same_weight(quant.load_checkpoint(tmp_path / "model.safetensors")["layer"], whole["layer"])
    assert_same_weight(quant.load_checkpoint(str(tmp_path / "model.safetensors"))["layer"], whole["layer"])
    with pytest.raises(ValueError, match=r"quantize_config.json is a file, not a checkpoint directory"):
        quant.load_checkpoint(tmp_path / "quantize_config.json")
    with pytest.raises(ValueError, match=r"absent does not exist"):
        quant.load_checkpoint(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"absent.safetensors does not exist"):
        quant.load_checkpoint(tmp_path / "absent.safetensors")


def test_save_refuses_a_file_path(tmp_path):
    qw = random_weight(0, (16, 8), min_zero=1)
    with pytest.raises(ValueError, match=r"names a file; save_checkpoint writes a directory"):
        quant.save_checkpoint(tmp_path / "model.safetensors", {"layer": qw})
    assert not list(tmp_path.iterdir())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt' names a file"):
        quant.save_checkpoint(tmp_path / "notes.txt", {"layer": qw})


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("config_gs", [16, 4, -1])
def test_config_group_size_that_disagrees_with_the_tensors_is_an_error(tmp_path, fmt, config_gs):
    # The tensors hold groups of 8 (K=32: 4 groups); the config says otherwise.
    config = _saved(tmp_path, fmt=fmt) / "quantize_config.json"
    fields = json.loads(config.read_text())
    key = "q_group_size" if fmt == "awq" else "group_size"
    assert fields[key] == 8
    config.write_text(json.dumps({**fields, key: config_gs}))
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(config))} says group_size={config_gs}, .* group_size=8$"
    ):
        quant.load_checkpoint(tmp_path)


def test_per_channel_config_agrees_with_one_group(tmp_path):
    qw = random_weight(0, (32, 16), gs=32, min_zero=1)
    for fmt in quant.FORMATS:
        quant.save_checkpoint(tmp_path / fmt, {"layer": qw}, format=fmt)
        config = tmp_path / fmt / "quantize_config.json"
        fields = json.loads(config.read_text())
        assert fields["group_size"] == -1
        assert_same_weight(quant.load_checkpoint(tmp_path / fmt)["layer"], qw)
        # Writing K itself is the same grouping.
        config.write_text(json.dumps({**fields, "group_size": 32, "q_group_size": 32}))
        assert_same_weight(quant.load_checkpoint(tmp_path / fmt)["layer"], qw)


def test_layer_errors_name_the_file_and_the_layer(tmp_path):
    from safetensors.numpy import load_file, save_file

    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    tensors["layer.qzeros"] = tensors["layer.qzeros"][:1]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: layer 'layer' .*'qzeros' has shape"):
        quant.load_checkpoint(tmp_path)
    save_file({"model.norm.weight": np.ones(4, np.float16)}, str(path))
    with pytest.raises(ValueError, match=r"hold no quantized layer"):
        quant.load_checkpoint(tmp_path)
