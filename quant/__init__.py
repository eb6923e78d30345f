"""Turning float weights into INT4 and back: the packed format, the quantizers, checkpoint layouts.

The model and the quality experiment (`quant.minilm`, `quant.eval`) are imported by name, not here:
they read the packaged all-MiniLM-L6-v2 files and are not part of the quantization API.

Layering: imports nothing of ours; never `kernels`. The packed format and RTN are imported with the package
(the kernels read `Int4Weight`); GPTQ, AWQ and the checkpoint layouts are imported on first use, so
`import kernels` does not pull them in.
"""

import importlib
from importlib import metadata as _metadata
from typing import Any

from quant.format import (
    SCALE_DTYPES,
    SUPPORTED_BITS,
    Int4Weight,
    codes_per_byte,
    dequantize_reference,
    max_code,
    pack_codes,
    pack_int4,
    perm_from_g_idx,
    symmetric_zero,
    unpack_codes,
    unpack_int4,
    validate_bits,
    validate_group_size,
    validate_int4_weight_inputs,
)
from quant.rtn import (
    grid_params,
    quantize_codes,
    quantize_rtn,
    round_scale,
    rtn_reference,
    validate_quantize_inputs,
    validate_scale_dtype,
)

try:
    __version__ = _metadata.version("tokenlab")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

# Public names of the heavier modules, imported on first access (PEP 562).
_LAZY = {
    "awq_act_scales": "awq",
    "awq_quantize": "awq",
    "awq_quantize_shared": "awq",
    "awq_reference": "awq",
    "fold_scales_into_linear": "awq",
    "fold_scales_into_norm": "awq",
    "validate_awq_activations": "awq",
    "validate_awq_inputs": "awq",
    "AWQ_ORDER": "checkpoints",
    "FORMATS": "checkpoints",
    "GPTQ_FORMATS": "checkpoints",
    "from_autoawq": "checkpoints",
    "from_autogptq": "checkpoints",
    "load_checkpoint": "checkpoints",
    "save_checkpoint": "checkpoints",
    "to_autoawq": "checkpoints",
    "to_autogptq": "checkpoints",
    "validate_format": "checkpoints",
    "HessianAccumulator": "gptq",
    "gptq_quantize": "gptq",
    "gptq_reference": "gptq",
    "hessian": "gptq",
    "validate_gptq_inputs": "gptq",
    "validate_hessian": "gptq",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"quant.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AWQ_ORDER",
    "FORMATS",
    "GPTQ_FORMATS",
    "SCALE_DTYPES",
    "SUPPORTED_BITS",
    "HessianAccumulator",
    "Int4Weight",
    "awq_act_scales",
    "awq_quantize",
    "awq_quantize_shared",
    "awq_reference",
    "codes_per_byte",
    "dequantize_reference",
    "fold_scales_into_linear",
    "fold_scales_into_norm",
    "from_autoawq",
    "from_autogptq",
    "gptq_quantize",
    "gptq_reference",
    "grid_params",
    "hessian",
    "load_checkpoint",
    "max_code",
    "pack_codes",
    "pack_int4",
    "perm_from_g_idx",
    "quantize_codes",
    "quantize_rtn",
    "round_scale",
    "rtn_reference",
    "save_checkpoint",
    "symmetric_zero",
    "to_autoawq",
    "to_autogptq",
    "unpack_codes",
    "unpack_int4",
    "validate_awq_activations",
    "validate_awq_inputs",
    "validate_bits",
    "validate_format",
    "validate_gptq_inputs",
    "validate_group_size",
    "validate_hessian",
    "validate_int4_weight_inputs",
    "validate_quantize_inputs",
    "validate_scale_dtype",
]
