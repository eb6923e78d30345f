"""Every `python -m benchmarks.<module>` answers --help with argparse's usage message and exits 0 at once,
without starting its measurement (some of them run for minutes)."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_help_prints_usage_and_exits_without_running(name):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m benchmarks.{name}"), proc.stdout
    assert proc.stderr == "", proc.stderr


def test_moe_rounds_must_be_positive():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.moe", "--rounds", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--rounds must be >= 1" in proc.stderr
