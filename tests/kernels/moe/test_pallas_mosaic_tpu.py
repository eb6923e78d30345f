"""The Pallas Mosaic TPU MoE FFN (kernels/moe/pallas_mosaic_tpu.py): its schedule, the kernels interpreted on
the CPU, their tpu lowering, and their compilation for v5e and v6e with libtpu's compile-only devices
(skipped with the reason where libtpu is absent).

The shared suite (test_shared.py) runs the kernels, interpreted, on every routing pattern, capacity, bf16,
INT4 experts and gradients; here: several grid steps along every axis at float32 accuracy, the visit schedule
by hand, experts without rows never read (their weights poisoned), INT4 variants, capacity mode, the tiles per
chip, and what the TPU compiler makes of it at one small and one benchmark case per chip
(`python -m benchmarks.compiled --only moe_ffn --targets v5e,v6e --impls pallas` covers every case).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import compile_only, targets
from kernels.moe import moe_ffn, moe_ffn_reference
from kernels.moe import pallas_mosaic_tpu as pt
from kernels.moe.arg_specs import arg_shapes, get
from quant.format import Int4Weight
from tests.kernels.moe.cases import make_routing, make_weights, make_x
from tests.tolerances import normalized_error, tolerance

IMPL = "pallas_mosaic_tpu"
# The kernels' own platforms choose at lowering (interpreted on the CPU, compiled on a TPU); elsewhere (a GPU
# host) these tests interpret them explicitly.
INTERPRET = None if jax.default_backend() in ("cpu", "tpu") else True


def run(x, w, ids, ws, **kw):
    return pt.moe_ffn_pallas_tpu(x, w, ids, *ws, interpret=INTERPRET, **kw)


def check(x, w, ids, ws, *, capacity=None, drop_priority="choice", **tunables):
    cf = None if capacity is None else capacity * ws[0].shape[0] / ids.size  # expert_capacity's inverse
    expected = moe_ffn_reference(x, w, ids, *ws, capacity_factor=cf, drop_priority=drop_priority)
    y = run(x, w, ids, ws, capacity=capacity, drop_priority=drop_priority, **tunables)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert normalized_error(y, expected) <= tolerance(x.dtype).nerr


def int4_experts(seed, e, k, n, *, group=32, bits=4, symmetric=False, act=False):
    """E stacked Int4Weight [k, n] (leaves with a leading expert axis): random codes, float16 scales, zero
    points (or the symmetric zero), AWQ activation scales."""
    rng = np.random.default_rng(seed)
    mask = 0x77 if bits == 3 else 0xFF  # 3-bit codes in the 4-bit container

    def one():
        g = k // group
        return Int4Weight(
            rng.integers(0, 256, (k // 2, n), dtype=np.uint8) & mask,
            (rng.uniform(0.5, 1.5, (g, n)) * 0.1 / np.sqrt(k)).astype(np.float16),
            None if symmetric else rng.integers(0, 1 << bits, (g, n), dtype=np.uint8),
            bits=bits,
            group_size=group,
            act_scales=rng.uniform(0.5, 2.0, k).astype(np.float32) if act else None,
        )

    return jax.tree.map(lambda *a: jnp.stack(a), *[one() for _ in range(e)])


def poisoned_scales(w, first, value):
    """w with the scales of experts first.. set to value."""
    leaves, aux = w.tree_flatten()
    return Int4Weight.tree_unflatten(aux, (leaves[0], leaves[1].at[first:].set(value), *leaves[2:]))


# --------------------------------------------------------------------------------------------------
# the schedule


def test_group_metadata_by_hand():
    # Rows [0, 5) expert 0, none for 1, [5, 25) expert 2, [25, 28) expert 3; tiles of 8 rows, 32 rows.
    offsets, gids, mids, num = pt.group_metadata(jnp.array([5, 0, 20, 3]), 32, 8)
    num = int(num)
    assert offsets.tolist() == [0, 5, 5, 25, 28]
    # Tile 0 holds experts 0 and 2; tiles 1 and 2 expert 2; tile 3 experts 2 and 3.
    assert list(zip(gids[:num].tolist(), mids[:num].tolist(), strict=True)) == [
        (0, 0), (2, 0), (2, 1), (2, 2), (2, 3), (3, 3),
    ]  # fmt: skip
    assert len(gids) == 32 // 8 + 4 - 1


def test_group_metadata_visits_no_empty_expert_and_each_row_once():
    rng = np.random.default_rng(0)
    metadata = jax.jit(pt.group_metadata, static_argnums=(1, 2))
    for _ in range(10):
        sizes = rng.integers(0, 12, 6) * (rng.random(6) < 0.6)
        rows = -(-max(int(sizes.sum()), 1) // 16) * 16 + 16
        offsets, gids, mids, num = (np.asarray(a) for a in metadata(jnp.asarray(sizes), rows, 16))
        visited = [(int(g), int(m)) for g, m in zip(gids[:num], mids[:num], strict=True)]
        assert all(sizes[g] > 0 for g, _ in visited)  # no block of an empty expert is ever copied
        assert [m for _, m in visited] == sorted(
            m for _, m in visited
        )  # an output tile's visits are adjacent
        covered = np.zeros(rows, int)
        for g, m in visited:
            r = np.arange(m * 16, (m + 1) * 16)
            covered[r[(r >= offsets[g]) & (r < offsets[g + 1])]] += 1
        assert covered[: sizes.sum()].tolist() == [1] * int(sizes.sum()) and not covered[sizes.sum() :].any()


def test_arrange_columns_matches_the_decoded_tile_order():
    a = jnp.arange(2 * 8, dtype=jnp.float32).reshape(2, 8)
    assert pt.arrange_columns(a, 4)[0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# --------------------------------------------------------------------------------------------------
# the kernels, interpreted


def test_float32_accuracy_with_several_steps_on_every_grid_axis():
    # d = f = 256 with 128-wide tiles: two column tiles and two K steps per kernel; 48 rows in tiles of 16,
    # four experts of uneven sizes (tiles shared by two experts).
    e, d, f, t = 4, 256, 256, 24
    w, ids = make_routing(1, 2, e=e, t=t)
    check(make_x(1, t=t, d=d), w, ids, make_weights(1, e=e, d=d, f=f), block_m=16, block_n=128, block_k=128)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float32_dots_ask_for_full_precision(dtype):
    xs, ws = make_x(2, t=32).astype(dtype), tuple(a.astype(dtype) for a in make_weights(2))
    sizes = jnp.array([4, 0, 8, 4, 4, 4, 4, 4])
    # Interpreted explicitly: the per-platform primitive's jaxpr does not show its lowerings.
    jaxpr = str(jax.make_jaxpr(lambda xs: pt.grouped_ffn_tpu(xs, sizes, *ws, interpret=True))(xs))
    assert "preferred_element_type=float32" in jaxpr
    assert ("precision=(Precision.HIGHEST, Precision.HIGHEST)" in jaxpr) == (dtype == jnp.float32)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_experts_without_rows_are_never_read(value):
    """Experts 3.. get no token; their weights (and, for INT4, their scales) poisoned: nothing reaches y."""
    w, ids = make_routing(3, 2, pattern="empty_experts")
    x, clean = make_x(3), make_weights(3)
    poisoned = tuple(a.copy() for a in clean)
    for a in poisoned:
        a[3:] = value
    y = run(x, w, ids, poisoned)
    assert np.isfinite(np.asarray(y)).all()
    assert normalized_error(y, moe_ffn_reference(x, w, ids, *clean)) <= tolerance(x.dtype).nerr
    qs = tuple(int4_experts(s, 8, *shape) for s, shape in enumerate([(64, 128), (64, 128), (128, 64)]))
    bad = tuple(poisoned_scales(q, 3, value) for q in qs)
    xq = make_x(4, d=64)
    y = run(xq, w, ids, bad)
    assert np.isfinite(np.asarray(y)).all()
    assert normalized_error(y, moe_ffn_reference(xq, w, ids, *qs)) <= tolerance(xq.dtype).nerr


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(symmetric=True, bits=3, act=True),
    ],
    ids=["zeros", "symmetric_bits3_awq"],
)
def test_int4_experts(variant):
    # d = 512 at block_k = 256: two K steps of eight groups each in the gate/up kernel.
    e, d, f, t = 4, 512, 256, 8
    ws = (int4_experts(0, e, d, f, **variant), int4_experts(1, e, d, f, **variant),
          int4_experts(2, e, f, d, **variant))  # fmt: skip
    w, ids = make_routing(5, 2, e=e, t=t)
    check(make_x(5, t=t, d=d), w, ids, ws, block_k=256)


def test_int4_experts_with_bfloat16_and_float16_activations():
    ws = tuple(int4_experts(s, 8, *shape) for s, shape in enumerate([(64, 128), (64, 128), (128, 64)]))
    w, ids = make_routing(6, 2)
    for dtype in (jnp.bfloat16, np.float16):
        check(make_x(6, d=64).astype(dtype), w, ids, ws)


@pytest.mark.parametrize("prio", ["token", "weight"])
def test_capacity_mode(prio):
    w, ids = make_routing(7, 2)
    ids[:10, 0] = 2  # expert 2 overloaded: capacity drops some of its assignments
    check(make_x(7), w, ids, make_weights(7), capacity=3, drop_priority=prio)


# --------------------------------------------------------------------------------------------------
# tiles per chip


def test_choose_tiling_by_chip_at_the_benchmark_cases():
    for name in ("mixtral T8 bf16", "mixtral T4096 bf16", "deepseek T8 bf16", "deepseek T4096 bf16"):
        case = get(name)
        (x, _, ids, wg, _, wd), _ = arg_shapes(case)
        for chip in pt.CHIPS.values():
            t = pt.choose_tiling(
                ids.shape[0] * ids.shape[1], wg, wd, x.dtype, chip=chip, vmem_capacity=64 << 20
            )
            assert t.block_m % 16 == 0 and t.block_m <= chip.block_m
            for (bn, bk), (k, n) in ((t.gate_up, wg.shape[1:]), (t.down, wd.shape[1:])):
                assert n % bn == 0 and (bn % 128 == 0 or bn == n)
                assert k % bk == 0 and (bk % 128 == 0 or bk == k)
            assert 16 << 20 <= t.vmem_limit <= min(chip.vmem_limit, 48 << 20)
    assert pt.choose_tiling(32, *make_weights(0)[::2], np.float32, chip=pt.INTERPRET_CHIP).gate_up == (48, 32)


def test_chip_is_read_from_the_tpu_being_lowered_for():
    if jax.default_backend() != "tpu":
        assert pt.chip_tiles() == (pt.DEFAULT_CHIP, None)  # no TPU to ask
    with targets.device_context("tpu", device_kind="TPU v5 lite"):
        assert pt.chip_tiles() == (pt.CHIPS["v5e"], 128 << 20)
    with targets.device_context("tpu", device_kind="TPU v6 lite"):
        assert pt.chip_tiles() == (pt.CHIPS["v6e"], 128 << 20)


# --------------------------------------------------------------------------------------------------
# lowering and compiling for TPUs


def _shapes(*arrays):
    return [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in arrays]


@pytest.mark.parametrize("impl", [IMPL, "auto"])
def test_lowers_for_tpu_with_the_expert_matmuls_inside_the_kernels(impl):
    x, ws = make_x(8).astype(jnp.bfloat16), tuple(a.astype(jnp.bfloat16) for a in make_weights(8))
    w, ids = make_routing(8, 2)
    text = targets.lower(
        lambda x, w, ids, *ws: moe_ffn(x, w, ids, *ws, impl=impl),
        *_shapes(x, w, ids, *ws),
        platforms=("tpu",),
    ).as_text()
    assert len(re.findall(r"tpu_custom_call", text)) == 2  # gate/up + SwiGLU, then down
    # XLA's own dots (the weighted combine) never take an expert stack.
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert all("8x32x48" not in line and "8x48x32" not in line for line in dots)


def test_exports_for_cpu_and_tpu_and_runs_the_export_on_the_cpu():
    x, ws = make_x(9), make_weights(9)
    w, ids = make_routing(9, 2)
    exported = targets.export(
        lambda x, w, ids: moe_ffn(x, w, ids, *ws, impl=IMPL), *_shapes(x, w, ids),
        platforms=("cpu", "tpu"), disabled_checks=["tpu_custom_call"],
    )  # fmt: skip
    assert "tpu_custom_call" in exported.mlir_module()
    expected = moe_ffn_reference(x, w, ids, *ws)
    assert normalized_error(exported.call(x, w, ids), expected) <= tolerance(x.dtype).nerr


# One small case (INT4 experts: the in-kernel decode) and one benchmark case per chip; benchmarks.compiled
# compiles every case, forward and gradient.
COMPILE_CASES = ("test int4 experts", "mixtral T8 bf16")


@pytest.mark.parametrize("case", COMPILE_CASES)
@pytest.mark.parametrize("target", ["v5e", "v6e"])
def test_compiles_for_tpu(target, case):
    reason = compile_only.missing(target)
    if reason:
        pytest.skip(f"{target}: {reason}")
    args, kwargs = arg_shapes(get(case))
    compiled = compile_only.compile_for(target, lambda *a: moe_ffn(*a, impl=IMPL, **kwargs), *args)
    text = compiled.as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 2
    asked = [
        int(v)
        for v in re.findall(r'"scoped_memory_configs":\[\{"memory_space":"?1"?,[^}]*?"size":"?(\d+)', text)
    ]
    assert asked and all(16 << 20 <= v <= pt.CHIPS[target].vmem_limit for v in asked)  # the limit we set


# --------------------------------------------------------------------------------------------------
# what it declines


def test_unsupported_operands_name_the_reason():
    x, ws = make_x(0), make_weights(0)
    assert pt.pallas_unsupported(x, *ws) is None
    assert "float16" in pt.pallas_unsupported(x.astype(np.float16), *(a.astype(np.float16) for a in ws))
    q = int4_experts(0, 8, 32, 48)
    assert "mixed" in pt.pallas_unsupported(x, q, *ws[1:])
    leaves, aux = q.tree_flatten()
    permuted = Int4Weight.tree_unflatten(aux, (*leaves[:3], jnp.tile(jnp.arange(32), (8, 1)), None))
    assert "perm" in pt.pallas_unsupported(x, permuted, q, q)
    with pytest.raises(ValueError, match="does not support x.dtype=float16"):
        moe_ffn(x.astype(np.float16), *make_routing(0, 2), *(a.astype(np.float16) for a in ws), impl=IMPL)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"block_m": 12}, "block_m=12"),
        ({"block_n": 64}, "block_n=64"),
        ({"block_k": 100}, "block_k=100"),
        ({"interpret": "yes"}, "interpret='yes'"),
        ({"capacity": 0}, "capacity=0"),
    ],
)
def test_bad_tunables_name_the_argument(kw, match):
    w, ids = make_routing(0, 2)
    with pytest.raises(ValueError, match=match):
        pt.moe_ffn_pallas_tpu(make_x(0), w, ids, *make_weights(0), **kw)
