"""Benchmarks never run in the test suite, but every benchmark module must at least import."""

import importlib
import pkgutil

import pytest

import benchmarks

MODULES = [m.name for m in pkgutil.iter_modules(benchmarks.__path__)]


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")
