"""What a kernel costs and what that means per token: chips, counters, timing, model shapes, token cost."""

from importlib import metadata as _metadata

from roofline.counters import (
    Cost,
    CostComparison,
    XlaCost,
    attention_cost,
    compare_with_xla,
    dtype_name,
    itemsize,
    matmul_cost,
    xla_cost,
)
from roofline.hardware import CHIPS, Chip, catalogue_chip, get_chip, load_chips, measure_host
from roofline.models import MODELS, ModelShape, get_model
from roofline.timing import Achieved, Timing, copy_inputs, time_fn
from roofline.tokens import (
    COMPONENTS,
    KV_FORMATS,
    PHASES,
    WEIGHT_FORMATS,
    Component,
    ComponentTime,
    Footprint,
    StepEstimate,
    chips_needed,
    estimate,
    expected_experts_touched,
    kv_bytes_per_token,
    memory_footprint,
    step_components,
    usd_per_mtok,
    weight_bytes,
)

try:
    __version__ = _metadata.version("tokenlab")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

__all__ = [
    "CHIPS",
    "COMPONENTS",
    "KV_FORMATS",
    "MODELS",
    "PHASES",
    "WEIGHT_FORMATS",
    "Achieved",
    "Chip",
    "Component",
    "ComponentTime",
    "Cost",
    "CostComparison",
    "Footprint",
    "ModelShape",
    "StepEstimate",
    "Timing",
    "XlaCost",
    "attention_cost",
    "catalogue_chip",
    "chips_needed",
    "compare_with_xla",
    "copy_inputs",
    "dtype_name",
    "estimate",
    "expected_experts_touched",
    "get_chip",
    "get_model",
    "itemsize",
    "kv_bytes_per_token",
    "load_chips",
    "matmul_cost",
    "measure_host",
    "memory_footprint",
    "step_components",
    "time_fn",
    "usd_per_mtok",
    "weight_bytes",
    "xla_cost",
]
