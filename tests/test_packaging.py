"""The package list: every Python package of the lab ships (pyproject's find rule), and the runtime dependency
on JAX is a range that admits the user's own JAX while constraints.txt pins what CI tests.

What ships: py.typed, the licence, `__version__`, and an sdist that holds its tests and runs them.
`import kernels` registers the native FFI handlers (a deserialized export runs after it) and is quiet without
the library. Benchmarks whose optional peer cannot run skip in `setup`, so `make bench` passes without torch.
"""

import importlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import zipfile

import pytest
import setuptools

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_found():
    rule = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    found = set(setuptools.find_packages(str(ROOT), include=rule["include"]))
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("kernels", "quant", "roofline")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert on_disk <= found, f"packages missing from the wheel: {sorted(on_disk - found)}"
    assert {"kernels.paged_attention", "kernels.int4_matmul", "kernels.moe", "kernels.cpu"} <= found
    assert not any(name.startswith("tests") for name in found)


def test_jax_is_a_range_and_ci_pins_it():
    deps = _pyproject()["project"]["dependencies"]
    assert "jax>=0.10.2" in deps and not any(d.startswith(("jax==", "jaxlib==")) for d in deps)
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"cuda12", "cuda13", "tpu"} <= set(extras)
    pins = (ROOT / "constraints.txt").read_text().split()
    assert "jax==0.12.1" in pins and "jaxlib==0.12.1" in pins  # the newest of the range
    # and `make test-floor` runs the shared suites on the floor of the range
    assert "FLOOR_JAX := 0.10.2" in (ROOT / "Makefile").read_text()


# ---------------------------------------------------------------------------------------------------------
# What ships: py.typed, LICENSE, __version__, and an sdist whose tests run.

PACKAGES = ("kernels", "quant", "roofline")


def test_every_package_is_typed():
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]
    for top in PACKAGES:
        assert (ROOT / top / "py.typed").is_file(), f"{top}/py.typed is missing"
        assert "py.typed" in package_data.get(top, []), f"{top}'s package-data does not ship py.typed"


def test_version_comes_from_the_package_metadata():
    import kernels
    import quant
    import roofline

    version = _pyproject()["project"]["version"]
    assert importlib.metadata.version("tokenlab") == version
    assert kernels.__version__ == quant.__version__ == roofline.__version__ == version


def test_changelog_starts_with_this_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {_pyproject()['project']['version']}" in text


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """`python -m build`: the sdist, then the wheel built from that sdist (without the native library, which
    TOKENLAB_CPU_NATIVE=0 skips, to keep this quick); {"sdist": path, "wheel": path}."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "TOKENLAB_CPU_NATIVE": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, f"python -m build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {"sdist": next(out.glob("*.tar.gz")), "wheel": next(out.glob("*.whl"))}


def _sdist_names(sdist):
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        return {n.removeprefix(f"{top}/") for n in tar.getnames()}


def test_wheel_holds_the_licence_and_py_typed(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    for top in PACKAGES:
        assert f"{top}/py.typed" in names
    assert "roofline/data/chips.json" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_sdist_holds_the_tests_and_what_they_read(dists):
    names = _sdist_names(dists["sdist"])
    on_disk = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert on_disk - names == set(), f"tests missing from the sdist: {sorted(on_disk - names)}"
    needed = {"README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "setup.py", "constraints.txt"}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.py")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "kernels" / "cpu").glob("*.[ch]*")}
    assert needed - names == set(), f"missing from the sdist: {sorted(needed - names)}"
    assert not any(n.endswith((".pyc", ".so")) for n in names)


def test_tests_run_from_the_unpacked_sdist(dists, tmp_path):
    """A few of the sdist's own tests, run from the unpacked sdist (its packages shadow the installed ones:
    pytest puts the sdist's root first on sys.path)."""
    with tarfile.open(dists["sdist"]) as tar:
        tar.extractall(tmp_path, filter="data")
    (src,) = tmp_path.iterdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/quant/test_format.py",
            "tests/test_docs.py::test_relative_links_resolve",
            "tests/test_benchmarks_import.py",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " error" not in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# `import kernels` registers the native FFI handlers: a deserialized export runs in a fresh process.


def _run_python(code, *argv, cwd=ROOT, env=None):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, argv)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


_CALL_EXPORT = """
    import sys, pathlib
    {imports}
    import jax, numpy as np

    d = pathlib.Path(sys.argv[1])
    exported = jax.export.deserialize(bytearray((d / "f.jax_export").read_bytes()))
    with np.load(d / "args.npz") as f:
        y = exported.call(*(f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))))
    np.save(d / "y.npy", np.asarray(y))
"""


def test_a_native_cpu_export_runs_in_a_fresh_process_after_import_kernels(tmp_path):
    pytest.importorskip("flatbuffers")
    import jax.numpy as jnp
    import numpy as np

    import kernels
    import quant
    from kernels import cpu, targets

    if not cpu.available():
        pytest.skip(f"the native library is not built: {cpu.load()}")
    rng = np.random.default_rng(0)
    qw = quant.quantize_rtn(rng.standard_normal((256, 64), dtype=np.float32), bits=4, group_size=128)
    x = rng.standard_normal((2, 256), dtype=np.float32)

    def f(x, packed, scales, zeros):
        w = quant.Int4Weight(packed, scales, zeros, group_size=128)
        return kernels.int4_matmul(x, w, impl="cpu_native")

    args = (x, qw.packed, qw.scales, qw.zeros)
    exported = targets.export(f, *args, platforms=("cpu",), disabled_checks=targets.KERNEL_CALLS)
    assert "tokenlab_int4_matmul" in exported.mlir_module()
    (tmp_path / "f.jax_export").write_bytes(exported.serialize())
    np.savez(tmp_path / "args.npz", *(np.asarray(a) for a in args))

    without = _run_python(_CALL_EXPORT.format(imports=""), tmp_path)
    assert without.returncode != 0 and "No FFI handler registered for tokenlab_int4_matmul" in without.stderr

    proc = _run_python(_CALL_EXPORT.format(imports="import kernels"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = np.asarray(jnp.asarray(kernels.int4_matmul_reference(x, qw)))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-4, atol=1e-4)


def _copy_packages(dest):
    for top in ("kernels", "quant"):
        shutil.copytree(ROOT / top, dest / top, ignore=shutil.ignore_patterns("*.so", "__pycache__"))


def test_import_kernels_is_quiet_without_the_library(tmp_path):
    _copy_packages(tmp_path)  # the packages without the built library, first on sys.path
    code = """
        import kernels
        from kernels import cpu
        assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__
        assert not cpu.loader.load.cache_info().currsize  # nothing tried at import
    """
    proc = _run_python("import sys\n" + textwrap.dedent(code), tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tokenlab" not in proc.stderr  # no warning at import


def test_import_kernels_survives_a_broken_library(tmp_path):
    _copy_packages(tmp_path)
    (tmp_path / "kernels" / "cpu" / "_tokenlab_cpu.so").write_bytes(b"not a shared library")
    code = """
        import sys, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kernels
        from kernels import cpu
        assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__
        assert not cpu.available()
        print([str(w.message) for w in caught if "tokenlab" in str(w.message)])
    """
    proc = _run_python(code, tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "could not be loaded" in proc.stdout and "portable XLA path" in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# `make bench` without torch: an optional peer that cannot run skips in `setup` (asv: skipped), never in a
# timed or tracked body (asv: failed).

BENCH_PREFIXES = ("time_", "track_", "mem_", "peakmem_", "timeraw_")


def _benchmark_classes():
    import inspect
    import pkgutil

    import benchmarks

    found = []
    for info in pkgutil.iter_modules(benchmarks.__path__):
        module = importlib.import_module(f"benchmarks.{info.name}")
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == module.__name__:
                if any(attr.startswith(BENCH_PREFIXES) for attr in dir(cls)):
                    found.append(cls)
    return found


def _bodies(cls):
    import ast
    import inspect

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    for node in tree.body[0].body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith(BENCH_PREFIXES):
            yield node


def test_no_benchmark_body_can_skip():
    import ast

    for cls in _benchmark_classes():
        for body in _bodies(cls):
            where = f"{cls.__module__}.{cls.__name__}.{body.name}"
            for node in ast.walk(body):
                if isinstance(node, ast.Raise) and "NotImplementedError" in ast.unparse(node):
                    raise AssertionError(f"{where} raises NotImplementedError: skip in setup instead")
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("_peer"):
                    raise AssertionError(f"{where} builds an optional peer: do it in setup")
                if isinstance(node, ast.Import | ast.ImportFrom) and "torch" in ast.unparse(node):
                    raise AssertionError(f"{where} imports torch: do it in setup")


def _first_params(cls):
    params = getattr(cls, "params", [])
    if params and not isinstance(params, tuple):
        params = (params,)
    return [p[0] for p in params]


def _optional_peer_classes():
    import inspect

    import jax

    picked = []
    for cls in _benchmark_classes():
        setup = inspect.getsource(cls.setup) if hasattr(cls, "setup") else ""
        if "torch" in setup or ("default_backend()" in setup and jax.default_backend() == "cpu"):
            picked.append(pytest.param(cls, id=f"{cls.__module__}.{cls.__name__}"))
    return picked


def test_benchmarks_with_optional_peers_are_found():
    names = {p.id.rsplit(".", 1)[1] for p in _optional_peer_classes()}
    assert {"Int4MatmulVsTorch", "Int4MatmulNativeVsTorch", "PagedDecodeNativeVsTorch"} <= names


@pytest.mark.parametrize("cls", _optional_peer_classes())
def test_benchmark_without_its_peer_skips_in_setup(cls, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(NotImplementedError):
        cls().setup(*_first_params(cls))
