"""`measure --devices N`: the sharded kernels timed against one device, on simulated CPU devices.

Simulated devices exist only if XLA is asked before its CPU backend starts, so the end-to-end runs are
subprocesses; the checks that need no devices run here."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from roofline.cli import _request_host_devices, main
from roofline.measure_sharded import check_sharding
from roofline.models import MODELS, ModelShape

ROOT = Path(__file__).resolve().parents[2]
# Every dimension splits over 2 devices in whole INT4 groups of 128; one dense layer and one MoE layer.
TINY = dict(
    name="tiny-sharded", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, vocab=256,
    experts=4, top_k=2, moe_ffn=256, dense_layers=1, source="test",
)  # fmt: skip


def _run(code: str, devices: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def test_sharded_kernels_are_timed_against_one_device_on_two_simulated_devices():
    proc = _run(
        f"""
        import dataclasses, json
        from roofline.measure_sharded import measure_sharded
        from roofline.models import ModelShape
        m = measure_sharded(ModelShape(**{TINY!r}), devices=2, batch=2, context=32, min_time_s=0.0,
                            progress=False)
        print(json.dumps(dataclasses.asdict(m)))
        """,
        devices=2,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    names = [c["name"] for c in m["components"]]
    assert names == ["qkv_proj", "attention", "o_proj", "mlp", "moe_experts"]
    for c in m["components"]:
        assert c["single_s"] > 0 and c["sharded_s"] > 0 and c["layout"]
    assert m["devices"] == 2 and m["platform"] == "cpu" and m["shared_cores"]
    assert any("not how they scale" in n for n in m["notes"])


def test_too_few_devices_says_how_to_simulate_them():
    proc = _run(
        f"""
        from roofline.measure_sharded import measure_sharded
        from roofline.models import ModelShape
        measure_sharded(ModelShape(**{TINY!r}), devices=2, batch=2, context=16, progress=False)
        """,
        devices=1,
    )
    assert proc.returncode != 0
    assert "devices=2 but JAX sees 1 cpu device(s)" in proc.stderr
    assert "--xla_force_host_platform_device_count=2" in proc.stderr


@pytest.mark.parametrize(
    "model,devices,batch,message",
    [
        (ModelShape(**TINY), 1, 2, "devices=1 must be an integer >= 2"),
        (ModelShape(**TINY), 3, 3, "heads=4 must be divisible by devices=3"),
        (ModelShape(**TINY), 2, 3, "batch=3 must be divisible by devices=2"),
        (ModelShape(**TINY), 4, 4, "o_proj's 2 groups of 128 must split over devices=4"),
        (ModelShape(**{**TINY, "heads": 12, "kv_heads": 4}), 6, 6, "kv_heads=4 must divide or be a multiple"),
        (MODELS["llama-3-8b"], 3, 3, "heads=32 must be divisible by devices=3"),
    ],
)
def test_layouts_that_do_not_split_are_refused_with_the_numbers(model, devices, batch, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_sharding(model, devices, batch)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--devices", "1"], "--devices=1 must be >= 2"),
        (["--devices", "0"], "--devices=0 must be an integer >= 1"),
        (["--devices", "2", "--weights", "bf16"], "use --weights int4"),
    ],
)
def test_devices_option_is_validated(args, message, capsys):
    assert main(["measure", "--out", "", *args]) == 2
    assert message in capsys.readouterr().err


def test_command_line_asks_xla_for_simulated_devices(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    _request_host_devices(["report", "--tp", "2"])
    assert "XLA_FLAGS" not in os.environ
    _request_host_devices(["measure", "--devices", "4"])
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    _request_host_devices(["measure", "--devices=2"])
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"
