"""`Int4Weight`: a quantized linear weight in the packed layout the INT4 matmul reads.

What it stands for
------------------
A weight `W: [K, N]` (in, out; the layer computes `y = x @ W`) is stored as unsigned integer codes
`q[k, n]`, one scale and one zero point per (group, output column), and optional per-input-channel
activation scales `s[k]` from AWQ:

    W_eff[k, n] = scales[g(k), n] * (q[k, n] - zeros[g(k), n]) / s[k]

`g(k)` is the group of input channel `k` (`group_size` consecutive rows of the stored layout share a
group), `zeros` is `2 ** (bits - 1)` everywhere when the weight is symmetric (`zeros=None`, GPTQ's
`(maxq + 1) / 2`), and `s` is 1 when there are no activation scales. The matmul applies `s` to `x`
(`y = (x / s) @ W_q`, AWQ's convention: AWQ quantizes `W * s` and divides the activations by `s`).
`Int4Weight.dequantize()` folds everything back into one float32 `[K, N]` matrix, so that
`x @ qw.dequantize()` is what the quantized layer computes.

Packed layout (bits = 4, the focus)
-----------------------------------
`packed: [K / 2, N] uint8`. Byte `packed[i, n]` holds two vertically adjacent codes of column `n`:

    bits 0..3 (low nibble)  = q[2 i,     n]    (even input channel)
    bits 4..7 (high nibble) = q[2 i + 1, n]    (odd input channel)

so `q[2i] = packed[i] & 0xF` and `q[2i+1] = packed[i] >> 4`. Why this layout, for the kernel's sake:
- Unpacking is one shift and one mask per byte, producing integer codes; no float conversion is needed
  before the group scale is applied (converting a whole 16M-element matrix to float costs more than the
  float32 matmul on our CPU; nibble shift/mask costs ~1 ms).
- Rows stay rows: a block of input channels `[k0, k0 + bk)` (k0, bk even) is the contiguous byte range
  `packed[k0/2 : (k0+bk)/2]`, so a K-blocked dequantize-then-dot reads whole cache lines, and a
  quantization group (an even number of rows) is a contiguous slab of `group_size / 2` byte rows.
- A kernel need not even interleave the two nibbles: `x @ W_blk == x[:, 0::2] @ lo + x[:, 1::2] @ hi`.
- `N` is the contiguous axis, like the float weight and the scales, so the per-column scale and zero
  broadcast along rows without any transpose.
Other widths use the same row-packing rule with `per_byte = 8 // width` rows per byte, row
`per_byte * i + j` in bits `width * j .. width * j + width - 1` of `packed[i]`:

    bits=2: width 2, 4 rows per byte, packed [K/4, N]
    bits=3: stored in the 4-bit container (width 4; codes 0..7), packed [K/2, N]; one kernel serves both
    bits=4: width 4, 2 rows per byte, packed [K/2, N]
    bits=8: width 8, 1 row per byte,  packed [K, N] (the codes themselves)

Act-order (GPTQ `desc_act`)
---------------------------
With act-order, a group is a set of input channels scattered over K (the checkpoint's `g_idx[k]` names
the group of channel `k`). Gathering rows per call would cost a matmul's worth of memory traffic, so the
rows are reordered once, when the weight is built or loaded: the stored codes are the rows
`perm[0], perm[1], ...` of the input-order codes, and `g(stored row r) = r // group_size` again. The
matmul permutes the (small) activation once: `y = x[:, perm] @ W_stored`. `perm` is canonical: the stable
argsort of `g_idx` (within a group, rows keep increasing input-channel order), so `g_idx <-> perm`
round-trips exactly, and `perm=None` whenever `g_idx` is the trivial `k // group_size`.

Axes: `K` input features (rows, the reduction axis of `x @ W`), `N` output features, `G = K / group_size`
groups, `R = K / per_byte` packed rows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
# Dtypes the quantizers round scales to: float16 (the AutoGPTQ, GPTQModel and AutoAWQ layouts) or float32.
SCALE_DTYPES = ("float16", "float32")
# Bits per stored field: 3-bit codes live in a 4-bit container so they share the INT4 layout.
_FIELD_WIDTH = {2: 2, 3: 4, 4: 4, 8: 8}


def validate_bits(bits: Any) -> int:
    """`bits` must be one of SUPPORTED_BITS; returns it as an int."""
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")
    return int(bits)


def codes_per_byte(bits: int) -> int:
    """How many codes one byte of the packed layout holds (4, 2, 2, 1 for bits 2, 3, 4, 8)."""
    return 8 // _FIELD_WIDTH[validate_bits(bits)]


def max_code(bits: int) -> int:
    """The largest code, `2**bits - 1` (GPTQ's `maxq`)."""
    return (1 << validate_bits(bits)) - 1


def symmetric_zero(bits: int) -> int:
    """The zero point of a symmetric grid: `2**(bits-1)`, GPTQ's `(maxq + 1) / 2`."""
    return 1 << (validate_bits(bits) - 1)


def validate_group_size(group_size: Any, k: int, *, name: str = "group_size") -> int:
    """`group_size` must divide K (or be -1, meaning K: one group per column); returns the resolved size."""
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer):
        raise ValueError(f"{name}={group_size!r} must be an int (or -1 for per-channel)")
    group_size = int(group_size)
    if group_size == -1:
        return k
    if group_size <= 0:
        raise ValueError(f"{name}={group_size} must be positive, or -1 for per-channel")
    if k % group_size:
        raise ValueError(f"K={k} (input features) is not divisible by {name}={group_size}")
    return group_size


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _xp(x: Any):
    return jnp if isinstance(x, jax.Array) else np


def pack_codes(codes: Any, bits: int = 4) -> Any:
    """Pack integer codes `[K, N]` into the row-packed layout `[K / per_byte, N] uint8` (see module doc).

    NumPy in, NumPy out; JAX in, JAX out (traceable). Concrete inputs are checked to lie in [0, 2**bits).
    """
    bits = validate_bits(bits)
    xp = _xp(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [K, N], got shape {tuple(codes.shape)}")
    if not xp.issubdtype(codes.dtype, xp.integer):
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    k, n = codes.shape
    per = codes_per_byte(bits)
    if k % per:
        raise ValueError(f"K={k} rows of codes is not divisible by the packing factor {per} for bits={bits}")
    if not _is_tracer(codes) and codes.size:
        lo, hi = int(np.asarray(codes).min()), int(np.asarray(codes).max())
        if lo < 0 or hi > max_code(bits):
            raise ValueError(f"codes lie in [{lo}, {hi}], outside [0, {max_code(bits)}] for bits={bits}")
    width = _FIELD_WIDTH[bits]
    c = codes.astype(xp.uint8).reshape(k // per, per, n)
    out = c[:, 0, :]
    for j in range(1, per):
        out = out | (c[:, j, :] << xp.uint8(width * j))
    return out


def unpack_codes(packed: Any, bits: int = 4) -> Any:
    """Unpack `[K / per_byte, N] uint8` back into codes `[K, N] uint8` (inverse of `pack_codes`)."""
    bits = validate_bits(bits)
    xp = _xp(packed)
    if packed.ndim != 2:
        raise ValueError(f"packed must be 2-D [R, N], got shape {tuple(packed.shape)}")
    if packed.dtype != xp.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    per = codes_per_byte(bits)
    if per == 1:
        return packed
    width = _FIELD_WIDTH[bits]
    mask = xp.uint8((1 << width) - 1)
    r, n = packed.shape
    parts = [(packed >> xp.uint8(width * j)) & mask for j in range(per)]
    return xp.stack(parts, axis=1).reshape(r * per, n)


def pack_int4(codes: Any) -> Any:
    """`codes: [K, N]` in 0..15 -> `[K/2, N] uint8`, even row in the low nibble, odd row in the high one."""
    return pack_codes(codes, 4)


def unpack_int4(packed: Any) -> Any:
    """`packed: [K/2, N] uint8` -> codes `[K, N] uint8`; `q[2i] = p[i] & 0xF`, `q[2i+1] = p[i] >> 4`."""
    return unpack_codes(packed, 4)


def perm_from_g_idx(g_idx: Any, group_size: int) -> np.ndarray | None:
    """The canonical row order for a `g_idx: [K]`: its stable argsort, or None when it is `k // group_size`.

    Every group must hold exactly `group_size` channels (what GPTQ act-order produces); otherwise the
    weight cannot be stored as contiguous groups and this raises.
    """
    g = np.asarray(g_idx)
    if g.ndim != 1 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"g_idx must be a 1-D integer array [K], got shape {g.shape} dtype {g.dtype}")
    k = g.shape[0]
    if k % group_size:
        raise ValueError(f"g_idx has K={k} entries, not divisible by group_size={group_size}")
    trivial = np.arange(k) // group_size
    if np.array_equal(g, trivial):
        return None
    counts = np.bincount(g.clip(0), minlength=k // group_size)
    if g.min() < 0 or g.max() >= k // group_size or np.any(counts != group_size):
        raise ValueError(
            f"g_idx must assign exactly group_size={group_size} channels to each of the "
            f"{k // group_size} groups (got group ids in [{g.min()}, {g.max()}], "
            f"counts {sorted(set(counts.tolist()))})"
        )
    return np.argsort(g, kind="stable").astype(np.int32)


def validate_int4_weight_inputs(
    packed: Any,
    scales: Any,
    zeros: Any,
    *,
    bits: int,
    group_size: int,
    perm: Any = None,
    act_scales: Any = None,
) -> tuple[int, int]:
    """Static checks of an Int4Weight's parts; returns (K, N). Values are checked when concrete."""
    bits = validate_bits(bits)
    if getattr(packed, "ndim", None) != 2:
        raise ValueError(f"packed must be 2-D [R, N] uint8, got shape {getattr(packed, 'shape', None)}")
    if packed.dtype != np.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    r, n = packed.shape
    k = r * codes_per_byte(bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer) or group_size <= 0:
        raise ValueError(f"group_size={group_size!r} must be a positive int")
    if k % group_size:
        raise ValueError(f"K={k} is not divisible by group_size={group_size}")
    g = k // group_size
    if getattr(scales, "ndim", None) != 2 or tuple(scales.shape) != (g, n):
        raise ValueError(f"scales must be [G, N] = [{g}, {n}], got shape {getattr(scales, 'shape', None)}")
    if not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"scales must be floating point, got {scales.dtype}")
    if zeros is not None:
        if getattr(zeros, "ndim", None) != 2 or tuple(zeros.shape) != (g, n):
            raise ValueError(f"zeros must be [G, N] = [{g}, {n}], got shape {getattr(zeros, 'shape', None)}")
        if zeros.dtype != np.uint8:
            raise ValueError(f"zeros must be uint8 (integer zero points), got {zeros.dtype}")
        if not _is_tracer(zeros) and zeros.size and int(np.asarray(zeros).max()) > max_code(bits):
            raise ValueError(f"zeros exceed the largest code {max_code(bits)} for bits={bits}")
    if perm is not None:
        if getattr(perm, "ndim", None) != 1 or tuple(perm.shape) != (k,):
            raise ValueError(f"perm must be [K] = [{k}], got shape {getattr(perm, 'shape', None)}")
        if not jnp.issubdtype(perm.dtype, jnp.integer):
            raise ValueError(f"perm must be integer, got {perm.dtype}")
        if not _is_tracer(perm) and not np.array_equal(np.sort(np.asarray(perm)), np.arange(k)):
            raise ValueError(f"perm must be a permutation of range(K={k})")
    if act_scales is not None:
        if getattr(act_scales, "ndim", None) != 1 or tuple(act_scales.shape) != (k,):
            raise ValueError(
                f"act_scales must be [K] = [{k}], got shape {getattr(act_scales, 'shape', None)}"
            )
        if not jnp.issubdtype(act_scales.dtype, jnp.floating):
            raise ValueError(f"act_scales must be floating point, got {act_scales.dtype}")
        if not _is_tracer(act_scales):
            a = np.asarray(act_scales, dtype=np.float64)
            if not np.all(np.isfinite(a)) or np.any(a == 0):
                raise ValueError("act_scales must be finite and nonzero")
    if not _is_tracer(scales) and not np.all(np.isfinite(np.asarray(scales, dtype=np.float64))):
        raise ValueError("scales contain NaN or Inf")
    return k, n


@jax.tree_util.register_pytree_node_class
class Int4Weight:
    """A quantized `[K, N]` weight (see the module docstring for the formula and the layout).

    Leaves (JAX arrays): `packed: [R, N] uint8`, `scales: [G, N] float`, `zeros: [G, N] uint8 | None`,
    `perm: [K] int32 | None` (stored row r is input channel perm[r]), `act_scales: [K] float | None`.
    Static (aux) data: `bits`, `group_size`.
    """

    __slots__ = ("act_scales", "bits", "group_size", "packed", "perm", "scales", "zeros")

    def __init__(
        self,
        packed: Any,
        scales: Any,
        zeros: Any = None,
        *,
        bits: int = 4,
        group_size: int,
        perm: Any = None,
        act_scales: Any = None,
    ):
        validate_int4_weight_inputs(
            packed, scales, zeros, bits=bits, group_size=group_size, perm=perm, act_scales=act_scales
        )

        def arr(x):
            return x if x is None or _is_tracer(x) else jnp.asarray(x)

        self.packed = arr(packed)
        self.scales = arr(scales)
        self.zeros = arr(zeros)
        self.perm = None if perm is None else arr(perm if _is_tracer(perm) else np.asarray(perm, np.int32))
        self.act_scales = arr(act_scales)
        self.bits = int(bits)
        self.group_size = int(group_size)

    # -- pytree protocol: leaves are the arrays, bits and group_size are static ----------------------
    def tree_flatten(self):
        children = (self.packed, self.scales, self.zeros, self.perm, self.act_scales)
        return children, (self.bits, self.group_size)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # Bypass __init__: under transformations the leaves may be placeholders, not arrays.
        obj = object.__new__(cls)
        obj.packed, obj.scales, obj.zeros, obj.perm, obj.act_scales = children
        obj.bits, obj.group_size = aux
        return obj

    # -- construction from codes in input-channel order -----------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: Any,
        scales: Any,
        zeros: Any = None,
        *,
        bits: int = 4,
        group_size: int,
        g_idx: Any = None,
        act_scales: Any = None,
    ) -> Int4Weight:
        """Build from `codes: [K, N]` in input-channel order and `scales`/`zeros: [G, N]` by group id.

        `g_idx: [K]` (group of each input channel) defaults to `k // group_size`; a non-trivial one is
        applied here, once: rows are stored in the canonical order `perm = argsort(g_idx, stable)`.
        """
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"codes must be 2-D [K, N], got shape {codes.shape}")
        perm = None if g_idx is None else perm_from_g_idx(g_idx, group_size)
        if g_idx is not None and len(np.asarray(g_idx)) != codes.shape[0]:
            raise ValueError(f"g_idx has {len(np.asarray(g_idx))} entries but codes have K={codes.shape[0]}")
        stored = codes if perm is None else codes[perm]
        if zeros is not None:
            zeros = np.asarray(zeros)
            if not np.issubdtype(zeros.dtype, np.integer):
                raise ValueError(f"zeros must be integer zero points, got {zeros.dtype}")
            if zeros.size and (zeros.min() < 0 or zeros.max() > max_code(bits)):
                raise ValueError(f"zeros lie outside [0, {max_code(bits)}] for bits={bits}")
            zeros = zeros.astype(np.uint8)
        return cls(
            pack_codes(stored, bits),
            scales,
            zeros,
            bits=bits,
            group_size=group_size,
            perm=perm,
            act_scales=act_scales,
        )

    # -- views ---------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(K, N)."""
        r, n = self.packed.shape
        return r * codes_per_byte(self.bits), n

    @property
    def num_groups(self) -> int:
        return self.shape[0] // self.group_size

    @property
    def sym(self) -> bool:
        return self.zeros is None

    def codes(self) -> jax.Array:
        """Codes `[K, N] uint8` in stored row order (row r is input channel perm[r])."""
        return unpack_codes(self.packed, self.bits)

    def codes_in_input_order(self) -> np.ndarray:
        """Codes `[K, N] uint8` indexed by input channel."""
        c = np.asarray(self.codes())
        if self.perm is None:
            return c
        out = np.empty_like(c)
        out[np.asarray(self.perm)] = c
        return out

    def zero_points(self) -> jax.Array:
        """Zero points `[G, N] uint8`, the implicit symmetric ones included."""
        if self.zeros is None:
            return jnp.full(self.scales.shape, symmetric_zero(self.bits), jnp.uint8)
        return self.zeros

    def g_idx(self) -> np.ndarray:
        """Group of each input channel, `[K] int32` (the checkpoints' `g_idx`)."""
        k = self.shape[0]
        stored_group = np.arange(k, dtype=np.int32) // self.group_size
        if self.perm is None:
            return stored_group
        g = np.empty(k, np.int32)
        g[np.asarray(self.perm)] = stored_group
        return g

    def dequantize(self) -> jax.Array:
        """The effective float32 weight `[K, N]` in input-channel order, activation scales folded in."""
        k, n = self.shape
        g = self.num_groups
        q = self.codes().astype(jnp.float32).reshape(g, self.group_size, n)
        z = self.zero_points().astype(jnp.float32)[:, None, :]
        s = self.scales.astype(jnp.float32)[:, None, :]
        w = ((q - z) * s).reshape(k, n)
        if self.perm is not None:
            w = jnp.zeros_like(w).at[self.perm].set(w)
        if self.act_scales is not None:
            w = w / self.act_scales.astype(jnp.float32)[:, None]
        return w

    def __repr__(self) -> str:
        k, n = self.shape
        extras = [f"bits={self.bits}", f"group_size={self.group_size}", "sym" if self.sym else "asym"]
        if self.perm is not None:
            extras.append("act_order")
        if self.act_scales is not None:
            extras.append("act_scales")
        return f"Int4Weight([K={k}, N={n}], {', '.join(extras)})"


def dequantize_reference(qw: Int4Weight) -> np.ndarray:
    """NumPy float64 oracle of `Int4Weight.dequantize`, one input channel at a time from the formula."""
    k, n = qw.shape
    codes = np.asarray(qw.codes_in_input_order(), dtype=np.float64)
    g_idx = qw.g_idx()
    scales = np.asarray(qw.scales, dtype=np.float64)
    zeros = np.asarray(qw.zero_points(), dtype=np.float64)
    s = np.ones(k) if qw.act_scales is None else np.asarray(qw.act_scales, dtype=np.float64)
    out = np.empty((k, n))
    for row in range(k):
        g = g_idx[row]
        out[row] = scales[g] * (codes[row] - zeros[g]) / s[row]
    return out
