"""Checkpoint layouts of AutoGPTQ / GPTQModel and AutoAWQ, both directions, bit-exact; whole-model files.

Per-layer tensors (a PyTorch `Linear(in=K, out=N)`; the quantized weight is `[K, N]` as in tokenlab)
-------------------------------------------------------------------------------------------------------
GPTQ (`format="gptq"`, AutoGPTQ's v1, and `"gptq_v2"`, GPTQModel's), bits b in {2, 4, 8}, f = 32 / b
codes per int32 word:

    qweight: int32 [K / f, N]   bits b*j .. b*j+b-1 of word [r, n] = code of input channel f*r + j
    qzeros:  int32 [G, N / f]   bits b*j .. b*j+b-1 of word [g, c] = stored zero of column f*c + j
    scales:  float16 [G, N]
    g_idx:   int32 [K]          group of each input channel (k // group_size unless act-order)

v1 stores `zero - 1` in qzeros (its kernels add the 1 back); v2 stores the zero itself. Dequantization
is `scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])` in both.

AWQ (`format="awq"`, AutoAWQ's GEMM version), 4 bits only, with order = [0, 2, 4, 6, 1, 3, 5, 7]:

    qweight: int32 [K, N / 8]   nibble i (bits 4i..4i+3) of word [k, c] = code of column 8c + order[i]
    qzeros:  int32 [G, N / 8]   the zeros of [G, N], packed the same way (stored as is, no -1)
    scales:  float16 [G, N]

tokenlab's own layout (`format="tokenlab"`) stores `Int4Weight` as it is in memory: `qweight` is the
packed uint8 `[K / per_byte, N]` of `quant.format`, `scales` keep their dtype, `qzeros` is the uint8
`[G, N]` zero points (absent when symmetric), `g_idx` int32 `[K]` is present with act-order, and
`act_scales` `[K]` carries AWQ activation scales that were not folded.

Files: `save_checkpoint(dir, {name: Int4Weight}, format=...)` writes `dir/model.safetensors` with tensors
`<name>.qweight`, `<name>.qzeros`, `<name>.scales`, `<name>.g_idx` (and `<name>.act_scales`), then
`dir/quantize_config.json` with the fields those tools write (bits, group_size (-1: per-channel),
desc_act, sym, quant_method, checkpoint_format; AWQ: zero_point, q_group_size, w_bit, version). Each file
is written under a temporary name and renamed into place, so a crash never leaves a partial file.
`load_checkpoint(dir)` reads every `*.safetensors` in the directory with `safetensors.numpy` (no pickle);
given the path of a `.safetensors` file instead, it reads that file's directory (the whole checkpoint,
every shard). Every error names the file and what is wrong with it: a truncated or corrupt tensors file,
a config that is not JSON (with its line and column) or holds a bad value, a layer whose tensors do not
fit the config (the config's `group_size` and the one the tensors imply are both named).

Upstream quirks, handled
------------------------
- v1 cannot store a zero point of 0: `zero - 1 = -1` has no b-bit code. AutoGPTQ's packer ORs the
  sign-extended -1 into the word, setting every higher field of that word to all ones, and GPTQModel's
  v1 -> v2 conversion (adding 0x11111111 to the word) carries out of a field of all ones into its
  neighbour. So `to_autogptq(format="gptq")` raises on a zero of 0 (use "gptq_v2"), and
  `from_autogptq(format="gptq")` raises on a stored field of all ones, whose true zero cannot be
  recovered, instead of loading a silently shifted weight.
- The upstream layouts have no slot for per-input-channel activation scales (AutoAWQ folds them into the
  previous norm or linear layer before packing): a weight with `act_scales` raises, fold them first or
  use `format="tokenlab"`.
- Scales are float16 upstream. The quantizers round their scales to float16 before choosing codes
  (`scale_dtype`, float16 by default), so quantize -> save -> load gives back exactly the quantized
  weight, in every layout (the lab's own keeps float32 scales too, if asked for). Scales that float16
  cannot hold (a weight quantized with `scale_dtype=float32`, or a `fold_scales_into_linear` producer)
  are rounded on the way out with a warning, since the checkpoint then holds a slightly different weight;
  an overflow to inf raises. A checkpoint read back keeps float16 scales, so checkpoint -> Int4Weight ->
  checkpoint is exact too.
- AWQ has no g_idx: an act-order weight cannot be written as AWQ. AWQ always stores zeros: a symmetric
  weight is written with its implicit zeros (2**(bits-1)); pass `sym=True` on reading to get `zeros=None`
  back (checked). The same `sym` switch exists for GPTQ; `load_checkpoint` takes it from the config.
- The codes of act-order weights are written in input-channel order with their g_idx, as upstream
  expects; reading applies the g_idx once (`Int4Weight.from_codes`).

Axes: `K` input features, `N` output features, `G` groups, `f` codes per int32 word.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quant.format import (
    Int4Weight,
    codes_per_byte,
    max_code,
    symmetric_zero,
    unpack_codes,
    validate_bits,
)

GPTQ_FORMATS = ("gptq", "gptq_v2")
FORMATS = (*GPTQ_FORMATS, "awq", "tokenlab")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Bits the GPTQ int32 layout packs as whole fields; AutoGPTQ's 3-bit layout spans words and is not read.
GPTQ_BITS = (2, 4, 8)
CONFIG_NAME = "quantize_config.json"
TENSORS_NAME = "model.safetensors"


def validate_format(format: Any, allowed: tuple[str, ...] = FORMATS) -> str:
    if format not in allowed:
        raise ValueError(f"format={format!r} is not known; expected one of {allowed}")
    return format


# -- int32 word packing ------------------------------------------------------------------------------


def _pack_words(fields: np.ndarray, bits: int, axis: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Pack b-bit fields along `axis` into int32 words: field `order[j]` of each run goes to bits b*j."""
    f = 32 // bits
    fields = np.asarray(fields).astype(np.uint32)
    moved = np.moveaxis(fields, axis, -1)
    lead, m = moved.shape[:-1], moved.shape[-1]
    if m % f:
        raise ValueError(f"axis of length {m} is not divisible by {f} fields per int32 word")
    runs = moved.reshape(*lead, m // f, f)
    order = tuple(range(f)) if order is None else order
    words = np.zeros((*lead, m // f), np.uint32)
    for j, src in enumerate(order):
        words |= runs[..., src] << np.uint32(bits * j)
    return np.moveaxis(words, -1, axis).view(np.int32)


def _unpack_words(
    words: np.ndarray, bits: int, axis: int, order: tuple[int, ...] | None = None
) -> np.ndarray:
    f = 32 // bits
    moved = np.moveaxis(np.asarray(words).view(np.uint32), axis, -1)
    order = tuple(range(f)) if order is None else order
    mask = np.uint32((1 << bits) - 1)
    out = np.empty((*moved.shape, f), np.uint32)
    for j, dst in enumerate(order):
        out[..., dst] = (moved >> np.uint32(bits * j)) & mask
    out = out.reshape(*moved.shape[:-1], moved.shape[-1] * f)
    return np.moveaxis(out, -1, axis)


# -- validation helpers -------------------------------------------------------------------------------


def _tensor(
    tensors: Mapping[str, Any], key: str, *, ndim: int, dtypes: tuple, prefix: str = ""
) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"checkpoint tensor {prefix + key!r} is missing")
    t = np.asarray(tensors[key])
    if t.ndim != ndim:
        raise ValueError(f"checkpoint tensor {prefix + key!r} must be {ndim}-D, got shape {t.shape}")
    if t.dtype not in [np.dtype(d) for d in dtypes]:
        raise ValueError(f"checkpoint tensor {prefix + key!r} has dtype {t.dtype}; expected one of {dtypes}")
    return t


def _expect_shape(t: np.ndarray, shape: tuple[int, ...], key: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}; expected {tuple(shape)}")


def _scales_f16(qw: Int4Weight, format: str) -> np.ndarray:
    s = np.asarray(qw.scales)
    s16 = s.astype(np.float16)
    if not np.all(np.isfinite(s16)):
        raise ValueError(f"scales overflow float16, the dtype of format={format!r} checkpoints")
    if s.dtype != np.float16 and not np.array_equal(s16.astype(s.dtype), s):
        warnings.warn(
            f"format={format!r} stores float16 scales and this weight's {s.dtype} scales are not float16 "
            "values: they are rounded, so the checkpoint holds a slightly different weight. Quantize with "
            "scale_dtype=np.float16 (the default) for an exact checkpoint, or save with format='tokenlab'",
            RuntimeWarning,
            stacklevel=3,
        )
    return s16


def _refuse_act_scales(qw: Int4Weight, format: str) -> None:
    if qw.act_scales is not None:
        raise ValueError(
            f"this weight carries per-input-channel act_scales, which format={format!r} has no slot for; "
            "fold them into the preceding layer (W_eff = qw.dequantize()) or save with format='tokenlab'"
        )


def _zeros_from_stored(zeros: np.ndarray, *, bits: int, sym: bool, key: str) -> np.ndarray | None:
    if not sym:
        return zeros.astype(np.uint8)
    if not np.all(zeros == symmetric_zero(bits)):
        raise ValueError(f"sym=True but {key} are not all {symmetric_zero(bits)} (the symmetric zero)")
    return None


# -- GPTQ ----------------------------------------------------------------------------------------------


def to_autogptq(qw: Int4Weight, *, format: str = "gptq") -> dict[str, np.ndarray]:
    """`qw` as AutoGPTQ (`"gptq"`, v1) or GPTQModel (`"gptq_v2"`) tensors: qweight, qzeros, scales, g_idx."""
    validate_format(format, GPTQ_FORMATS)
    if qw.bits not in GPTQ_BITS:
        raise ValueError(f"bits={qw.bits} has no whole-field GPTQ int32 layout; supported: {GPTQ_BITS}")
    _refuse_act_scales(qw, format)
    k, n = qw.shape
    f = 32 // qw.bits
    if k % f or n % f:
        raise ValueError(f"K={k} and N={n} must be divisible by {f} for the {qw.bits}-bit GPTQ layout")
    zeros = np.asarray(qw.zero_points()).astype(np.int64)
    if format == "gptq":
        if np.any(zeros == 0):
            g, col = np.argwhere(zeros == 0)[0]
            raise ValueError(
                f"GPTQ v1 stores zero - 1 and cannot hold the zero point 0 (group {g}, column {col}); "
                "upstream packers wrap it and corrupt neighbouring zeros. Use format='gptq_v2'"
            )
        zeros = zeros - 1
    return {
        "qweight": _pack_words(qw.codes_in_input_order(), qw.bits, axis=0),
        "qzeros": _pack_words(zeros, qw.bits, axis=1),
        "scales": _scales_f16(qw, format),
        "g_idx": qw.g_idx().astype(np.int32),
    }


def from_autogptq(
    tensors: Mapping[str, Any],
    *,
    format: str = "gptq",
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool = False,
) -> Int4Weight:
    """Read AutoGPTQ/GPTQModel tensors (see `to_autogptq`) back into an `Int4Weight`.

    `bits` is inferred from g_idx when present (else 4); `group_size` from K / G unless given (then
    checked). `sym=True` checks that every zero is 2**(bits-1) and returns `zeros=None`.
    """
    validate_format(format, GPTQ_FORMATS)
    qweight = _tensor(tensors, "qweight", ndim=2, dtypes=("int32", "uint32"))
    qzeros = _tensor(tensors, "qzeros", ndim=2, dtypes=("int32", "uint32"))
    scales = _tensor(tensors, "scales", ndim=2, dtypes=("float16", "bfloat16", "float32"))
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        g_idx = _tensor(tensors, "g_idx", ndim=1, dtypes=("int32", "int64"))
        k = g_idx.shape[0]
        if (32 * qweight.shape[0]) % k or (32 * qweight.shape[0]) // k not in GPTQ_BITS:
            raise ValueError(f"qweight has {qweight.shape[0]} rows, which fits no GPTQ bit width for K={k}")
        inferred = 32 * qweight.shape[0] // k
        if bits is not None and validate_bits(bits) != inferred:
            raise ValueError(f"bits={bits} disagrees with qweight/g_idx shapes, which imply bits={inferred}")
        bits = inferred
    else:
        bits = 4 if bits is None else validate_bits(bits)
        if bits not in GPTQ_BITS:
            raise ValueError(f"bits={bits} has no whole-field GPTQ int32 layout; supported: {GPTQ_BITS}")
        k = qweight.shape[0] * 32 // bits
    f = 32 // bits
    n = qweight.shape[1]
    _expect_shape(qweight, (k // f, n), "qweight")
    g = scales.shape[0]
    _expect_shape(scales, (g, n), "scales")
    _expect_shape(qzeros, (g, n // f), "qzeros")
    if g == 0 or k % g:
        raise ValueError(f"scales have G={g} groups, which does not divide K={k}")
    gs = k // g
    if group_size is not None and group_size not in (gs, -1 if g == 1 else gs):
        raise ValueError(
            f"group_size={group_size} disagrees with the tensors: scales have G={g} groups for K={k} input "
            f"channels, which imply group_size={-1 if g == 1 else gs}"
        )
    codes = _unpack_words(qweight, bits, axis=0)
    zeros = _unpack_words(qzeros, bits, axis=1).astype(np.int64)
    if format == "gptq":
        wrapped = zeros == max_code(bits)
        if np.any(wrapped):
            gi, col = np.argwhere(wrapped)[0]
            raise ValueError(
                f"GPTQ v1 qzeros hold an all-ones field (group {gi}, column {col}): the zero - 1 of a zero "
                "point 0, wrapped by the packer, which also overwrote the higher fields of its word; the "
                "true zeros cannot be recovered"
            )
        zeros = zeros + 1
    if not np.all(np.isfinite(scales.astype(np.float32))):
        raise ValueError("checkpoint tensor 'scales' contains NaN or Inf")
    return Int4Weight.from_codes(
        codes,
        scales,
        _zeros_from_stored(zeros, bits=bits, sym=sym, key="qzeros"),
        bits=bits,
        group_size=gs,
        g_idx=g_idx,
    )


# -- AWQ -----------------------------------------------------------------------------------------------


def to_autoawq(qw: Int4Weight) -> dict[str, np.ndarray]:
    """`qw` as AutoAWQ GEMM tensors: qweight int32 [K, N/8], qzeros int32 [G, N/8], scales float16 [G, N]."""
    if qw.bits != 4:
        raise ValueError(f"bits={qw.bits}: the AWQ GEMM layout is 4-bit only")
    _refuse_act_scales(qw, "awq")
    if qw.perm is not None:
        raise ValueError("this weight has an act-order g_idx, which the AWQ layout cannot store")
    n = qw.shape[1]
    if n % 8:
        raise ValueError(f"N={n} must be divisible by 8 for the AWQ GEMM layout")
    return {
        "qweight": _pack_words(np.asarray(qw.codes()), 4, axis=1, order=AWQ_ORDER),
        "qzeros": _pack_words(np.asarray(qw.zero_points()), 4, axis=1, order=AWQ_ORDER),
        "scales": _scales_f16(qw, "awq"),
    }


def from_autoawq(tensors: Mapping[str, Any], group_size: int, *, sym: bool = False) -> Int4Weight:
    """Read AutoAWQ GEMM tensors (see `to_autoawq`); `group_size` -1 means per-channel."""
    qweight = _tensor(tensors, "qweight", ndim=2, dtypes=("int32", "uint32"))
    qzeros = _tensor(tensors, "qzeros", ndim=2, dtypes=("int32", "uint32"))
    scales = _tensor(tensors, "scales", ndim=2, dtypes=("float16", "bfloat16", "float32"))
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer):
        raise ValueError(f"group_size={group_size!r} must be an int")
    gs = k if group_size == -1 else int(group_size)
    if gs <= 0 or k % gs:
        raise ValueError(f"K={k} (qweight rows) is not divisible by group_size={group_size}")
    g = scales.shape[0]
    if g != k // gs and g > 0 and k % g == 0 and scales.shape[1] == n:
        raise ValueError(
            f"group_size={group_size} disagrees with the tensors: scales have G={g} groups for K={k} input "
            f"channels, which imply group_size={-1 if g == 1 else k // g}"
        )
    _expect_shape(scales, (k // gs, n), "scales")
    _expect_shape(qzeros, (k // gs, n // 8), "qzeros")
    if not np.all(np.isfinite(scales.astype(np.float32))):
        raise ValueError("checkpoint tensor 'scales' contains NaN or Inf")
    codes = _unpack_words(qweight, 4, axis=1, order=AWQ_ORDER)
    zeros = _unpack_words(qzeros, 4, axis=1, order=AWQ_ORDER)
    return Int4Weight.from_codes(
        codes, scales, _zeros_from_stored(zeros, bits=4, sym=sym, key="qzeros"), bits=4, group_size=gs
    )


# -- tokenlab's own layout ------------------------------------------------------------------------------


def _to_tokenlab(qw: Int4Weight) -> dict[str, np.ndarray]:
    out = {"qweight": np.asarray(qw.packed), "scales": np.asarray(qw.scales)}
    if qw.zeros is not None:
        out["qzeros"] = np.asarray(qw.zeros)
    if qw.perm is not None:
        out["g_idx"] = qw.g_idx()
    if qw.act_scales is not None:
        out["act_scales"] = np.asarray(qw.act_scales)
    return out


def _from_tokenlab(tensors: Mapping[str, Any], *, bits: int, prefix: str = "") -> Int4Weight:
    qweight = _tensor(tensors, "qweight", ndim=2, dtypes=("uint8",), prefix=prefix)
    scales = _tensor(tensors, "scales", ndim=2, dtypes=("float16", "bfloat16", "float32"), prefix=prefix)
    k, n = qweight.shape[0] * codes_per_byte(bits), qweight.shape[1]
    g = scales.shape[0]
    if g == 0 or k % g:
        raise ValueError(f"checkpoint tensor {prefix}scales has G={g} groups, which does not divide K={k}")
    _expect_shape(scales, (g, n), prefix + "scales")
    zeros = None
    if "qzeros" in tensors:
        zeros = _tensor(tensors, "qzeros", ndim=2, dtypes=("uint8",), prefix=prefix)
        _expect_shape(zeros, (g, n), prefix + "qzeros")
    g_idx = None
    if "g_idx" in tensors:
        g_idx = _tensor(tensors, "g_idx", ndim=1, dtypes=("int32", "int64"), prefix=prefix)
        _expect_shape(g_idx, (k,), prefix + "g_idx")
    act_scales = None
    if "act_scales" in tensors:
        act_scales = _tensor(
            tensors, "act_scales", ndim=1, dtypes=("float16", "bfloat16", "float32"), prefix=prefix
        )
        _expect_shape(act_scales, (k,), prefix + "act_scales")
    codes = unpack_codes(qweight, bits)
    if g_idx is not None:
        # The file stores rows already in the canonical order; recover input order for from_codes.
        perm = np.argsort(g_idx, kind="stable")
        unordered = np.empty_like(codes)
        unordered[perm] = codes
        codes = unordered
    return Int4Weight.from_codes(
        codes, scales, zeros, bits=bits, group_size=k // g, g_idx=g_idx, act_scales=act_scales
    )


# -- whole-model files ------------------------------------------------------------------------------------


def _config_group_size(qw: Int4Weight) -> int:
    return -1 if qw.num_groups == 1 else qw.group_size


def _config(weights: Mapping[str, Int4Weight], format: str) -> dict[str, Any]:
    first = next(iter(weights.values()))
    for name, qw in weights.items():
        for attr, value, ref in (
            ("bits", qw.bits, first.bits),
            ("group_size", _config_group_size(qw), _config_group_size(first)),
            ("sym", qw.sym, first.sym),
        ):
            if value != ref:
                raise ValueError(
                    f"weights[{name!r}] has {attr}={value} but others have {attr}={ref}; a checkpoint's "
                    "quantize_config.json holds one value for all weights"
                )
    bits, gs, sym = first.bits, _config_group_size(first), first.sym
    meta = {"quantizer": ["tokenlab"]}
    if format == "awq":
        return {
            "quant_method": "awq",
            "zero_point": not sym,
            "q_group_size": gs,
            "w_bit": bits,
            "version": "GEMM",
            "bits": bits,
            "group_size": gs,
            "meta": meta,
        }
    return {
        "bits": bits,
        "group_size": gs,
        "desc_act": any(qw.perm is not None for qw in weights.values()),
        "static_groups": False,
        "sym": sym,
        "true_sequential": True,
        "quant_method": "gptq" if format in GPTQ_FORMATS else "tokenlab",
        "checkpoint_format": format,
        "pack_dtype": "int32" if format in GPTQ_FORMATS else "uint8",
        "meta": meta,
    }


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_checkpoint(
    path: str | os.PathLike, weights: Mapping[str, Int4Weight], *, format: str = "gptq"
) -> None:
    """Write `{name: Int4Weight}` to the directory `path` as `model.safetensors` + `quantize_config.json`.

    `format`: "gptq" (AutoGPTQ v1), "gptq_v2" (GPTQModel), "awq" (AutoAWQ GEMM) or "tokenlab".
    All weights must share bits, group size (or all be per-channel) and symmetry. `path` is created if
    missing; a path that names a file (or ends in `.safetensors`) is refused. Scales that are not float16
    values are rounded, with a warning, by the float16 layouts (see the module docstring).
    """
    from safetensors.numpy import save_file

    validate_format(format)
    root = Path(path)
    if root.suffix == ".safetensors" or root.is_file():
        raise ValueError(
            f"path={str(root)!r} names a file; save_checkpoint writes a directory: pass the directory that "
            f"should hold {TENSORS_NAME} and {CONFIG_NAME}"
        )
    if not weights:
        raise ValueError("weights is empty: nothing to save")
    for name, qw in weights.items():
        if not isinstance(qw, Int4Weight):
            raise ValueError(f"weights[{name!r}] is a {type(qw).__name__}, not an Int4Weight")
    config = _config(weights, format)
    tensors: dict[str, np.ndarray] = {}
    for name, qw in weights.items():
        if format in GPTQ_FORMATS:
            layer = to_autogptq(qw, format=format)
        elif format == "awq":
            layer = to_autoawq(qw)
        else:
            layer = _to_tokenlab(qw)
        for key, t in layer.items():
            tensors[f"{name}.{key}"] = np.ascontiguousarray(t)
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / TENSORS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))

    def write_config(p: Path) -> None:
        p.write_text(json.dumps(config, indent=2) + "\n")

    # Config last: a directory whose config is present has its tensors complete.
    _atomic_write(root / CONFIG_NAME, write_config)


def _detect_format(config: Mapping[str, Any]) -> str:
    fmt = config.get("checkpoint_format")
    if fmt is None:
        fmt = {"gptq": "gptq", "awq": "awq"}.get(str(config.get("quant_method", "gptq")).lower())
    if fmt is None or fmt not in FORMATS:
        raise ValueError(
            f"unknown format (checkpoint_format={config.get('checkpoint_format')!r}, "
            f"quant_method={config.get('quant_method')!r}); expected one of {FORMATS}"
        )
    if fmt == "awq" and str(config.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"AWQ version={config.get('version')!r} is not supported; only GEMM")
    return fmt


def _read_config(config_path: Path) -> tuple[str, int, int, bool]:
    """`(format, bits, group_size, sym)` from quantize_config.json; every error names the file."""
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{config_path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{config_path} is not UTF-8 text: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got a JSON {type(config).__name__}")
    try:
        fmt = _detect_format(config)
        key = "w_bit" if "w_bit" in config else "bits"
        bits = validate_bits(config.get(key, 4))
        key = "q_group_size" if "q_group_size" in config else "group_size"
        gs = config.get(key, 128)
        if isinstance(gs, bool) or not isinstance(gs, int) or (gs <= 0 and gs != -1):
            raise ValueError(f"{key}={gs!r} must be a positive int, or -1 for per-channel")
        sym = (not config.get("zero_point", True)) if fmt == "awq" else bool(config.get("sym", False))
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e
    return fmt, bits, gs, sym


def _load_tensors(files: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """Every tensor of every file, and the file each came from; unreadable files name themselves."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    for file in files:
        try:
            loaded = load_file(str(file))
        except SafetensorError as e:
            raise ValueError(
                f"{file} cannot be read as safetensors ({e}): the file is truncated or corrupt (an "
                "interrupted download or copy?)"
            ) from e
        tensors.update(loaded)
        origin.update(dict.fromkeys(loaded, file))
    return tensors, origin


def _layer_group_size(layer: Mapping[str, Any], fmt: str, gs: int) -> int:
    """The group size to read an AWQ layer with: the tensors' own, so a config that disagrees is named."""
    if fmt != "awq" or "qweight" not in layer or "scales" not in layer:
        return gs
    k, g = np.shape(layer["qweight"])[0], np.shape(layer["scales"])[0]
    if g > 0 and k % g == 0:
        return k // g
    return k if gs == -1 else gs


def load_checkpoint(path: str | os.PathLike) -> dict[str, Int4Weight]:
    """Read a checkpoint directory (ours, AutoGPTQ's, GPTQModel's or AutoAWQ's) into `{name: Int4Weight}`.

    Every `*.safetensors` file in the directory is read (sharded checkpoints too); tensors that are not
    part of a quantized layer (biases, norms, embeddings) are ignored. `path` may also name a
    `.safetensors` file: its directory is read. Every error names the file and what is wrong with it.
    """
    root = Path(path)
    if root.suffix == ".safetensors" and root.is_file():
        root = root.parent
    if not root.exists():
        raise ValueError(f"{root} does not exist")
    if not root.is_dir():
        raise ValueError(
            f"{root} is a file, not a checkpoint directory: pass the directory that holds {CONFIG_NAME} "
            "and the *.safetensors files (or one of those .safetensors files)"
        )
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{config_path} is missing: not a quantized checkpoint directory")
    fmt, bits, gs, sym = _read_config(config_path)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in {root}")
    tensors, origin = _load_tensors(files)
    names = sorted(key[: -len(".qweight")] for key in tensors if key.endswith(".qweight"))
    if not names:
        raise ValueError(
            f"{', '.join(str(f) for f in files)} hold no quantized layer (no '<name>.qweight' tensor)"
        )
    out: dict[str, Int4Weight] = {}
    for name in names:
        prefix = f"{name}."
        layer = {
            key[len(prefix) :]: t
            for key, t in tensors.items()
            if key.startswith(prefix) and "." not in key[len(prefix) :]
        }
        file = origin[f"{name}.qweight"]
        try:
            if fmt in GPTQ_FORMATS:
                qw = from_autogptq(layer, format=fmt, bits=bits, sym=sym)
            elif fmt == "awq":
                qw = from_autoawq(layer, _layer_group_size(layer, fmt, gs), sym=sym)
            else:
                qw = _from_tokenlab(layer, bits=bits)
        except ValueError as e:
            raise ValueError(
                f"{file}: layer {name!r} (read as format={fmt!r}, bits={bits} from {config_path.name}): {e}"
            ) from e
        if (qw.num_groups != 1) if gs == -1 else (qw.group_size != gs):
            implied = -1 if qw.num_groups == 1 else qw.group_size
            raise ValueError(
                f"{config_path} says group_size={gs}, but layer {name!r} in {file} has {qw.num_groups} "
                f"group(s) for K={qw.shape[0]} input channels: group_size={implied}"
            )
        out[name] = qw
    return out
