"""The paged KV cache: host-side page bookkeeping and the jitted writes into the pages.

Pages are NHD, `k_pages, v_pages: [P, S, K, D]` (P pages of S tokens, K kv heads, head dim D). Token i of a
sequence lives in page `block_table[i // S]` at offset `i % S`, i.e. at flat slot `page * S + offset`.

`PageAllocator` (host side, plain Python) owns which pages belong to which sequence:
- `add()` starts an empty sequence; `append(seq, n)` reserves slots for n new tokens and returns them;
- `fork(seq)` starts a new sequence sharing all of seq's pages (reference counts). Full shared pages stay
  shared forever (their tokens never change). Appending to a sequence whose last, partly filled page is
  shared copies that page first (copy-on-write): the allocator queues (src, dst) page pairs that the caller
  applies to the cache with `copy_pages` before writing the new tokens (`pop_copies()` drains the queue);
- `free(seq)` drops the sequence's references; a page returns to the free list when no sequence uses it;
- `block_tables(seqs)`, `kv_lens(seqs)` give the kernel's arrays.
Errors raise and leave the allocator unchanged: `OutOfPages` when the free list is too short, KeyError for an
unknown or already freed sequence (so a double free is caught).

`write_kv(k_pages, v_pages, k, v, slot_mapping)` (jittable; donate the pages) stores new tokens' keys and
values at their slots; slot −1 skips a token (padding). Into int8 or float8_e4m3fn pages it quantizes:
    per-tensor scale (a scalar):            stored = round_or_cast(x / scale)
    per-token-and-head scales [P, S, K]:    scale = max|x| over D / qmax (qmax 127 for int8, 448 for fp8),
                                            written beside the token, and stored = round_or_cast(x / scale)
int8 rounds to nearest even and clips to [−127, 127]; fp8 clips to ±448 before the cast (no NaN/Inf).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
_QMAX = {np.dtype(np.int8): 127.0, np.dtype(ml_dtypes.float8_e4m3fn): 448.0}


def _quantize(x: jax.Array, scale: jax.Array, dtype: np.dtype) -> jax.Array:
    qmax = _QMAX[dtype]
    y = jnp.clip(x / scale, -qmax, qmax)
    if dtype == np.dtype(np.int8):
        y = jnp.round(y)
    return y.astype(dtype)


def validate_write_kv_inputs(
    k_pages: Any, v_pages: Any, k: Any, v: Any, slot_mapping: Any, *, k_scale: Any = None, v_scale: Any = None
) -> None:
    if np.ndim(k_pages) != 4:
        raise ValueError(f"k_pages must be [P, S, K, D]; got shape {np.shape(k_pages)}")
    p, s, kh, d = np.shape(k_pages)
    if np.shape(v_pages) != np.shape(k_pages):
        raise ValueError(f"v_pages.shape={np.shape(v_pages)} must equal k_pages.shape={np.shape(k_pages)}")
    t = np.shape(k)[0] if np.ndim(k) == 3 else None
    for name, x in (("k", k), ("v", v)):
        if np.ndim(x) != 3 or tuple(np.shape(x)[1:]) != (kh, d):
            raise ValueError(f"{name}.shape={np.shape(x)} must be [T, K={kh}, D={d}]")
    if np.shape(v)[0] != t:
        raise ValueError(f"v has {np.shape(v)[0]} tokens but k has {t}")
    if np.shape(slot_mapping) != (t,):
        raise ValueError(f"slot_mapping.shape={np.shape(slot_mapping)} must be (T={t},)")
    slot_dtype = (
        np.dtype(slot_mapping.dtype) if hasattr(slot_mapping, "dtype") else np.asarray(slot_mapping).dtype
    )
    if t and not np.issubdtype(slot_dtype, np.integer):
        # A float slot would be truncated to a neighbouring slot: refuse it instead.
        raise ValueError(f"slot_mapping.dtype={slot_dtype} must be an integer type (int32 slots, -1 to skip)")
    for name, pages, sc in (("k_pages", k_pages, k_scale), ("v_pages", v_pages, v_scale)):
        dt = np.dtype(pages.dtype)
        if dt in _QMAX:
            if sc is None:
                raise ValueError(f"{name}.dtype={dt} is quantized and needs {name[0]}_scale")
            if np.shape(sc) not in ((), (p, s, kh)):
                raise ValueError(f"{name[0]}_scale.shape={np.shape(sc)} must be () or {(p, s, kh)}")
        elif sc is not None:
            raise ValueError(f"{name[0]}_scale is only for int8/float8_e4m3fn pages; {name}.dtype={dt}")
    # One dtype rule with the kernels: no silent change of precision. Float pages take k/v of their own
    # dtype; quantized pages take any of the float dtypes (they are quantized with the scales).
    for name, x, pages in (("k", k, k_pages), ("v", v, v_pages)):
        xt, pt = np.dtype(x.dtype), np.dtype(pages.dtype)
        if xt not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={xt} must be one of float32, bfloat16, float16")
        if pt not in _QMAX and xt != pt:
            raise ValueError(f"{name}.dtype={xt} must equal the pages' dtype {pt} (cast it explicitly)")
    if not isinstance(slot_mapping, jax.core.Tracer):
        slots = np.asarray(slot_mapping)
        bad = np.flatnonzero((slots < -1) | (slots >= p * s))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"slot_mapping[{i}]={slots[i]} must be -1 (skip) or a slot in [0, {p * s})")


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
    *,
    k_scale: jax.Array | float | None = None,
    v_scale: jax.Array | float | None = None,
) -> tuple[jax.Array, ...]:
    """Write k, v: [T, K, D] to the slots slot_mapping: [T] int32 of k_pages, v_pages: [P, S, K, D].

    Returns (k_pages, v_pages), or (k_pages, v_pages, k_scale, v_scale) when either scale is per token and
    head ([P, S, K]). Under jit, slots outside [0, P·S) are dropped, never written elsewhere.
    """
    validate_write_kv_inputs(k_pages, v_pages, k, v, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    p, s, kh, d = k_pages.shape
    slots = jnp.asarray(slot_mapping, jnp.int32)
    # Negative indices would wrap around in JAX: send skipped and out-of-range slots past the end, dropped.
    slots = jnp.where((slots >= 0) & (slots < p * s), slots, p * s)
    outs = []
    scales_out = []
    per_token = any(sc is not None and np.ndim(sc) == 3 for sc in (k_scale, v_scale))
    for pages, x, sc in ((k_pages, k, k_scale), (v_pages, v, v_scale)):
        dt = np.dtype(pages.dtype)
        flat = pages.reshape(p * s, kh, d)
        if dt in _QMAX:
            x32 = x.astype(jnp.float32)
            if np.ndim(sc) == 3:
                new = jnp.max(jnp.abs(x32), axis=-1) / _QMAX[dt]  # [T, K]
                new = jnp.where(new > 0, new, 1.0)  # all-zero vectors: any scale works
                sc_flat = jnp.asarray(sc, jnp.float32).reshape(p * s, kh).at[slots].set(new, mode="drop")
                vals = _quantize(x32, new[..., None], dt)
                scales_out.append(sc_flat.reshape(p, s, kh).astype(jnp.asarray(sc).dtype))
            else:
                vals = _quantize(x32, jnp.asarray(sc, jnp.float32), dt)
                scales_out.append(sc)
        else:
            vals = x.astype(dt)
            scales_out.append(sc)
        outs.append(flat.at[slots].set(vals, mode="drop").reshape(p, s, kh, d))
    if per_token:
        return outs[0], outs[1], scales_out[0], scales_out[1]
    return outs[0], outs[1]


def copy_pages(k_pages: jax.Array, v_pages: jax.Array, src: Any, dst: Any, *scales: jax.Array):
    """Copy pages src[i] -> dst[i] in k_pages, v_pages (and any per-token scale arrays [P, S, K]), as
    `PageAllocator.pop_copies()` asks before a copy-on-write append. Jittable."""
    src = jnp.asarray(src, jnp.int32)
    dst = jnp.asarray(dst, jnp.int32)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"src.shape={src.shape} and dst.shape={dst.shape} must be equal and 1-D")
    return tuple(a.at[dst].set(a[src]) for a in (k_pages, v_pages, *scales))


@dataclasses.dataclass
class _Seq:
    pages: list[int]
    length: int


class OutOfPages(RuntimeError):
    """The allocator has too few free pages for the request."""


class PageAllocator:
    """Host-side page bookkeeping for a paged KV cache of `num_pages` pages of `page_size` tokens."""

    def __init__(self, num_pages: int, page_size: int):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r} must be an integer >= 1")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size={page_size!r} must be an integer >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first
        self._refs = [0] * num_pages
        self._seqs: dict[int, _Seq] = {}
        self._ids = itertools.count()
        self._copies: list[tuple[int, int]] = []

    # -- queries
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> list[int]:
        return list(self._seqs)

    def _seq(self, seq: int) -> _Seq:
        if seq not in self._seqs:
            raise KeyError(f"unknown sequence {seq!r} (never added, or already freed)")
        return self._seqs[seq]

    def length(self, seq: int) -> int:
        return self._seq(seq).length

    def pages(self, seq: int) -> list[int]:
        return list(self._seq(seq).pages)

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    # -- changes
    def add(self) -> int:
        """Start an empty sequence; returns its id."""
        seq = next(self._ids)
        self._seqs[seq] = _Seq([], 0)
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence sharing every page (and token) of `seq`."""
        parent = self._seq(seq)
        child = next(self._ids)
        for page in parent.pages:
            self._refs[page] += 1
        self._seqs[child] = _Seq(list(parent.pages), parent.length)
        return child

    def append(self, seq: int, n: int = 1) -> np.ndarray:
        """Reserve slots for n new tokens of `seq`: int32 [n] flat slots (page * S + offset)."""
        state = self._seq(seq)
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n={n!r} must be an integer >= 0")
        s = self.page_size
        partial = state.length % s != 0
        cow = partial and self._refs[state.pages[-1]] > 1
        new_pages = -(-(state.length + n) // s) - len(state.pages) + (1 if cow and n > 0 else 0)
        if new_pages > len(self._free):
            raise OutOfPages(
                f"out of pages: sequence {seq} needs {new_pages} more page(s) for {n} token(s), "
                f"{len(self._free)} free of {self.num_pages}"
            )
        if cow and n > 0:
            old = state.pages[-1]
            fresh = self._free.pop()
            self._refs[fresh] = 1
            self._refs[old] -= 1
            state.pages[-1] = fresh
            self._copies.append((old, fresh))
        slots = np.empty(n, dtype=np.int32)
        for i in range(n):
            pos = state.length + i
            if pos // s == len(state.pages):
                page = self._free.pop()
                self._refs[page] = 1
                state.pages.append(page)
            slots[i] = state.pages[pos // s] * s + pos % s
        state.length += n
        return slots

    def free(self, seq: int) -> None:
        """Drop the sequence; pages no other sequence uses return to the free list."""
        state = self._seq(seq)
        for page in state.pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)
        del self._seqs[seq]

    def pop_copies(self) -> tuple[np.ndarray, np.ndarray]:
        """Pending copy-on-write page copies as (src, dst) int32 arrays, for `copy_pages`; clears them."""
        src = np.array([a for a, _ in self._copies], dtype=np.int32)
        dst = np.array([b for _, b in self._copies], dtype=np.int32)
        self._copies.clear()
        return src, dst

    # -- arrays for the kernel
    def block_tables(self, seqs: Sequence[int], max_pages: int | None = None) -> np.ndarray:
        """int32 [B, max_pages]; entries past a sequence's pages are 0 (the kernel ignores them)."""
        rows = [self._seq(q).pages for q in seqs]
        width = max((len(r) for r in rows), default=0) if max_pages is None else max_pages
        out = np.zeros((len(rows), max(width, 1)), dtype=np.int32)
        for i, r in enumerate(rows):
            if len(r) > out.shape[1]:
                raise ValueError(f"max_pages={max_pages} is less than sequence {seqs[i]}'s {len(r)} pages")
            out[i, : len(r)] = r
        return out

    def kv_lens(self, seqs: Iterable[int]) -> np.ndarray:
        return np.array([self._seq(q).length for q in seqs], dtype=np.int32)

    def check(self) -> None:
        """Assert the invariants: every page is free xor referenced, and reference counts match."""
        counts = [0] * self.num_pages
        for state in self._seqs.values():
            assert len(state.pages) == -(-state.length // self.page_size), "pages do not match length"
            for page in state.pages:
                counts[page] += 1
        assert counts == self._refs, "reference counts drifted"
        free = set(self._free)
        assert len(free) == len(self._free), "a page is free twice"
        for page in range(self.num_pages):
            assert (page in free) == (counts[page] == 0), f"page {page} leaked or is free while in use"
