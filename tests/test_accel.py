"""`python -m benchmarks.accel --smoke`: the accelerator check, end to end at tiny shapes on this backend,
with a user's backend brought in by `--impl-module` (tests/kernels/byo/reference_copy.py registers one)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels
from benchmarks import accel

ROOT = Path(__file__).resolve().parents[1]
BYO = "tests.kernels.byo.reference_copy"
STATUS_PREFIXES = ("missing: ", "failed: ")


def _accel(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # A process of its own: the registration must not leak into the other tests' registry.
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "benchmarks.accel", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel") / "accel.json"
    proc = _accel("--smoke", "--impl-module", BYO, "--out", str(out))
    assert out.exists(), proc.stderr[-3000:]
    return proc.returncode, json.loads(out.read_text())


def test_smoke_run_exits_cleanly_and_names_the_device(smoke):
    code, result = smoke
    assert code == 0, [r for r in result["records"] if r["status"].startswith("failed")]
    assert result["smoke"] is True
    assert result["impl_modules"] == [BYO]
    assert result["device"]["platform"]
    assert set(result["device"]) >= {"device_kind", "chip", "datasheet_bandwidth", "measured_bandwidth"}


def test_every_kernel_has_a_lab_row_and_a_baseline_that_ran(smoke):
    _, result = smoke
    for kernel in accel.KERNELS:
        rows = [r for r in result["records"] if r["kernel"] == kernel]
        assert any(r["role"] == "lab" and r["status"] == "ok" for r in rows), kernel
        assert any(r["role"] == "baseline" and r["status"] == "ok" for r in rows), kernel


def test_lab_rows_are_the_registrys_implementations_plus_the_users(smoke):
    _, result = smoke
    for kernel in accel.KERNELS:
        expected = (set(kernels.available_impls(kernel)) - {"reference"}) | {"reference_copy"}
        for case in {r["case"] for r in result["records"] if r["kernel"] == kernel}:
            lab = [
                r for r in result["records"] if (r["kernel"], r["case"], r["role"]) == (kernel, case, "lab")
            ]
            assert {r["impl"] for r in lab} == expected, (kernel, case)


def test_the_users_backend_is_timed_for_every_case(smoke):
    _, result = smoke
    byo = [r for r in result["records"] if r["impl"] == "reference_copy"]
    assert {r["kernel"] for r in byo} == set(accel.KERNELS)
    for r in byo:
        assert r["role"] == "lab" and r["status"] == "ok" and r["ms"] > 0, r
        assert not r["auto"], r  # its `prefer` keeps impl="auto" off it


def test_the_row_auto_runs_is_named_by_the_registry(smoke):
    _, result = smoke
    for case in {(r["kernel"], r["case"]) for r in result["records"]}:
        auto = [r for r in result["records"] if (r["kernel"], r["case"]) == case and r["auto"]]
        assert len(auto) == 1 and auto[0]["role"] == "lab" and auto[0]["status"] == "ok", (case, auto)


def test_statuses_are_valid_and_missing_peers_are_reported_not_dropped(smoke):
    _, result = smoke
    records = result["records"]
    for r in records:
        assert r["status"] == "ok" or r["status"].startswith(STATUS_PREFIXES), r
        assert r["status"] not in ("missing: ", "failed: "), "a missing or failed row says why"
    impls = {(r["kernel"], r["impl"]) for r in records}
    # The GPU-only peers appear on every backend, as rows of their own.
    assert ("paged_attention", "jax.experimental.pallas.ops.gpu.paged_attention") in impls
    assert ("moe_ffn", "jax.experimental.pallas.ops.gpu.ragged_dot_mgpu") in impls
    assert ("int4_matmul", "torch _weight_int4pack_mm (tinygemm)") in impls


def test_numbers_of_rows_that_ran_are_positive_and_consistent(smoke):
    _, result = smoke
    for r in result["records"]:
        if r["status"] != "ok":
            assert r["ms"] is None and r["ratio"] is None, r
            continue
        for key in ("ms", "ms_dispatch", "bytes", "frac_measured", "ratio"):
            assert r[key] is not None and r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert r["calls"] >= r["copies"] >= 1, r
        if result["device"]["datasheet_bandwidth"]:
            assert r["frac_datasheet"] > 0, r
    for case in {(r["kernel"], r["case"]) for r in result["records"]}:
        ok = [r for r in result["records"] if (r["kernel"], r["case"]) == case and r["status"] == "ok"]
        baselines = [r["ratio"] for r in ok if r["role"] == "baseline"]
        assert min(baselines) == pytest.approx(1.0), case  # the best baseline is the unit


def test_a_module_that_does_not_import_is_a_usage_error():
    proc = _accel("--smoke", "--impl-module", "tests.no_such_module", timeout=120)
    assert proc.returncode == 2
    assert "--impl-module tests.no_such_module: ModuleNotFoundError" in proc.stderr


def test_module_keeps_heavy_imports_and_benchmark_names_out_of_module_level():
    assert not [n for n in vars(accel) if n.startswith(("time_", "track_", "mem_", "peakmem_"))]
    assert "torch" not in vars(accel) and "jax" not in vars(accel)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--only", "nope"], "argument --only: unknown kernel(s) nope; valid kernels: paged_attention, "),
        (["--only", ","], "argument --only: ',' has an empty item; give kernels from: paged_attention"),
        (["--only", "moe_ffn,"], "has an empty item"),
        (["--out", "/nonexistent/a.json"], "argument --out: cannot write '/nonexistent/a.json': directory"),
    ],
)
def test_bad_flags_are_usage_errors_before_any_run(args, message):
    proc = _accel("--smoke", *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # nothing ran


def test_repeated_kernels_run_once():
    assert accel._only("moe_ffn,int4_matmul,moe_ffn") == ("moe_ffn", "int4_matmul")


# --------------------------------------------------------------------------------------------------
# --tune: the sweep at tiny shapes, its file written, read back and used by the kernels' defaults

TUNE_OP = "int4_matmul"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    path, out = folder / "tuned.json", folder / "tune.json"
    proc = _accel("--tune", "--smoke", "--only", TUNE_OP, "--tune-out", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert path.exists(), proc.stdout[-2000:]
    return path, json.loads(out.read_text())


def _entries(tuned) -> list[dict]:
    path, _ = tuned
    entries = json.loads(path.read_text())["entries"]
    if not entries:
        pytest.skip(f"no {TUNE_OP} Pallas GPU kernel here defines shape_class/tune_space yet")
    return entries


def test_tune_smoke_writes_the_best_config_of_every_kernel_it_timed(tuned):
    import jax

    path, result = tuned
    assert result["tuned"] == str(path)
    timed = {(r["impl"], r["shape_class"]) for r in result["records"] if r["status"] == "ok" and r["ms"]}
    entries = _entries(tuned)
    assert {(e["impl"], e["shape_class"]) for e in entries} == timed
    for e in entries:
        assert e["op"] == TUNE_OP and e["impl"] in accel.TUNED_IMPLS, e
        assert e["device_kind"] == result["device"]["device_kind"] and e["jax"] == jax.__version__, e
        assert e["ms"] > 0 and len(e["date"]) == 10, e
        ran = [
            r["config"]
            for r in result["records"]
            if (r["impl"], r["shape_class"], r["status"]) == (e["impl"], e["shape_class"], "ok")
        ]
        assert e["config"] in ran, (e, ran)
    for r in result["records"]:
        assert r["status"] == "ok" or r["status"].startswith(("pruned: ", "unsupported: ", "skipped: ")), r


def test_the_tuned_file_is_read_back(tuned, monkeypatch):
    from kernels import tuning

    path, _ = tuned
    monkeypatch.setenv("TOKENLAB_TUNED", str(path))
    for e in _entries(tuned):
        assert tuning.lookup(e["op"], e["impl"], e["shape_class"], e["device_kind"]) == e["config"]
        assert tuning.lookup(e["op"], e["impl"], e["shape_class"], "another GPU") is None


def _defaults(module) -> tuple[str, object] | None:
    for name in ("default_config", "choose"):
        if callable(getattr(module, name, None)):
            return name, getattr(module, name)
    return None


def test_a_kernels_default_config_uses_the_tuned_file(tuned, tmp_path, monkeypatch):
    """The kernel's default (`default_config(*args)`, or `choose(*args)` for a module that resolves its
    tiles there) takes the tuned fields for the GPU being lowered for: the CPU's device kind stands in for
    it here. A tuned entry that kept the built-in default is replaced by the space's second candidate
    first, so that 'used' is visible."""
    import importlib

    from kernels import tuning

    path, _ = tuned
    spec = importlib.import_module(accel.ARG_SPECS[TUNE_OP])
    case = spec.cases("smoke")[0]
    args, kwargs = spec.make_args(case)
    checked = 0
    for e in _entries(tuned):
        module = accel._tune_module(e["op"], e["impl"])
        found = _defaults(module)
        if found is None or module.shape_class(*args, **kwargs) != e["shape_class"]:
            continue
        config = e["config"]
        if not config:  # the built-in default won: tune in a visible one (the file is still --tune's)
            space = [accel._config_fields(c) for c in module.tune_space(*args, **kwargs)]
            config = next((c for c in space if c), None)
            if config is None:
                continue
            mine = tmp_path / f"{e['impl']}.json"
            mine.write_text(path.read_text())
            tuning.write([{**e, "config": config}], mine)
            monkeypatch.setenv("TOKENLAB_TUNED", str(mine))
        else:
            monkeypatch.setenv("TOKENLAB_TUNED", str(path))
        monkeypatch.setattr(module, "target_gpu", lambda kind=e["device_kind"]: (kind, 90))
        name, default = found
        chosen = default(*args, **kwargs)
        seen = {f: getattr(chosen, f) for f in config if hasattr(chosen, f)}
        assert seen, f"{e['impl']}.{name} returned {chosen!r}, which shows none of the fields {config}"
        assert seen == {f: config[f] for f in seen}, (e["impl"], name, chosen, config)
        checked += 1
    if not checked:
        pytest.skip(f"no tuned {TUNE_OP} module exposes default_config/choose for its smoke shape class")


def test_candidates_are_pruned_by_the_targets_compiled_code():
    """What --tune drops before timing on a GPU: the compile report of the config on the GPU's target (here a
    kernel that declines the target; spills and shared memory are read from the same record)."""
    import importlib

    from kernels import compile_only, registry

    if compile_only.missing("sm_90a"):
        pytest.skip(f"sm_90a: {compile_only.missing('sm_90a')}")
    op, name = TUNE_OP, "pallas_mosaic_gpu"
    if name not in kernels.available_impls(op):
        pytest.skip(f"{op} has no {name} here")
    case = importlib.import_module(accel.ARG_SPECS[op]).cases("smoke")[0]
    config = registry.implementations(op)[name].config()
    assert accel.prune_by_resources(op, name, case, config, "sm_90a") is None
    assert accel.prune_by_resources(op, name, case, config, "sm_80").startswith("sm_80: unsupported: ")


def test_tune_flags_are_checked():
    proc = _accel("--tune-target", "sm_90a", timeout=120)
    assert proc.returncode == 2 and "--tune-out and --tune-target go with --tune" in proc.stderr
    proc = _accel("--tune", "--tune-target", "sm_75", timeout=120)
    assert proc.returncode == 2 and "argument --tune-target: 'sm_75' is not one of" in proc.stderr
