"""Shared test configuration: hypothesis profiles and the --full switch for slow sweeps."""

import importlib
import os

# libtpu (the `compile` extra's compile-only TPU devices) lets one process at a time load it unless told: the
# session and its compile run (tests/compile_run.py) both compile for TPUs.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest
from hypothesis import HealthCheck, settings

# The suite compiles thousands of small CPU programs, where LLVM's optimizations cost more time than they
# save: this process compiles its CPU code at level 0 (XLA reads XLA_FLAGS once, when JAX starts its first
# backend; the variable is restored at once, so subprocesses start as users do). Programs compiled for a
# GPU or TPU target keep XLA's default level (3): their code is what the compile tests judge.
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0"
TARGET_COMPILE_OPTIONS = {"xla_backend_optimization_level": 3}


def _compile_cpu_code_fast() -> None:
    if os.environ.get("JAX_PLATFORMS") != "cpu" or "xla_backend_optimization_level" in os.environ.get(
        "XLA_FLAGS", ""
    ):
        return
    import jax
    from jax._src import stages

    before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{before or ''} {FAST_CPU_COMPILE}".strip()
    try:
        jax.devices()
    finally:
        if before is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = before

    compile_ = stages.Lowered.compile

    def compile(self, compiler_options=None, **kwargs):
        try:
            platform = self._lowering.compile_args["backend"].platform
        except (AttributeError, KeyError, TypeError):  # a JAX that keeps it elsewhere: the default level
            platform = None
        if platform != "cpu":
            compiler_options = {**TARGET_COMPILE_OPTIONS, **(compiler_options or {})}
        return compile_(self, compiler_options, **kwargs)

    stages.Lowered.compile = compile


_compile_cpu_code_fast()

# `ci` is what `make test` and CI use: deterministic, no deadline (JAX compiles on first call).
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=8,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# `thorough` is for local runs before a release: many more random examples.
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption(
        "--impl-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first: the backends it registers (kernels.registry.register) face the suites",
    )


def pytest_configure(config):
    # Imported before collection, so the shared suites' parametrization over available_impls sees them.
    for name in config.getoption("--impl-module"):
        importlib.import_module(name)


def pytest_collection_finish(session):
    # The compile-for-targets run takes minutes: start it now, beside the rest of the suite.
    if any(item.path.name == "test_compiled.py" for item in session.items):
        from tests import compile_run

        compile_run.start()


def pytest_unconfigure(config):
    from tests import compile_run

    compile_run.stop()


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow sweep: run with --full")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def host_chip(tmp_path_factory):
    """This machine's measured roofline, measured once per test session into a private cache."""
    from roofline.hardware import measure_host

    os.environ.setdefault("TOKENLAB_CACHE", str(tmp_path_factory.mktemp("tokenlab-cache")))
    return measure_host(matmul_n=1024, stream_bytes=256 << 20, repeats=3)
