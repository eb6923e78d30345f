"""The package list: every Python package of the lab ships (pyproject's find rule), and the runtime dependency
on JAX is a range that admits the user's own JAX while constraints.txt pins what CI tests."""

import pathlib
import tomllib

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
    assert "jax==0.10.2" in pins and "jaxlib==0.10.2" in pins
