"""The INT4 matmul cases, written once: the tests' shape sets, the asv benchmarks (benchmarks/int4_matmul.py)
and the accelerator check (benchmarks/accel.py) all take their shapes from `CASES`.

A `Case` is `y[M, N] = x[M, K] @ W[K, N]` with a quantized W described by its format (group size, bits,
symmetric or not, act-order, AWQ activation scales); `make_args(case, seed)` builds `(x, w)` for
`int4_matmul(x, w)` from random codes, scales and zero points (quantizing a random float matrix costs far
more at these sizes and exercises nothing the kernel reads differently). `cost(case)` is what one call must
move.

Tags say who uses a case: "test" (the shared suite's K=256, N=96 shape in every weight variant), "asv" (CPU
benchmarks, float32), "native" (the CPU-native kernel's targets), "accel" (bf16 activations with float16
scales: benchmarks.accel and the asv GPU class) and "smoke" (tiny, for `python -m benchmarks.accel --smoke`).

Axes: M rows of x, K input features (reduction), N output features, G = K / group_size groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kernels import case_table


@dataclasses.dataclass(frozen=True)
class Case:
    """One matmul: shapes, the weight's format and the dtypes of x and of the scales."""

    name: str
    m: int
    k: int
    n: int
    group_size: int = 128  # -1: one group per column (per channel)
    bits: int = 4
    sym: bool = False
    act_order: bool = False
    act_scales: bool = False
    x_dtype: str = "float32"
    scale_dtype: str = "float32"
    tags: tuple[str, ...] = ()

    @property
    def group(self) -> int:
        return self.k if self.group_size == -1 else self.group_size

    def params(self) -> dict[str, Any]:
        """The shape in a few numbers, for reports."""
        return {
            "M": self.m,
            "K": self.k,
            "N": self.n,
            "group": self.group_size,
            "bits": self.bits,
            "dtype": self.x_dtype,
            "scales": self.scale_dtype,
        }


def matmul(
    m: int,
    k: int,
    n: int,
    *,
    x_dtype: str = "float32",
    scale_dtype: str = "float32",
    tags: tuple[str, ...] = (),
    **fmt: Any,
) -> Case:
    """A group-128 asymmetric (unless `fmt` says otherwise) case named "{K}x{N} M{m} {x_dtype}"."""
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(x_dtype, x_dtype)
    return Case(f"{k}x{n} M{m} {short}", m, k, n, x_dtype=x_dtype, scale_dtype=scale_dtype, tags=tags, **fmt)


# The shared suite's weight variants (tests/kernels/int4_matmul), around group 64, at K=256, N=96.
TEST_K, TEST_N = 256, 96
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"group_size": 64},
    "g32": {"group_size": 32},
    "g128": {"group_size": 128},
    "per_channel": {"group_size": -1},
    "sym": {"group_size": 64, "sym": True},
    "act_order": {"group_size": 64, "act_order": True},
    "act_scales": {"group_size": 64, "act_scales": True},
    "act_order_and_scales": {"group_size": 64, "act_order": True, "act_scales": True, "sym": True},
    "bits3": {"group_size": 64, "bits": 3},
    "bits2": {"group_size": 64, "bits": 2},
    "bits8": {"group_size": 64, "bits": 8},
}
# Llama-3-8B's projections (4096x4096, 4096x14336, 14336x4096) and Llama-3-70B's 8192x28672.
ASV_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))
TARGET_SHAPES = ((4096, 14336), (8192, 28672))

CASES: tuple[Case, ...] = (
    *(Case(f"test {v}", 5, TEST_K, TEST_N, tags=("test",), **fmt) for v, fmt in VARIANTS.items()),
    *(
        matmul(m, k, n, tags=("asv", "native") if (k, n) in TARGET_SHAPES and m in (1, 16) else ("asv",))
        for k, n in ASV_SHAPES
        for m in (1, 4, 16, 64)
    ),
    *(
        matmul(m, k, n, x_dtype="bfloat16", scale_dtype="float16", tags=("accel",))
        for k, n in TARGET_SHAPES
        for m in (1, 16, 64)
    ),
    *(matmul(m, 256, 128, x_dtype="bfloat16", scale_dtype="float16", tags=("smoke",)) for m in (1, 4)),
)


def cases(tag: str) -> tuple[Case, ...]:
    """The cases carrying `tag`, in `CASES` order."""
    return case_table.with_tag(CASES, tag, "INT4 matmul")


def get(name: str) -> Case:
    """The case called `name`."""
    return case_table.named(CASES, name, "INT4 matmul")


def make_args(case: Case, seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`((x, w), {})` for `int4_matmul(x, w)`: `x [M, K]` standard normal in `case.x_dtype` and an
    `Int4Weight` of random packed codes, scales uniform in [0.005, 0.015) (`case.scale_dtype`), random
    zero points unless symmetric, a random act-order grouping and AWQ scales in [0.25, 4) when asked.
    Drawn on the default device with `jax.random`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from quant.format import Int4Weight, codes_per_byte, perm_from_g_idx

    k, n, g = case.k, case.n, case.group
    if k % g:
        raise ValueError(f"case {case.name!r}: K={k} must be divisible by group_size={g}")
    kx, kp, ks, kz, ka, korder = jax.random.split(jax.random.key(seed), 6)
    # bits=3 codes sit in the 4-bit container, so both nibbles of a byte stay below 8.
    per_byte = codes_per_byte(case.bits)
    packed = jax.random.randint(kp, (k // per_byte, n), 0, 256, jnp.int32).astype(jnp.uint8)
    if case.bits == 3:
        packed = packed & jnp.uint8(0x77)
    scales = jax.random.uniform(ks, (k // g, n), jnp.float32, 0.5, 1.5) * 0.01
    zeros = None
    if not case.sym:
        zeros = jax.random.randint(kz, (k // g, n), 0, 2**case.bits, jnp.int32).astype(jnp.uint8)
    perm = None
    if case.act_order:
        g_idx = np.asarray(jax.random.permutation(korder, np.repeat(np.arange(k // g), g)))
        perm = perm_from_g_idx(g_idx, g)
    act_scales = jax.random.uniform(ka, (k,), jnp.float32, 0.25, 4.0) if case.act_scales else None
    w = Int4Weight(
        packed,
        scales.astype(case.scale_dtype),
        zeros,
        bits=case.bits,
        group_size=g,
        perm=perm,
        act_scales=act_scales,
    )
    x = jax.random.normal(kx, (case.m, k), jnp.dtype(case.x_dtype))
    return (x, w), {}


def arg_shapes(case: Case) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`make_args(case)` as shapes only (`jax.ShapeDtypeStruct` leaves): for compiling, no array is made."""
    import jax

    return jax.eval_shape(lambda: make_args(case)[0]), {}


def cost(case: Case, args: tuple[Any, ...] | None = None) -> Any:
    """`int4_matmul_cost` of one call on `case` (a `kernels.cost.Cost`; `args` are not needed)."""
    from kernels.int4_matmul import int4_matmul_cost

    return int4_matmul_cost(
        case.m,
        case.k,
        case.n,
        group_size=case.group,
        bits=case.bits,
        sym=case.sym,
        x_dtype=case.x_dtype,
        scale_dtype=case.scale_dtype,
        act_order=case.act_order,
        act_scales=case.act_scales,
    )
