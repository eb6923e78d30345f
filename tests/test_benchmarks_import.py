"""Benchmarks never run in the test suite, but every benchmark module must at least import."""

import importlib
import pkgutil

import pytest

import benchmarks

MODULES = [m.name for m in pkgutil.iter_modules(benchmarks.__path__)]


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")


@pytest.mark.parametrize("name", MODULES)
def test_no_imported_name_looks_like_a_benchmark(name):
    """asv runs every module-level callable named time_*, track_*, mem_* or peakmem_* as a benchmark, so a
    helper imported under such a name (e.g. roofline's time_fn) would show up as a failing benchmark."""
    module = importlib.import_module(f"benchmarks.{name}")
    prefixes = ("time_", "track_", "mem_", "peakmem_", "timeraw_")
    for attr, value in vars(module).items():
        if attr.startswith(prefixes) and callable(value):
            assert getattr(value, "__module__", None) == module.__name__, (
                f"benchmarks.{name}.{attr} is imported"
            )
