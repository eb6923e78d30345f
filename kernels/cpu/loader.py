"""Find the compiled CPU kernel library and register its handlers with XLA (once per process).

The library (`_tokenlab_cpu*.so` beside this file) is built by the package build (setup.py) with the system's
C++ compiler. It is optional: when it is missing (no compiler at install time, or an unsupported platform),
`available()` is False, the kernels' `impl="auto"` uses the portable XLA path, and one warning says why.
Set TOKENLAB_CPU_NATIVE=0 to ignore a built library (the XLA path everywhere).
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
}
_LIB_GLOB = "_tokenlab_cpu*.so"


def library_path() -> pathlib.Path | None:
    """The built library beside this module, or None when the build produced none."""
    here = pathlib.Path(__file__).resolve().parent
    found = sorted(here.glob(_LIB_GLOB))
    return found[0] if found else None


@functools.cache
def load() -> str | None:
    """Register the handlers with XLA; returns None on success, else the reason the library is unusable.

    Cached: XLA's registry of FFI targets is process-wide, so registering once per process is the whole
    job (tests clear the cache to simulate a missing library).
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
        lib = ctypes.CDLL(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError) as e:
        reason = (
            f"the CPU-native kernel library {path} could not be loaded ({e}); using the portable XLA path"
        )
        warnings.warn(f"tokenlab: {reason}", RuntimeWarning, stacklevel=3)
        return reason
    return None


def available() -> bool:
    """True when the native CPU kernels are built and registered (registers them on first call)."""
    return load() is None
