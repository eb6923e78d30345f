"""Cases for the MoE suites: expert weights, routings with skew and empty experts, tie-heavy logits, and
the check of the FFN against its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st

from kernels.moe import (
    moe_ffn,
    moe_ffn_reference,
)
from tests.kernels import suite
from tests.tolerances import (
    normalized_error,
    tolerance,
)

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))
SOME = settings(max_examples=max(6, settings.default.max_examples // 2))

T, E, D, F = 16, 8, 32, 48
STRATEGIES = ("grouped", "bucketed", "ragged", "batched", "dense")
SMALL_BLOCKS = dict(row_align=2, block_rows=8)  # exercises full blocks and every remainder size


def small_blocks(impl):
    """SMALL_BLOCKS as `impl`'s config, where its Config has them (the grouped loop's row blocks)."""
    return suite.config_for("moe_ffn", impl, **SMALL_BLOCKS)


def make_weights(seed, e=E, d=D, f=F, dtype=np.float32):
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(d)
    return (
        (rng.standard_normal((e, d, f)) * scale).astype(dtype),
        (rng.standard_normal((e, d, f)) * scale).astype(dtype),
        (rng.standard_normal((e, f, d)) * scale).astype(dtype),
    )


def make_x(seed, t=T, d=D, dtype=np.float32):
    return np.random.default_rng(seed + 1000).standard_normal((t, d)).astype(dtype)


# Logit values with many exact ties (and ±0).
TIE_VALUES = st.sampled_from([-2.0, -0.5, -0.0, 0.0, 0.5, 1.0, 3.0])


def logits_strategy(t, e):
    return st.lists(TIE_VALUES, min_size=t * e, max_size=t * e).map(
        lambda v: np.array(v, np.float32).reshape(t, e)
    )


def make_routing(seed, k, e=E, t=T, pattern="random"):
    rng = np.random.default_rng(seed)
    if pattern == "one_expert":
        ids = np.tile(np.arange(k, dtype=np.int32), (t, 1))  # every token on experts 0..k-1
    elif pattern == "empty_experts":
        ids = np.stack([rng.permutation(k + 1)[:k] for _ in range(t)]).astype(np.int32)  # experts > k unused
    else:
        ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    return w, ids


def check_ffn(x, w, ids, ws, impl, cf=None, prio="choice"):
    reason = suite.unsupported("moe_ffn", impl, x, w, ids, *ws, capacity_factor=cf, drop_priority=prio)
    if reason is not None:
        pytest.skip(f"impl={impl!r} does not serve {reason}")
    y = moe_ffn(x, w, ids, *ws, impl=impl, capacity_factor=cf, drop_priority=prio, config=small_blocks(impl))
    ref = moe_ffn_reference(x, w, ids, *ws, capacity_factor=cf, drop_priority=prio)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert normalized_error(y, ref) <= tolerance(x.dtype).nerr


PATTERNS = ("random", "one_expert", "empty_experts")


QD, QF = 64, 128  # K of every expert matmul must hold whole groups of 32


def quantized_experts(seed, e=E):
    from quant import quantize_rtn

    rng = np.random.default_rng(seed)

    def stack(k, n):
        ws = [quantize_rtn(rng.standard_normal((k, n)).astype(np.float32), group_size=32) for _ in range(e)]
        return jax.tree.map(lambda *a: jnp.stack(a), *ws)

    return stack(QD, QF), stack(QD, QF), stack(QF, QD)
