"""kernels.parallel on 8 simulated CPU devices, against the single-device kernels.

JAX fixes its device count when it starts, so the checks run in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (tests/kernels/parallel_checks.py lists them: heads split
and replicated, column/row INT4 with act-order, expert parallel MoE with skewed loads, an expert that gets
nothing, capacity drops, INT4 experts, and the layouts that do not divide).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# ~30 s on 2 cores: under --full; docs/scale-out.md's blocks run the sharded kernels on 8 devices by default.
@pytest.mark.slow
def test_sharded_kernels_match_single_device_on_8_simulated_devices():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.parallel_checks"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "ok    moe_ffn" in report and "0 failed" in report, report


def test_parallel_rejects_an_axis_the_mesh_lacks():
    import jax
    import numpy as np
    import pytest
    from jax.sharding import Mesh

    from kernels import parallel

    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    with pytest.raises(ValueError, match="axis='data'"):
        parallel.paged_attention(
            np.zeros((1, 8, 4), np.float32),
            np.zeros((2, 4, 8, 4), np.float32),
            np.zeros((2, 4, 8, 4), np.float32),
            np.ones((1,), np.int32),
            np.zeros((1, 1), np.int32),
            mesh=mesh,
            axis="data",
        )
