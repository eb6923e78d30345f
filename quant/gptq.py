"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") as IST-DASLab/gptq's `GPTQ.fasterquant` computes it, on weights laid out `[K, N]`.

What it computes
----------------
Given a layer `y = x @ W` and calibration inputs `X: [n, K]`, GPTQ chooses codes on the min-max grid of
`quant.rtn` that reduce the layer's output error, the proxy loss

    tr((W - Q)ᵀ H (W - Q)),   H = 2/n · Xᵀ X   ([K, K]; `hessian`, `HessianAccumulator`)

by quantizing one input channel (a row of W; a *column* of the reference's [out, in] weight) at a time
and spreading its rounding error over the channels not yet quantized, weighted by the upper Cholesky
factor `Hinv = chol(H⁻¹)ᵀ`:

    err = (W[i] - Q[i]) / Hinv[i, i];   W[j] -= Hinv[i, j] · err   for j > i

The steps, in the reference's order (the quirks are kept so that codes match it):
1. Per-channel grids (`group_size` = K or -1) are found from the original W, before step 2.
2. Dead channels: where H[i, i] == 0, set H[i, i] = 1 and zero row i of W (it quantizes to 0). A
   channel is dead when no calibration input reached it; one warning says how many are. A Hessian whose
   channels are all dead (all zero: no calibration data was added) is an error, not an all-zero weight.
3. `static_groups`: every group's grid is found now, from W in input order.
4. `act_order`: rows are processed in order of decreasing H[i, i] (a stable sort here; the reference's
   `torch.argsort` is not stable, so ties among equal diagonals may be ordered differently there).
5. Dampening: H += damp · mean(diag H) · I, then Hinv = upper Cholesky factor of H⁻¹ (the JAX path gets
   the same unique factor from one Cholesky of the reversed H and one triangular solve). If the Cholesky
   factorization fails, damp is escalated tenfold with a `warnings.warn` (the reference raises).
6. Lazy batch updates: rows are processed in blocks of `block_size`; inside a block the error is
   propagated immediately, to the rest of W only once per block.
7. Dynamic groups (no `static_groups`): when row i starts a group, its grid is found from
   `W[i : i + group_size]` *as updated up to the start of the current block*. This is the reference's
   quirk: updates from the earlier rows of the same block (and with act-order, the permuted order) are not
   yet in W. With act-order, groups are consecutive in the processing order, so g_idx is scattered.

The JAX path (`gptq_quantize`) runs in float32 with the per-row loop jitted (`lax.fori_loop` over blocks,
sub-blocks of 16 rows, rows); the trailing update after a block is a full-height masked matmul (the upper
triangular Hinv zeroes the rows already done), which keeps one compiled shape for every block.
`gptq_reference` is the plain NumPy version of the same steps (float64 by default).

Every grid's scale is rounded up to `scale_dtype` (float16 by default, as checkpoints store it; see
`quant.rtn`) as soon as the grid is found, before its zero point and before any row is quantized on it,
so the error that GPTQ propagates is the error of the weight a checkpoint holds.

Axes: `K` input features (the rows of W, the reference's columns), `N` output features, `n` calibration
samples, `G = K / group_size`, `B = block_size`.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from quant.format import Int4Weight, max_code, validate_bits
from quant.rtn import (
    check_scales_fit,
    grid_params,
    quantize_codes,
    validate_quantize_inputs,
    validate_scale_dtype,
)

# Sub-block height inside a GPTQ block: the row-by-row updates then touch a [16, N] slab that stays in
# L1/L2, and the rest of the block is updated by one small matmul per sub-block.
_SUB_BLOCK = 16
# The trailing update after each block is split into about this many row chunks (finished ones skipped).
_TRAILING_CHUNKS = 8
# Dampening escalation: multiply by this on a failed Cholesky, give up above _MAX_DAMP.
_DAMP_GROWTH = 10.0
_MAX_DAMP = 1e4


def validate_hessian(H: Any, k: int, *, name: str = "H") -> None:
    """H must be a finite, symmetric (within 1e-5 of max |H|), square `[K, K]` float matrix matching the
    weight's K, with calibration data in it.

    An all-zero diagonal (every channel dead: `HessianAccumulator(K).H` before any `.add()`) is an error:
    GPTQ would quietly return an all-zero weight.
    """
    shape = getattr(H, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{name} must be a square [K, K] matrix, got shape {shape}")
    if shape[0] != k:
        raise ValueError(f"{name} has shape {tuple(shape)} but the weight has K={k} input features")
    if not jnp.issubdtype(H.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {H.dtype}")
    h = np.asarray(H)
    if not np.all(np.isfinite(h)):
        raise ValueError(
            f"{name} contains NaN or Inf: it is not the Hessian of finite calibration data (hessian() and "
            "HessianAccumulator.add() refuse NaN/Inf inputs; was it built another way, or did it overflow?)"
        )
    _check_symmetric(h, name)
    if k and not np.any(np.diag(h)):
        raise ValueError(
            f"{name} is all zero on its diagonal (every input channel is dead): no calibration data was "
            "added. Pass hessian(x) of the layer's inputs, or call HessianAccumulator.add(x) before using .H"
        )


def _check_symmetric(h: np.ndarray, name: str) -> None:
    """H = 2/n · Xᵀ X is symmetric; one that is not (a hand-built or corrupted matrix) would be factored from
    one triangle and quietly give other codes. Tolerance: 1e-5 of max |H| (a few ulps for 16-bit floats)."""
    k = h.shape[0]
    scale = float(np.max(np.abs(h))) if h.size else 0.0
    tol = max(1e-5, 8.0 * float(ml_dtypes.finfo(h.dtype).eps)) * scale
    worst, at = 0.0, (0, 0)
    for i in range(0, k, 1024):  # in row blocks: no second [K, K] array
        d = np.abs(h[i : i + 1024].astype(np.float64) - h[:, i : i + 1024].T)
        j = int(np.argmax(d))
        if d.flat[j] > worst:
            worst, at = float(d.flat[j]), (i + j // k, j % k)
    if worst > tol:
        r, c = at
        raise ValueError(
            f"{name} is not symmetric: |{name}[{r}, {c}] - {name}[{c}, {r}]| = {worst:.3g} exceeds the "
            f"tolerance {tol:.3g}; a Hessian 2/n · Xᵀ X is symmetric: build it with hessian(x) or "
            "HessianAccumulator, or symmetrize it, (H + H.T) / 2"
        )


def validate_gptq_inputs(
    w: Any, H: Any, *, bits: int, group_size: int, block_size: int, damp: float
) -> tuple[int, int, int]:
    """Checks `w: [K, N]`, `H: [K, K]` and the options; returns (K, N, resolved group_size)."""
    k, n, gs = validate_quantize_inputs(w, bits=bits, group_size=group_size)
    validate_hessian(H, k)
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    if not (isinstance(damp, int | float | np.floating) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp={damp!r} must be a finite number >= 0")
    return k, n, gs


# -- the Hessian ----------------------------------------------------------------------------------------


def _as_rows(x: Any, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must be [..., K] with at least 2 dims (samples, K), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


@jax.jit
def _gram(x: jax.Array) -> jax.Array:
    return x.T @ x


def hessian(x: Any) -> jax.Array:
    """`H = 2/n · Xᵀ X` from calibration inputs `x: [..., K]` (all leading axes are samples): `[K, K]`."""
    rows = _as_rows(x)
    if rows.shape[0] == 0:
        raise ValueError("x holds no samples")
    if not bool(jnp.all(jnp.isfinite(rows))):
        raise ValueError("x contains NaN or Inf")
    return _gram(rows) * (2.0 / rows.shape[0])


@jax.jit
def _running_update(H: jax.Array, x: jax.Array, n_old: jax.Array, n_new: jax.Array) -> jax.Array:
    # The reference's running average: rescale the old sum, then add the new batch scaled by 2/n_new.
    return H * (n_old / n_new) + _gram(x * jnp.sqrt(2.0 / n_new))


class HessianAccumulator:
    """Running `H = 2/n · Σ XᵀX` over calibration batches, as the reference's `add_batch` keeps it.

    `n` counts rows (tokens) here; the reference counts sequences, which scales H by a constant that
    GPTQ's codes do not depend on. After adding batches, `.H` equals `hessian(concatenated batches)`.
    """

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise ValueError(f"k={k!r} must be a positive int")
        self.k = int(k)
        self.H = jnp.zeros((self.k, self.k), jnp.float32)
        self.nsamples = 0

    def add(self, x: Any) -> None:
        """Add a batch `x: [..., K]` of layer inputs."""
        rows = _as_rows(x)
        if rows.shape[1] != self.k:
            raise ValueError(f"x has {rows.shape[1]} features, the accumulator expects K={self.k}")
        if not bool(jnp.all(jnp.isfinite(rows))):
            raise ValueError("x contains NaN or Inf")
        t = rows.shape[0]
        if t == 0:
            return
        n_new = self.nsamples + t
        self.H = _running_update(self.H, rows, jnp.float32(self.nsamples), jnp.float32(n_new))
        self.nsamples = n_new


# -- shared preparation (steps 1-4) --------------------------------------------------------------------


def _group_grid(W: np.ndarray, gs: int, bits: int, sym: bool, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    g = W.reshape(W.shape[0] // gs, gs, W.shape[1])
    return grid_params(g.min(axis=1), g.max(axis=1), bits=bits, sym=sym, scale_dtype=scale_dtype)


def _prepare(w, H, *, gs, bits, sym, act_order, static_groups, dtype, scale_dtype):
    """Steps 1-4 on host arrays. Returns W, H (permuted), perm, fixed grid table and row->table map."""
    W = np.array(w, dtype=dtype)
    H = np.array(H, dtype=dtype)
    k = W.shape[0]
    table = None
    if gs == k:
        table = _group_grid(W, k, bits, sym, scale_dtype)
    dead = np.diag(H) == 0
    if np.any(dead):
        warnings.warn(
            f"GPTQ: {int(dead.sum())} of {k} input channels are dead (H[i, i] == 0: no calibration input "
            "reached them); their weights quantize to 0, as in the reference GPTQ",
            RuntimeWarning,
            stacklevel=3,
        )
    H[dead, dead] = 1
    W[dead, :] = 0
    if static_groups and gs != k:
        table = _group_grid(W, gs, bits, sym, scale_dtype)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    if act_order:
        W = W[perm]
        H = H[perm][:, perm]
    # Which row of the fixed table each processed row uses: its input channel's group.
    row_group = (perm // gs).astype(np.int32) if table is not None else None
    return W, H, perm, table, row_group


def _finish(codes_proc, scales, zeros, perm, *, gs, bits, sym, dynamic, scale_dtype) -> Int4Weight:
    """Back to input order: codes, the group of each channel, and the canonical stored order."""
    k = codes_proc.shape[0]
    codes = np.empty_like(codes_proc)
    codes[perm] = codes_proc
    g_idx = np.empty(k, np.int32)
    # Dynamic groups are consecutive in processing order; fixed ones follow input order.
    g_idx[perm] = (np.arange(k) // gs) if dynamic else (perm // gs)
    zeros = None if sym else np.asarray(zeros).astype(np.uint8)
    return Int4Weight.from_codes(
        codes, np.asarray(scales).astype(scale_dtype), zeros, bits=bits, group_size=gs, g_idx=g_idx
    )


# -- the jitted path -------------------------------------------------------------------------------------


@jax.jit
def _upper_inverse_factor(H: jax.Array, damp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Step 5: upper U with Uᵀ U = (H + damp·mean(diag H)·I)⁻¹, and whether the factorization worked.

    The reference forms H⁻¹ (cholesky_inverse) and factors it again. The same U, which is unique, costs
    one Cholesky and one triangular solve: factor the index-reversed matrix, J H J = L Lᵀ, so that
    H = R Rᵀ with R = J L J upper triangular; then H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹.
    """
    k = H.shape[0]
    eye = jnp.eye(k, dtype=H.dtype)
    Hd = H + damp * jnp.mean(jnp.diag(H)) * eye
    R = jnp.linalg.cholesky(Hd[::-1, ::-1])[::-1, ::-1]
    U = jax.scipy.linalg.solve_triangular(R, eye, lower=False)
    return U, jnp.all(jnp.isfinite(U))


def _damped_factor(H: np.ndarray, damp: float, factor) -> Any:
    """Runs `factor(H, damp)` and escalates damp with a warning while the Cholesky fails."""
    current = float(damp)
    while True:
        U, ok = factor(H, current)
        if bool(ok):
            return U
        nxt = current * _DAMP_GROWTH if current > 0 else 0.01
        if nxt > _MAX_DAMP:
            raise ValueError(
                f"H is not positive definite even with damp={current:g} (a Hessian from calibration "
                f"inputs is positive semi-definite; check H)"
            )
        warnings.warn(
            f"GPTQ: Cholesky of the dampened Hessian failed with damp={current:g}; retrying with "
            f"damp={nxt:g}",
            RuntimeWarning,
            stacklevel=3,
        )
        current = nxt


def _chunk_blocks(n_blocks: int) -> int:
    """Blocks per trailing-update chunk: about 8 chunks, a divisor of the block count."""
    target = max(1, n_blocks // _TRAILING_CHUNKS)
    return max(m for m in range(1, target + 1) if n_blocks % m == 0)


@partial(jax.jit, static_argnames=("bits", "gs", "sym", "block_size", "dynamic", "scale_dtype"))
def _gptq_blocks(
    W, U, table_scale, table_zero, row_group, *, bits, gs, sym, block_size, dynamic, scale_dtype
):
    """Steps 6-7 on a padded problem (K a multiple of block_size). Returns codes in processing order,
    the dynamic groups' scales/zeros (in processing-order group numbering) and a finiteness flag."""
    K, N = W.shape
    B = block_size
    b = math.gcd(B, _SUB_BLOCK)
    n_groups = K // gs + 1  # one spare row absorbs group starts inside the padding
    maxq = max_code(bits)
    C = B * _chunk_blocks(K // B)

    def quant_row(w, s, z):
        q = quantize_codes(w, s, z, bits=bits)
        return q, s * (q - z)

    def block(bi, carry):
        W, codes, g_scale, g_zero, cur_s, cur_z = carry
        i1 = bi * B
        W1 = lax.dynamic_slice(W, (i1, 0), (B, N))
        U1 = lax.dynamic_slice(U, (i1, i1), (B, B))

        def sub_block(si, carry):
            W1, Err1, codes, g_scale, g_zero, cur_s, cur_z = carry
            j1 = si * b
            Ws = lax.dynamic_slice(W1, (j1, 0), (b, N))
            Us = lax.dynamic_slice(U1, (j1, j1), (b, b))

            def row(t, carry):
                Ws, Errs, codes, g_scale, g_zero, cur_s, cur_z = carry
                r = i1 + j1 + t
                if dynamic:

                    def new_grid(_):
                        # The quirk: the block-start W, without this block's own updates.
                        x = lax.dynamic_slice(W, (r, 0), (gs, N))
                        return grid_params(
                            x.min(axis=0), x.max(axis=0), bits=bits, sym=sym, scale_dtype=scale_dtype
                        )

                    cur_s, cur_z = lax.cond(r % gs == 0, new_grid, lambda _: (cur_s, cur_z), None)
                    g_scale = g_scale.at[r // gs].set(cur_s)
                    g_zero = g_zero.at[r // gs].set(cur_z)
                else:
                    cur_s, cur_z = table_scale[row_group[r]], table_zero[row_group[r]]
                w = Ws[t]
                q, deq = quant_row(w, cur_s, cur_z)
                codes = lax.dynamic_update_slice(codes, q.astype(jnp.uint8)[None], (r, 0))
                err = (w - deq) / Us[t, t]
                # Us is upper triangular: rows before t get a zero coefficient and stay as they are.
                Ws = Ws - Us[t][:, None] * err[None, :]
                Errs = Errs.at[t].set(err)
                return Ws, Errs, codes, g_scale, g_zero, cur_s, cur_z

            Errs = jnp.zeros((b, N), W.dtype)
            Ws, Errs, codes, g_scale, g_zero, cur_s, cur_z = lax.fori_loop(
                0, b, row, (Ws, Errs, codes, g_scale, g_zero, cur_s, cur_z)
            )
            # The rest of this block sees the sub-block's errors; rows already done are overwritten
            # harmlessly (their codes are taken).
            W1 = W1 - lax.dynamic_slice(U1, (j1, 0), (b, B)).T @ Errs
            Err1 = lax.dynamic_update_slice(Err1, Errs, (j1, 0))
            return W1, Err1, codes, g_scale, g_zero, cur_s, cur_z

        Err1 = jnp.zeros((B, N), W.dtype)
        W1, Err1, codes, g_scale, g_zero, cur_s, cur_z = lax.fori_loop(
            0, B // b, sub_block, (W1, Err1, codes, g_scale, g_zero, cur_s, cur_z)
        )
        # Lazy batch update of the rows after the block, one fixed-height chunk at a time so that chunks
        # already done are skipped (Hinv's zero lower triangle masks the rows done inside a chunk).
        for c in range(K // C):

            def update(W, c=c):
                rows = lax.dynamic_slice(W, (c * C, 0), (C, N))
                rows = rows - lax.dynamic_slice(U, (i1, c * C), (B, C)).T @ Err1
                return lax.dynamic_update_slice(W, rows, (c * C, 0))

            W = lax.cond((c + 1) * C > i1 + B, update, lambda W: W, W)
        return W, codes, g_scale, g_zero, cur_s, cur_z

    codes = jnp.zeros((K, N), jnp.uint8)
    g_scale = jnp.ones((n_groups, N), W.dtype)
    g_zero = jnp.zeros((n_groups, N), W.dtype)
    cur = (jnp.ones((N,), W.dtype), jnp.full((N,), (maxq + 1) // 2, W.dtype))
    W, codes, g_scale, g_zero, _, _ = lax.fori_loop(0, K // B, block, (W, codes, g_scale, g_zero, *cur))
    return codes, g_scale, g_zero, jnp.all(jnp.isfinite(W))


def gptq_quantize(
    w: Any,
    H: Any,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    scale_dtype: Any = np.float16,
) -> Int4Weight:
    """GPTQ-quantize `w: [K, N] float` (in, out) against `H: [K, K]` (see `hessian`).

    `group_size=-1` (or K) is per-channel. With `act_order`, the returned weight stores its rows in the
    canonical act-order layout (`Int4Weight.perm`), and `g_idx()` is what a GPTQ checkpoint would hold.
    Float32 throughout. Scales are rounded up to `scale_dtype` (float16, as GPTQ checkpoints store them,
    or float32) before any row is quantized on them, and returned in that dtype. A failed Cholesky
    escalates `damp` with a warning; dead input channels (`H[i, i] == 0`) quantize to 0 with one warning;
    an `H` with no calibration data in it (all-zero diagonal) raises.
    """
    k, n, gs = validate_gptq_inputs(w, H, bits=bits, group_size=group_size, block_size=block_size, damp=damp)
    bits = validate_bits(bits)
    sd = validate_scale_dtype(scale_dtype)
    W, Hp, perm, table, row_group = _prepare(
        w,
        H,
        gs=gs,
        bits=bits,
        sym=sym,
        act_order=act_order,
        static_groups=static_groups,
        dtype=np.float32,
        scale_dtype=sd,
    )
    U = _damped_factor(Hp, damp, lambda h, d: _upper_inverse_factor(jnp.asarray(h), jnp.float32(d)))
    dynamic = table is None
    # Pad K to a whole number of blocks: padded rows are zero in W and identity in U, so no error flows
    # into or out of them; their codes are dropped.
    kp = -(-k // block_size) * block_size
    Wp = jnp.pad(jnp.asarray(W), ((0, kp - k), (0, 0)))
    Up = jnp.asarray(U)
    if kp != k:
        Up = jnp.pad(Up, ((0, kp - k), (0, kp - k))).at[jnp.arange(k, kp), jnp.arange(k, kp)].set(1.0)
    if dynamic:
        t_scale = t_zero = jnp.zeros((1, n), jnp.float32)
        rg = jnp.zeros((kp,), jnp.int32)
    else:
        t_scale, t_zero = (jnp.asarray(a, jnp.float32) for a in table)
        rg = jnp.pad(jnp.asarray(row_group), (0, kp - k))
    codes, g_scale, g_zero, finite = _gptq_blocks(
        Wp,
        Up,
        t_scale,
        t_zero,
        rg,
        bits=bits,
        gs=gs,
        sym=bool(sym),
        block_size=int(block_size),
        dynamic=dynamic,
        scale_dtype=sd.name,
    )
    scales, zeros = (g_scale[: k // gs], g_zero[: k // gs]) if dynamic else (t_scale, t_zero)
    check_scales_fit(scales, sd)
    if not bool(finite):
        raise ValueError("GPTQ produced non-finite intermediate weights; H is too ill-conditioned")
    return _finish(
        np.asarray(codes)[:k], scales, zeros, perm, gs=gs, bits=bits, sym=sym, dynamic=dynamic, scale_dtype=sd
    )


# -- the plain NumPy path ---------------------------------------------------------------------------------


def _numpy_upper_inverse_factor(H: np.ndarray, damp: float) -> tuple[np.ndarray | None, bool]:
    Hd = H + damp * np.mean(np.diag(H)) * np.eye(H.shape[0], dtype=H.dtype)
    try:
        L = np.linalg.cholesky(Hd)
        Linv = np.linalg.inv(L)
        U = np.linalg.cholesky(Linv.T @ Linv).T
    except np.linalg.LinAlgError:
        return None, False
    return U, bool(np.all(np.isfinite(U)))


def gptq_reference(
    w: Any,
    H: Any,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    dtype: Any = np.float64,
    scale_dtype: Any = np.float16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plain NumPy GPTQ (steps 1-7, row by row, float64 by default).

    Returns `(codes [K, N] int64, scales [G, N], zeros [G, N], g_idx [K] int32)`, all indexed by input
    channel / group id as a checkpoint stores them; scales hold values of `scale_dtype` in `dtype`.
    """
    k, n, gs = validate_gptq_inputs(w, H, bits=bits, group_size=group_size, block_size=block_size, damp=damp)
    bits = validate_bits(bits)
    sd = validate_scale_dtype(scale_dtype)
    W, Hp, perm, table, row_group = _prepare(
        w,
        H,
        gs=gs,
        bits=bits,
        sym=sym,
        act_order=act_order,
        static_groups=static_groups,
        dtype=dtype,
        scale_dtype=sd,
    )
    U = _damped_factor(Hp, damp, _numpy_upper_inverse_factor)
    dynamic = table is None
    codes = np.zeros((k, n), np.int64)
    g_scale = np.zeros((k // gs, n), dtype)
    g_zero = np.zeros((k // gs, n), dtype)
    s = z = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[i1:i2].copy()
        Err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = i1 + i
            if not dynamic:
                s, z = table[0][row_group[r]], table[1][row_group[r]]
            elif r % gs == 0:
                s, z = _group_grid(W[r : r + gs], gs, bits, sym, sd)
                s, z = s[0], z[0]
                g_scale[r // gs], g_zero[r // gs] = s, z
            q = quantize_codes(W1[i], s, z, bits=bits)
            codes[r] = q
            err = (W1[i] - s * (q - z)) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], err)
            Err1[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ Err1
    scales, zeros = (g_scale, g_zero) if dynamic else table
    check_scales_fit(scales, sd)
    qw_codes = np.empty_like(codes)
    qw_codes[perm] = codes
    g_idx = np.empty(k, np.int32)
    g_idx[perm] = (np.arange(k) // gs) if dynamic else (perm // gs)
    return qw_codes, np.asarray(scales), np.asarray(zeros), g_idx
