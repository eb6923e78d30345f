"""The one tolerance table: every numerical comparison in the tests takes its bounds from here.

Keyed by the dtype of the arrays under test (a NumPy dtype name). `rtol`/`atol` are for elementwise
`assert_allclose`; `nerr` bounds the normalized error ||actual - expected|| / ||expected|| used for
quantized kernels (against the dequantized reference) and long reductions.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    nerr: float


TOLERANCES = {
    "float64": Tolerance(rtol=1e-12, atol=1e-12, nerr=1e-12),
    "float32": Tolerance(rtol=2e-5, atol=2e-5, nerr=1e-5),
    "float16": Tolerance(rtol=2e-3, atol=2e-3, nerr=1e-3),
    "bfloat16": Tolerance(rtol=2e-2, atol=2e-2, nerr=8e-3),
}

# Relative agreement of analytic counters with XLA's cost analysis on the CPU.
COST_FLOPS_RTOL = 0.02
COST_BYTES_RTOL = 0.10


def tolerance(dtype) -> Tolerance:
    name = np.dtype(dtype).name
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {name!r}; add it to tests/tolerances.py")
    return TOLERANCES[name]


def normalized_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    denom = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (denom if denom else 1.0))


def assert_close(actual, expected, dtype) -> None:
    tol = tolerance(dtype)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=tol.rtol,
        atol=tol.atol,
    )


# Relative agreement of a float32 autodiff directional derivative with a float64 central difference of the
# NumPy reference (the MoE FFN gradients).
DIRECTIONAL_GRAD_RTOL = 1e-4

# Quantization (tests/quant). Codes computed in float32 may round a float tie (x / scale within this
# fraction of a step of k + 1/2) differently from a float64 oracle; elsewhere they must agree exactly.
QUANT_TIE_WIDTH = 1e-3
# GPTQ in float32 against a float64 oracle: one tie broken differently shifts later rows slightly, so
# codes are compared as the fraction that agree (and disagreements must be off by one code).
GPTQ_CODE_AGREEMENT = 0.999
# Issue target: GPTQ's layer output error at 4 bits, group 128, on correlated inputs with outlier
# channels, relative to RTN's.
GPTQ_OVER_RTN_OUTPUT_ERROR = 0.75
# AWQ (tests/quant/test_awq.py). The jitted float32 search may break a near-tie between candidate scales or
# clip ratios differently from the float64 reference: its output error may exceed the reference's by this
# fraction.
AWQ_VS_REFERENCE_ERROR_RTOL = 1e-3
# Issue target: AWQ's layer output error (a norm ratio) relative to RTN's on inputs with outlier channels.
AWQ_OVER_RTN_OUTPUT_ERROR = 0.9
# all-MiniLM-L6-v2 (tests/quant/test_minilm.py): the jitted float32 forward against the float64 reference,
# max |difference| of unit-norm sentence embeddings (six float32 layers: a few float32 ulps of error each).
MINILM_FLOAT32_EMBEDDING_ATOL = 1e-5
# Issue targets on the real model at 4 bits, group 128 (512 calibration, 256 held-out sentences).
MINILM_GPTQ_OVER_RTN_LAYER_ERROR = 0.75
MINILM_AWQ_OVER_RTN_LAYER_ERROR = 0.9
MINILM_GPTQ_MIN_COSINE = 0.985
MINILM_AWQ_MIN_COSINE = 0.97

# The native CPU INT4 kernel (float32 activations) against the dequantized float64 reference: the lab's
# bound on the normalized error.
NATIVE_INT4_NERR = 1e-4
