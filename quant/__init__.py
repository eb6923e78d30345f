"""Turning float weights into INT4 and back: the packed format, the quantizers, checkpoint layouts.

The model and the quality experiment (`quant.minilm`, `quant.eval`) are imported by name, not here:
they read the packaged all-MiniLM-L6-v2 files and are not part of the quantization API.

Layering: imports nothing of ours but the roofline core (and today not even that); never `kernels`.
"""

from quant.awq import (
    awq_act_scales,
    awq_quantize,
    awq_quantize_shared,
    awq_reference,
    fold_scales_into_linear,
    fold_scales_into_norm,
    validate_awq_activations,
    validate_awq_inputs,
)
from quant.checkpoints import (
    AWQ_ORDER,
    FORMATS,
    GPTQ_FORMATS,
    from_autoawq,
    from_autogptq,
    load_checkpoint,
    save_checkpoint,
    to_autoawq,
    to_autogptq,
    validate_format,
)
from quant.format import (
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
from quant.gptq import (
    HessianAccumulator,
    gptq_quantize,
    gptq_reference,
    hessian,
    validate_gptq_inputs,
    validate_hessian,
)
from quant.rtn import grid_params, quantize_codes, quantize_rtn, rtn_reference, validate_quantize_inputs

__all__ = [
    "AWQ_ORDER",
    "FORMATS",
    "GPTQ_FORMATS",
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
]
