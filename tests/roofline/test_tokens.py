import dataclasses

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
from roofline.tokens import all_to_all_s, ring_all_reduce_s

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
        # The collectives move activations, the same for both formats: compare the kernels' time.
        assert int4.comm_s == pytest.approx(bf16.comm_s)
        assert int4.step_s - int4.comm_s < (bf16.step_s - bf16.comm_s) / 2.5


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


# A chip with a link: 1000 B/s per direction, 0.5 s per collective.
LINKED = Chip(
    "linked",
    "toy",
    {"bf16": 1000.0},
    bandwidth=100.0,
    memory=1e6,
    price_per_hour=3.6,
    sources={},
    link="toy link",
    link_bandwidth=1000.0,
    link_latency=0.5,
)
TOY_MOE = ModelShape(
    name="toy-moe",
    layers=3,
    hidden=4,
    heads=2,
    kv_heads=1,
    head_dim=2,
    ffn=8,
    vocab=16,
    experts=4,
    top_k=2,
    moe_ffn=8,
    dense_layers=1,
    source="test",
)


def test_ring_all_reduce_time_by_hand():
    # 4 chips, 2000 B: 0.5 s + 2 · 3/4 · 2000 / 1000 = 0.5 + 3 = 3.5 s.
    assert ring_all_reduce_s(2000.0, 4, LINKED) == pytest.approx(3.5)
    assert ring_all_reduce_s(2000.0, 1, LINKED) == 0.0


def test_one_mib_all_reduce_on_eight_h100s_is_nccl_like():
    # 12 µs + 2 · 7/8 · 1 MiB / 450 GB/s = 12 + 4.08 µs, inside the 15-25 µs NCCL takes.
    t = ring_all_reduce_s(2**20, 8, CHIPS["h100-sxm"])
    assert t == pytest.approx(12e-6 + 2 * 7 / 8 * 2**20 / 450e9)
    assert 15e-6 <= t <= 25e-6


def test_all_to_all_time_by_hand():
    # 4 chips, each scatters 800 B: 0.5 s + 3/4 · 800 / 1000 = 0.5 + 0.6 = 1.1 s.
    assert all_to_all_s(800.0, 4, LINKED) == pytest.approx(1.1)
    assert all_to_all_s(800.0, 1, LINKED) == 0.0


def test_comm_is_zero_on_one_chip():
    e = estimate(TOY, LINKED, batch=2, context=3, chips=1)
    assert e.comm_s == 0.0 and e.collectives == ()
    assert e.step_s == pytest.approx(sum(c.count * c.time_s for c in e.components))


def test_tensor_parallel_adds_two_all_reduces_per_layer():
    """TOY on 2 chips, decode batch 2: each all-reduce is over 2 tokens × hidden 4 × 2 bytes = 16 B:
    0.5 + 2 · 1/2 · 16 / 1000 = 0.516 s, 2 per layer × 2 layers = 4 per step = 2.064 s."""
    one = estimate(TOY, LINKED, batch=2, context=3, chips=1)
    two = estimate(TOY, LINKED, batch=2, context=3, chips=2)
    (ar,) = two.collectives
    assert (ar.name, ar.count, ar.group, ar.bytes) == ("tp_all_reduce", 4, 2, 16.0)
    assert ar.seconds == pytest.approx(0.516)
    assert two.comm_s == pytest.approx(2.064)
    assert two.step_s == pytest.approx(one.step_s / 2 + 2.064)
    assert two.tp == 2 and two.ep == 1
    assert any("collectives over toy link" in n for n in two.notes)


def test_expert_parallel_adds_two_all_to_alls_per_moe_layer():
    """TOY_MOE (3 layers, 2 MoE) on 4 chips as tp=2 × ep=2, decode batch 8:
    all-reduce: 8 / ep=2 tokens × 4 × 2 B = 32 B over 2 chips: 0.5 + 32/1000 · 2·1/2 = 0.532 s, 6 per step;
    all-to-all: each chip scatters 8/2 tokens × top_k 2 × 4 × 2 B = 64 B over 2 chips: 0.5 + 1/2 · 64/1000
    = 0.532 s, 2 per MoE layer = 4 per step."""
    e = estimate(TOY_MOE, LINKED, batch=8, context=3, chips=4, tp=2, ep=2)
    by_name = {c.name: c for c in e.collectives}
    ar, a2a = by_name["tp_all_reduce"], by_name["ep_all_to_all"]
    assert (ar.count, ar.group, ar.bytes) == (6, 2, 32.0)
    assert ar.seconds == pytest.approx(0.532)
    assert (a2a.count, a2a.group, a2a.bytes) == (4, 2, 64.0)
    assert a2a.seconds == pytest.approx(0.532)
    assert e.comm_s == pytest.approx(6 * 0.532 + 4 * 0.532)
    # Expert parallel only: no all-reduce.
    ep_only = estimate(TOY_MOE, LINKED, batch=8, context=3, ep=4, chips=4)
    assert [c.name for c in ep_only.collectives] == ["ep_all_to_all"] and ep_only.tp == 1
    assert not any("batch=8 < ep" in n for n in ep_only.notes)
    small = estimate(TOY_MOE, LINKED, batch=2, context=3, ep=4, chips=4)
    assert any("batch=2 < ep=4" in n for n in small.notes)


def test_layout_defaults_and_errors():
    assert estimate(TOY, LINKED, batch=2, context=3, chips=4).tp == 4
    assert estimate(TOY, LINKED, batch=2, context=3, tp=2).chips == 2
    moe = estimate(TOY_MOE, LINKED, batch=2, context=3, ep=2)
    assert (moe.chips, moe.tp, moe.ep) == (2, 1, 2)
    with pytest.raises(ValueError, match="expert parallelism needs an MoE model"):
        estimate(TOY, LINKED, batch=2, context=3, ep=2)
    with pytest.raises(ValueError, match="tp=2 × ep=2 must equal chips=8"):
        estimate(TOY_MOE, LINKED, batch=2, context=3, chips=8, tp=2, ep=2)
    with pytest.raises(ValueError, match="ep=3 must divide the number of routed experts"):
        estimate(TOY_MOE, LINKED, batch=2, context=3, ep=3)


def test_data_parallel_groups_each_read_their_own_copy_of_the_dense_weights():
    """tp=1 × ep=2: each chip reads all of a dense component's weights (split over tp=1), but only half
    of the activations; under tp=2 it reads half the weights."""
    tp2 = estimate(TOY_MOE, LINKED, batch=2, context=3, chips=2, tp=2)
    ep2 = estimate(TOY_MOE, LINKED, batch=2, context=3, chips=2, tp=1, ep=2)
    o_tp = next(c for c in tp2.components if c.name == "o_proj")
    o_ep = next(c for c in ep2.components if c.name == "o_proj")
    assert o_tp.chip_s == pytest.approx(o_tp.bound_s / 2)
    w = next(c for c in step_components(TOY_MOE, batch=2, context=3) if c.name == "o_proj").weight_bytes
    assert o_ep.chip_s == pytest.approx((w + (o_ep.cost.bytes - w) / 2) / LINKED.bandwidth)


def test_a_chip_without_link_figures_says_communication_is_ignored():
    e = estimate(TOY, TOY_CHIP, batch=2, context=3, chips=2)
    assert e.comm_s == 0.0 and any("communication ignored" in n for n in e.notes)


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_every_catalogue_chip_has_a_sourced_link(name):
    chip = CHIPS[name]
    assert chip.has_interconnect and chip.link
    assert chip.link in chip.sources["link_bandwidth"]  # the source names the link
    assert chip.sources["link_latency"].strip()
    assert 1e10 <= chip.link_bandwidth <= 2e12
    assert 1e-6 <= chip.link_latency <= 5e-5


# -- names for the model and the chip ---------------------------------------------------------------------


def test_estimate_takes_catalogue_names():
    by_name = estimate("llama-3-70b", "h100-sxm", batch=4, context=1024, weights="int4")
    by_object = estimate(MODELS["llama-3-70b"], CHIPS["h100-sxm"], batch=4, context=1024, weights="int4")
    assert by_name == by_object
    with pytest.raises(ValueError, match="unknown model 'llama-70b'; valid models: llama-3-8b"):
        estimate("llama-70b", "h100-sxm", batch=1, context=16)
    with pytest.raises(ValueError, match="unknown chip 'h100'"):
        estimate("llama-3-70b", "h100", batch=1, context=16)


def test_estimate_names_the_type_it_expects():
    with pytest.raises(TypeError, match="model must be a ModelShape or a model name .*llama-3-70b.*got dict"):
        estimate({"name": "llama-3-70b"}, "h100-sxm", batch=1, context=16)
    with pytest.raises(TypeError, match="chip must be a Chip or a chip name .*got int"):
        estimate("llama-3-70b", 3, batch=1, context=16)


# -- tensor parallelism must split the model --------------------------------------------------------------


@pytest.mark.parametrize(
    "model,tp,match",
    [
        (MODELS["llama-3-70b"], 3, "tp=3 cannot split llama-3-70b: its 64 query heads do not split evenly"),
        (MODELS["llama-3-70b"], 128, "tp=128 cannot split llama-3-70b: its 64 query heads"),
        # 48 heads and 8 kv heads: 12 chips split the heads, but 8 kv heads neither split over 12 nor
        # replicate evenly onto them.
        (
            ModelShape("h48", 2, 64, heads=48, kv_heads=8, head_dim=8, ffn=96, vocab=16, source="test"),
            12,
            "its 8 kv heads neither split evenly over 12 chips nor replicate evenly",
        ),
        (
            ModelShape("f12", 2, 64, heads=8, kv_heads=8, head_dim=8, ffn=12, vocab=16, source="test"),
            8,
            "its FFN width 12 does not split evenly over 8 chips",
        ),
        (MODELS["qwen3-30b-a3b"], 512, "its 32 query heads"),
    ],
)
def test_a_tp_that_cannot_split_the_model_raises(model, tp, match):
    with pytest.raises(ValueError, match=match):
        estimate(model, LINKED, batch=1, context=16, tp=tp)


def test_kv_heads_may_replicate_and_a_derived_tp_that_cannot_split_is_noted():
    # 16 chips over 8 kv heads: each kv head on two chips (allowed, and noted: the KV bytes do not count it).
    e = estimate(MODELS["llama-3-70b"], CHIPS["h100-sxm"], batch=1, context=16, tp=16)
    assert e.tp == 16 and any("replicated on 2 chips" in n for n in e.notes)
    # A tp that follows from `chips` is kept, with a note.
    e = estimate(TOY, LINKED, batch=2, context=3, chips=4)
    assert any("tp=4 cannot split toy" in n for n in e.notes)


# -- memory fit under expert parallelism ------------------------------------------------------------------


def test_expert_parallel_memory_fit_by_hand():
    """Mixtral-8x7B, bf16, tp=1 × ep=4, batch 64 × context 32768. Per chip: the dense weights whole (tp=1),
    a quarter of the experts and a quarter of the KV cache (each ep group holds its own sequences).

    dense  per layer: qkv 4096·(32 + 2·8)·128 + o 4096·4096 + router 4096·8 = 41,975,808 weights;
           32 layers + embedding and lm_head 2·32000·4096 = 1,605,369,856 weights = 3,210,739,712 B
    experts 32 layers · 8 · 3·4096·14336 = 45,097,156,608 weights = 90,194,313,216 B
    KV     per token and layer 2·8·128·2 = 4096 B; 64·32768·32·4096 B = 274,877,906,944 B
    per chip = 3,210,739,712 + 90,194,313,216 / 4 + 274,877,906,944 / 4 = 94,478,794,752 B (94.5 GB)
    Dividing the KV by tp = 1 instead would give 300.6 GB. A 120 GB chip (108 GB usable) holds the first."""
    dense = 32 * (4096 * 48 * 128 + 4096 * 4096 + 4096 * 8) + 2 * 32000 * 4096
    assert dense == 1_605_369_856
    experts = 32 * 8 * 3 * 4096 * 14336
    kv = 64 * 32768 * 32 * 4096
    per_chip = 2 * dense + 2 * experts / 4 + kv / 4
    assert per_chip == 94_478_794_752
    chip = dataclasses.replace(CHIPS["h100-sxm"], memory=120e9)
    e = estimate(MODELS["mixtral-8x7b"], chip, batch=64, context=32768, weights="bf16", tp=1, ep=4)
    assert (e.chips, e.tp, e.ep) == (4, 1, 4)
    assert e.memory_per_chip == pytest.approx(per_chip)
    assert e.fits and not any("does not fit" in n for n in e.notes)
    assert 2 * dense + 2 * experts / 4 + kv > 0.9 * chip.memory  # the over-count would not fit
