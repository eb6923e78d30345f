"""The aarch64 build of the native kernels, checked from any machine with Debian's cross tools
(`g++-aarch64-linux-gnu`, and `qemu-user` for qemu-aarch64): the NEON kernels against double-precision loops
(neon_kernels_test.cc, run under qemu-aarch64, or natively on an aarch64 host), and the whole library
cross-compiled with XLA's (header-only) FFI headers. Skipped with the reason when the tools are absent."""

import json
import pathlib
import platform
import shutil
import subprocess

import jax
import numpy as np
import pytest

from tests.tolerances import NATIVE_INT4_NERR, tolerance

ROOT = pathlib.Path(__file__).resolve().parents[3]
CPU_DIR = ROOT / "kernels" / "cpu"
NATIVE = platform.machine() in ("aarch64", "arm64")
CXX = shutil.which("g++" if NATIVE else "aarch64-linux-gnu-g++")
RUNNER = [] if NATIVE else [shutil.which("qemu-aarch64")]
FLAGS = ["-std=c++17", "-O2", "-Wall", "-Wno-maybe-uninitialized"]

needs_cxx = pytest.mark.skipif(
    CXX is None, reason="no aarch64 C++ compiler (apt-get install g++-aarch64-linux-gnu)"
)
needs_runner = pytest.mark.skipif(
    None in RUNNER, reason="no qemu-aarch64 to run aarch64 code here (apt-get install qemu-user)"
)


def _compile(args, timeout=300):
    done = subprocess.run([CXX, *FLAGS, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


@needs_cxx
@needs_runner
def test_neon_kernels_match_double_precision_loops(tmp_path):
    exe = tmp_path / "neon_kernels_test"
    sources = [
        pathlib.Path(__file__).with_name("neon_kernels_test.cc"),
        CPU_DIR / "int4_matmul_neon.cc",
        CPU_DIR / "paged_attention_neon.cc",
        CPU_DIR / "isa.cc",
    ]
    _compile(["-static", f"-I{ROOT}", *map(str, sources), "-o", str(exe)])
    run = subprocess.run([*RUNNER, str(exe)], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(run.stdout)
    assert result["isa"] == "neon"  # the run-time detection on an aarch64 CPU
    assert result["int4_nerr"] <= NATIVE_INT4_NERR
    assert result["decode_nerr"] <= tolerance(np.float32).nerr
    assert result["nan_reaches_its_heads"]  # a NaN key makes exactly its query heads' outputs NaN


@pytest.mark.slow
@needs_cxx
def test_whole_library_cross_compiles_for_aarch64(tmp_path):
    lib = tmp_path / "_tokenlab_cpu.so"
    sources = sorted(str(p) for p in CPU_DIR.glob("*.cc"))
    _compile(
        [
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-isystem",
            jax.ffi.include_dir(),
            *sources,
            "-o",
            str(lib),
        ]
    )
    nm = shutil.which("nm" if NATIVE else "aarch64-linux-gnu-nm")
    if nm is None:
        pytest.skip("no nm for aarch64 objects to list the library's symbols")
    symbols = subprocess.run([nm, "-D", str(lib)], capture_output=True, text=True, check=True).stdout
    for name in ("TokenlabInt4Matmul", "TokenlabPagedDecode", "TokenlabCpuIsa", "TokenlabCpuSetIsa"):
        assert name in symbols
