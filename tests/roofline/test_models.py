import pytest

from roofline import MODELS, get_model

# Published parameter counts, in billions.
PUBLISHED = {
    "llama-3-8b": 8.03,
    "llama-3-70b": 70.6,
    "mixtral-8x7b": 46.7,
    "qwen3-30b-a3b": 30.5,
    "deepseek-v3": 671,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    assert get_model(name).params() / 1e9 == pytest.approx(PUBLISHED[name], rel=0.01)


def test_shapes_are_consistent():
    for m in MODELS.values():
        assert m.heads % m.kv_heads == 0
        assert m.source
        if m.is_moe:
            assert 0 < m.top_k <= m.experts and m.moe_ffn > 0


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match="unknown model 'llama'; valid models: llama-3-8b, llama-3-70b"):
        get_model("llama")
