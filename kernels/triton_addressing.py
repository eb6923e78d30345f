"""How JAX's Pallas Triton lowering addresses a kernel's operands, and the 16-bit word view that keeps
one-byte operands of 2**31 to 2**32 elements within reach of its 32-bit offsets.

The rule
--------
For an operand of n elements of `itemsize` bytes (its whole shape as the pallas_call sees it: under
`jax.vmap` the batched array, not one example), every load and store adds an element offset to the operand's
base pointer, and that offset is

    64-bit  when n · itemsize > 2**32 bytes,
    32-bit  otherwise, whatever the index dtype (an int64 index is cast, i.e. truncated, to it).

The add sign-extends a 32-bit offset (`tt.addptr` lowers to an LLVM GEP; SASS `LEA.HI.X.SX32`), so a 32-bit
offset reaches elements 0 .. 2**31 − 1. For two-byte and wider elements that covers every operand of at most
2**32 bytes; for one-byte elements it does not: an operand of 2**31 < n ≤ 2**32 elements (an int8/fp8 KV
pool of 2 to 4 GiB, a packed INT4 weight or expert stack of that size, their zero points) would be read at
wrong addresses past its first 2 GiB. Below 2**32 bytes the lowering cannot be asked for 64-bit offsets.

The contract
------------
Such an operand goes in as 16-bit words: `needs_words(x)` says when (one-byte elements, more than
`MAX_I32_ELEMENTS`, at most `MAX_I32_OFFSET_BYTES`, counted through vmap by `operand_elements`), `to_words`
views x: [..., L] as [..., L/2] uint16 (a bitcast in XLA, no copy), so n/2 ≤ 2**31 words, all in reach; inside
the kernel the block or slice is indexed in words (`word_slice` turns a `pl.ds` of byte columns into the
`pl.ds` of words that holds them) and `from_words` splits each loaded word [..., w] back into the bytes
[..., 2w] in memory order (shifts and a join in registers). Past 2**32 bytes the lowering's own 64-bit
offsets take over, as for any operand; smaller operands keep their one-byte loads. The choice is static, by
shape and dtype, and must be made where the pallas_call is built (inside a kernel primitive's lowering, so
that vmap's batch counts).

Evidence
--------
`jax._src.pallas.triton.lowering._compute_offsets_from_indices` (JAX 0.12 and earlier): `full_size =
prod(full_shape) · itemsize` and `offset_eltype = i64 if full_size > 2**32 else i32`. tests/kernels/
test_gpu_addressing.py pins it: it lowers the paged attention, INT4 matmul and MoE kernels for sm_80/sm_90a
without a GPU (`kernels.compile_only`), reads the offset width of every `tt.addptr` on a kernel argument, and
checks on both sides of each boundary (2**31 elements, 2**32 bytes) which form each big operand takes, that
the rule still holds and that no 32-bit-addressed operand has more than 2**31 elements; in interpret mode it
checks that word and byte loads give bit-identical outputs.

Axis legend: L an operand's last axis in one-byte elements (even), L/2 the same axis in 16-bit words, n an
operand's element count (its batched shape under vmap), w the words of a loaded tile.

The only private API here is the one `operand_elements` needs (below); `from_words` and `word_slice` run
inside Pallas kernel bodies (Triton lowering or interpret mode).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

MAX_I32_OFFSET_BYTES = 2**32  # operands up to this size get 32-bit offsets from the lowering
MAX_I32_ELEMENTS = 2**31  # 32-bit offsets (sign-extended) reach elements 0 .. 2**31 - 1


def offsets_are_64bit(num_elements: int, itemsize: int) -> bool:
    """Whether JAX's Pallas Triton lowering addresses an operand of `num_elements` elements of `itemsize`
    bytes with 64-bit offsets (more than 2**32 bytes) rather than 32-bit ones."""
    return int(num_elements) * int(itemsize) > MAX_I32_OFFSET_BYTES


def operand_elements(x: Any) -> int:
    """Elements of x as a pallas_call built from it sees them. Under `jax.vmap` (the lab's kernel primitives
    batch by running their lowering under `jax.vmap`), Pallas batches the call over the mapped axes, so the
    batched value counts: x's per-example shape alone would hide a stack of weights or of layers' pages.
    JAX has no public way to ask a vmapped value for its batch, hence the private BatchTracer (its `val` is
    the batched value, in every JAX the lab supports)."""
    from jax._src.interpreters import batching

    while isinstance(x, batching.BatchTracer):
        x = x.val
    return int(np.prod(np.shape(x), dtype=np.int64))


def needs_words(x: Any) -> bool:
    """True when x, about to be a pallas_call operand, must go in as 16-bit words (`to_words`): one-byte
    elements, more than 2**31 of them (through vmap), and at most 2**32 bytes, where the lowering's 32-bit
    offsets would wrap."""
    itemsize = np.dtype(x.dtype).itemsize
    n = operand_elements(x)
    return itemsize == 1 and n > MAX_I32_ELEMENTS and not offsets_are_64bit(n, itemsize)


def to_words(x: jax.Array) -> jax.Array:
    """x: [..., L] one-byte dtype, L even -> [..., L/2] uint16, word i holding bytes 2i (low) and 2i + 1
    (high), as in memory on little-endian GPUs: XLA makes this a bitcast, no copy."""
    if np.dtype(x.dtype).itemsize != 1 or x.shape[-1] % 2:
        raise ValueError(f"x: {x.dtype}{list(x.shape)} must have one-byte elements and an even last axis")
    return jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), jnp.uint16)


def from_words(words: jax.Array, dtype: Any) -> jax.Array:
    """Inside a kernel: words [..., n] uint16 (a tile loaded from a `to_words` operand) -> [..., 2n] in the
    one-byte `dtype` (int8, uint8, float8_*), the bytes in memory order. Lowers to shifts, truncations and
    one `tt.join`; a masked word's bytes are as undefined as the word."""
    lo = words.astype(jnp.uint8)
    hi = jax.lax.shift_right_logical(words, jnp.asarray(8, jnp.uint16)).astype(jnp.uint8)
    b = jnp.stack([lo, hi], axis=-1).reshape(*words.shape[:-1], 2 * words.shape[-1])
    dtype = np.dtype(dtype)
    return b if dtype == np.uint8 else jax.lax.bitcast_convert_type(b, dtype)


def word_slice(cols: Any) -> Any:
    """The `pl.ds` of 16-bit words covering the byte columns `cols` (a `pl.ds` of even start and size)."""
    half = cols.size // 2
    start = cols.start // 2
    return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, half), half)
