"""moe_ffn compiled for TPU v5e and v6e on this host, with libtpu's compile-only devices (no TPU needed).

Lowering is not a check: a module that lowers can still fail in libtpu's compiler. `impl="auto"` in bf16
did ("Mosaic failed to compile TPU kernel: Bad lhs type"): it took the "ragged" strategy, whose
`lax.ragged_dot` asked for float32 (HIGHEST) contraction of bf16 operands, which XLA's Mosaic ragged-dot
kernel rejects. libtpu 0.0.52 uses that kernel only with `xla_tpu_enable_ragged_dot_kernel` (by default it
lowers ragged_dot as a dense convolution over every expert), so the ragged checks compile both ways.

Shapes come from `kernels.moe.arg_specs` as `jax.ShapeDtypeStruct`s placed on the compile-only device (an
array cannot be copied there). The small case compiles in one to three seconds a program; at the benchmark
shape (T=256, E=8, k=2, d=1024, f=2048) the default run compiles the ragged strategy through the Mosaic
kernel (~5 s), and `"auto"` only with --full (its bucketed switch holds 12 GEMM chains: 0.5 to 3 minutes a
forward program and 2 to 13 minutes a gradient on a 2-core host). Skipped where libtpu is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from kernels.moe import moe_ffn
from kernels.moe.arg_specs import Case, get, make_args
from kernels.moe.xla import STRATEGIES, TPU_STRATEGY

CHIPS = {"v5e": "v5e:1x1", "v6e": "v6e:1x1"}
DTYPES = ("float32", "bfloat16")
# libtpu's switch for XLA's Mosaic ragged-dot kernel (the kernel that rejected bf16 operands).
RAGGED_DOT_KERNEL = {"xla_tpu_enable_ragged_dot_kernel": True}
SMALL = get("test base")  # T=16, E=8, k=2, d=32, f=48
ISSUE = Case("issue", 256, 8, 2, 1024, 2048, routing="random")


@pytest.fixture(scope="module")
def tpu_devices():
    """chip -> a compile-only TPU device of that chip (never copy an array to it)."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'jax[tpu]'): no compile-only TPU devices")
    from jax.experimental import topologies

    devices = {}
    for chip, name in CHIPS.items():
        try:
            topology = topologies.get_topology_desc(
                name, platform="tpu", chip_config_name="default",
                chips_per_host_bounds=(1, 1, 1), num_slices=1, wrap=(False, False, False),
            )  # fmt: skip
        except Exception as err:  # an old or broken libtpu, or another process holding libtpu's lock
            pytest.skip(f"libtpu gives no compile-only {chip} device here: {str(err).splitlines()[0]}")
        devices[chip] = topology.devices[0]
    return devices


def _on(device, tree):
    make = getattr(jax.sharding, "make_single_device_sharding", None)  # JAX >= 0.12; the class before
    sharding = make(device) if make is not None else jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def compile_for(device, fn, case, *, grad=False, compiler_options=None, **kwargs):
    """`fn(*args, **kwargs)` (or the gradient of its sum w.r.t. x and the expert weights, or for INT4 experts
    x and the routing weights) on `case`'s shapes, lowered and compiled for `device`. Returns the lowered
    text and the compiled program."""
    args = jax.eval_shape(lambda: make_args(case)[0])
    kwargs = {**kwargs, **({} if case.capacity_factor is None else {"capacity_factor": case.capacity_factor})}

    def call(*a):
        return fn(*a, **kwargs)

    if grad:
        argnums = (0, 1) if case.experts == "int4" else (0, 3, 4, 5)
        call = jax.grad(lambda *a: fn(*a, **kwargs).astype(jnp.float32).sum(), argnums=argnums)
    with jax.default_device(device):
        lowered = jax.jit(call).trace(*_on(device, args)).lower()
        compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    return lowered.as_text(), compiled


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chip", CHIPS)
def test_auto_compiles(tpu_devices, chip, dtype, grad):
    """ "auto" compiles for both chips in both dtypes, forward and backward, and does not take ragged_dot."""
    case = dataclasses.replace(SMALL, dtype=dtype)
    text, _ = compile_for(tpu_devices[chip], moe_ffn, case, grad=grad, impl="auto")
    assert "ragged_dot" not in text


INT4 = get("test int4 experts")  # "grouped" over int4_matmul
BRANCHES = [
    INT4,
    get("test capacity 1.0"),  # "batched"
    dataclasses.replace(SMALL, name="test decode T2 bf16", tokens=2, dtype="bfloat16"),  # decode
]


@pytest.mark.parametrize(
    "case,grad",
    [
        *((c, False) for c in BRANCHES),
        *((c, True) for c in BRANCHES if c is not INT4),
        pytest.param(INT4, True, marks=pytest.mark.slow),  # ~5 s
    ],
    ids=lambda v: v.name if isinstance(v, Case) else ("grad" if v else "forward"),
)
def test_auto_compiles_for_each_tpu_branch(tpu_devices, case, grad):
    compile_for(tpu_devices["v6e"], moe_ffn, case, grad=grad, impl="auto")


@pytest.mark.slow
@pytest.mark.parametrize("chip,dtype", [("v6e", "bfloat16"), ("v5e", "float32")])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_compiles(tpu_devices, strategy, chip, dtype):
    compile_for(tpu_devices[chip], moe_ffn, dataclasses.replace(SMALL, dtype=dtype), impl=strategy)


@pytest.mark.parametrize(
    "chip,kernel,grad",
    [
        pytest.param(
            chip,
            kernel,
            grad,
            id=f"{chip}-{'kernel' if kernel else 'dense'}-{'grad' if grad else 'fwd'}",
            marks=() if default else pytest.mark.slow,
        )
        for chip, kernel, grad, default in [
            ("v5e", True, False, True),
            ("v5e", True, True, False),
            ("v6e", True, False, False),
            ("v6e", True, True, True),
            (
                "v6e",
                False,
                True,
                False,
            ),  # the default (dense) lowering's forward: test_every_strategy_compiles
        ]
    ],
)
def test_ragged_compiles_in_bf16_with_either_lowering(tpu_devices, chip, kernel, grad):
    """The failure it had, at a small shape: XLA's Mosaic ragged-dot kernel rejected the bf16 operands."""
    compile_for(
        tpu_devices[chip], moe_ffn, dataclasses.replace(SMALL, dtype="bfloat16"), grad=grad, impl="ragged",
        compiler_options={"xla_tpu_enable_ragged_dot_kernel": kernel},
    )  # fmt: skip


def test_ragged_compiles_in_bf16_at_the_issue_shape(tpu_devices):
    _, compiled = compile_for(
        tpu_devices["v6e"], moe_ffn, dataclasses.replace(ISSUE, dtype="bfloat16"), impl="ragged",
        compiler_options=RAGGED_DOT_KERNEL,
    )  # fmt: skip
    assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()  # the Mosaic kernel, not the fallback


@pytest.mark.slow
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chip", CHIPS)
def test_auto_compiles_at_the_issue_shape(tpu_devices, chip, dtype, grad):
    compile_for(tpu_devices[chip], moe_ffn, dataclasses.replace(ISSUE, dtype=dtype), grad=grad, impl="auto")


def test_auto_on_a_tpu_is_the_grouped_loop():
    assert TPU_STRATEGY == "grouped"
