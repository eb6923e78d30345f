"""The precision policy, checked where it matters without a GPU: lowered for cuda, every dot the XLA paths
build on float32 data (forward and backward) asks for HIGHEST, so NVIDIA GPUs do not drop to TF32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import int4_matmul, moe_ffn, paged_attention
from quant import quantize_rtn


def _dot_lines(fn, *args):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return [line for line in text.split("\n") if "dot_general" in line or "ragged_dot" in line]


def _assert_highest(fn, *args):
    dots = _dot_lines(fn, *args)
    assert dots, "no dot in the lowered program"
    low = [d for d in dots if "HIGHEST" not in d]
    assert not low, f"{len(low)} of {len(dots)} float32 dots without HIGHEST precision: {low[0][:200]}"


@pytest.mark.parametrize("impl", ["codes", "dequant", "dense"])
def test_int4_matmul_forward_and_backward(impl):
    w = np.random.default_rng(0).standard_normal((256, 96)).astype(np.float32)
    qw = quantize_rtn(w, group_size=64)
    x = jnp.ones((4, 256), jnp.float32)
    _assert_highest(lambda x: int4_matmul(x, qw, impl=impl), x)
    _assert_highest(jax.grad(lambda x: int4_matmul(x, qw, impl=impl).sum()), x)


@pytest.mark.parametrize("impl", ["grouped", "bucketed", "ragged", "batched", "dense"])
def test_moe_ffn_forward_and_backward(impl):
    e, d, f = 4, 32, 48
    ws = (jnp.ones((e, d, f)), jnp.ones((e, d, f)), jnp.ones((e, f, d)))
    ids = jnp.zeros((8, 2), jnp.int32).at[:, 1].set(1)
    weights = jnp.ones((8, 2))
    x = jnp.ones((8, d), jnp.float32)
    _assert_highest(lambda x: moe_ffn(x, weights, ids, *ws, impl=impl), x)
    _assert_highest(jax.grad(lambda x, *ws: moe_ffn(x, weights, ids, *ws, impl=impl).sum(), (0, 1)), x, *ws)


@pytest.mark.parametrize("q_lens", [None, (1, 3)])
def test_paged_attention(q_lens):
    kp = jnp.ones((8, 16, 2, 64), jnp.float32)
    lens, bt = jnp.array([5, 9]), jnp.zeros((2, 4), jnp.int32)
    ql = None if q_lens is None else jnp.array(q_lens)
    q = jnp.ones((2 if q_lens is None else sum(q_lens), 4, 64), jnp.float32)
    _assert_highest(lambda q: paged_attention(q, kp, kp, lens, bt, q_lens=ql, impl="xla"), q)
