"""The prepared INT4 weight layout of the Mosaic GPU kernel: computed once from a canonical `Int4Weight`.

Why a second layout
-------------------
The canonical layout (`quant/format.py`: `packed: [K/2, N] uint8`, two vertically adjacent codes per byte,
N contiguous) suits K-blocked XLA scans and the CPU. Hopper's tensor cores want the weight as the *left*
operand of wgmma held in registers (the swap-AB form: yᵀ = Wᵀ · x̃ᵀ, so that N fills wgmma's 64-row M side and
the few rows of x fill its narrow N side, down to 8 at decode), unpacked with as few instructions as
possible. So the prepared codes are uint16 words, four codes each, in blocks of K_BLOCK = 64 stored rows:

    codes[b, n, c] = Σ_j q[64b + 16j + c, n] << 4j      shape [K/64, Np, 16] uint16, j = 0..3, c = 0..15

- per block, an output feature's 16 words are 32 contiguous bytes, and a block's rows of all N features are
  contiguous: a TMA box [bk/64, bn, 16] is bk/64 runs of bn·32 bytes;
- Mosaic GPU holds a [bn, 16] uint16 array in the wgmma register layout as pairs of row neighbours, one
  32-bit register each (eight codes). Nibble j of both halves at once is `(r >> 4j) & 0x000F000F |
  0x43004300`: the bf16 pattern of 128 with the code in its low mantissa bits, i.e. exactly 128 + q. One SHF
  and one LOP3 per two weights (no SHF for j = 0), and the four nibbles of a block are the block's four wgmma
  K steps of 16 (columns 16j .. 16j + 15 of the [bn, 64] A operand);
- the codes are unsigned (q, not q − 8): the tensor core sees 128 + q, and the bias goes into the
  zero-point term;
- N padded to a multiple of `N_ALIGN` with zero codes (whose columns the kernel computes and drops), so every
  weight has whole column tiles; K must be a multiple of K_BLOCK.
The zero point never enters the kernel's inner loop: per group g, with the weight as the tensor core sees it
(q + d, d = 128, or d = −8 for float32 activations where the kernel subtracts 136 first),
    Σ_{r∈g} x̃_r s_g (q_r − z_g) = s_g · (Σ_r x̃_r (q_r + d)) − s_g · (z_g + d) · Σ_r x̃_r,
a rank-1 correction from the activation's group sums, applied to the small [bn, M] product once per group.
The scales and zero points are also prepared, once, as the kernel reads them: `planes: [G, 2, Np]` in the
scales' dtype (float32, bfloat16 or float16), plane 0 the scales s, plane 1 the zero-point term z + PLANE_BIAS
(z + 128: the zero point, or the symmetric zero 2**(bits-1) for a symmetric weight, plus the bias of the bf16
codes 128 + q; 128..143 are exact in every float dtype), N padded with zeros. One TMA box of [groups of a K
step, 2, bn] brings a step's scales and zero-point terms; with bf16/f16 activations (d = 128) the kernel uses
them as they are, with float32 ones (d = −8) it adds d − 128. So a call reads 2·itemsize(s) bytes per
(group, column) beside the 64 bytes of codes of a 128-row group, and runs no XLA kernel over the weight.
The canonical scales, zero points, act-order permutation and AWQ activation scales stay in the prepared
weight too (small arrays): the scales are the differentiable leaf. `planes` is derived from them (the kernel's
custom VJP sends the scale gradient to `scales` and a zero cotangent to `planes`), so a weight whose scales
change is prepared again (`prepare`, or `PreparedCache`, which reuses the codes and rebuilds the planes).

Preparing and caching
---------------------
`prepare(w)` builds a `PreparedInt4Weight` (a pytree; traceable, so it also works on traced weights inside jit
or vmap). `cached_prepare(w)` returns the same prepared object for the same concrete weight, keyed on the
identity of `w.packed` (a weak reference: the entry goes when the canonical array is freed), so
`kernels.int4_matmul(x, w)` prepares a weight once however often it is called eagerly or with the weight
closed over by jit. A weight passed to a jitted function as an argument is a tracer: it is prepared inside
that program on every call, so a serving loop should call `prepare(w)` once and pass the prepared weight.
`to_int4_weight(pw)` (and `unprepare_codes`) go back to the canonical layout exactly.

Axes: K input features (stored row order), N output features (Np padded), G groups.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.memo import IdentityMemo
from quant.format import Int4Weight, pack_int4

TARGETS = ("mosaic_gpu",)
N_ALIGN = 64  # the rows of one wgmma: column tiles are 64 or 128 output features
K_BLOCK = 64  # stored rows per block of words: four wgmma K steps of 16
WORDS = 16  # uint16 words per row of a block (one wgmma K step: 16 columns)
NIBBLES = 4  # codes per word: the block's four wgmma K steps
CODE_OFFSET = 8  # the symmetric zero point of the 4-bit container
SUPPORTED_BITS = (3, 4)  # the 4-bit container
PLANE_BIAS = 128  # added to the zero points in `planes`: the bias of the bf16 codes 128 + q


@jax.tree_util.register_pytree_node_class
class PreparedInt4Weight:
    """A `[K, N]` INT4 weight in the Mosaic GPU kernel's layout (module docstring).

    Leaves: `codes: [K/64, Np, 16] uint16` (four codes a word, N padded to a multiple of N_ALIGN),
    `scales: [G, N] float`, `zeros: [G, N] uint8 | None`, `perm: [K] int32 | None`, `act_scales: [K] float |
    None` (these four exactly as in the canonical Int4Weight), `planes: [G, 2, Np]` in the scales' dtype
    (the scales and the zero-point terms z + 128 as the kernel reads them; `prepare_planes`, computed from
    the scales and zeros when not given). Static: `bits`, `group_size`, `n` (the real N), `target`.
    """

    __slots__ = (
        "act_scales",
        "bits",
        "codes",
        "group_size",
        "n",
        "perm",
        "planes",
        "scales",
        "target",
        "zeros",
    )

    def __init__(
        self,
        codes,
        scales,
        zeros,
        perm,
        act_scales,
        planes=None,
        *,
        bits: int,
        group_size: int,
        n: int,
        target: str = "mosaic_gpu",
    ):
        if planes is None:
            planes = prepare_planes(scales, zeros, bits=bits, np_=int(codes.shape[-2]))
        self.codes, self.scales, self.zeros, self.perm, self.act_scales, self.planes = (
            codes,
            scales,
            zeros,
            perm,
            act_scales,
            planes,
        )
        self.bits, self.group_size, self.n, self.target = int(bits), int(group_size), int(n), target

    def tree_flatten(self):
        return (self.codes, self.scales, self.zeros, self.perm, self.act_scales, self.planes), (
            self.bits,
            self.group_size,
            self.n,
            self.target,
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.codes, obj.scales, obj.zeros, obj.perm, obj.act_scales, obj.planes = children
        obj.bits, obj.group_size, obj.n, obj.target = aux
        return obj

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): the logical weight's shape (N unpadded)."""
        return int(self.codes.shape[-3]) * K_BLOCK, self.n

    @property
    def num_groups(self) -> int:
        return self.shape[0] // self.group_size

    @property
    def sym(self) -> bool:
        return self.zeros is None

    def __repr__(self) -> str:
        k, n = self.shape
        return (
            f"PreparedInt4Weight([K={k}, N={n}], target={self.target}, bits={self.bits}, "
            f"group_size={self.group_size}, {'sym' if self.sym else 'asym'})"
        )


def padded_n(n: int) -> int:
    return -(-n // N_ALIGN) * N_ALIGN


def prepare_codes(packed: jax.Array) -> jax.Array:
    """Canonical `packed: [K/2, N] uint8` -> prepared `codes: [K/64, Np, 16] uint16` (module docstring: word
    c of block b, row n holds q[64b + 16j + c, n] in bits 4j..4j+3, N padded with zero codes). Traceable
    (jnp); one pass over the weight. ValueError unless K is a multiple of K_BLOCK."""
    r, n = packed.shape
    if (2 * r) % K_BLOCK:
        raise ValueError(f"w has K={2 * r} rows; the prepared layout needs a multiple of {K_BLOCK}")
    packed = jnp.asarray(packed)
    q = jnp.stack([packed & 0xF, packed >> 4], axis=1).reshape(2 * r, n).astype(jnp.uint16)  # [K, N]
    np_ = padded_n(n)
    if np_ != n:
        q = jnp.pad(q, ((0, 0), (0, np_ - n)))
    q = q.reshape(2 * r // K_BLOCK, NIBBLES, WORDS, np_)  # [K/64, j, c, Np]
    words = q[:, 0] | (q[:, 1] << 4) | (q[:, 2] << 8) | (q[:, 3] << 12)  # [K/64, c, Np]
    return words.transpose(0, 2, 1)


def prepare_planes(scales: jax.Array, zeros: jax.Array | None, *, bits: int, np_: int) -> jax.Array:
    """Canonical `scales: [G, N] float`, `zeros: [G, N] uint8 | None` -> `planes: [G, 2, Np]` in the scales'
    dtype: plane 0 the scales, plane 1 the zero-point term z + PLANE_BIAS (z = 2**(bits-1) when `zeros` is
    None), N padded to `np_` with zeros. Exact (128..143 are exact in float16 and bfloat16). Traceable."""
    scales = jnp.asarray(scales)
    dtype = scales.dtype
    zero = jnp.full(scales.shape, 1 << (bits - 1), jnp.int32) if zeros is None else jnp.asarray(zeros)
    z = (zero.astype(jnp.int32) + PLANE_BIAS).astype(dtype)
    planes = jnp.stack([scales, z], axis=-2)  # [G, 2, N]
    n = scales.shape[-1]
    if np_ != n:
        planes = jnp.pad(planes, ((0, 0), (0, 0), (0, np_ - n)))
    return planes


def unprepare_codes(codes: jax.Array, n: int) -> jax.Array:
    """Prepared `codes: [K/64, Np, 16] uint16` -> canonical `packed: [K/2, N] uint8` (the inverse of
    prepare_codes)."""
    words = jnp.asarray(codes)[:, :n].transpose(0, 2, 1)  # [K/64, c, N]
    q = jnp.stack([(words >> (4 * j)) & 0xF for j in range(NIBBLES)], axis=1)  # [K/64, j, c, N]
    return pack_int4(q.reshape(-1, n).astype(jnp.uint8))


def prepare(w: Int4Weight, target: str = "mosaic_gpu") -> PreparedInt4Weight:
    """The prepared form of a canonical weight for `target` ("mosaic_gpu"). Bits 4 and 3 (the 4-bit
    container); a ValueError naming the argument otherwise. Traceable."""
    if isinstance(w, PreparedInt4Weight):
        return w
    _check_preparable(w, target)
    return _with_codes(prepare_codes(w.packed), w, target)


def _check_preparable(w: Any, target: str) -> None:
    if not isinstance(w, Int4Weight):
        raise ValueError(f"w must be a quant.Int4Weight, got {type(w).__name__}")
    if target not in TARGETS:
        raise ValueError(f"target={target!r} must be one of {TARGETS}")
    if w.bits not in SUPPORTED_BITS:
        raise ValueError(f"w.bits={w.bits}: the prepared layout holds the 4-bit container (bits 3 and 4)")
    if w.packed.ndim != 2:
        raise ValueError(f"w.packed has shape {tuple(w.packed.shape)}; prepare one [K/2, N] weight at a time")
    if not jnp.issubdtype(w.scales.dtype, jnp.floating):
        raise ValueError(f"w.scales.dtype={w.scales.dtype} must be a float dtype")


def _with_codes(codes: jax.Array, w: Int4Weight, target: str) -> PreparedInt4Weight:
    """The prepared weight of already prepared `codes` with w's scales, zero points, perm and AWQ scales."""
    return PreparedInt4Weight(
        codes,
        w.scales,
        w.zeros,
        w.perm,
        w.act_scales,
        bits=w.bits,
        group_size=w.group_size,
        n=w.shape[1],
        target=target,
    )


def to_int4_weight(pw: PreparedInt4Weight) -> Int4Weight:
    """The canonical Int4Weight of a prepared weight (exact; traceable)."""
    packed = unprepare_codes(pw.codes, pw.n)
    return Int4Weight.tree_unflatten(
        (pw.bits, pw.group_size), (packed, pw.scales, pw.zeros, pw.perm, pw.act_scales)
    )


class PreparedCache:
    """Prepared weights keyed on the identity of a concrete canonical `packed` array, held by weak reference
    (an entry goes when the canonical array is freed). Traced weights are prepared and not cached."""

    def __init__(self) -> None:
        self._memos = {target: IdentityMemo() for target in TARGETS}

    def __len__(self) -> int:
        return sum(len(m) for m in self._memos.values())

    def get(self, w: Int4Weight, target: str = "mosaic_gpu") -> PreparedInt4Weight:
        if target not in self._memos or any(
            isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(w)
        ):
            return prepare(w, target)
        pw = self._memos[target].get((w.packed,), lambda: prepare(w, target))
        if (
            pw.scales is w.scales
            and pw.zeros is w.zeros
            and pw.perm is w.perm
            and pw.act_scales is w.act_scales
            and pw.group_size == w.group_size
        ):
            return pw
        # Same codes, other small leaves (e.g. new scales): reuse the prepared codes, rebuild the planes.
        _check_preparable(w, target)
        return _with_codes(pw.codes, w, target)


# The process-wide cache behind `cached_prepare` (the one piece of mutable state of the INT4 package: the
# transparent `int4_matmul(x, w)` path needs to find a weight's prepared form again).
_CACHE = PreparedCache()


def cached_prepare(w: Int4Weight, target: str = "mosaic_gpu") -> PreparedInt4Weight:
    """`prepare(w, target)`, once per concrete weight (see PreparedCache)."""
    return _CACHE.get(w, target)


def codes_in_stored_order(pw: PreparedInt4Weight) -> np.ndarray:
    """The codes `[K, N] uint8` a prepared weight holds (NumPy), in stored row order."""
    words = np.asarray(pw.codes)[:, : pw.n].transpose(0, 2, 1)  # [K/64, c, N]
    q = np.stack([(words >> (4 * j)) & 0xF for j in range(NIBBLES)], axis=1)  # [K/64, j, c, N]
    return q.reshape(-1, pw.n).astype(np.uint8)
