"""The compile-for-targets run behind tests/test_compiled.py: `python -m benchmarks.compiled` itself, started
in a second process as soon as the session has collected those tests (tests/conftest.py), so that its
minutes of compiling overlap the rest of the suite instead of adding to it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).parents[1]
TARGETS = ("sm_80", "sm_90a", "v5e", "v6e")
IMPLS = ("pallas", "xla")  # the Pallas kernels and the XLA path's own choice; `--full` adds the strategies
TIMEOUT_S = 1800

_run: dict = {}


def start() -> None:
    """Start the run (once per session)."""
    if _run:
        return
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tokenlab-compiled-"))
    out, log = folder / "compiled.json", folder / "compiled.log"
    cmd = [sys.executable, "-m", "benchmarks.compiled", "--targets", ",".join(TARGETS)]
    cmd += ["--impls", ",".join(IMPLS), "--json", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS") or "cpu"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    _run.update(proc=proc, out=out, log=log)


def stop() -> None:
    """Stop a run still going when the session ends."""
    proc = _run.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def records() -> list[dict]:
    """The run's records, waiting for it to finish; a RuntimeError with its log's tail if it broke."""
    start()
    proc = _run["proc"]
    try:
        code = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop()
        code = None
    log = _run["log"].read_text()
    if code not in (0, 1) or not _run["out"].exists():  # 1: some program failed, and the records say which
        raise RuntimeError(f"python -m benchmarks.compiled exited with {code}:\n{log[-3000:]}")
    return json.loads(_run["out"].read_text())["records"]
