"""The measured token-cost path, end to end on tiny shapes."""

import json

import pytest

from roofline import estimate
from roofline.cli import main
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
    import roofline.cli as cli

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


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_native_bf16_path_runs_and_names_each_components_implementation(weights):
    """The accelerator path (native bf16 dots, bf16 activations), run here at tiny shapes."""
    m = measure_step(
        TINY_MOE, CHIP, batch=2, context=32, weights=weights, min_time_s=0.0, progress=False, native_bf16=True
    )
    assert set(m.impls) == {c.name for c in m.estimate.components}
    assert m.impls["lm_head"] == "dot[xla, bf16]"
    assert m.impls["attention"].startswith("paged_attention[")
    assert m.impls["moe_experts"].startswith("moe_ffn[")
    if weights == "int4":
        assert m.impls["qkv_proj"].startswith("int4_matmul[")
    else:
        assert m.impls["qkv_proj"] == "dot[xla, bf16]"
        assert not any("float32 weights" in n for n in m.notes)


def test_cpu_path_names_the_float32_workaround():
    m = measure_step(TINY, CHIP, batch=1, context=16, weights="bf16", min_time_s=0.0, progress=False)
    assert m.impls["mlp"] == "dot[xla, bf16 in float32 blocks]"


def test_native_bf16_dot_and_the_cpu_workaround_match_the_numpy_product():
    import jax.numpy as jnp
    import numpy as np

    from roofline.measure import _matmul_any
    from tests.tolerances import normalized_error, tolerance

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 256), dtype=np.float32))
    w_t = jnp.asarray(rng.standard_normal((64, 256), dtype=np.float32), jnp.bfloat16)
    expected = np.asarray(x, np.float64) @ np.asarray(w_t, np.float64).T
    for native in (True, False):
        got = _matmul_any(x, w_t, native)
        assert got.dtype == jnp.float32
        assert normalized_error(got, expected) < tolerance("bfloat16").nerr


def test_measure_cli_reports_the_datasheet_fraction_of_a_recognized_chip(capsys, monkeypatch):
    import dataclasses

    import roofline.cli as cli
    from roofline import CHIPS

    recognized = dataclasses.replace(CHIP, catalogue_entry="h200")
    monkeypatch.setattr(cli, "measure_host", lambda **kw: recognized)
    monkeypatch.setattr(cli, "get_model", lambda name: TINY)
    args = ["measure", "--batch", "1", "--context", "32", "--min-time", "0.001", "--out", ""]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["datasheet_chip"] == "h200"
    for c in report["runs"][0]["components"]:
        assert c["impl"]
        expected = c["datasheet_bound_s"] / c["measured_s"]
        assert c["fraction_of_datasheet"] == pytest.approx(expected)
        assert c["datasheet_bound_s"] < c["bound_s"]  # the H200's roof is far above the toy chip's
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "of h200" in text and "implementation" in text and "int4_matmul[" in text
    assert CHIPS["h200"].bandwidth > CHIP.bandwidth


def test_component_impls_name_what_runs_for_these_inputs():
    """The label is the registry's `auto_impl` for the component's own arguments: the native CPU decode kernel
    reads float32 pages only, so with bf16 pages the label says xla."""
    import jax
    import jax.numpy as jnp

    from kernels.registry import auto_impl
    from roofline.measure import PAGE_SIZE

    labels = {}
    for kv, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        m = measure_step(
            TINY, CHIP, batch=1, context=16, weights="int4", kv=kv, min_time_s=0.0, progress=False
        )
        q = jax.ShapeDtypeStruct((1, TINY.heads, TINY.head_dim), dtype)
        pages = jax.ShapeDtypeStruct((1, PAGE_SIZE, TINY.kv_heads, TINY.head_dim), dtype)
        lens, bt = jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1, 1), jnp.int32)
        labels[kv] = auto_impl("paged_attention", q, pages, pages, lens, bt)
        assert m.impls["attention"] == f"paged_attention[{labels[kv]}]"
    assert labels["bf16"] != "cpu_native"
    if labels["fp32"] == "cpu_native":
        assert labels["bf16"] == "xla"


def test_progress_is_one_plain_line_per_step_when_stderr_is_not_a_terminal():
    import io

    from roofline.measure import _progress

    log = io.StringIO()
    for i, name in enumerate(["qkv_proj", "attention", "done"]):
        _progress(i, 2, name, log)
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines() == ["[0/2] qkv_proj", "[1/2] attention", "[2/2] done"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    _progress(1, 2, "attention", tty)
    assert tty.getvalue().startswith("\r[")  # a terminal still gets the bar redrawn in place
