"""Find the compiled CPU kernel library, register its handlers with XLA, and choose its instruction set.

The library (`_tokenlab_cpu*.so` beside this file) is built by the package build (setup.py) with the system's
C++ compiler. It is optional: when it is missing (no compiler at install time, or an unsupported platform),
`available()` is False, the kernels' `impl="auto"` uses the portable XLA path, and one warning says why.
Set TOKENLAB_CPU_NATIVE=0 to ignore a built library (the XLA path everywhere). `import kernels` registers the
handlers of a built library (`load_if_built`), so that a deserialized `jax.export` calling them runs in any
process that imports the lab.

Instruction sets: one build carries a scalar path and the vector paths of its architecture (AVX2 and AVX-512
on x86-64, NEON on aarch64) and uses the best one the CPU reports. TOKENLAB_CPU_ISA=<name> (one of `ISAS`)
picks another path the CPU runs (the detected one or a lower one); an unknown name, or a path this CPU cannot
run, gives one warning and the best path. The choice lives in the library (`TokenlabCpuSetIsa`), read back
with `isa()`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import warnings

import jax

# FFI target name -> exported handler symbol.
TARGETS = {
    "tokenlab_int4_matmul": "TokenlabInt4Matmul",
    "tokenlab_paged_decode": "TokenlabPagedDecode",
    "tokenlab_moe_ffn": "TokenlabMoeFfn",
}
# Instruction-set paths by the library's numbering (isa.h), lowest first within an architecture.
ISAS = ("scalar", "neon", "avx2", "avx512")
_LIB_GLOB = "_tokenlab_cpu*.so"


def library_path() -> pathlib.Path | None:
    """The built library beside this module, or None when the build produced none."""
    here = pathlib.Path(__file__).resolve().parent
    found = sorted(here.glob(_LIB_GLOB))
    return found[0] if found else None


@functools.cache
def _open(path: str) -> ctypes.CDLL:
    """dlopen once per path; the library's ISA choice is process-wide state of the library itself."""
    lib = ctypes.CDLL(path)
    for name in ("TokenlabCpuIsa", "TokenlabCpuDetectedIsa"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = []
    for name in ("TokenlabCpuSetIsa", "TokenlabCpuIsaRunsHere"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_int]
    return lib


def handle() -> ctypes.CDLL | None:
    """The loaded library through ctypes (for its C interface), or None when `load()` failed."""
    if load() is not None:
        return None
    return _open(str(library_path()))


def runnable_isas(lib: ctypes.CDLL) -> tuple[str, ...]:
    """The paths this CPU runs, lowest first: scalar and its architecture's paths up to the detected one."""
    return tuple(n for i, n in enumerate(ISAS) if lib.TokenlabCpuIsaRunsHere(i))


def _select_isa(lib: ctypes.CDLL) -> None:
    """Apply TOKENLAB_CPU_ISA (or the detected best path when unset or unusable) to the library."""
    best = lib.TokenlabCpuDetectedIsa()
    wanted = os.environ.get("TOKENLAB_CPU_ISA", "").strip().lower()
    choice = best
    if wanted:
        runnable = runnable_isas(lib)
        if wanted in runnable:
            choice = ISAS.index(wanted)
        else:
            why = "is not one of " + ", ".join(ISAS) if wanted not in ISAS else "is not a path this CPU runs"
            warnings.warn(
                f"tokenlab: TOKENLAB_CPU_ISA={wanted!r} {why} (this CPU runs: {', '.join(runnable)}); "
                f"using {ISAS[best]!r}",
                RuntimeWarning,
                stacklevel=4,
            )
    lib.TokenlabCpuSetIsa(choice)


@functools.cache
def load() -> str | None:
    """Register the handlers with XLA; returns None on success, else the reason the library is unusable.

    Cached: XLA's registry of FFI targets is process-wide, so registering once per process is the whole
    job (tests clear the cache to simulate a missing library). Also applies TOKENLAB_CPU_ISA.
    """
    if os.environ.get("TOKENLAB_CPU_NATIVE", "1") == "0":
        return "disabled by TOKENLAB_CPU_NATIVE=0"
    path = library_path()
    if path is None:
        reason = (
            "the CPU-native kernel library (kernels/cpu/_tokenlab_cpu*.so) was not built — reinstall with a "
            "C++ compiler (`pip install -e .`) to get it; using the portable XLA path"
        )
        warnings.warn(f"tokenlab: {reason}", RuntimeWarning, stacklevel=3)
        return reason
    try:
        lib = _open(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # OSError (dlopen), AttributeError (a missing symbol), or JAX refusing the handler
        reason = (
            f"the CPU-native kernel library {path} could not be loaded ({e}); using the portable XLA path"
        )
        warnings.warn(f"tokenlab: {reason}", RuntimeWarning, stacklevel=3)
        return reason
    _select_isa(lib)
    return None


def load_if_built() -> None:
    """`load()` when a library was built, at `import kernels`: the handlers are then registered in every
    process that imports the lab, so a deserialized `jax.export` whose CPU code calls them runs after a bare
    `import kernels` (docs/export.md). Quiet when there is no library (the kernels say so when asked for
    `cpu_native`); a library that is there but cannot be used gives `load()`'s one warning. Never raises."""
    if os.environ.get("TOKENLAB_CPU_NATIVE", "1") == "0" or library_path() is None:
        return
    try:
        load()
    except Exception as e:  # load() reports what it foresees; nothing else may break the import either
        warnings.warn(
            f"tokenlab: the CPU-native kernels are not registered ({e!r})", RuntimeWarning, stacklevel=3
        )


def available() -> bool:
    """True when the native CPU kernels are built and registered (registers them on first call)."""
    return load() is None
