"""Build of the optional CPU-native kernels (kernels/cpu/*.cc) into kernels/cpu/_tokenlab_cpu*.so.

Everything else about the package is in pyproject.toml. The library is compiled against XLA's FFI headers
from the installed jaxlib (`jax.ffi.include_dir()`), for the compiler's baseline of the architecture (plain
x86-64, or armv8-a), so one build runs on any CPU of that architecture: the AVX2 and AVX-512 paths are
compiled per function with the target attribute and chosen at run time from what the CPU reports
(kernels/cpu/isa.h), and NEON is part of the aarch64 baseline. TOKENLAB_CPU_ARCH=<arch> (e.g. `native`, or
`x86-64-v3`) adds `-march=<arch>` (`-mcpu=` on aarch64) for the portable parts too; such a build only runs on
CPUs with that instruction set. Only the compiler pip already uses is needed (no system packages). A failed
build (no compiler, no headers) does not fail the install: the kernels then use the portable XLA path and say
so once at run time.

The library is a release build: no debug information (`-g0` overrides the `-g` Python's own CFLAGS carry) and
stripped at link time (`-s`), about 0.3 MB instead of 5.5 MB. TOKENLAB_CPU_DEBUG=1 builds it with debug
symbols and unstripped (same optimization), for gdb or perf. TOKENLAB_CPU_NATIVE=0, which makes the kernels
ignore a built library at run time, skips the build altogether (a pure-Python install, in seconds).
"""

import glob
import importlib.util
import os
import sys
import sysconfig
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = sorted(glob.glob("kernels/cpu/*.cc"))
HEADERS = sorted(glob.glob("kernels/cpu/*.h"))


def _ffi_include_dir():
    """jaxlib's include directory (what `jax.ffi.include_dir()` returns), found without importing jax."""
    # Build isolation installs jaxlib from [build-system] requires; without isolation it is the venv's.
    spec = importlib.util.find_spec("jaxlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        include = os.path.join(root, "include")
        if os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
            return include
    print(
        "tokenlab: WARNING: no XLA FFI headers (jaxlib/include); skipping the CPU-native kernels",
        file=sys.stderr,
    )
    return None


def _flag_works(compiler, flag):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cc")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            compiler.compile([src], output_dir=d, extra_postargs=[flag])
            return True
        except Exception:
            return False


def _strip_flags():
    """Link flags that drop the symbol table: GNU/LLVM ld take -s; Apple's ld calls -s obsolete (a warning)
    and strips local symbols with -x."""
    return ["-Wl,-x"] if sys.platform == "darwin" else ["-s"]


class OptionalBuildExt(build_ext):
    """Compile the native kernels if possible; never fail the install because of them."""

    def build_extension(self, ext):
        if os.environ.get("TOKENLAB_CPU_NATIVE", "1") == "0":
            print("tokenlab: TOKENLAB_CPU_NATIVE=0: not building the CPU-native kernels", file=sys.stderr)
            return
        include = _ffi_include_dir()
        if include is None:
            return
        arch = os.environ.get("TOKENLAB_CPU_ARCH", "")
        debug = os.environ.get("TOKENLAB_CPU_DEBUG", "0") not in ("", "0")
        flags = ["-std=c++17", "-O3", "-fvisibility=hidden", "-Wno-maybe-uninitialized", "-isystem", include]
        # The last -g* option wins, so -g0 cancels the -g that Python's CFLAGS put first.
        flags.append("-g" if debug else "-g0")
        if arch not in ("", "none"):
            for flag in (f"-march={arch}", f"-mcpu={arch}"):  # x86-64 spells it -march, aarch64 -mcpu
                if _flag_works(self.compiler, flag):
                    flags.append(flag)
                    break
            else:
                print(
                    f"tokenlab: WARNING: TOKENLAB_CPU_ARCH={arch} is not understood by the compiler; ignored",
                    file=sys.stderr,
                )
        ext.extra_compile_args = flags
        ext.extra_link_args = [] if debug else _strip_flags()
        try:
            super().build_extension(ext)
        except Exception as e:
            print(
                f"tokenlab: WARNING: could not build the CPU-native kernels ({e}); "
                "the portable XLA path will be used",
                file=sys.stderr,
            )

    def get_export_symbols(self, ext):
        return []  # a plain shared library loaded with ctypes, not a Python module

    def get_ext_filename(self, ext_name):
        suffix = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
        return os.path.join(*ext_name.split(".")) + suffix


setup(
    ext_modules=[
        Extension("kernels.cpu._tokenlab_cpu", SOURCES, depends=HEADERS, language="c++", optional=True)
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
