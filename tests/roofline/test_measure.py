"""The measured token-cost path, end to end on tiny shapes."""

import json

import pytest

from roofline import estimate
from roofline.__main__ import main
from roofline.hardware import Chip
from roofline.measure import measure_step
from roofline.models import ModelShape

TINY = ModelShape(
    name="tiny", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, vocab=512, source="test"
)
TINY_MOE = ModelShape(
    name="tiny-moe",
    layers=2,
    hidden=128,
    heads=4,
    kv_heads=2,
    head_dim=32,
    ffn=256,
    vocab=256,
    experts=8,
    top_k=2,
    moe_ffn=128,
    source="test",
)
CHIP = Chip(
    "toy-host",
    "toy",
    {"fp32": 1e11, "bf16": 1e11},
    bandwidth=2e10,
    memory=1e10,
    price_per_hour=0.5,
    sources={},
)


@pytest.mark.parametrize(
    "model,weights", [(TINY, "int4"), (TINY, "bf16"), (TINY, "fp32"), (TINY_MOE, "bf16"), (TINY_MOE, "int4")]
)
def test_measure_step_end_to_end(model, weights):
    m = measure_step(model, CHIP, batch=2, context=48, weights=weights, min_time_s=0.0, progress=False)
    e = m.estimate
    names = [c.name for c in e.components]
    assert set(m.measured_s) == set(names)
    for c in e.components:
        assert c.measured and c.time_s == m.measured_s[c.name] > 0
    assert e.step_s == pytest.approx(sum(c.count * c.time_s for c in e.components))
    assert e.tokens_per_s == pytest.approx(2 / e.step_s)
    assert e.usd_per_mtok == pytest.approx(0.5 / (e.tokens_per_s * 3600) * 1e6)
    assert m.fits and "one layer" in m.notes[0]


def test_measured_arithmetic_matches_the_analytic_model_when_fed_its_times():
    analytic = estimate(TINY, CHIP, batch=3, context=64, weights="int4")
    fed = estimate(
        TINY,
        CHIP,
        batch=3,
        context=64,
        weights="int4",
        measured={c.name: c.bound_s for c in analytic.components},
    )
    assert fed.step_s == pytest.approx(analytic.step_s)
    assert fed.tokens_per_s == pytest.approx(analytic.tokens_per_s)
    assert fed.usd_per_mtok == pytest.approx(analytic.usd_per_mtok)


def test_moe_experts_too_large_to_measure_are_refused_clearly(monkeypatch):
    import roofline.measure as measure

    monkeypatch.setattr(measure, "MAX_COMPONENT_BYTES", 1 << 10)
    with pytest.raises(ValueError, match="moe_experts: one layer's experts take"):
        measure_step(TINY_MOE, CHIP, batch=1, context=16, weights="int4", min_time_s=0.0, progress=False)


def test_measure_cli_json(tmp_path, capsys, monkeypatch):
    # The command's own path, on the tiny model and chip (the real host measurement is tested elsewhere).
    import roofline.__main__ as cli

    monkeypatch.setattr(cli, "measure_host", lambda **kw: CHIP)
    monkeypatch.setattr(cli, "get_model", lambda name: TINY)
    rc = main(
        [
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--context",
            "64",
            "--weights",
            "int4",
            "--min-time",
            "0.001",
            "--json",
            "--out",
            str(tmp_path / "m.png"),
            "--price",
            "0.1",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    run = report["runs"][0]
    assert {c["name"] for c in run["components"]} == {"qkv_proj", "attention", "o_proj", "mlp", "lm_head"}
    for c in run["components"]:
        assert c["measured_s"] > 0 and c["bound_s"] > 0 and 0 < c["fraction"]
    assert run["tokens_per_s"] > 0 and run["usd_per_mtok"] > 0 and run["step_s"] > 0
    assert (tmp_path / "m.png").stat().st_size > 10_000


def test_measure_cli_rejects_unknown_weights(capsys):
    assert main(["measure", "--weights", "int8", "--out", ""]) == 2
    assert "valid choices: fp32, bf16, int4" in capsys.readouterr().err
