"""GPTQ against an independent float64 oracle of IST-DASLab/gptq's `fasterquant`, hand-worked cases,
the error targets, the Hessian, and bad input."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quant
from tests.tolerances import GPTQ_CODE_AGREEMENT, GPTQ_OVER_RTN_OUTPUT_ERROR, assert_close, tolerance

# -- the oracle: the reference algorithm transcribed on its own [out, in] orientation, in float64 --------


def _round_up(scale, scale_dtype):
    """The smallest positive value of `scale_dtype` >= scale, elementwise, back in float64."""
    r = scale.astype(scale_dtype)
    up = (r.astype(np.float64) < scale) | (r == 0)
    r[up] = np.nextafter(r[up], np.asarray(np.inf, scale_dtype))
    return r.astype(np.float64)


def _find_params(x, bits, sym, scale_dtype):
    """Grid of each row of x [rows, m] (the reference's per-output-channel min-max grid), its scale
    rounded up to the checkpoint's `scale_dtype` before the zero point is chosen."""
    maxq = 2**bits - 1
    xmin = np.minimum(x.min(axis=1), 0)
    xmax = np.maximum(x.max(axis=1), 0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin[dead], xmax[dead] = -1, 1
    scale = _round_up((xmax - xmin) / maxq, scale_dtype)
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    return scale, zero


def oracle_gptq(w, H, *, bits=4, group_size=128, sym=False, act_order=False, static_groups=False, damp=0.01,
                block_size=128, scale_dtype=np.float16):  # fmt: skip
    """Codes [K, N] in input order. The weight is transposed to the reference's [out, in] first."""
    W = np.array(w, np.float64).T.copy()
    H = np.array(H, np.float64).copy()
    columns = W.shape[1]
    maxq = 2**bits - 1
    per_channel = group_size in (-1, columns)
    if per_channel:
        scale, zero = _find_params(W, bits, sym, scale_dtype)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups and not per_channel:
        groups = [
            _find_params(W[:, i : i + group_size], bits, sym, scale_dtype)
            for i in range(0, columns, group_size)
        ]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(columns)
    W, H = W[:, perm], H[perm][:, perm]
    H[np.diag_indices(columns)] += damp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, Err1, Hinv1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1)), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if not per_channel:
                if static_groups:
                    scale, zero = groups[perm[i1 + i] // group_size]
                elif (i1 + i) % group_size == 0:
                    scale, zero = _find_params(W[:, i1 + i : i1 + i + group_size], bits, sym, scale_dtype)
            w_col = W1[:, i]
            q = np.clip(np.round(w_col / scale) + zero, 0, maxq)
            Q[:, i1 + i] = q
            err = (w_col - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, np.argsort(perm)].T.astype(np.int64)


# -- data ---------------------------------------------------------------------------------------------


def correlated_inputs(rng, n, k, outliers=8):
    """Low-rank correlated activations plus noise, with a few input channels 10-20x larger."""
    r = max(2, k // 8)
    X = rng.standard_normal((n, r)) @ rng.standard_normal((r, k)) / np.sqrt(r) + 0.1 * rng.standard_normal(
        (n, k)
    )
    idx = rng.choice(k, outliers, replace=False)
    X[:, idx] *= rng.uniform(10, 20, outliers)
    return X.astype(np.float32)


def problem(seed, k=128, n=48, samples=512):
    rng = np.random.default_rng(seed)
    X = correlated_inputs(rng, samples, k)
    W = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return W, X, np.asarray(quant.hessian(X))


def assert_codes_agree(codes, ref):
    # Not "off by at most one": a tie broken differently can move a later group's min/max, and with it
    # every code of that group and column.
    codes = np.asarray(codes, np.int64)
    assert codes.shape == ref.shape
    assert np.mean(codes == ref) >= GPTQ_CODE_AGREEMENT


OPTIONS = [
    {},
    {"sym": True},
    {"act_order": True},
    {"act_order": True, "static_groups": True},
    {"static_groups": True},
    {"group_size": -1},
    {"group_size": 16, "block_size": 48},
    {"group_size": 64, "block_size": 16, "act_order": True},
    {"bits": 3, "group_size": 32},
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_gptq_matches_oracle(options):
    W, _, H = problem(0)
    kw = {"group_size": 32, **options}
    qw = quant.gptq_quantize(W, H, **kw)
    ref = oracle_gptq(W, H, **kw)
    assert_codes_agree(qw.codes_in_input_order(), ref)
    # The NumPy path in quant follows the same algorithm in float64.
    codes, scales, zeros, g_idx = quant.gptq_reference(W, H, **kw)
    assert_codes_agree(codes, ref)
    np.testing.assert_array_equal(qw.g_idx(), g_idx)
    assert_close(qw.scales, scales, np.float32)
    if qw.zeros is not None:
        assert np.mean(np.asarray(qw.zeros) == zeros) >= GPTQ_CODE_AGREEMENT


def test_gptq_hand_worked():
    # K=4, N=1, one group. H couples channels 0 and 1: H = [[2, 1], [1, 2]] (+ identity for 2, 3), damp 0.
    # Grid: xmin 0, xmax 1.5 -> scale 0.1, zero 0. Channel 0: 0.33 -> code 3, error 0.03. The OBS update
    # moves channel 1 by -0.03 * Hinv[0, 1] / Hinv[0, 0] = +0.015: 0.44 -> 0.455 -> code 5 (RTN: 4).
    # float32 scales: the grid by hand (float16 would round the scale 0.1 up to 0.10003).
    W = np.array([[0.33], [0.44], [1.5], [0.0]], np.float32)
    H = np.array([[2, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    f32 = {"scale_dtype": np.float32}
    for block_size in (1, 2, 128):
        qw = quant.gptq_quantize(W, H, group_size=4, damp=0.0, block_size=block_size, **f32)
        np.testing.assert_array_equal(np.asarray(qw.codes())[:, 0], [3, 5, 15, 0])
        assert_close(qw.dequantize()[:, 0], [0.3, 0.5, 1.5, 0.0], np.float32)
    np.testing.assert_array_equal(
        np.asarray(quant.quantize_rtn(W, group_size=4).codes())[:, 0], [3, 4, 15, 0]
    )
    np.testing.assert_array_equal(
        quant.gptq_reference(W, H, group_size=4, damp=0.0, **f32)[0][:, 0], [3, 5, 15, 0]
    )


def test_gptq_group_params_use_weights_updated_to_the_block_start():
    # Group 1 (channels 2, 3) starts inside block 0 (size 4): its grid comes from W before channels 0, 1
    # pushed their error into it. With block size 2 the group starts a block and sees the updates.
    W, _, H = problem(3, k=16, n=8)
    late = quant.gptq_quantize(W, H, group_size=2, block_size=4)
    early = quant.gptq_quantize(W, H, group_size=2, block_size=2)
    assert not np.allclose(np.asarray(late.scales), np.asarray(early.scales))
    for qw, bs in ((late, 4), (early, 2)):
        assert_codes_agree(qw.codes_in_input_order(), oracle_gptq(W, H, group_size=2, block_size=bs))


def test_gptq_dead_channels_and_singular_hessian():
    W, X, _ = problem(1, k=64, n=16, samples=8)  # 8 samples: H has rank 8 of 64
    X[:, [3, 17]] = 0  # dead input channels
    H = np.asarray(quant.hessian(X))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qw = quant.gptq_quantize(W, H, group_size=32, act_order=True)
    # Exactly one warning, naming how many channels are dead; they quantize to 0 as in the reference.
    dead = [str(w.message) for w in caught if "dead" in str(w.message)]
    assert len(dead) == 1 and "2 of 64 input channels are dead" in dead[0]
    deq = np.asarray(qw.dequantize())
    assert np.all(np.isfinite(deq))
    np.testing.assert_array_equal(deq[[3, 17]], 0.0)
    assert_codes_agree(qw.codes_in_input_order(), oracle_gptq(W, H, group_size=32, act_order=True))
    with pytest.warns(RuntimeWarning, match="2 of 64 input channels are dead"):
        quant.gptq_reference(W, H, group_size=32)


@pytest.mark.parametrize("quantize", [quant.gptq_quantize, quant.gptq_reference], ids=["jax", "reference"])
def test_gptq_without_calibration_data_is_an_error(quantize):
    # A Hessian with nothing in it used to give an all-zero weight without a word: every channel "dead".
    W = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    acc = quant.HessianAccumulator(64)
    for H in (acc.H, np.zeros((64, 64), np.float32)):
        with pytest.raises(ValueError, match=r"^H is all zero .* no calibration data was added"):
            quantize(W, H, group_size=32)
    for bad in (np.nan, np.inf):
        H = np.eye(64, dtype=np.float32)
        H[5, 7] = bad
        with pytest.raises(ValueError, match=r"^H contains NaN or Inf: it is not the Hessian of finite"):
            quantize(W, H, group_size=32)
    acc.add(np.ones((4, 64), np.float32))
    quantize(W, acc.H, group_size=32)  # once data is added, it runs


@pytest.mark.parametrize("quantize", [quant.gptq_quantize, quant.gptq_reference], ids=["jax", "reference"])
def test_gptq_refuses_a_non_symmetric_hessian(quantize):
    # Used to escalate damp with four "Cholesky failed" warnings and return codes differing on ~7% of entries.
    W, _, H = problem(3, k=64, n=16, samples=256)
    bad = H + np.triu(np.random.default_rng(3).standard_normal((64, 64))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refusal comes first, with no damping warnings
        with pytest.raises(ValueError, match=r"^H is not symmetric: \|H\[\d+, \d+\] - H\[\d+, \d+\]\| = "):
            quantize(W, bad, group_size=32)
    # Rounding-level asymmetry (a float32 X^T X from another library) is accepted.
    tiny = H + np.triu(np.full((64, 64), 1e-7 * np.abs(H).max(), np.float32), 1)
    quantize(W, tiny, group_size=32)
    quantize(W, np.asarray((bad + bad.T) / 2, np.float32) + 64 * np.eye(64, dtype=np.float32), group_size=32)


def test_gptq_escalates_damp_with_a_warning():
    rng = np.random.default_rng(2)
    k = 32
    Q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    eig = np.ones(k)
    eig[0] = -0.05  # indefinite: fails with damp 0.01, succeeds once damp reaches 0.1
    H = (Q * eig) @ Q.T
    W = rng.standard_normal((k, 8)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="damp=0.01"):
        qw = quant.gptq_quantize(W, H.astype(np.float32), group_size=16)
    assert np.all(np.isfinite(np.asarray(qw.dequantize())))
    with pytest.raises(ValueError, match="not positive definite"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant.gptq_quantize(W, -np.eye(k, dtype=np.float32), group_size=16)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**31), sym=st.booleans(), act_order=st.booleans())
def test_gptq_lowers_proxy_loss_against_rtn(seed, sym, act_order):
    W, _, H = problem(seed, k=64, n=32, samples=256)

    def proxy(qw):
        D = np.asarray(qw.dequantize(), np.float64) - W
        return np.trace(D.T @ H @ D)

    rtn = quant.quantize_rtn(W, group_size=32, sym=sym)
    gptq = quant.gptq_quantize(W, H, group_size=32, sym=sym, act_order=act_order)
    assert proxy(gptq) < proxy(rtn)


def test_gptq_output_error_target_against_rtn():
    # The quality target, on a moderate layer: 4 bits, group 128, correlated inputs with outlier channels.
    rng = np.random.default_rng(7)
    k, n = 512, 128
    X = correlated_inputs(rng, 2048, k)
    W = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    H = quant.hessian(X)

    def output_error(qw):
        return np.linalg.norm(X @ np.asarray(qw.dequantize()) - X @ W)

    ratio = output_error(quant.gptq_quantize(W, H, group_size=128)) / output_error(quant.quantize_rtn(W))
    assert ratio <= GPTQ_OVER_RTN_OUTPUT_ERROR


# -- the Hessian ----------------------------------------------------------------------------------------


def test_hessian_and_accumulator_agree():
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal(shape).astype(np.float32) for shape in ((5, 16), (2, 3, 16), (7, 16))]
    X = np.concatenate([b.reshape(-1, 16) for b in batches]).astype(np.float64)
    expected = 2 / X.shape[0] * X.T @ X
    acc = quant.HessianAccumulator(16)
    for b in batches:
        acc.add(b)
    assert acc.nsamples == X.shape[0]
    tol = tolerance(np.float32)
    np.testing.assert_allclose(np.asarray(acc.H), expected, rtol=tol.rtol, atol=tol.atol * 10)
    np.testing.assert_allclose(
        np.asarray(quant.hessian(X.astype(np.float32))), expected, rtol=tol.rtol, atol=tol.atol * 10
    )


def test_hessian_bad_input():
    with pytest.raises(ValueError, match="at least 2 dims"):
        quant.hessian(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        quant.hessian(np.full((2, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="K=4"):
        quant.HessianAccumulator(4).add(np.zeros((2, 5), np.float32))


@pytest.mark.parametrize(
    "H, kwargs, match",
    [
        (np.eye(16, 8, dtype=np.float32), {}, "square"),
        (np.eye(8, dtype=np.float32), {}, "K=16"),
        (np.full((16, 16), np.nan, np.float32), {}, "NaN"),
        (np.eye(16, dtype=np.float32), {"block_size": 0}, "block_size"),
        (np.eye(16, dtype=np.float32), {"damp": -1.0}, "damp"),
        (np.eye(16, dtype=np.float32), {"group_size": 5}, "group_size=5"),
        (np.eye(16, dtype=np.float32), {"bits": 7}, "bits=7"),
    ],
)
def test_gptq_bad_input(H, kwargs, match):
    W = np.zeros((16, 4), np.float32)
    with pytest.raises(ValueError, match=match):
        quant.gptq_quantize(W, H, **{"group_size": 8, **kwargs})
    with pytest.raises(ValueError, match="NaN"):
        quant.gptq_quantize(np.full((16, 4), np.inf, np.float32), np.eye(16, dtype=np.float32), group_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("options", OPTIONS)
def test_gptq_matches_oracle_large(options):
    # Independent Gaussian inputs with outlier channels (cond(H) ~ 1e3). On the low-rank inputs of
    # `problem` at this size cond(H) reaches ~1e5 and any float32 GPTQ, a plain NumPy one included,
    # agrees with the float64 oracle on only ~99.8% of the codes.
    rng = np.random.default_rng(11)
    X = rng.standard_normal((2048, 512)).astype(np.float32)
    X[:, :8] *= 15
    W = (rng.standard_normal((512, 128)) * 0.05).astype(np.float32)
    H = np.asarray(quant.hessian(X))
    kw = {"group_size": 128, **options}
    assert_codes_agree(quant.gptq_quantize(W, H, **kw).codes_in_input_order(), oracle_gptq(W, H, **kw))


def test_jitted_gptq_lowers_for_every_backend():
    # The per-block loop and the inverse factor are plain XLA: nothing CPU-only in the fast path.
    import jax

    from quant.gptq import _gptq_blocks, _upper_inverse_factor

    k, n = 32, 8
    f32 = jax.ShapeDtypeStruct
    platforms = ("cpu", "cuda", "rocm", "tpu")
    blocks = jax.jit(
        lambda W, U, s, z, rg: _gptq_blocks(
            W, U, s, z, rg, bits=4, gs=16, sym=False, block_size=16, dynamic=True, scale_dtype="float16"
        )
    )
    grid = f32((1, n), np.float32)
    args = (f32((k, n), np.float32), f32((k, k), np.float32), grid, grid, f32((k,), np.int32))
    assert jax.export.export(blocks, platforms=platforms)(*args).platforms == platforms
    factor = jax.export.export(_upper_inverse_factor, platforms=platforms)
    assert factor(f32((k, k), np.float32), f32((), np.float32)).platforms == platforms
