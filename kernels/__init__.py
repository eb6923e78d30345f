"""Compute kernels for LLM serving, one package per op and one module per backend.

Each op (`paged_attention`, `int4_matmul`, `moe`) has a NumPy reference, the portable jitted XLA path and,
where it pays, faster paths for one backend (`cpu_native`, `pallas`); `available_impls(op)` lists those that
run here and `kernels.registry` says how `impl=` is chosen.
"""

from importlib import metadata as _metadata

from kernels.cpu import loader as _cpu_loader
from kernels.int4_matmul import (
    int4_matmul,
    int4_matmul_cost,
    int4_matmul_reference,
    validate_int4_matmul_inputs,
)
from kernels.moe import (
    DispatchPlan,
    combine,
    dequantize_experts,
    dispatch,
    dispatch_plan,
    expert_capacity,
    load_balancing_loss,
    moe_ffn,
    moe_ffn_cost,
    moe_ffn_reference,
    route,
    route_expert_choice,
    route_expert_choice_reference,
    route_reference,
    router_z_loss,
    validate_moe_ffn_inputs,
    validate_route_inputs,
)
from kernels.paged_attention import (
    OutOfPages,
    PageAllocator,
    copy_pages,
    dequantize_pages,
    gather_kv,
    paged_attention,
    paged_attention_cost,
    paged_attention_reference,
    validate_paged_attention_inputs,
    validate_write_kv_inputs,
    write_kv,
)
from kernels.registry import available_impls

try:
    __version__ = _metadata.version("tokenlab")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

# The one import-time side effect, on purpose: register the native CPU kernels' FFI handlers (when the library
# is built) so that a deserialized jax.export calling them runs after `import kernels` (docs/export.md). It is
# quiet without a library and never raises.
_cpu_loader.load_if_built()

__all__ = [
    "DispatchPlan",
    "OutOfPages",
    "PageAllocator",
    "available_impls",
    "combine",
    "copy_pages",
    "dequantize_experts",
    "dequantize_pages",
    "dispatch",
    "dispatch_plan",
    "expert_capacity",
    "gather_kv",
    "int4_matmul",
    "int4_matmul_cost",
    "int4_matmul_reference",
    "load_balancing_loss",
    "moe_ffn",
    "moe_ffn_cost",
    "moe_ffn_reference",
    "paged_attention",
    "paged_attention_cost",
    "paged_attention_reference",
    "route",
    "route_expert_choice",
    "route_expert_choice_reference",
    "route_reference",
    "router_z_loss",
    "validate_int4_matmul_inputs",
    "validate_moe_ffn_inputs",
    "validate_paged_attention_inputs",
    "validate_route_inputs",
    "validate_write_kv_inputs",
    "write_kv",
]
