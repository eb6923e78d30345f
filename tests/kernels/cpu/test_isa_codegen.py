"""The machine code of the native library: each x86 vector path is compiled for its own instruction set only.
The AVX2 and AVX-512 paths share their loops as templates (kernels/cpu/*_simd.h) instantiated once per path,
inside the path's namespace (tokenlab::<op>::avx2 / ::avx512) and target region; code compiled for AVX-512
that the AVX2 path or the portable code ran (a shared inline function whose AVX-512 copy the linker kept, say)
would crash AVX2-only CPUs with an illegal instruction. So: no AVX-512 register (zmm, or a k mask) outside the
::avx512:: namespaces, no ymm in the portable code, and, as the control that the checks read real code, ymm
in each op's AVX2 path and zmm in each op's AVX-512 path.

The paths are told apart by demangled symbol name, which the installed library no longer has (setup.py strips
it), so the test links its own copy of kernels/cpu/*.cc with setup.py's compile flags for the baseline target
(no TOKENLAB_CPU_ARCH) and reads its disassembly (binutils' objdump). Skipped with the reason off x86-64, or
without a C++ compiler, XLA's FFI headers (jaxlib) or objdump."""

import functools
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import jax
import pytest

CPU_DIR = pathlib.Path(__file__).resolve().parents[3] / "kernels" / "cpu"
OPS = ("decode", "int4", "moe")  # tokenlab::<op>::{avx2,avx512}, one of each per op
PATHS = ("avx2", "avx512")
HEADER = re.compile(r"^[0-9a-f]+ <(.+)>:$")
REGISTER = re.compile(r"%([xyz]mm|k)\d+")  # AT&T syntax: %ymm3, %zmm17, %k1
AVX512 = {"zmm", "k"}
OWNER = re.compile(r"^tokenlab::(\w+)::(avx2|avx512)::")


def _compiler():
    cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "g++")
    return cxx if cxx and shutil.which(cxx[0]) else None


def _ffi_include():
    include = pathlib.Path(jax.ffi.include_dir())
    return include if (include / "xla" / "ffi" / "api" / "ffi.h").exists() else None


def _skip_reason():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the AVX paths exist on x86-64 only (this is {platform.machine()})"
    if _compiler() is None:
        return "no C++ compiler (CXX, or g++) to build the library"
    if _ffi_include() is None:
        return "no XLA FFI headers (jaxlib/include) to build the library"
    if shutil.which("objdump") is None:
        return "no objdump to disassemble the library (binutils)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture(scope="module")
def functions(tmp_path_factory):
    """Demangled function name -> the register classes ('xmm', 'ymm', 'zmm', 'k') its instructions name, in
    a private, unstripped build of the library."""
    out = tmp_path_factory.mktemp("tokenlab_cpu")
    cxx = _compiler()
    flags = ["-std=c++17", "-O3", "-fvisibility=hidden", "-fPIC", "-w", "-isystem", str(_ffi_include())]

    def compile_one(src):
        obj = out / (src.stem + ".o")
        subprocess.run([*cxx, *flags, "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
        return str(obj)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        objects = list(pool.map(compile_one, sorted(CPU_DIR.glob("*.cc"))))
    lib = out / "_tokenlab_cpu.so"
    subprocess.run([*cxx, "-shared", *objects, "-o", str(lib)], check=True, capture_output=True)
    text = subprocess.run(
        ["objdump", "-dC", "--no-show-raw-insn", str(lib)], check=True, capture_output=True, text=True
    ).stdout
    regs, name = {}, None
    for line in text.splitlines():
        header = HEADER.match(line)
        if header:
            name = header.group(1)
            regs.setdefault(name, set())
        elif name is not None and line.startswith(" "):
            regs[name].update(REGISTER.findall(line))
    return regs


@functools.cache
def owner(name):
    """(op, path) of a function in a vector path's namespace, else None; judged by the function's own
    qualified name, not its return type or template arguments."""
    qualified = name.replace("(anonymous namespace)", "{anonymous}").split("(")[0].split("<")[0].split()
    match = OWNER.match(qualified[-1]) if qualified else None
    return match.groups() if match else None


def _offenders(functions, select, registers):
    return sorted(n for n, used in functions.items() if select(owner(n)) and used & registers)


def test_avx2_paths_use_no_zmm(functions):
    bad = _offenders(functions, lambda o: o is not None and o[1] == "avx2", AVX512)
    assert not bad, f"AVX2-path functions with AVX-512 (zmm, k) code, which crashes AVX2-only CPUs: {bad}"


def test_zmm_only_in_the_avx512_paths(functions):
    bad = _offenders(functions, lambda o: o is None or o[1] != "avx512", AVX512)
    assert not bad, f"functions outside tokenlab::<op>::avx512 with AVX-512 (zmm, k) code: {bad}"


def test_portable_code_uses_no_ymm(functions):
    bad = _offenders(functions, lambda o: o is None, {"ymm"})
    assert not bad, f"functions outside the vector paths with AVX (ymm) code, which baseline CPUs lack: {bad}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", OPS)
def test_each_path_is_vector_code_of_its_width(functions, op, path):
    register = {"avx2": "ymm", "avx512": "zmm"}[path]
    mine = {n: used for n, used in functions.items() if owner(n) == (op, path)}
    assert mine, f"no functions of tokenlab::{op}::{path} in the library"
    assert any(register in used for used in mine.values()), (
        f"tokenlab::{op}::{path} has no {register} code: {sorted(mine)}"
    )
