"""The compile-for-targets run behind tests/test_compiled.py: `benchmarks.compiled.run`, the command's own
code, in a second process started as soon as the session has collected those tests (tests/conftest.py), so
that its minutes of compiling overlap the rest of the suite instead of adding to it.

What it compiles (`select`), to keep `make test` under 10 minutes on 2 cores:
- sm_90a (the baseline's target): every Triton kernel, forward and backward, at the small and the
  benchmark cases;
- sm_80: every Pallas kernel, forward and backward, at the small cases, and the paged-attention and INT4
  forward kernels at the benchmark cases too (where 4 warps once spilled);
- the Mosaic GPU kernels (Hopper and newer): on sm_90a forward and backward at the small cases and forward at
  the benchmark cases the targets name (`MOSAIC_GPU_CASES`: paged decode B8 L4096, INT4 M=1/16/64 at
  4096x14336, MoE Mixtral-like T=256); on sm_80 the small cases only, where they must decline;
- every target (sm_80, sm_90a, v5e, v6e): the XLA path's own strategy choice at the small cases, float32
  and bf16.
`--full` compiles the rest (tests/test_compiled.py::test_the_rest_compiles), and `python -m
benchmarks.compiled` everything, every XLA strategy included.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).parents[1]
GPU_TARGETS = ("sm_80", "sm_90a")
TPU_TARGETS = ("v5e", "v6e")
TIMEOUT_S = 1800

# The benchmark cases the Mosaic GPU kernels compile at on sm_90a (forward): where the compile targets of
# docs/performance.md are judged.
MOSAIC_GPU_CASES = frozenset(
    {"decode B8 L4096 bf16", "mixtral T256 bf16"} | {f"4096x14336 M{m} bf16" for m in (1, 16, 64)}
)

_run: dict = {}


def covers(target: str, family: str) -> bool:
    """Whether this run holds programs of `family` for `target`."""
    return target in GPU_TARGETS or (target in TPU_TARGETS and family == "xla")


def select(program, target: str) -> bool:
    """Whether this run compiles `program` for `target` (see the module docstring)."""
    small = program.case in _small_cases()
    if program.family == "strategies":
        return False
    if target in TPU_TARGETS:
        return program.family == "xla" and small
    if program.family == "xla":
        return small
    if program.impl.startswith("pallas_mosaic_gpu"):
        benchmark = program.case in MOSAIC_GPU_CASES and not program.impl.endswith("grad")
        return small or (target == "sm_90a" and benchmark)
    cheap = program.kernel != "moe_ffn" and not program.impl.endswith("grad")  # seconds, not minutes
    return small or target == "sm_90a" or cheap


@functools.cache
def _small_cases() -> frozenset[str]:
    import importlib

    from benchmarks import compiled

    names = set()
    for op in compiled.KERNELS:
        for case in importlib.import_module(compiled.ARG_SPECS[op]).cases("smoke"):
            names |= {case.name, *(compiled._with_dtype(op, case, dt).name for dt in ("float32", "bfloat16"))}
    return frozenset(names)


def main(out: str) -> None:
    """Compile the selection and write {"device", "records"} to `out` (run in the second process), then
    `done` beside it: "ok", or the error that stopped the run."""
    _exit_with(os.environ.get(WATCH_ENV))
    done = pathlib.Path(out).with_name("done")
    try:
        from benchmarks import compiled

        records = []
        for target in (*GPU_TARGETS, *TPU_TARGETS):
            result = compiled.run(targets=(target,), select=lambda p, t=target: select(p, t))
            records += result["records"]
            pathlib.Path(out).write_text(json.dumps({"device": result["device"], "records": records}))
    except BaseException as err:
        done.write_text(f"{type(err).__name__}: {err}")
        raise
    done.write_text("ok")


# The process whose end ends the run (the pytest session, or under pytest-xdist its controller).
WATCH_ENV = "TOKENLAB_COMPILE_RUN_WATCH"


def _exit_with(pid: str | None) -> None:
    """Exit this process when process `pid` is gone (a session stopped early leaves no compiler running)."""
    if not pid:
        return
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(2)
            try:
                os.kill(int(pid), 0)
            except OSError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _shared() -> str | None:
    """The test run's id under pytest-xdist (every worker of one run sees the same), else None."""
    return os.environ.get("PYTEST_XDIST_TESTRUNUID")


def start() -> None:
    """Start the run (once per session; under pytest-xdist, once per test run: the first worker to get
    here starts it, and every worker reads its result)."""
    if _run:
        return
    uid = _shared()
    if uid is None:
        folder, owner = pathlib.Path(tempfile.mkdtemp(prefix="tokenlab-compiled-")), True
    else:
        folder = pathlib.Path(tempfile.gettempdir()) / f"tokenlab-compiled-{uid}"
        try:
            folder.mkdir()
            owner = True
        except FileExistsError:
            owner = False
    out, log = folder / "compiled.json", folder / "compiled.log"
    proc = None
    if owner:
        cmd = [sys.executable, "-c", f"from tests.compile_run import main; main({str(out)!r})"]
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS") or "cpu"}
        # Under xdist a worker may finish before the others read the run: the run lives as long as the
        # controller (this worker's parent) does.
        env[WATCH_ENV] = str(os.getpid() if uid is None else os.getppid())
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    _run.update(proc=proc, out=out, log=log, done=folder / "done")


def stop() -> None:
    """Stop a run still going when the session ends (not under xdist: other workers may still read it)."""
    proc = _run.get("proc")
    if proc is not None and _shared() is None and proc.poll() is None:
        proc.kill()
        proc.wait()


def records() -> list[dict]:
    """The run's records, waiting for it to finish; a RuntimeError with its log's tail if it broke."""
    import time

    start()
    proc, done = _run["proc"], _run["done"]
    deadline = time.monotonic() + TIMEOUT_S
    while not done.exists() and time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break  # exited without a verdict: killed
        time.sleep(1)
    verdict = done.read_text() if done.exists() else "no verdict (timed out or killed)"
    if verdict != "ok" or not _run["out"].exists():
        log = _run["log"].read_text() if _run["log"].exists() else ""
        raise RuntimeError(f"the compile run failed: {verdict}\n{log[-3000:]}")
    return json.loads(_run["out"].read_text())["records"]
