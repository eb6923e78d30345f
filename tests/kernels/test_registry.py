"""The dispatch shared by every op: `available_impls`, what impl="auto" lowers to on each platform, export,
and the fallback when the CPU-native library is absent or disabled."""

import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import (
    available_impls,
    cpu,
    int4_matmul,
    int4_matmul_reference,
    paged_attention,
    paged_attention_reference,
    registry,
    targets,
)
from kernels.cpu import loader
from kernels.registry import OPS, auto_impl, valid_impls
from kernels.targets import TRITON_CALL
from tests.kernels.int4_matmul.cases import K, make_weight
from tests.kernels.paged_attention.cases import make_cache
from tests.tolerances import assert_close, normalized_error

ROOT = pathlib.Path(__file__).resolve().parents[2]
needs_lib = pytest.mark.skipif(not cpu.available(), reason=f"CPU-native library not available: {cpu.load()}")


def _lowered_text(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("op", OPS)
def test_available_impls_are_valid_and_include_the_portable_ones(op):
    names = available_impls(op)
    assert names[:2] == ("reference", "xla")
    assert set(names) <= set(valid_impls(op))
    if jax.default_backend() == "cpu" and cpu.available() and op in ("paged_attention", "int4_matmul"):
        assert "cpu_native" in names


def test_available_impls_names_an_unknown_op():
    with pytest.raises(ValueError, match="op='conv' is not a kernel of the lab"):
        available_impls("conv")


@needs_lib
def test_auto_picks_native_on_cpu_and_xla_forces_portable():
    qw = make_weight(0)
    x = jnp.ones((2, K), jnp.float32)
    assert "tokenlab_int4_matmul" in _lowered_text(lambda x: int4_matmul(x, qw), x)
    assert "tokenlab_int4_matmul" not in _lowered_text(lambda x: int4_matmul(x, qw, impl="xla"), x)
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 1])
    assert "tokenlab_paged_decode" in _lowered_text(lambda *a: paged_attention(*a), q, kp, vp, lens, bt)
    xla_text = _lowered_text(lambda *a: paged_attention(*a, impl="xla"), q, kp, vp, lens, bt)
    assert "tokenlab_paged_decode" not in xla_text


def test_auto_exports_for_other_backends():
    """The platform choice happens at lowering: cuda, rocm and tpu never see the native custom call; tpu sees
    no Pallas GPU kernel either, while cuda and rocm get the Triton kernel (exportable only with the custom
    call allowed, as for any Pallas kernel)."""
    spec = jax.ShapeDtypeStruct
    qw = make_weight(0, act_order=True, act_scales=True)
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 1])
    dec_args = [spec(a.shape, a.dtype) for a in (q, kp, vp, lens, bt)]

    def int4(x):
        return int4_matmul(x, qw)

    def decode(*a):
        return paged_attention(*a, soft_cap=2.0, sliding_window=8)

    for fn, args in (
        (int4, [spec((1, K), jnp.float32)]),
        (int4, [spec((64, K), jnp.float32)]),
        (decode, dec_args),
    ):
        tpu = targets.export(fn, *args, platforms=("tpu",)).mlir_module()
        assert not any(f"@{t}(" in tpu for t in cpu.TARGETS) and TRITON_CALL not in tpu
        gpu = targets.export(fn, *args, platforms=("cuda", "rocm"), disabled_checks=[TRITON_CALL])
        assert (
            not any(f"@{t}(" in gpu.mlir_module() for t in cpu.TARGETS) and TRITON_CALL in gpu.mlir_module()
        )


@needs_lib
def test_auto_exports_for_all_four_with_the_custom_call_allowed():
    spec = jax.ShapeDtypeStruct
    qw = make_weight(0)
    exp = targets.export(
        lambda x: int4_matmul(x, qw),
        spec((1, K), jnp.float32),
        platforms=("cpu", "cuda", "rocm", "tpu"),
        disabled_checks=(*cpu.TARGETS, TRITON_CALL),
    )
    assert "@tokenlab_int4_matmul(" in exp.mlir_module() and TRITON_CALL in exp.mlir_module()


@pytest.fixture
def no_library(monkeypatch):
    """Simulate a build without the library: the loader finds nothing (registration already done stays)."""
    monkeypatch.setattr(loader, "library_path", lambda: None)
    loader.load.cache_clear()
    yield
    monkeypatch.undo()
    loader.load.cache_clear()


def test_fallback_when_the_library_is_absent(no_library):
    qw = make_weight(0)
    x = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="was not built"):
        assert not cpu.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only: the reason is cached
        assert not cpu.available()
        assert "tokenlab" not in _lowered_text(lambda x: int4_matmul(x, qw), x)
        q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 1])
        assert "tokenlab" not in _lowered_text(lambda *a: paged_attention(*a), q, kp, vp, lens, bt)
        out = int4_matmul(jnp.asarray(x), qw)
        expected = int4_matmul_reference(x, qw).astype(np.float64)
        assert normalized_error(out, expected) <= 1e-5
        assert_close(
            paged_attention(q, kp, vp, lens, bt), paged_attention_reference(q, kp, vp, lens, bt), q.dtype
        )
    with pytest.raises(RuntimeError, match="needs the native CPU library"):
        int4_matmul(jnp.asarray(x), qw, impl="cpu_native")
    with pytest.raises(RuntimeError, match="needs the native CPU library"):
        paged_attention(q, kp, vp, lens, bt, impl="cpu_native")


def test_environment_switch_disables_the_library(monkeypatch):
    monkeypatch.setenv("TOKENLAB_CPU_NATIVE", "0")
    loader.load.cache_clear()
    try:
        assert not cpu.available()
        assert "TOKENLAB_CPU_NATIVE=0" in cpu.load()
    finally:
        monkeypatch.undo()
        loader.load.cache_clear()


@needs_lib
def test_auto_never_picks_a_native_path_slower_than_xla(monkeypatch):
    """The rule of kernels.cpu.fast_enough: on a CPU whose native path is the scalar fallback, impl="auto"
    lowers the XLA path."""
    qw = make_weight(0)
    x = jnp.ones((2, K), jnp.float32)
    q, kp, vp, lens, bt = make_cache(0, lens=[20, 5, 1])
    monkeypatch.setattr(cpu, "fast_enough", lambda op: False)
    assert "@tokenlab_int4_matmul(" not in _lowered_text(lambda x: int4_matmul(x, qw), x)
    assert "@tokenlab_paged_decode(" not in _lowered_text(lambda *a: paged_attention(*a), q, kp, vp, lens, bt)
    assert auto_impl("int4_matmul", platform="cpu") == auto_impl("paged_attention", platform="cpu") == "xla"
    monkeypatch.setattr(cpu, "fast_enough", lambda op: True)
    assert "@tokenlab_int4_matmul(" in _lowered_text(lambda x: int4_matmul(x, qw), x)
    assert auto_impl("int4_matmul", platform="cpu") == "cpu_native"


@pytest.mark.parametrize("op", OPS)
def test_every_builtin_backend_is_an_implementation(op):
    table = registry.implementations(op)
    assert {"reference", "xla", "cpu_native", "pallas_triton"} <= set(table)
    for name, impl in table.items():
        assert isinstance(impl, registry.Implementation) and impl.name == name
        assert set(impl.platforms) <= set(registry.PLATFORMS)
    with pytest.raises(TypeError):
        table["mine"] = table["xla"]  # the table is read-only; register() is the way in


def test_a_registered_backend_runs_through_the_entry():
    calls = []

    def mine(x, w, *, config):
        calls.append(config)
        return registry.implementations("int4_matmul")["xla"](x, w)

    registry.register("int4_matmul", registry.Implementation("mine", mine, platforms=("cpu",)))
    try:
        qw, x = make_weight(0), jnp.ones((2, K), jnp.float32)
        assert "mine" in available_impls("int4_matmul") and "mine" in registry.implementations("int4_matmul")
        out = int4_matmul(x, qw, impl="mine")
        assert calls == [None]
        assert normalized_error(out, int4_matmul_reference(np.asarray(x), qw)) < 1e-5
        with pytest.raises(ValueError, match="already has an implementation named 'mine'"):
            registry.register("int4_matmul", registry.Implementation("mine", mine, platforms=("cpu",)))
    finally:
        registry.unregister("int4_matmul", "mine")
    assert "mine" not in available_impls("int4_matmul")
    with pytest.raises(ValueError, match="impl='mine' is not an implementation of int4_matmul"):
        int4_matmul(x, qw, impl="mine")


def test_register_refuses_reserved_names_and_non_implementations():
    fn = registry.implementations("moe_ffn")["xla"].fn
    with pytest.raises(ValueError, match="reserved"):
        registry.register("moe_ffn", registry.Implementation("grouped", fn, platforms=("cpu",)))
    with pytest.raises(ValueError, match="reserved"):
        registry.register("moe_ffn", registry.Implementation("pallas", fn, platforms=("cpu",)))
    with pytest.raises(TypeError, match="must be a kernels.registry.Implementation"):
        registry.register("moe_ffn", fn)
    with pytest.raises(ValueError, match="platforms="):
        registry.Implementation("mine", fn, platforms=("gpu",))
    with pytest.raises(ValueError, match="op='conv'"):
        registry.implementations("conv")


def test_a_config_of_the_wrong_backend_is_a_type_error():
    from kernels.int4_matmul.pallas_triton import Config as PallasConfig
    from kernels.int4_matmul.xla import Config as XlaConfig

    qw, x = make_weight(0), jnp.ones((2, K), jnp.float32)
    with pytest.raises(TypeError, match="the config of impl='xla'"):
        int4_matmul(x, qw, impl="xla", config=PallasConfig(block_m=16))
    with pytest.raises(ValueError, match="block_m=0 must be an integer >= 1"):
        PallasConfig(block_m=0)
    with pytest.raises(ValueError, match="disagree"):
        int4_matmul(x, qw, impl="codes", config=XlaConfig(strategy="dense"))
    # impl="auto" hands a config to the chosen backend whose Config it is.
    out = int4_matmul(x, qw, config=XlaConfig(strategy="dense"))
    assert normalized_error(out, int4_matmul_reference(np.asarray(x), qw)) < 1e-5


def _shared_suite(module, *options):
    """The int4_matmul shared suite run against the backends `module` registers (only those)."""
    name = module.rsplit(".", 1)[-1]
    suite = "tests/kernels/int4_matmul/test_shared.py"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        suite,
        "--impl-module",
        module,
        "-k",
        name,
        *options,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_the_shared_suite_runs_a_registered_backend_and_rejects_a_wrong_one():
    good = _shared_suite("tests.kernels.byo.xla_copy")
    assert good.returncode == 0, good.stdout[-3000:]
    assert " passed" in good.stdout
    bad = _shared_suite("tests.kernels.byo.wrong", "-x")  # the first failure is the answer
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "failed" in bad.stdout


_WITHOUT_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):  # a JAX that has removed the Pallas Triton backend
    def find_spec(self, name, path=None, target=None):
        if name == "jax.experimental.pallas.triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTriton())
import numpy as np
import jax.numpy as jnp
import kernels
from kernels import registry

for op in registry.OPS:
    assert "pallas_triton" not in kernels.available_impls(op), op
    assert "pallas_triton" in registry.valid_impls(op), op
    assert registry.auto_impl(op, platform="rocm") == "xla", op
    assert registry.auto_impl(op, platform="cuda") != "pallas_triton", op
import jax, quant
jax_version = jax.__version__
qw = quant.quantize_rtn(np.ones((64, 32), np.float32), bits=4, group_size=32)
try:
    kernels.int4_matmul(jnp.ones((1, 64)), qw, impl="pallas_triton")
    raise SystemExit("impl='pallas_triton' ran without its JAX backend")
except RuntimeError as err:  # as for any implementation that cannot run here
    assert "triton" in str(err) and jax_version in str(err), err
print("OK", kernels.available_impls("int4_matmul"))
"""


def test_a_jax_without_the_triton_backend_lists_it_unavailable_and_auto_moves_on():
    """When JAX removes the Pallas Triton backend, the lab still imports: `pallas_triton` stays a valid name
    that is never available, and impl="auto" takes the next backend (the XLA path on rocm)."""
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout and "pallas_triton" not in out.stdout.split("OK")[1]


@pytest.mark.skipif(jax.__version_info__[:2] < (0, 12), reason="the Mosaic GPU kernels need JAX >= 0.12")
@pytest.mark.parametrize("op", OPS)
def test_every_pallas_backend_runs_interpreted_on_this_cpu(op):
    """On the JAX the lab pins, no built-in Pallas backend is hidden as unavailable (an import error of our
    own would otherwise pass for a JAX that lacks the lowering): all three run here, interpreted."""
    if jax.default_backend() != "cpu":
        pytest.skip("on an accelerator, each lowers for its own platform only")
    table = registry.implementations(op)
    for name in ("pallas_mosaic_gpu", "pallas_triton", "pallas_mosaic_tpu"):
        assert table[name].unavailable() is None, (name, table[name].unavailable())
        assert name in available_impls(op)
