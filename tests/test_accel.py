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
