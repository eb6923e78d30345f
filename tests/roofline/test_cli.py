import json
import subprocess
import sys

import pytest

from roofline.__main__ import main


def test_json_report(tmp_path, capsys):
    out = tmp_path / "r.png"
    rc = main(
        ["report", "--no-host", "--chips", "h100-sxm,tpu-v6e", "--batch", "1,8", "--json", "--out", str(out)]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "llama-3-70b"
    assert len(report["rows"]) == 2 * 2 * 2  # chips x weights x batches
    row = report["rows"][0]
    assert {"step_s", "tokens_per_s", "usd_per_mtok", "dominant_bound", "components"} <= set(row)
    assert out.stat().st_size > 10_000


def test_table_report(tmp_path, capsys):
    rc = main(
        [
            "report",
            "--no-host",
            "--chips",
            "l4",
            "--model",
            "qwen3-30b-a3b",
            "--weights",
            "int4",
            "--batch",
            "4",
            "--tp",
            "2",
            "--out",
            str(tmp_path / "p.png"),
            "--price",
            "l4=1.0",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "qwen3-30b-a3b" in text and "l4" in text and "$/Mtok" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "gpt-5"], "valid models: llama-3-8b"),
        (["--chips", "h100"], "valid choices: h100-sxm"),
        (["--batch", "0"], "integer >= 1"),
        (["--weights", "nf4"], "valid choices: bf16, int8, int4"),
        (["--price", "h100-sxm=free"], "CHIP=USD"),
    ],
)
def test_bad_input_exits_nonzero_with_choices(args, message, capsys):
    assert main(["report", "--no-host", "--out", "", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_as_a_module_rejects_unknown_kv():
    proc = subprocess.run(
        [sys.executable, "-m", "roofline", "report", "--kv", "fp4"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "fp4" in proc.stderr
