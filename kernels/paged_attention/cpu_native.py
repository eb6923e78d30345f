"""Paged attention through the CPU-native decode kernel (kernels/cpu/paged_attention.cc, XLA's FFI).

It serves decode (q_lens=None) with float32 q and float32 pages: one work unit per (sequence, kv head,
context split) walks the sequence's pages in place — each page's slice of that kv head is read once for
all G query heads, no gathered copy — with an online softmax and a log-sum-exp merge of the splits. It
checks every page id a sequence covers and kv_lens against the block table, and a bad one is an error
raised from the handler (never a read outside the pages). The entry chooses it per platform at lowering
(the CPU branch of `impl="auto"`), so the same jitted function lowers the XLA path everywhere else.
Reverse-mode autodiff (q, k_pages, v_pages, alibi_slopes) takes the XLA path's recompute-based backward
(`kernels.paged_attention.xla.differentiable`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from kernels import cpu, registry
from kernels.paged_attention.reference import shape_dtype
from kernels.paged_attention.xla import differentiable


def native_unsupported(q: Any, k_pages: Any, v_pages: Any, *, q_lens: Any = None) -> str | None:
    """Why the native CPU decode kernel cannot serve these inputs (None when it can)."""
    if q_lens is not None:
        return "multi-token queries (q_lens given): the native kernel is decode-only"
    f32 = np.dtype(np.float32)
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        dt = shape_dtype(x)[1]
        if dt != f32:
            return f"{name}.dtype={dt} (the native kernel takes float32 q and pages)"
    return None


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "sliding_window"))
def paged_decode_native(
    q, k_pages, v_pages, kv_lens, block_tables, alibi_slopes, *, scale, soft_cap, sliding_window
):
    """Decode through the native kernel (CPU only; the caller chooses the platform): [B, H, D], q's dtype."""
    out = cpu.paged_decode_native(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        alibi_slopes,
        scale=scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
    )
    return out.astype(q.dtype)


def _supports(q, k_pages, v_pages, kv_lens, block_tables, *, q_lens=None, **options):
    return native_unsupported(q, k_pages, v_pages, q_lens=q_lens)


def _native(
    q, k_pages, v_pages, kv_lens, block_tables, *, alibi_slopes, scale, soft_cap, sliding_window, config, **_
):
    del config

    def forward(q, k_pages, v_pages, kv_lens, block_tables, q_lens, alibi_slopes, k_scale, v_scale):
        del q_lens, k_scale, v_scale  # decode with float32 pages: None
        return paged_decode_native(
            q, k_pages, v_pages, kv_lens, block_tables, alibi_slopes,
            scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        )  # fmt: skip

    # The native forward with the XLA path's recompute-based backward (reverse-mode autodiff).
    return differentiable(
        forward, (scale, soft_cap, sliding_window, 1), q, k_pages, v_pages, kv_lens, block_tables, None,
        alibi_slopes, None, None,
    )  # fmt: skip


IMPLEMENTATION = registry.Implementation(
    "cpu_native",
    _native,
    platforms=("cpu",),
    supports=_supports,
    available=registry.native_library_missing,
    prefer=lambda *args, **kwargs: registry.native_slower("paged_attention"),
)
