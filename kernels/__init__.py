"""Compute kernels for LLM serving: each a NumPy reference and a jitted JAX implementation."""

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
    "paged_attention",
    "paged_attention_cost",
    "paged_attention_reference",
    "validate_paged_attention_inputs",
    "validate_write_kv_inputs",
    "write_kv",
]
