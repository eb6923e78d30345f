import pytest

from roofline import (
    CHIPS,
    MODELS,
    attention_cost,
    chips_needed,
    estimate,
    expected_experts_touched,
    memory_footprint,
    step_components,
    usd_per_mtok,
    weight_bytes,
)
from roofline.hardware import Chip
from roofline.models import ModelShape

# A toy model and chip small enough to work every number out by hand.
TOY = ModelShape(
    name="toy", layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, ffn=8, vocab=16, source="test"
)
TOY_CHIP = Chip(
    "toy-chip", "toy", {"bf16": 1000.0}, bandwidth=100.0, memory=1e6, price_per_hour=3.6, sources={}
)


def test_hand_worked_decode_step():
    """Batch B=2, context L=3, bf16 weights and KV, one chip with 1000 FLOP/s, 100 B/s, $3.6/h.

    qkv_proj  [2,4] @ [4, (2+2·1)·2 = 8]: 2·2·4·8 = 128 FLOP; read 4·8·2 (W) + 2·4·2 (x) = 80 B,
              write 2·8·2 = 32 B -> 112 B -> max(0.128, 1.12) = 1.12 s
    attention KV per token per layer: 2 (k, v) · 1 head · 2 dims · 2 B = 8 B. Each query sees 3 keys:
              2 seqs · 2 heads · 3 = 12 scores · (2·2 + 2·2 + 5) = 156 FLOP; read 2·3·8 (KV) + 2·2·2·2 (q)
              = 64 B; write 2·(8 (new KV) + 2·2·2 (out)) = 32 B -> 96 B -> 0.96 s
    o_proj    [2,4] @ [4,4]: 64 FLOP; read 32 + 16, write 16 -> 64 B -> 0.64 s
    mlp       [2,4] @ [4,16] (gate|up): 256 FLOP, 128 + 16 + 64 = 208 B;
              [2,8] @ [8,4] (down): 128 FLOP, 64 + 32 + 16 = 112 B -> 384 FLOP, 320 B -> 3.2 s
    per layer 1.12 + 0.96 + 0.64 + 3.2 = 5.92 s; two layers 11.84 s
    lm_head   [2,4] @ [4,16]: 256 FLOP, 208 B -> 2.08 s
    step      13.92 s; tokens/s = 2 / 13.92; $/Mtok = 3.6 · 13.92 / (2 · 3600) · 1e6 = 6960
    """
    e = estimate(TOY, TOY_CHIP, batch=2, context=3, weights="bf16", kv="bf16")
    times = {c.name: c.time_s for c in e.components}
    assert times == pytest.approx(
        {"qkv_proj": 1.12, "attention": 0.96, "o_proj": 0.64, "mlp": 3.2, "lm_head": 2.08}
    )
    flops = {c.name: c.cost.flops for c in e.components}
    assert flops == {"qkv_proj": 128, "attention": 156, "o_proj": 64, "mlp": 384, "lm_head": 256}
    assert e.chips == 1 and e.fits
    assert e.step_s == pytest.approx(13.92)
    assert e.tokens_per_s == pytest.approx(2 / 13.92)
    assert e.usd_per_mtok == pytest.approx(6960.0)
    assert e.dominant_bound == "memory"
    # Weights: per layer qkv 64 + o 32 + mlp 192 = 288 B, two layers 576, embedding + lm_head 2·16·4·2 = 256;
    # KV: 2 seqs · 3 tokens · 2 layers · 8 B = 96.
    assert e.footprint.weight_bytes == 832 and e.footprint.kv_bytes == 96


def test_two_chips_halve_the_step_and_keep_the_price():
    one = estimate(TOY, TOY_CHIP, batch=2, context=3, chips=1)
    two = estimate(TOY, TOY_CHIP, batch=2, context=3, chips=2)
    assert two.step_s == pytest.approx(one.step_s / 2)
    assert two.usd_per_mtok == pytest.approx(one.usd_per_mtok)
    assert any("communication ignored" in n for n in two.notes)


def test_memory_check_picks_enough_chips():
    small = Chip(
        "small", "", {"bf16": 1000.0}, bandwidth=100.0, memory=1000.0, price_per_hour=1.0, sources={}
    )
    foot = memory_footprint(TOY, batch=2, context=3)  # 928 B > 0.9 · 1000
    assert chips_needed(foot, small) == 2
    assert estimate(TOY, small, batch=2, context=3).chips == 2
    squeezed = estimate(TOY, small, batch=2, context=3, chips=1)
    assert not squeezed.fits and "does not fit" in squeezed.notes[0]


def test_measured_times_replace_analytic_bounds():
    e = estimate(TOY, TOY_CHIP, batch=2, context=3, measured={"mlp": 10.0})
    mlp = next(c for c in e.components if c.name == "mlp")
    assert mlp.measured and mlp.bound_s == pytest.approx(3.2) and mlp.time_s == 10.0
    assert e.step_s == pytest.approx(13.92 - 2 * 3.2 + 2 * 10.0)
    with pytest.raises(ValueError, match="moe_experts"):
        estimate(TOY, TOY_CHIP, batch=2, context=3, measured={"moe_experts": 1.0})


def test_weight_formats_count_scales_and_zeros():
    assert weight_bytes(4096, 4096, "bf16") == 2 * 4096 * 4096
    assert weight_bytes(4096, 4096, "int8") == 4096 * 4096 + 2 * 4096
    # int4 g128: half a byte per weight + per (group, column) an fp16 scale and a 4-bit zero.
    assert weight_bytes(4096, 4096, "int4", 128) == 4096 * 4096 / 2 + 32 * 4096 * 2.5
    assert weight_bytes(4096, 4096, "int4", None) == 4096 * 4096 / 2 + 4096 * 2.5


def test_attention_component_agrees_with_the_counter():
    m = MODELS["llama-3-8b"]
    attn = next(c for c in step_components(m, batch=4, context=512) if c.name == "attention")
    ref = attention_cost(4, m.heads, m.kv_heads, 1, 512, m.head_dim, dtype="bf16")
    assert attn.cost.flops == ref.flops and attn.cost.transcendentals == ref.transcendentals
    new_kv = 4 * 2 * m.kv_heads * m.head_dim * 2
    assert attn.cost.bytes == ref.bytes + new_kv


def test_moe_expected_experts():
    assert expected_experts_touched(1, 8, 2) == pytest.approx(2.0)
    assert expected_experts_touched(10_000, 8, 2) == pytest.approx(8.0)
    assert 2 < expected_experts_touched(4, 8, 2) < 8


def test_moe_and_mla_models_have_their_components():
    names = [c.name for c in step_components(MODELS["deepseek-v3"], batch=8, context=1024)]
    assert names == ["qkv_proj", "attention", "o_proj", "mlp", "moe_router", "moe_experts", "lm_head"]
    counts = {c.name: c.count for c in step_components(MODELS["deepseek-v3"], batch=8, context=1024)}
    assert counts["mlp"] == 3 and counts["moe_experts"] == 58
    names = [c.name for c in step_components(MODELS["mixtral-8x7b"], batch=8, context=1024)]
    assert "mlp" not in names and "moe_experts" in names


def test_int4_is_faster_than_bf16_at_decode_on_every_chip():
    m = MODELS["llama-3-70b"]
    for chip in CHIPS.values():
        bf16 = estimate(m, chip, batch=1, context=1024, weights="bf16", chips=8)
        int4 = estimate(m, chip, batch=1, context=1024, weights="int4", chips=8)
        assert int4.step_s < bf16.step_s / 2.5


def test_prefill_counts_every_prompt_token():
    e = estimate(TOY, TOY_CHIP, batch=2, context=3, phase="prefill")
    assert e.tokens_per_s == pytest.approx(6 / e.step_s)
    attn = next(c for c in e.components if c.name == "attention")
    assert attn.cost.transcendentals == 2 * 2 * (1 + 2 + 3)


def test_usd_per_mtok_formula():
    assert usd_per_mtok(2.0, 8, 1000.0) == pytest.approx(2.0 * 8 / 3.6e6 * 1e6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch": 0}, "batch=0 must be an integer >= 1"),
        ({"context": -1}, "context=-1"),
        ({"weights": "fp4"}, "unknown weights='fp4'; valid choices: bf16, int8, int4"),
        ({"kv": "int4"}, "unknown kv='int4'; valid choices: bf16, fp8, int8"),
        ({"phase": "train"}, "unknown phase='train'"),
        ({"compute_dtype": "fp8"}, "no published peak for dtype='fp8'"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = {"batch": 1, "context": 16} | kwargs
    with pytest.raises(ValueError, match=match):
        estimate(TOY, TOY_CHIP, **args)
