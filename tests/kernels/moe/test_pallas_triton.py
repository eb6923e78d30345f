"""The Pallas grouped expert FFN (interpret mode on the CPU) against the NumPy MoE reference: the tile
schedule by hand, dropless and capacity routing (skewed, an expert with no rows, decode), float32 and
bfloat16, quantized experts, gradients against the dense strategy's autodiff, and the cuda lowering."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels import expert_capacity, moe_ffn, moe_ffn_reference, targets
from kernels.moe.pallas_triton import (
    grouped_ffn_pallas,
    launch_order,
    moe_ffn_pallas,
    pallas_unsupported,
    tile_schedule,
)
from kernels.targets import TRITON_CALL
from quant.format import Int4Weight
from tests.tolerances import normalized_error, tolerance

T, D, F = 16, 32, 64
QD = 64  # quantized experts: K must hold whole groups of 32


def _weights(seed, e, d=D, f=F, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(
        (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(dtype)
        for shape in ((e, d, f), (e, d, f), (e, f, d))
    )


def _x(seed, t=T, d=D, dtype=np.float32):
    return np.random.default_rng(seed + 1000).standard_normal((t, d)).astype(dtype)


def _routing(seed, e, k, t=T, pattern="random"):
    rng = np.random.default_rng(seed)
    # "skewed": a trained router's popularity skew (as benchmarks.accel draws it), and expert 1 empty.
    if pattern == "skewed":
        logits = rng.standard_normal((t, e)) + np.linspace(0.0, 3.0, e)
        logits[:, 1] = -np.inf
        ids = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int32)
    else:
        ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    return rng.uniform(0.1, 1.0, (t, k)).astype(np.float32), ids


def _check(x, w, ids, ws, capacity_factor=None, drop_priority="choice"):
    capacity = None
    if capacity_factor is not None:
        num_experts = (ws[0].packed if isinstance(ws[0], Int4Weight) else ws[0]).shape[0]
        capacity = expert_capacity(ids.shape[0], num_experts, ids.shape[1], capacity_factor)
    y = moe_ffn_pallas(x, w, ids, *ws, capacity=capacity, drop_priority=drop_priority)
    ref = moe_ffn_reference(x, w, ids, *ws, capacity_factor=capacity_factor, drop_priority=drop_priority)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert normalized_error(y, ref) <= tolerance(x.dtype).nerr


# ---------------------------------------------------------------------------------------------------------
# The tile schedule.

_schedule = jax.jit(tile_schedule, static_argnums=(1, 2))


def test_tile_schedule_by_hand():
    # 48 rows in blocks of 16; experts of 5, 0, 20 and 3 rows: expert 2 straddles blocks 0 and 1 and
    # shares block 1 with expert 3, whose tile also zeroes rows 28..31; block 2 is past the routed rows.
    sched = np.asarray(_schedule(jnp.array([5, 0, 20, 3], jnp.int32), 48, 16))
    want = np.array(
        [
            [0, 2, 2, 3, 3, 3],  # expert
            [0, 0, 1, 1, 2, 0],  # row block
            [0, 5, 16, 25, 0, 0],  # lo
            [5, 16, 25, 28, 0, 0],  # hi
            [48, 48, 48, 28, 32, 48],  # zero_from
        ]
    )
    np.testing.assert_array_equal(sched, want)


@pytest.mark.parametrize(
    "sizes,rows",
    [([0, 0, 0], 32), ([16, 16], 32), ([1, 0, 0, 30, 0, 1], 64), ([3, 3, 3, 3], 16), ([9, 20, 5], 32)],
)
def test_tile_schedule_covers_every_row_once(sizes, rows):
    block_m = 16
    sched = np.asarray(_schedule(jnp.asarray(sizes, jnp.int32), rows, block_m))
    # Sizes past the buffer (only possible when traced: concrete ones are refused) are clamped to it.
    sizes = np.diff(np.minimum(np.cumsum([0, *sizes]), rows))
    assert sched.shape == (5, rows // block_m + len(sizes) - 1)
    written = np.zeros(rows, int)
    owner = np.full(rows, -1)
    for e, block, lo, hi, zero_from in sched.T:
        r = np.arange(block * block_m, (block + 1) * block_m)
        mine = (r >= lo) & (r < hi)
        assert not mine.any() or sizes[e] > 0  # an expert with no rows is never read
        owner[r[mine]] = e
        written[r[mine | (r >= zero_from)]] += 1
    np.testing.assert_array_equal(written, 1)
    total = sum(sizes)
    np.testing.assert_array_equal(owner[:total], np.repeat(np.arange(len(sizes)), sizes))
    assert (owner[total:] == -1).all()


@pytest.mark.parametrize("rows,cols", [(1, 1), (8, 3), (13, 5), (20, 1), (3, 7)])
def test_launch_order_visits_every_tile_once(rows, cols):
    i, j = launch_order(jnp.arange(rows * cols), rows, cols)
    pairs = sorted(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), strict=True))
    assert pairs == [(a, b) for a in range(rows) for b in range(cols)]


# ---------------------------------------------------------------------------------------------------------
# The FFN against the reference.


def test_grouped_ffn_rows_and_padding():
    # 21 routed rows of a 24-row buffer (not a multiple of the 16-row block): the last three are padding.
    e = 4
    sizes = np.array([6, 0, 13, 2], np.int32)
    xs = _x(1, t=24)
    ws = _weights(1, e)
    # Each routed row as a token of its own with weight 1; padding rows with weight 0.
    ids = np.repeat(np.arange(e), sizes).astype(np.int32)
    ids = np.concatenate([ids, np.zeros(3, np.int32)])[:, None]
    w = np.concatenate([np.ones(21), np.zeros(3)]).astype(np.float32)[:, None]
    ys = jax.jit(grouped_ffn_pallas)(xs, sizes, *ws)
    ref = moe_ffn_reference(xs, w, ids, *ws)
    assert normalized_error(ys, ref) <= tolerance(np.float32).nerr
    assert not np.asarray(ys)[21:].any()
    # The backward kernels: every tile shape (straddling blocks, a padded tail, an empty expert).
    cot = np.random.default_rng(1).standard_normal(xs.shape).astype(np.float32)
    got = jax.jit(
        jax.grad(lambda *a: jnp.sum(cot * grouped_ffn_pallas(a[0], sizes, *a[1:])), argnums=(0, 1, 2, 3))
    )(xs, *ws)
    want = jax.grad(
        lambda *a: jnp.sum(cot * moe_ffn(a[0], w, ids, *a[1:], impl="dense")), argnums=(0, 1, 2, 3)
    )(xs, *ws)
    for a, b in zip(got, want, strict=True):
        assert normalized_error(a, b) <= tolerance(np.float32).nerr
    assert not np.asarray(got[0])[21:].any()
    assert not any(np.asarray(g)[1].any() for g in got[1:])


@pytest.mark.parametrize(
    "e,k,pattern,dtype",
    [(8, 2, "skewed", "float32"), (4, 1, "random", "float32"), (8, 2, "random", "bfloat16")],
)
def test_dropless_matches_reference(e, k, pattern, dtype):
    w, ids = _routing(e + k, e, k, pattern=pattern)
    ws = tuple(a.astype(dtype) for a in _weights(e, e))
    _check(_x(e, dtype=dtype), w, ids, ws)


def test_decode_few_tokens_many_experts():
    w, ids = _routing(3, 8, 2, t=2)  # 4 rows over 8 experts: at most 4 experts read
    _check(_x(3, t=2), w, ids, _weights(3, 8))


def test_vmap_over_batches_of_tokens():
    w, ids = _routing(4, 4, 2, t=2 * T)
    x, ws = _x(4, t=2 * T), _weights(4, 4)
    batched = jax.jit(jax.vmap(moe_ffn_pallas, in_axes=(0, 0, 0, None, None, None)))
    y = batched(x.reshape(2, T, D), w.reshape(2, T, 2), ids.reshape(2, T, 2), *ws)
    for b in range(2):
        ref = moe_ffn_reference(x[b * T : (b + 1) * T], w[b * T : (b + 1) * T], ids[b * T : (b + 1) * T], *ws)
        assert normalized_error(y[b], ref) <= tolerance(np.float32).nerr


@pytest.mark.parametrize("drop_priority", ["choice", "weight"])
def test_capacity_mode_matches_reference(drop_priority):
    w, ids = _routing(5, 8, 2, pattern="skewed")
    _check(_x(5), w, ids, _weights(5, 8), capacity_factor=1.0, drop_priority=drop_priority)


def _loss(x, w, wg, wu, wd, ids, pallas):
    if pallas:
        y = moe_ffn_pallas(x, w, ids, wg, wu, wd, capacity=None, drop_priority="choice")
    else:
        y = moe_ffn(x, w, ids, wg, wu, wd, impl="dense")
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))


# float32 gradients: in the shared suite (test_shared.py) and test_grouped_ffn_rows_and_padding.
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_gradients_match_dense_autodiff(dtype):
    w, ids = _routing(7, 8, 2, pattern="skewed")
    args = [_x(7, dtype=dtype), w, *(a.astype(dtype) for a in _weights(7, 8))]
    grad = functools.partial(jax.grad(_loss, argnums=(0, 1, 2, 3, 4)), ids=ids)
    got = jax.jit(functools.partial(grad, pallas=True))(*args)
    want = grad(*args, pallas=False)
    for a, b in zip(got, want, strict=True):
        assert normalized_error(a, b) <= tolerance(dtype).nerr
    for g in got[2:]:  # expert 1 receives no token: exact zero gradients
        assert not np.asarray(g)[1].any()


# ---------------------------------------------------------------------------------------------------------
# Quantized experts.


def _quantized_experts(seed, e, *, sym=False, act_scales=False, bits=4):
    from quant import quantize_rtn

    rng = np.random.default_rng(seed)

    def one(k, n):
        q = quantize_rtn(rng.standard_normal((k, n)).astype(np.float32), bits=bits, group_size=32, sym=sym)
        if act_scales:
            s = rng.uniform(0.5, 2.0, k).astype(np.float32)
            q = Int4Weight(q.packed, q.scales, q.zeros, bits=4, group_size=32, act_scales=s)
        return q

    def stack(k, n):
        return jax.tree.map(lambda *a: jnp.stack(a), *[one(k, n) for _ in range(e)])

    return stack(QD, F), stack(QD, F), stack(F, QD)


@pytest.mark.parametrize("sym,act_scales,dtype", [(False, False, "float32"), (True, True, "bfloat16")])
def test_quantized_experts_match_the_dequantized_reference(sym, act_scales, dtype):
    ws = _quantized_experts(11, 4, sym=sym, act_scales=act_scales)
    w, ids = _routing(11, 4, 2, pattern="skewed")
    _check(_x(11, d=QD, dtype=dtype), w, ids, ws)


def test_quantized_experts_gradient_reaches_x():
    ws = _quantized_experts(12, 4)
    w, ids = _routing(12, 4, 2)
    cot = np.random.default_rng(12).standard_normal((T, QD)).astype(np.float32)

    def loss(x, w, pallas):
        if pallas:
            y = moe_ffn_pallas(x, w, ids, *ws, capacity=None, drop_priority="choice")
        else:
            y = moe_ffn(x, w, ids, *ws, impl="dense")
        return jnp.sum(cot * y)

    x = _x(12, d=QD)
    got = jax.jit(jax.grad(functools.partial(loss, pallas=True), argnums=(0, 1)))(x, w)
    want = jax.grad(functools.partial(loss, pallas=False), argnums=(0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        assert normalized_error(g, r) <= tolerance(np.float32).nerr


# ---------------------------------------------------------------------------------------------------------
# Lowering, support, bad input.


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("quantized", [False, True])
def test_lowers_the_triton_kernels_for_cuda(quantized):
    ws = _quantized_experts(13, 8) if quantized else _weights(13, 8, d=QD, dtype=jnp.bfloat16)
    args = (_sds((T, QD), jnp.bfloat16), _sds((T, 2), jnp.float32), _sds((T, 2), jnp.int32), *ws)
    f = functools.partial(moe_ffn_pallas, capacity=None, drop_priority="choice")
    text = targets.lower(f, *args, platforms=("cuda",)).as_text()
    assert text.count(TRITON_CALL) == 2  # the gate/up and down kernels
    # One jitted function lowers for every platform: Triton on cuda/rocm, interpret mode on cpu, XLA on tpu.
    targets.lower(f, *args, platforms=("cpu", "cuda", "rocm", "tpu"))
    if quantized:
        return

    def loss(x, w, ids, *ws):
        return jnp.sum(moe_ffn_pallas(x, w, ids, *ws).astype(jnp.float32) ** 2)

    g = jax.grad(loss, argnums=(0, 1, 3, 4, 5))
    text = targets.lower(g, *args, platforms=("cuda",)).as_text()
    assert text.count(TRITON_CALL) == 6  # the forward's two, then gate/up backward, dx, two weight gradients
    targets.lower(g, *args, platforms=("cpu", "cuda", "rocm", "tpu"))


def _kernel_dots(jaxpr, inside=False):
    """(operand dtype, precision) of every dot_general inside the pallas_calls of a jaxpr, nested ones too."""
    for eqn in jaxpr.eqns:
        if inside and eqn.primitive.name == "dot_general":
            yield eqn.invars[0].aval.dtype, eqn.params["precision"]
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _kernel_dots(sub, inside or eqn.primitive.name == "pallas_call")


@pytest.mark.parametrize("quantized", [False, True])
def test_float32_dots_ask_for_ieee_not_tf32(quantized):
    # Triton lowers a float32 dot with DEFAULT precision to TF32; the kernels must say HIGHEST (IEEE).
    ws = _quantized_experts(14, 4) if quantized else _weights(14, 4, d=QD)
    xs, sizes = _sds((T, QD), jnp.float32), _sds((4,), jnp.int32)
    fn = functools.partial(grouped_ffn_pallas, interpret=False)
    jaxpr = jax.make_jaxpr(fn)(xs, sizes, *ws)
    if not quantized:  # and the backward kernels' dots
        loss = lambda x, s, *w: jnp.sum(fn(x, s, *w))  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 2, 3, 4)))(xs, sizes, *ws)
    dots = list(_kernel_dots(jaxpr.jaxpr))
    assert len(dots) >= (3 if quantized else 3 + 7)  # gate, up, down (+ dh, dx twice, dw three times, g, u)
    for dtype, precision in dots:
        assert dtype == jnp.float32
        assert precision in ((jax.lax.Precision.HIGHEST,) * 2, jax.lax.Precision.HIGHEST)


def test_pallas_unsupported_reasons():
    x = _x(0)
    assert pallas_unsupported(x, *_weights(0, 4)) is None
    assert "f=40" in pallas_unsupported(x, *_weights(0, 4, f=40))
    assert "int32" in pallas_unsupported(x.astype(np.int32), *_weights(0, 4))
    wg, wu, wd = _quantized_experts(0, 2)
    xq = _x(0, d=QD)
    assert pallas_unsupported(xq, wg, wu, wd) is None
    assert "mixed" in pallas_unsupported(xq, wg, wu, _weights(0, 2, d=QD)[2])
    perm = np.arange(QD, dtype=np.int32)[::-1]
    experts = [jax.tree.map(lambda a, e=e: a[e], wg) for e in range(2)]
    experts = [Int4Weight(q.packed, q.scales, q.zeros, bits=4, group_size=32, perm=perm) for q in experts]
    act_ordered = jax.tree.map(lambda *a: jnp.stack(a), *experts)
    assert "act-ordered" in pallas_unsupported(xq, act_ordered, wu, wd)
    assert "bits=8" in pallas_unsupported(xq, *_quantized_experts(0, 2, bits=8))


def test_bad_input():
    ws = _weights(0, 4)
    xs = _x(0)
    with pytest.raises(ValueError, match=r"group_sizes\.shape"):
        grouped_ffn_pallas(xs, np.array([4, 4], np.int32), *ws)
    with pytest.raises(ValueError, match="sum <= A=16"):
        grouped_ffn_pallas(xs, np.array([4, 4, 4, 5], np.int32), *ws)
    with pytest.raises(ValueError, match="block_m=24"):
        grouped_ffn_pallas(xs, np.array([4, 4, 4, 4], np.int32), *ws, block_m=24)
    with pytest.raises(ValueError, match=r"xs.shape=\(16, 32\) must be \[A, d=64\]"):
        grouped_ffn_pallas(xs, np.array([4, 4, 4, 4], np.int32), *_weights(0, 4, d=64))
    with pytest.raises(ValueError, match="does not take these operands: f=40"):
        grouped_ffn_pallas(xs, np.array([4, 4, 4, 4], np.int32), *_weights(0, 4, f=40))


def test_shape_class_tune_space_and_the_tuned_default(tmp_path, monkeypatch):
    from kernels import tuning
    from kernels.moe import pallas_triton as pt

    wg, wu, wd = _weights(40, 4)
    x = _x(41).astype(ml_dtypes.bfloat16)
    weights = np.full((T, 2), 0.5, np.float32)
    ids = np.zeros((T, 2), np.int32)
    args = (x, weights, ids, wg, wu, wd)
    assert pt.shape_class(*args) == "decode"
    big = np.zeros((4096, 2), np.int32)
    assert pt.shape_class(x, weights, big, wg, wu, wd) == "prefill"
    for a in (args, (x, weights, big, wg, wu, wd)):
        space = pt.tune_space(*a)
        assert space[0] == pt.Config() and 1 < len(space) <= 12 and len(set(space)) == len(space)
    assert pt._resolve_blocks(4096 * 2, 8, jnp.bfloat16, None, None, None) == (
        64,
        128,
        32,
    )  # prefill K slices
    assert pt._resolve_blocks(16, 8, jnp.bfloat16, None, None, None) == (16, 128, 64)  # decode
    monkeypatch.setenv("TOKENLAB_TUNED", str(tmp_path / "tuned.json"))
    monkeypatch.setattr(pt, "target_gpu", lambda: ("NVIDIA A100-SXM4-40GB", 80))
    assert pt.default_config(*args) == pt.Config()
    tuning.write(
        [tuning.entry("moe_ffn", "pallas_triton", "decode", "NVIDIA A100-SXM4-40GB", {"block_m": 32}, 1)]
    )
    assert pt.default_config(*args) == pt.Config(block_m=32)
