"""AWQ: activation-aware weight quantization (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration"), as mit-han-lab/llm-awq's `auto_scale` and `auto_clip` search it.

What it computes
----------------
A layer `y = x @ W` (`W: [K, N]`, in, out) is quantized as `Q(W · s) / s` with one scale `s[k]` per input
channel: channels that carry large activations get their weights scaled up before rounding, so their
relative rounding error shrinks, and the matmul divides the activations instead, `y = (x / s) @ Q(W · s)`.
This is exactly `Int4Weight`'s `act_scales` convention, so `dequantize()` returns `Q(W · s) / s`.

1. Scale search (`auto_scale`). With `m[k] = mean_t |x[t, k]|` over the calibration rows,

       s(α) = m^α / sqrt(max(m^α) · min(m^α)),   α ∈ {0, 1/grid, ..., (grid - 1)/grid}

   and the α with the smallest layer output error `||x @ W - (x / s) @ Q(W · s)||²` wins. α = 0 is
   plain RTN, so the search never does worse than RTN on the calibration set. The error is computed
   from the Gram matrix `H = xᵀ x / n` as `tr(Dᵀ H D)`, `D = W - Q(W · s) / s`, which is exact and costs
   `K² N` per candidate whatever the number of calibration tokens.
2. Clip search (`auto_clip`, with `clip=True`). On the scaled weight, each (group, output column) picks
   a shrink `c ∈ {1, 1 - 1/grid, ..., > 1/2}` of its min-max range (both ends, so the asymmetric grid stays
   asymmetric; the reference clamps to ±c·max|w|), scored by that group's share of the output error,
   `dᵀ H_gg d` with `H_gg` the group's diagonal block of the scaled inputs' Gram matrix. Weights outside
   the shrunk range clip to the end codes. `c = 1` is no clipping; ties keep the larger range.
3. Codes, scales and zeros are those of `quant.rtn`'s min-max grid on `W · s` (shrunk where clipped).

Every grid, in the searches too, has its scale rounded up to `scale_dtype` (float16 by default, as the
AutoAWQ layout stores it; see `quant.rtn`) before its zero point and codes are chosen, so the candidates
are scored on the weight a checkpoint would hold. The activation scales `s` stay float32: no upstream
layout stores them (they are folded into the producing norm or linear first), and the lab's own format
keeps them as they are.

Channels whose mean |x| is below `1e-4 ×` the largest are raised to that floor before the power, so a
channel that is all zeros never produces a zero, NaN or infinite scale (the reference clamps `m^α` at an
absolute 1e-4); an all-zero calibration set gives `s = 1`.

Deployable form
---------------
Layers that read the same input (q, k and v) can share one `s`, searched on their concatenated output
error (`awq_quantize_shared`); the division `x / s` then happens once for all of them. Where the input is
produced by a per-channel affine op whose output feeds only these layers, `s` folds into it and the
weights need no `act_scales` at all:
- a norm whose output feeds only the linears (pre-LN transformers, Llama's RMSNorm):
  `fold_scales_into_norm` divides its gain and bias by `s`;
- a linear whose output reaches the layer through a per-channel linear path (BERT's value projection
  feeding attention-output through softmax(QKᵀ)·V): `fold_scales_into_linear` divides the producer's
  output columns (its group scales and bias) by `s`, exactly, after quantization.
BERT is post-LN: every LayerNorm output is both the next linears' input and the residual stream, so
dividing a LayerNorm's gain by `s` would also scale the residual, and no LayerNorm fold is exact there.
In BERT the q/k/v, intermediate and (after GELU, which is not homogeneous) output layers keep their
`act_scales`; only attention-output's scale folds, into value.

`awq_quantize` runs the searches jitted in float32; `awq_reference` is the plain NumPy float64 version,
which scores candidates on the activations themselves rather than on their Gram matrix.

Axes: `K` input features, `N` output features, `n` calibration rows (tokens), `G = K / group_size`,
`A = grid` candidate exponents, `C` candidate clip ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from quant.format import Int4Weight, validate_bits
from quant.rtn import (
    check_scales_fit,
    grid_params,
    quantize_codes,
    validate_quantize_inputs,
    validate_scale_dtype,
)

# Channels with a mean |x| below this fraction of the largest are raised to it before the power:
# the scales stay finite and nonzero, and a dead channel cannot dominate the normalization.
_MEAN_FLOOR = 1e-4
# The clip search tries shrink ratios 1, 1 - 1/grid, ... down to (not including) this fraction.
_MAX_SHRINK = 0.5


def validate_awq_inputs(
    w: Any, x: Any, *, bits: int, group_size: int, grid: int, name: str = "w"
) -> tuple[int, int, int]:
    """Checks `w: [K, N]`, calibration activations `x: [..., K]` and `grid`; returns (K, N, group_size)."""
    k, n, gs = validate_quantize_inputs(w, bits=bits, group_size=group_size, name=name)
    validate_awq_activations(x, k)
    if isinstance(grid, bool) or not isinstance(grid, int | np.integer) or grid < 1:
        raise ValueError(f"grid={grid!r} must be a positive int (the number of candidate exponents)")
    return k, n, gs


def validate_awq_activations(x: Any, k: int, *, name: str = "x") -> None:
    """`x: [..., K]` floating point, at least one row, finite, width `k`."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError(f"{name} must be [n, K] calibration activations, got shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if shape[-1] != k:
        raise ValueError(f"{name} has width {shape[-1]} (shape {tuple(shape)}) but the weight has K={k}")
    if int(np.prod(shape[:-1])) == 0:
        raise ValueError(f"{name} is an empty calibration set (shape {tuple(shape)})")
    if not np.all(np.isfinite(np.asarray(x, dtype=np.float32))):
        raise ValueError(f"{name} contains NaN or Inf")


def awq_act_scales(x_mean: Any, alpha: float) -> Any:
    """`s = m^α / sqrt(max(m^α) · min(m^α))` from per-channel mean |x| `x_mean: [K]` (NumPy or JAX).

    `m` is `x_mean` raised to the floor `1e-4 · max(x_mean)` (1 where every channel is zero).
    """
    xp = jnp if isinstance(x_mean, jax.Array) else np
    top = xp.max(x_mean)
    floor = xp.where(top > 0, top * _MEAN_FLOOR, 1.0)
    m = xp.maximum(x_mean, floor)
    s = m**alpha
    return s / xp.sqrt(xp.max(s) * xp.min(s))


def _fake_quant(W, *, bits, gs, sym, scale_dtype, shrink=None):
    """Min-max-grid quantize-dequantize of `W: [K, N]` per (group, column); optional shrink `[G, N]`."""
    k, n = W.shape
    g = W.reshape(k // gs, gs, n)
    lo, hi = g.min(axis=1), g.max(axis=1)
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    scale, zero = grid_params(lo, hi, bits=bits, sym=sym, scale_dtype=scale_dtype)
    q = quantize_codes(g, scale[:, None, :], zero[:, None, :], bits=bits)
    return (scale[:, None, :] * (q - zero[:, None, :])).reshape(k, n), q.reshape(k, n), scale, zero


def _shrinks(grid: int, clip: bool) -> np.ndarray:
    steps = max(1, int(grid * _MAX_SHRINK)) if clip else 1
    return 1.0 - np.arange(steps) / grid


@partial(jax.jit, static_argnames=("bits", "gs", "sym", "grid", "scale_dtype"))
def _search_scales(W, H, x_mean, *, bits, gs, sym, grid, scale_dtype):
    """Step 1: the best `s: [K]` and the output error of every candidate `[A]`."""
    alphas = jnp.arange(grid, dtype=jnp.float32) / grid

    def loss(alpha):
        s = awq_act_scales(x_mean, alpha)
        D = (
            W
            - _fake_quant(W * s[:, None], bits=bits, gs=gs, sym=sym, scale_dtype=scale_dtype)[0] / s[:, None]
        )
        return jnp.sum(D * (H @ D))

    losses = lax.map(loss, alphas)
    return awq_act_scales(x_mean, alphas[jnp.argmin(losses)]), losses


@partial(jax.jit, static_argnames=("bits", "gs", "sym", "scale_dtype"))
def _clip_and_quantize(W, H, s, shrinks, *, bits, gs, sym, scale_dtype):
    """Steps 2-3 on `W · s`: codes `[K, N]`, scales and zeros `[G, N]`."""
    k, n = W.shape
    G = k // gs
    Ws = W * s[:, None]
    # The scaled layer reads x / s, whose Gram matrix is H / (s sᵀ); only its diagonal blocks matter here.
    Hs = H / (s[:, None] * s[None, :])
    Hg = jnp.stack([Hs[i * gs : (i + 1) * gs, i * gs : (i + 1) * gs] for i in range(G)])
    Wg = Ws.reshape(G, gs, n)

    def group_errors(c):
        deq = _fake_quant(Ws, bits=bits, gs=gs, sym=sym, scale_dtype=scale_dtype, shrink=jnp.full((G, n), c))[
            0
        ]
        D = Wg - deq.reshape(G, gs, n)
        return jnp.einsum("gkn,gkl,gln->gn", D, Hg, D)

    errs = lax.map(group_errors, shrinks)  # [C, G, N]; argmin keeps the first (largest range) on ties
    best = shrinks[jnp.argmin(errs, axis=0)]
    _, q, scale, zero = _fake_quant(Ws, bits=bits, gs=gs, sym=sym, scale_dtype=scale_dtype, shrink=best)
    return q.astype(jnp.uint8), scale, zero.astype(jnp.uint8)


def _rows(x: Any) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(-1, x.shape[-1])


@jax.jit
def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.mean(jnp.abs(x), axis=0), (x.T @ x) / x.shape[0]


def _to_weight(codes, scale, zero, s, *, bits, gs, sym, scale_dtype) -> Int4Weight:
    return Int4Weight.from_codes(
        np.asarray(codes),
        np.asarray(scale).astype(scale_dtype),
        None if sym else np.asarray(zero),
        bits=bits,
        group_size=gs,
        act_scales=np.asarray(s, np.float32),
    )


def _awq(ws: Sequence[Any], x: Any, *, bits, group_size, grid, clip, sym, scale_dtype) -> list[Int4Weight]:
    names = ["w"] if len(ws) == 1 else [f"ws[{i}]" for i in range(len(ws))]
    shapes = [validate_awq_inputs(w, x, bits=bits, group_size=group_size, grid=grid, name=nm)
              for w, nm in zip(ws, names, strict=True)]  # fmt: skip
    bits = validate_bits(bits)
    sd = validate_scale_dtype(scale_dtype)
    gs = shapes[0][2]
    widths = [int(w.shape[1]) for w in ws]
    # Shared scales: the concatenated output error is the sum of the layers' errors, and the grid is
    # per (group, column), so quantizing the concatenation quantizes each layer.
    W = jnp.concatenate([jnp.asarray(w, jnp.float32) for w in ws], axis=1)
    x_mean, H = _stats(_rows(x))
    s, _ = _search_scales(W, H, x_mean, bits=bits, gs=gs, sym=bool(sym), grid=int(grid), scale_dtype=sd.name)
    shrinks = jnp.asarray(_shrinks(int(grid), bool(clip)), jnp.float32)
    codes, scale, zero = _clip_and_quantize(
        W, H, s, shrinks, bits=bits, gs=gs, sym=bool(sym), scale_dtype=sd.name
    )
    check_scales_fit(scale, sd, name=names[0] if len(ws) == 1 else "ws")
    out, c0 = [], 0
    for width in widths:
        cols = slice(c0, c0 + width)
        out.append(
            _to_weight(
                codes[:, cols], scale[:, cols], zero[:, cols], s, bits=bits, gs=gs, sym=sym, scale_dtype=sd
            )
        )
        c0 += width
    return out


def awq_quantize(
    w: Any,
    x: Any,
    *,
    bits: int = 4,
    group_size: int = 128,
    grid: int = 20,
    clip: bool = True,
    sym: bool = False,
    scale_dtype: Any = np.float16,
) -> Int4Weight:
    """AWQ-quantize `w: [K, N] float` (in, out) with calibration activations `x: [n, K]` (or `[..., K]`).

    Returns an Int4Weight whose `act_scales: [K] float32` hold the searched `s` (so `dequantize()` is
    `Q(W · s) / s`). `group_size=-1` is per-channel; `grid` candidate exponents α = i / grid; `clip`
    also searches a per-(group, column) range shrink. Float32 throughout; the group scales are rounded up
    to `scale_dtype` (float16, as AutoAWQ checkpoints store them, or float32) before codes are chosen, in
    the searches too, and returned in that dtype.
    """
    return _awq(
        [w], x, bits=bits, group_size=group_size, grid=grid, clip=clip, sym=sym, scale_dtype=scale_dtype
    )[0]


def awq_quantize_shared(
    ws: Sequence[Any],
    x: Any,
    *,
    bits: int = 4,
    group_size: int = 128,
    grid: int = 20,
    clip: bool = True,
    sym: bool = False,
    scale_dtype: Any = np.float16,
) -> list[Int4Weight]:
    """AWQ for layers that read the same input `x: [n, K]` (q, k, v): one `s` for all of `ws: [K, N_i]`.

    The scale search scores the sum of the layers' output errors; the clip search stays per (group,
    column) of each layer. Every returned weight carries the same `act_scales`, ready for
    `fold_scales_into_norm`. `scale_dtype` as in `awq_quantize`.
    """
    if isinstance(ws, np.ndarray | jax.Array) or len(ws) == 0:
        raise ValueError(f"ws must be a non-empty sequence of [K, N] weights, got {type(ws).__name__}")
    return _awq(
        list(ws), x, bits=bits, group_size=group_size, grid=grid, clip=clip, sym=sym, scale_dtype=scale_dtype
    )


# -- folding the scales into the op that produces the activations ----------------------------------------


def _shared_scales(qws: Sequence[Int4Weight], name: str) -> np.ndarray:
    if len(qws) == 0:
        raise ValueError(f"{name} is empty")
    if any(qw.act_scales is None for qw in qws):
        raise ValueError(f"every weight in {name} must carry act_scales to fold")
    s = np.asarray(qws[0].act_scales)
    for i, qw in enumerate(qws[1:], 1):
        if not np.array_equal(np.asarray(qw.act_scales), s):
            raise ValueError(f"{name}[{i}] has different act_scales from {name}[0]; quantize them shared")
    return s


def _without_act_scales(qw: Int4Weight, scales: Any = None) -> Int4Weight:
    return Int4Weight(
        qw.packed,
        qw.scales if scales is None else scales,
        qw.zeros,
        bits=qw.bits,
        group_size=qw.group_size,
        perm=qw.perm,
        act_scales=None,
    )


def fold_scales_into_norm(
    gamma: Any, beta: Any, qws: Sequence[Int4Weight]
) -> tuple[np.ndarray, np.ndarray | None, list[Int4Weight]]:
    """Fold the shared `act_scales` of `qws` into the norm that produces their input.

    `gamma, beta: [K]` (beta may be None, as in RMSNorm). Returns `(gamma / s, beta / s, weights without
    act_scales)`. Exact only when that norm's output feeds nothing but these layers (pre-LN blocks);
    BERT's post-LN outputs are also the residual stream (see the module docstring).
    """
    s = _shared_scales(qws, "qws").astype(np.float64)
    gamma = np.asarray(gamma)
    if gamma.shape != s.shape:
        raise ValueError(f"gamma has shape {gamma.shape} but the weights have K={s.shape[0]}")
    if beta is not None and np.asarray(beta).shape != s.shape:
        raise ValueError(f"beta has shape {np.asarray(beta).shape} but the weights have K={s.shape[0]}")
    new_beta = None if beta is None else (np.asarray(beta, np.float64) / s).astype(np.asarray(beta).dtype)
    new_gamma = (gamma.astype(np.float64) / s).astype(gamma.dtype)
    return new_gamma, new_beta, [_without_act_scales(qw) for qw in qws]


def fold_scales_into_linear(
    producer: Int4Weight, bias: Any, qws: Sequence[Int4Weight]
) -> tuple[Int4Weight, np.ndarray | None, list[Int4Weight]]:
    """Fold the shared `act_scales` of `qws` into the output columns of the quantized layer producing
    their input: `producer.scales[:, n] / s[n]` and `bias[n] / s[n]`, exact, no re-quantization.

    Valid when the path from the producer's output to `qws`' input is linear per channel (BERT's value
    projection -> softmax(QKᵀ)·V -> attention-output). Returns `(producer', bias', weights without
    act_scales)`. The producer's new scales are float32 whatever its scales were: a float16 quotient would
    round, and the fold would no longer be exact. Saving it in a float16 layout rounds them (with a warning).
    """
    s = _shared_scales(qws, "qws")
    n = producer.shape[1]
    if n != s.shape[0]:
        raise ValueError(f"producer has N={n} outputs but the weights have K={s.shape[0]} inputs")
    scales = (np.asarray(producer.scales, np.float64) / s.astype(np.float64)[None, :]).astype(np.float32)
    new_bias = None
    if bias is not None:
        b = np.asarray(bias)
        if b.shape != (n,):
            raise ValueError(f"bias has shape {b.shape}, expected [N] = [{n}]")
        new_bias = (b.astype(np.float64) / s).astype(b.dtype)
    folded = Int4Weight(
        producer.packed,
        scales,
        producer.zeros,
        bits=producer.bits,
        group_size=producer.group_size,
        perm=producer.perm,
        act_scales=producer.act_scales,
    )
    return folded, new_bias, [_without_act_scales(qw) for qw in qws]


# -- the plain NumPy path --------------------------------------------------------------------------------


def _np_fake_quant(w: np.ndarray, lo: float, hi: float, bits: int, sym: bool, scale_dtype):
    scale, zero = grid_params(np.array(lo), np.array(hi), bits=bits, sym=sym, scale_dtype=scale_dtype)
    q = quantize_codes(w, scale, zero, bits=bits)
    return scale * (q - zero), q, float(scale), float(zero)


def awq_reference(
    w: Any,
    x: Any,
    *,
    bits: int = 4,
    group_size: int = 128,
    grid: int = 20,
    clip: bool = True,
    sym: bool = False,
    scale_dtype: Any = np.float16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plain NumPy float64 AWQ (steps 1-3, one candidate, group and column at a time), scoring on `x`.

    Returns `(codes [K, N] int64, scales [G, N], zeros [G, N], act_scales [K])`; the scales hold values of
    `scale_dtype`, rounded up before the codes are chosen.
    """
    k, n, gs = validate_awq_inputs(w, x, bits=bits, group_size=group_size, grid=grid)
    sd = validate_scale_dtype(scale_dtype)
    W = np.asarray(w, np.float64)
    X = np.asarray(x, np.float64).reshape(-1, k)
    x_mean = np.abs(X).mean(axis=0)
    Y = X @ W
    best = (np.inf, None)
    for i in range(grid):
        s = awq_act_scales(x_mean, i / grid)
        Ws = W * s[:, None]
        Wq = np.empty_like(W)
        for g0 in range(0, k, gs):
            for col in range(n):
                blk = Ws[g0 : g0 + gs, col]
                Wq[g0 : g0 + gs, col] = _np_fake_quant(blk, blk.min(), blk.max(), bits, sym, sd)[0]
        err = np.sum((Y - (X / s) @ Wq) ** 2)
        if err < best[0]:
            best = (err, s)
    s = best[1]
    Ws, Xs = W * s[:, None], X / s
    g = k // gs
    codes, scales, zeros = np.empty((k, n), np.int64), np.empty((g, n)), np.empty((g, n))
    for gi in range(g):
        rows = slice(gi * gs, (gi + 1) * gs)
        for col in range(n):
            blk = Ws[rows, col]
            target = Xs[:, rows] @ blk
            chosen = None
            for c in _shrinks(grid, clip):
                deq, q, sc, z = _np_fake_quant(blk, blk.min() * c, blk.max() * c, bits, sym, sd)
                err = np.sum((target - Xs[:, rows] @ deq) ** 2)
                if chosen is None or err < chosen[0]:
                    chosen = (err, q, sc, z)
            _, codes[rows, col], scales[gi, col], zeros[gi, col] = chosen
    check_scales_fit(scales, sd)
    return codes, scales, zeros, s
