import json
import subprocess
import sys

import pytest

from roofline.cli import main


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


def _report(capsys, *args):
    rc = main(["report", "--no-host", "--out", "", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_text_report_marks_rows_that_do_not_fit_and_says_how_many_chips_would(capsys):
    # bf16 Llama-3-70B (141 GB of weights) on one 80 GB H100 does not fit; two do.
    rc, out, _ = _report(capsys, "--chips", "h100-sxm", "--tp", "1", "--batch", "1", "--weights", "bf16,int4")
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("h100-sxm")]
    assert len(rows) == 2
    bf16, int4 = rows
    assert "bf16" in bf16 and "does not fit: needs 2 chips" in bf16
    assert "int4" in int4 and "does not fit" not in int4


def test_text_report_marks_a_tp_that_is_too_small(capsys):
    # --tp 2 at batch 64: weights and KV (227 GB) need more than 2 x 80 GB x 0.9.
    rc, out, _ = _report(capsys, "--chips", "h100-sxm", "--tp", "2", "--batch", "64", "--weights", "bf16")
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith("h100-sxm"))
    assert "does not fit: needs 4 chips" in row


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch", "1,,2"], "empty item"),
        (["--batch", "1,2,"], "empty item"),
        (["--chips", "h100-sxm,,l4"], "empty item"),
        (["--weights", ","], "empty item"),
        (["--group-size", "100"], "--group-size='100' must be one of 16, 32, 64, 128"),
        (["--group-size", "0"], "must be one of"),
        (["--context", "0"], "--context=0 must be an integer >= 1"),
        (["--tp", "0"], "--tp=0 must be an integer >= 1"),
        (["--mem-fraction", "0"], "--mem-fraction=0.0 must be in (0, 1]"),
        (["--mem-fraction", "1.5"], "must be in (0, 1]"),
        (["--compute-dtype", "fp64"], "valid choices: fp32, tf32, bf16"),
        (["--price", "h100-sxm=-1"], "must be a positive number"),
        (["--price", "h100-sxm=2,"], "empty item"),
        (["--price", "2.0"], "CHIP=USD"),
    ],
)
def test_every_report_option_is_validated(args, message, capsys):
    rc, _, err = _report(capsys, *args)
    assert rc == 2
    assert message in err


def test_report_prices_take_commas_and_repeats(capsys):
    rc, out, _ = _report(
        capsys, "--chips", "h100-sxm,l4", "--batch", "1", "--weights", "int4", "--json",
        "--price", "h100-sxm=2.0,l4=1.0", "--price", "l4=0.5",
    )  # fmt: skip
    assert rc == 0
    chips = json.loads(out)["chips"]
    assert chips["h100-sxm"]["price_per_hour"] == 2.0
    assert chips["l4"]["price_per_hour"] == 0.5  # the later value wins


@pytest.mark.parametrize(
    "args,message",
    [
        (["--min-time", "0"], "--min-time=0.0 must be a positive number"),
        (["--min-time", "-1"], "--min-time=-1.0 must be a positive number"),
        (["--batch", "1,,2"], "empty item"),
        (["--context", "-5"], "--context=-5 must be an integer >= 1"),
        (["--price", "host=0"], "must be a positive number"),
        (["--price", "tpu=1"], "unknown chip 'tpu'"),
        (["--weights", "int8"], "valid choices: fp32, bf16, int4"),
    ],
)
def test_every_measure_option_is_validated_before_measuring(args, message, capsys):
    assert main(["measure", "--out", "", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "roofline" not in err.split("error:")[0]  # refused before the host was measured


def test_measure_prices_parse_like_report_prices():
    from roofline.cli import _prices

    assert _prices(["host=0.10,h100-sxm=2.0"], bare="host") == {"host": 0.10, "h100-sxm": 2.0}
    assert _prices(["0.25"], bare="host") == {"host": 0.25}
    with pytest.raises(ValueError, match="CHIP=USD"):
        _prices(["0.25"])


@pytest.mark.parametrize("command", ["report", "measure"])
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 0.9)" in out if command == "report" else "(default: 0.2)" in out
    assert "(default: bf16)" in out


def test_host_progress_says_cached_when_it_is(host_chip, capsys):
    from roofline.hardware import measure_host

    lines = []
    measure_host(matmul_n=1024, stream_bytes=256 << 20, repeats=3, progress=lines.append)
    assert len(lines) == 1 and lines[0].startswith("this host's roofline: cached")
    lines.clear()
    measure_host(matmul_n=64, stream_bytes=1 << 20, repeats=1, cache=False, progress=lines.append)
    assert len(lines) == 1 and lines[0].startswith("measuring this host's roofline")


def test_report_shows_comm_as_its_own_component(capsys):
    rc, out, _ = _report(
        capsys, "--model", "deepseek-v3", "--chips", "h200", "--weights", "int4", "--batch", "64",
        "--tp", "1", "--ep", "8", "--json",
    )  # fmt: skip
    assert rc == 0
    (row,) = json.loads(out)["rows"]
    assert (row["chips"], row["tp"], row["ep"]) == (8, 1, 8)
    comm = next(c for c in row["components"] if c["name"] == "comm")
    assert comm["step_share_s"] == row["comm_s"] > 0
    assert [k["name"] for k in comm["collectives"]] == ["ep_all_to_all"]
    chip = json.loads(out)["chips"]["h200"]
    assert chip["link"] == "NVLink 4" and chip["link_bandwidth"] == 450e9 and chip["link_latency"] > 0
    assert "NVLink 4" in chip["sources"]["link_bandwidth"]
    assert sum(c["step_share_s"] for c in row["components"]) == pytest.approx(row["step_s"])
    rc, out, _ = _report(capsys, "--chips", "h100-sxm", "--tp", "8", "--batch", "1", "--weights", "bf16")
    assert rc == 0 and "comm ms" in out and "8×1" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ep", "0"], "--ep=0 must be an integer >= 1"),
        (["--ep", "2"], "expert parallelism needs an MoE model"),
        (["--model", "mixtral-8x7b", "--ep", "3"], "ep=3 must divide the number of routed experts"),
    ],
)
def test_ep_is_validated(args, message, capsys):
    rc, _, err = _report(capsys, "--chips", "h100-sxm", *args)
    assert rc == 2 and message in err


# -- output paths are checked before any work, and the table comes first -------------------------------------


@pytest.mark.parametrize("command", ["report", "measure"])
def test_an_unwritable_out_path_is_a_usage_error_before_any_work(command, capsys, monkeypatch):
    import roofline.cli as cli

    def no_work(**kw):
        raise AssertionError("measured the host before checking --out")

    monkeypatch.setattr(cli, "measure_host", no_work)
    with pytest.raises(SystemExit) as exit_:
        main([command, "--out", "/nonexistent/dir/y.png"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        "argument --out: cannot write '/nonexistent/dir/y.png': directory '/nonexistent/dir' does not exist"
        in err
    )


def test_an_out_path_that_is_a_directory_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--no-host", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "it is a directory" in capsys.readouterr().err


def test_the_table_is_printed_before_the_plot_is_written(capsys, monkeypatch, tmp_path):
    import roofline.cli as cli

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "plot_roofline", full_disk)
    rc = main(
        ["report", "--no-host", "--chips", "h100-sxm", "--batch", "1", "--out", str(tmp_path / "r.png")]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert "h100-sxm" in out and "tokens/s" in out  # the results are not lost
    assert "could not write the plot" in err and "No space left on device" in err


# -- --tp must split the model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tp,message",
    [
        ("3", "--tp=3 cannot split llama-3-70b: its 64 query heads do not split evenly over 3 chips"),
        ("128", "--tp=128 cannot split llama-3-70b: its 64 query heads do not split evenly over 128 chips"),
        ("6", "its 8 kv heads neither split evenly over 6 chips nor replicate evenly onto them"),
    ],
)
def test_a_tp_that_cannot_split_the_model_is_refused(tp, message, capsys):
    rc, out, err = _report(capsys, "--chips", "h100-sxm", "--tp", tp)
    assert rc == 2 and out == ""
    assert message in err and "valid --tp: 1, 2, 4, 8, 16, 32, 64" in err


# -- the text shows each row's notes and the price it used ------------------------------------------------


def test_text_report_shows_row_notes_and_the_price_per_chip_hour(capsys):
    rc, out, _ = _report(
        capsys, "--model", "deepseek-v3", "--chips", "h200", "--weights", "int4", "--batch", "1,64",
        "--tp", "1", "--ep", "8", "--price", "h200=5.0",
    )  # fmt: skip
    assert rc == 0
    lines = out.splitlines()
    head = next(line for line in lines if line.startswith("chip"))
    assert "$/Mtok" in head and "$/chip-h" in head and "notes" in head
    b1, b64 = (line for line in lines if line.startswith("h200"))
    assert " 5.00 " in b1 and " 5.00 " in b64
    notes = {line.split("] ", 1)[0] + "]": line.split("] ", 1)[1] for line in lines if line.startswith("[")}
    b1_notes = [notes[f"[{i}]"] for i in b1.rsplit("[", 1)[1].rstrip("]").split(",")]
    assert any("7 of 8 expert-parallel groups have no sequence" in n for n in b1_notes)
    assert not any("no sequence" in notes[f"[{i}]"] for i in b64.rsplit("[", 1)[1].rstrip("]").split(","))


def test_text_report_says_hosts_are_assumed_to_talk_for_free():
    from roofline import report as rep
    from roofline.hardware import Chip
    from roofline.models import MODELS

    host = Chip("host", "this machine", {"fp32": 1e11, "bf16": 1e11}, 2e10, 64e9, None, {"bandwidth": "test"})
    model = MODELS["llama-3-70b"]
    rows = rep.estimate_grid(model, [host], weights=["bf16"], batches=[1], context=4096)
    assert rows[0].chips > 1
    doc = rep.report_json(
        model, [host], rows, phase="decode", context=4096, kv="bf16", group_size=128, compute_dtype="bf16",
        plot=None,
    )  # fmt: skip
    text = rep.report_text(doc, [host])
    assert f"so the {rows[0].chips} hosts are assumed to exchange data for free" in text
    row = next(line for line in text.splitlines() if line.startswith("host"))
    assert " n/a " in row and "[1]" in row


def test_wide_values_keep_the_columns_aligned(capsys):
    # A 10M-token context needs thousands of chips and hundreds of TB: every cell still ends under its header.
    rc, out, _ = _report(capsys, "--chips", "h100-sxm,l4", "--context", "10000000")
    assert rc == 0
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("chip"))
    rows = [line for line in lines[head + 2 :] if line.startswith(("h100-sxm", "l4"))]
    assert len(rows) == 12 and any("16384" in r for r in rows)
    header = lines[head]
    for col in (
        "chips",
        "tp×ep",
        "weights",
        "batch",
        "step ms",
        "comm ms",
        "tokens/s",
        "$/Mtok",
        "bound",
        "GB",
    ):
        end = header.index(col) + len(col)
        for r in rows:
            assert r[end - 1] != " " and r[end] == " ", (col, r)


# -- help text --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["report", "measure"])
def test_help_states_each_default_once_and_never_none(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out and "(default: [])" not in out
    options = out.split("options:", 1)[1]
    for block in options.split("\n  -")[1:]:
        assert block.count("(default") <= 1, block


# -- TOKENLAB_CACHE ---------------------------------------------------------------------------------------


def test_an_unusable_tokenlab_cache_is_one_clear_error(tmp_path, capsys, monkeypatch):
    import roofline.hardware as hw

    def no_measurement(*args):
        raise AssertionError("measured before checking the cache")

    monkeypatch.setattr(hw, "_measure", no_measurement)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TOKENLAB_CACHE", str(blocker / "cache"))
    rc = main(["report", "--chips", "host", "--batch", "1", "--weights", "int4", "--out", ""])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: TOKENLAB_CACHE='{blocker / 'cache'}'" in err and "cannot be created or written" in err
    assert "Traceback" not in err
