"""Compute kernels for LLM serving: each a NumPy reference and a jitted JAX implementation."""

from kernels.int4_matmul import (
    int4_matmul,
    int4_matmul_cost,
    int4_matmul_reference,
    validate_int4_matmul_inputs,
)
from kernels.kv_cache import OutOfPages, PageAllocator, copy_pages, validate_write_kv_inputs, write_kv
from kernels.paged_attention import (
    dequantize_pages,
    gather_kv,
    paged_attention,
    paged_attention_cost,
    paged_attention_reference,
    validate_paged_attention_inputs,
)

__all__ = [
    "OutOfPages",
    "PageAllocator",
    "copy_pages",
    "dequantize_pages",
    "gather_kv",
    "int4_matmul",
    "int4_matmul_cost",
    "int4_matmul_reference",
    "paged_attention",
    "paged_attention_cost",
    "paged_attention_reference",
    "validate_int4_matmul_inputs",
    "validate_paged_attention_inputs",
    "validate_write_kv_inputs",
    "write_kv",
]
