"""The Mosaic GPU grouped expert FFN: its tile schedule by hand, interpret mode against the NumPy reference at
tiny shapes (an expert with no rows whose weights are NaN, INT4 experts in the kernels: an unused expert's
scales NaN, float32 activations with a capacity and several K steps; groups of 32 through the dequantizing
path), its configuration (tuned file, shape classes, bad fields), what it declines (GPUs below compute
capability 9.0, where impl="auto" takes the Triton kernel), and its compiled kernels at sm_90a (no spills,
wgmma and TMA) at a small case, the Mixtral-like T=256 benchmark case and Mixtral-like T=256 INT4 experts
(group 128). The shared suite (test_shared.py) covers the rest."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np
import pytest

from kernels import compile_only, registry
from kernels.moe import arg_specs, moe_ffn, moe_ffn_reference
from kernels.moe.pallas_mosaic_gpu import (
    BUILTIN,
    Config,
    _int4_reason,
    default_config,
    moe_ffn_mosaic_gpu,
    pallas_unsupported,
    shape_class,
    tile_experts,
    tune_space,
)
from quant import quantize_rtn
from quant.format import Int4Weight
from tests.kernels.moe.cases import make_routing, make_weights, make_x
from tests.tolerances import normalized_error, tolerance

H100 = "NVIDIA H100 80GB HBM3"


def _needs(target):
    reason = compile_only.missing(target)
    if reason:
        pytest.skip(reason)


def test_tile_experts_by_hand():
    # Groups of 5, 0, 70 and 64 rows padded to whole 64-row tiles: expert 0 owns tile 0, expert 2 tiles 1-2,
    # expert 3 tile 3; expert 1 owns none; tiles past the routed rows are -1.
    te = jax.jit(tile_experts, static_argnums=(1, 2))(jnp.array([5, 0, 70, 64], jnp.int32), 6, 64)
    np.testing.assert_array_equal(np.asarray(te), [0, 2, 2, 3, -1, -1])
    te = jax.jit(tile_experts, static_argnums=(1, 2))(jnp.zeros(3, jnp.int32), 2, 64)
    np.testing.assert_array_equal(np.asarray(te), [-1, -1])


def test_empty_expert_with_nan_weights_is_never_read_bf16():
    """Experts 3.. receive no token and hold NaN: no tile reads them (NaN would reach every row of a tile)."""
    w, ids = make_routing(3, 2, pattern="empty_experts")
    x = make_x(3).astype(jnp.bfloat16)
    clean = tuple(a.astype(jnp.bfloat16) for a in make_weights(3))
    poisoned = tuple(
        np.where(np.arange(a.shape[0])[:, None, None] >= 3, np.nan, a).astype(a.dtype) for a in clean
    )
    y = moe_ffn_mosaic_gpu(x, w, ids, *poisoned)
    assert y.dtype == x.dtype and np.isfinite(np.asarray(y, np.float32)).all()
    assert normalized_error(y, moe_ffn_reference(x, w, ids, *clean)) <= tolerance(x.dtype).nerr


def test_int4_experts_with_capacity_group_32_dequantized():
    """Groups of 32 rows, below the INT4 kernels' 64-row segment: XLA dequantizes, the float kernels run."""
    args, _ = arg_specs.make_args(arg_specs.get("test int4 experts"))
    x, w, ids, *ws = args
    assert _int4_reason(*ws) is not None
    x = x.astype(jnp.bfloat16)  # float32 runs six bf16 products: the shared suite covers it
    ids = np.asarray(ids).copy()
    ids[:8, 0] = 5  # overload expert 5 so that the capacity bites
    y = moe_ffn(x, w, ids, *ws, capacity_factor=1.0, impl="pallas_mosaic_gpu")
    ref = moe_ffn_reference(x, w, ids, *ws, capacity_factor=1.0)
    assert normalized_error(y, ref) <= tolerance(x.dtype).nerr


def _int4_stack(seed, e, k, n, **kw):
    rng = np.random.default_rng(seed)
    ws = [quantize_rtn(rng.standard_normal((k, n)).astype(np.float32), group_size=64, **kw) for _ in range(e)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ws)


def _int4_experts(seed, e, d, f, **kw):
    return tuple(_int4_stack(seed + i, e, *kn, **kw) for i, kn in enumerate(((d, f), (d, f), (f, d))))


def _runs_int4_kernels(x, w, ids, ws, **kw):
    jaxpr = str(jax.make_jaxpr(lambda *a: moe_ffn_mosaic_gpu(*a, **kw))(x, w, ids, *ws))
    return "tokenlab_moe_mosaic_gpu_int4_ffn" in jaxpr and "tokenlab_moe_mosaic_gpu_ffn" not in jaxpr


def test_int4_experts_in_the_kernels_never_read_unused_experts():
    """bf16 activations, zero points; experts 3.. receive no token and their scales are NaN: no tile reads
    them; XLA does not dequantize their codes either (the kernels take the packed codes)."""
    w, ids = make_routing(3, 2, pattern="empty_experts")
    x = jnp.asarray(make_x(3, d=64), jnp.bfloat16)
    clean = _int4_experts(0, 8, 64, 128)
    poisoned = tuple(
        Int4Weight.tree_unflatten(
            (q.bits, q.group_size),
            (q.packed, q.scales.at[3:].set(np.nan), q.zeros, q.perm, q.act_scales),
        )
        for q in clean
    )
    assert _runs_int4_kernels(x, w, ids, poisoned)
    y = moe_ffn_mosaic_gpu(x, w, ids, *poisoned)
    assert y.dtype == x.dtype and np.isfinite(np.asarray(y, np.float32)).all()
    assert normalized_error(y, moe_ffn_reference(x, w, ids, *clean)) <= tolerance(x.dtype).nerr


def test_int4_experts_in_the_kernels_float32_with_capacity():
    """float32 activations (three bf16 parts into one accumulator), symmetric codes, several K steps in both
    kernels (d = f = 128 with groups of 64), and a capacity that drops rows."""
    w, ids = make_routing(5, 2, e=4)
    ids[:8, 0] = 1  # overload expert 1 so that the capacity bites
    x = make_x(5, d=128)
    ws = _int4_experts(10, 4, 128, 128, sym=True)
    assert _runs_int4_kernels(x, w, ids, ws, capacity=5)
    y = moe_ffn_mosaic_gpu(x, w, ids, *ws, capacity=5)
    ref = moe_ffn_reference(x, w, ids, *ws, capacity_factor=5 * 4 / ids.size)
    assert normalized_error(y, ref) <= tolerance(x.dtype).nerr


def test_config_shape_class_and_tuned_file(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="block_m=32 must be 64 or 128"):
        Config(block_m=32)
    with pytest.raises(ValueError, match="block_n=96 must be a power of two"):
        Config(block_n=96)
    with pytest.raises(ValueError, match="would exceed"):
        Config(block_m=128, block_n=128)
    with pytest.raises(ValueError, match="int4_block_m=8 must be one of"):
        Config(int4_block_m=8)
    shapes = {c.name: arg_specs.arg_shapes(c)[0] for c in arg_specs.cases("accel")}
    assert shape_class(*shapes["mixtral T8 bf16"]) == "decode"
    assert shape_class(*shapes["mixtral T4096 bf16"]) == "prefill"
    space = tune_space(*shapes["mixtral T4096 bf16"])
    assert 4 <= len(space) <= 12 and all(isinstance(c, Config) for c in space)
    assert default_config(*shapes["mixtral T4096 bf16"]) == BUILTIN["prefill"]  # no GPU target: built-in
    _needs("sm_90a")
    tuned = tmp_path / "tuned.json"
    entry = {"op": "moe_ffn", "impl": "pallas_mosaic_gpu", "shape_class": "prefill", "device_kind": H100,
             "config": {"block_m": 64, "block_n": 64, "block_k": 64, "max_concurrent_steps": 3}}  # fmt: skip
    tuned.write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setenv("TOKENLAB_TUNED", str(tuned))
    with compile_only.on_target("sm_90a"):
        assert default_config(*shapes["mixtral T4096 bf16"]) == Config(**entry["config"])
        assert default_config(*shapes["mixtral T8 bf16"]) == BUILTIN["decode"]


def test_declines_below_hopper_and_auto_takes_triton():
    _needs("sm_80")
    _needs("sm_90a")
    args, kw = arg_specs.arg_shapes(arg_specs.get("mixtral T256 bf16"))
    with compile_only.on_target("sm_80"):
        assert "compute capability 8.0" in pallas_unsupported(args[0], *args[3:])
        assert registry.auto_impl("moe_ffn", *args, platform="cuda", **kw) == "pallas_triton"
    with compile_only.on_target("sm_90a"):
        assert pallas_unsupported(args[0], *args[3:]) is None
        assert registry.auto_impl("moe_ffn", *args, platform="cuda", **kw) == "pallas_mosaic_gpu"


@pytest.mark.parametrize("case", ["smoke mixtral T8 bf16", "mixtral T256 bf16"])
def test_compiles_for_sm90a_without_spills_on_wgmma(case):
    _needs("sm_90a")
    from benchmarks.compiled import cubin_resources, cubin_sass
    from kernels.compile_only import mosaic_gpu_kernels

    args, kw = arg_specs.arg_shapes(arg_specs.get(case))
    program = compile_only.compile_for(
        "sm_90a", lambda *a: moe_ffn(*a, impl="pallas_mosaic_gpu", **kw), *args
    )
    kernels = {k.name: k for k in mosaic_gpu_kernels(program)}
    assert sorted(kernels) == ["moe_down_mosaic_gpu_kernel", "moe_gate_up_swiglu_mosaic_gpu_kernel"]
    for k in kernels.values():
        assert cubin_resources(k.cubin)["spill_bytes"] == 0, k.name
        sass = cubin_sass(k.cubin)
        assert sass["tensor_core"] == "wgmma" and sass["tma"], (k.name, sass)


def test_int4_experts_compile_for_sm90a_without_spills_on_wgmma():
    """Mixtral-like experts (E=8, k=2, d=4096, f=14336) as INT4 with group 128 and zero points, T=256 bf16."""
    _needs("sm_90a")
    from benchmarks.compiled import cubin_resources, cubin_sass
    from kernels.compile_only import mosaic_gpu_kernels

    t, e, k, d, f, g = 256, 8, 2, 4096, 14336, 128
    S = jax.ShapeDtypeStruct

    def stack(rows, cols):
        fields = (S((e, rows // 2, cols), jnp.uint8), S((e, rows // g, cols), jnp.float16))
        return Int4Weight.tree_unflatten((4, g), (*fields, S((e, rows // g, cols), jnp.uint8), None, None))

    args = (S((t, d), jnp.bfloat16), S((t, k), jnp.float32), S((t, k), jnp.int32))
    args += (stack(d, f), stack(d, f), stack(f, d))
    program = compile_only.compile_for("sm_90a", lambda *a: moe_ffn(*a, impl="pallas_mosaic_gpu"), *args)
    kernels = {k.name: k for k in mosaic_gpu_kernels(program)}
    assert sorted(kernels) == ["moe_int4_down_mosaic_gpu_kernel", "moe_int4_gate_up_swiglu_mosaic_gpu_kernel"]
    for kern in kernels.values():
        assert cubin_resources(kern.cubin)["spill_bytes"] == 0, kern.name
        sass = cubin_sass(kern.cubin)
        assert sass["tensor_core"] == "wgmma" and sass["tma"], (kern.name, sass)
