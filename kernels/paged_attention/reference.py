"""Paged attention, the semantics: validation, the layout bridges and the NumPy reference.

What is computed, the layouts and the checks are described in `kernels.paged_attention` (the package
docstring); every implementation (`xla.py`, `cpu_native.py`, `pallas_triton.py`) follows them, and the shared
test suite (tests/kernels/paged_attention/) holds each of them to `paged_attention_reference`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kernels import registry

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
QUANT_DTYPES = (np.dtype(np.int8), np.dtype(ml_dtypes.float8_e4m3fn))


def is_concrete(x: Any) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(np.shape(x)), np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def validate_paged_attention_inputs(
    q: Any,
    k_pages: Any,
    v_pages: Any,
    kv_lens: Any,
    block_tables: Any,
    *,
    q_lens: Any = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
) -> None:
    """Raise ValueError naming the argument when the inputs are inconsistent (see the module docstring
    for which checks need concrete values)."""
    _validate(
        q, k_pages, v_pages, kv_lens, block_tables, q_lens=q_lens, scale=scale, soft_cap=soft_cap,
        sliding_window=sliding_window, alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale,
        float_dtypes=FLOAT_DTYPES,
    )  # fmt: skip


# The NumPy reference also takes float64 q and pages (finite differences of it check the gradients).
_REFERENCE_FLOAT_DTYPES = (*FLOAT_DTYPES, np.dtype(np.float64))


def _validate(
    q, k_pages, v_pages, kv_lens, block_tables, *, q_lens, scale, soft_cap, sliding_window, alibi_slopes,
    k_scale, v_scale, float_dtypes,
) -> None:  # fmt: skip
    q_shape, q_dtype = shape_dtype(q)
    k_shape, k_dtype = shape_dtype(k_pages)
    v_shape, v_dtype = shape_dtype(v_pages)
    if len(q_shape) != 3:
        raise ValueError(f"q must be [T, H, D]; got shape {q_shape}")
    if q_dtype not in float_dtypes:
        names = ", ".join(d.name for d in float_dtypes)
        raise ValueError(f"q.dtype={q_dtype} must be one of {names}")
    if len(k_shape) != 4:
        raise ValueError(f"k_pages must be [P, S, K, D]; got shape {k_shape}")
    if v_shape != k_shape:
        raise ValueError(f"v_pages.shape={v_shape} must equal k_pages.shape={k_shape}")
    t, h, d = q_shape
    p, s, kh, dk = k_shape
    if dk != d:
        raise ValueError(f"k_pages head dim {dk} must equal q head dim {d}")
    if kh < 1 or h % kh:
        raise ValueError(f"num_q_heads={h} must be a multiple of num_kv_heads={kh}")
    for name, dt, sc in (("k_pages", k_dtype, k_scale), ("v_pages", v_dtype, v_scale)):
        sc_name = name[0] + "_scale"
        if dt in QUANT_DTYPES:
            if sc is None:
                raise ValueError(f"{name}.dtype={dt} is quantized and needs {sc_name}")
            sc_shape = tuple(np.shape(sc))
            if sc_shape not in ((), (p, s, kh)):
                raise ValueError(f"{sc_name}.shape={sc_shape} must be () (per tensor) or {(p, s, kh)}")
        elif dt in float_dtypes:
            if dt != q_dtype:
                raise ValueError(f"{name}.dtype={dt} must equal q.dtype={q_dtype} (or be int8/float8_e4m3fn)")
            if sc is not None:
                raise ValueError(f"{sc_name} is only for int8/float8_e4m3fn pages; {name}.dtype={dt}")
        else:
            raise ValueError(f"{name}.dtype={dt} must be q's dtype, int8 or float8_e4m3fn")
    kv_shape, kv_dtype = shape_dtype(kv_lens)
    bt_shape, bt_dtype = shape_dtype(block_tables)
    if len(kv_shape) != 1:
        raise ValueError(f"kv_lens must be [B]; got shape {kv_shape}")
    if len(bt_shape) != 2:
        raise ValueError(f"block_tables must be [B, max_pages]; got shape {bt_shape}")
    if kv_shape[0] != bt_shape[0]:
        # Blame the one that disagrees with a third witness of B: q in decode (T == B), else q_lens.
        witness = t if q_lens is None else (shape_dtype(q_lens)[0] or (None,))[0]
        if witness == kv_shape[0]:
            raise ValueError(
                f"block_tables.shape={bt_shape} must be [B={kv_shape[0]}, max_pages]: one row per sequence "
                f"of kv_lens (shape {kv_shape})"
            )
        raise ValueError(
            f"kv_lens.shape={kv_shape} must be (B={bt_shape[0]},): one length per row of block_tables "
            f"(shape {bt_shape})"
        )
    b = kv_shape[0]
    for name, dt in (("kv_lens", kv_dtype), ("block_tables", bt_dtype)):
        if not np.issubdtype(dt, np.integer):
            raise ValueError(f"{name}.dtype={dt} must be an integer type")
    if q_lens is None:
        if t != b:
            raise ValueError(f"with q_lens=None (decode) q must have one token per sequence: T={t} != B={b}")
    else:
        ql_shape, ql_dtype = shape_dtype(q_lens)
        if ql_shape != (b,):
            raise ValueError(f"q_lens.shape={ql_shape} must be (B={b},)")
        if not np.issubdtype(ql_dtype, np.integer):
            raise ValueError(f"q_lens.dtype={ql_dtype} must be an integer type")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale={scale!r} must be a finite number")
    if soft_cap is not None and not (isinstance(soft_cap, (int, float)) and soft_cap > 0):
        raise ValueError(f"soft_cap={soft_cap!r} must be a positive number")
    if sliding_window is not None and not (
        isinstance(sliding_window, (int, np.integer)) and sliding_window >= 1
    ):
        raise ValueError(f"sliding_window={sliding_window!r} must be an integer >= 1")
    if alibi_slopes is not None and tuple(np.shape(alibi_slopes)) != (h,):
        raise ValueError(f"alibi_slopes.shape={tuple(np.shape(alibi_slopes))} must be (H={h},)")

    # Value checks, possible only on concrete arrays.
    max_pages = bt_shape[1]
    if is_concrete(kv_lens):
        lens = np.asarray(kv_lens)
        if (lens < 0).any():
            raise ValueError(f"kv_lens must be >= 0; got {lens.tolist()}")
        if (lens > max_pages * s).any():
            bad = int(np.argmax(lens > max_pages * s))
            raise ValueError(
                f"kv_lens[{bad}]={lens[bad]} exceeds what block_tables holds: max_pages={max_pages} × page "
                f"size {s} = {max_pages * s} tokens"
            )
        if is_concrete(block_tables):
            bt = np.asarray(block_tables)
            for seq in range(b):
                used = -(-int(lens[seq]) // s)
                row = bt[seq, :used]
                bad = np.flatnonzero((row < 0) | (row >= p))
                if bad.size:
                    j = int(bad[0])
                    raise ValueError(
                        f"block_tables[{seq}, {j}]={row[j]} is not a page id in [0, {p}) "
                        f"(sequence {seq} covers {used} pages)"
                    )
        if q_lens is not None and is_concrete(q_lens):
            ql = np.asarray(q_lens)
            if (ql < 0).any():
                raise ValueError(f"q_lens must be >= 0; got {ql.tolist()}")
            if (ql > lens).any():
                bad = int(np.argmax(ql > lens))
                raise ValueError(f"q_lens[{bad}]={ql[bad]} exceeds kv_lens[{bad}]={lens[bad]}")
            if int(ql.sum()) != t:
                raise ValueError(f"sum(q_lens)={int(ql.sum())} must equal the number of query tokens T={t}")
    if (
        alibi_slopes is not None
        and is_concrete(alibi_slopes)
        and not np.isfinite(np.asarray(alibi_slopes)).all()
    ):
        raise ValueError("alibi_slopes must be finite")


def dequantize_pages(pages: Any, scale: Any = None) -> np.ndarray:
    """Pages [P, S, K, D] as float64 values: stored value × scale (scalar or [P, S, K]) when quantized."""
    x = np.asarray(pages).astype(np.float64)
    if scale is None:
        return x
    sc = np.asarray(scale, dtype=np.float64)
    return x * (sc if sc.ndim == 0 else sc[..., None])


def gather_kv(pages: Any, block_table_row: Any, kv_len: int) -> np.ndarray:
    """Layout bridge: one sequence's first kv_len tokens from pages [P, S, K, D] -> [kv_len, K, D]."""
    pages = np.asarray(pages)
    s = pages.shape[1]
    used = -(-int(kv_len) // s)
    ids = np.asarray(block_table_row)[:used]
    return pages[ids].reshape(used * s, *pages.shape[2:])[: int(kv_len)]


def paged_attention_reference(
    q: Any,
    k_pages: Any,
    v_pages: Any,
    kv_lens: Any,
    block_tables: Any,
    *,
    q_lens: Any = None,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    alibi_slopes: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
    impl: str = "reference",
) -> np.ndarray:
    """NumPy, float64 inside, one query token at a time. Same arguments as `paged_attention`; q and the
    pages may also be float64 here (for finite differences)."""
    del impl
    _validate(
        q, k_pages, v_pages, kv_lens, block_tables, q_lens=q_lens, scale=scale, soft_cap=soft_cap,
        sliding_window=sliding_window, alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale,
        float_dtypes=_REFERENCE_FLOAT_DTYPES,
    )  # fmt: skip
    q_dtype = np.asarray(q).dtype
    q64 = np.asarray(q).astype(np.float64)
    t_total, h, d = q64.shape
    kh = np.shape(k_pages)[2]
    g = h // kh
    k64 = dequantize_pages(k_pages, k_scale)
    v64 = dequantize_pages(v_pages, v_scale)
    lens = np.asarray(kv_lens)
    bt = np.asarray(block_tables)
    qls = np.ones_like(lens) if q_lens is None else np.asarray(q_lens)
    sc = 1.0 / math.sqrt(d) if scale is None else float(scale)
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, dtype=np.float64)
    out = np.zeros((t_total, h, d), dtype=np.float64)
    kv_head = np.arange(h) // g  # query head -> the kv head it reads
    row = 0
    for b in range(len(lens)):
        n = int(lens[b])
        keys = gather_kv(k64, bt[b], n)[:, kv_head]  # [n, H, D]
        values = gather_kv(v64, bt[b], n)[:, kv_head]
        j = np.arange(n)
        for i in range(int(qls[b])):
            pos = n - int(qls[b]) + i
            logits = sc * np.einsum("nhd,hd->hn", keys, q64[row])  # [H, n]
            if soft_cap is not None:
                logits = soft_cap * np.tanh(logits / soft_cap)
            if slopes is not None:
                logits = logits + slopes[:, None] * (j - pos)[None, :]
            keep = j <= pos
            if sliding_window is not None:
                keep &= j > pos - sliding_window
            if keep.any():  # otherwise nothing to attend to: the row stays zero
                kept = logits[:, keep]
                w = np.exp(kept - kept.max(axis=1, keepdims=True))
                w /= w.sum(axis=1, keepdims=True)
                out[row] = np.einsum("hn,nhd->hd", w, values[keep])
            row += 1
    return out.astype(q_dtype)


def _reference(q, k_pages, v_pages, kv_lens, block_tables, *, config, **options):
    """impl="reference": the NumPy reference on host copies (it validates its arguments itself)."""
    del config
    arrays = (q, k_pages, v_pages, kv_lens, block_tables, *options.values())
    registry.require_concrete("paged_attention", *arrays)
    host = {k: np.asarray(v) if isinstance(v, jax.Array) else v for k, v in options.items()}
    out = paged_attention_reference(*(np.asarray(a) for a in arrays[:5]), **host)
    return jnp.asarray(out)


IMPLEMENTATION = registry.Implementation(
    "reference", _reference, platforms=registry.PLATFORMS, traceable=False
)
