"""The Mosaic GPU paged attention kernel: interpreted on the CPU against the NumPy reference, what it
declines, and compiled for an H100 (sm_90a) from the CPU.

Interpret mode is slow (a few seconds per call), so the cases share one small shape family: H=2, K=1 (GQA,
G=2), D=64, pages of 16 keys, blocks of 64 keys, a table of 12 pages (3 blocks: the TMA ring of 2 stages
wraps), three sequences, one of them empty. Every case carries the hazards the kernel must mask: block-table
entries past a sequence's pages outside [0, P), and NaN/Inf in every slot no sequence may read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels import compile_only, paged_attention, paged_attention_reference
from kernels.paged_attention import arg_specs
from kernels.paged_attention.pallas_mosaic_gpu import Config, pallas_unsupported, shape_class, tune_space
from tests.kernels.paged_attention.cases import make_cache, quantize_pages
from tests.tolerances import assert_close, normalized_error, tolerance

IMPL = "pallas_mosaic_gpu"
BF16 = np.dtype(jnp.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
LENS = (150, 0, 17)  # three blocks of 64 keys (a tail in the last), empty, a tail in the first block
Q_LENS = (40, 0, 3)  # a prefill chunk of two tiles (32 tokens a tile at G=2), empty, speculative
GEOM = dict(h=2, k=1, d=64, s=16, max_pages=12, num_pages=24)


def case(*, q_lens=None, dtype=BF16, seed=0):
    q, kp, vp, lens, bt = make_cache(seed, lens=LENS, q_lens=q_lens, poison=True, **GEOM)
    return q.astype(dtype), kp.astype(dtype), vp.astype(dtype), lens, bt


def run(q, kp, vp, lens, bt, finite=True, **kw):
    config = kw.pop("config", Config(num_stages=2, num_splits=1))
    arrays = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    out = paged_attention(
        *(jnp.asarray(a) for a in (q, kp, vp, lens, bt)), impl=IMPL, config=config, **arrays
    )
    out = np.asarray(out)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not finite or np.isfinite(out.astype(np.float32)).all()
    return out


def clean(bt, lens, s=16):
    """The block table the (eager, validating) reference accepts: entries past each sequence's pages
    zeroed."""
    bt = bt.copy()
    for i, n in enumerate(lens):
        bt[i, -(-n // s) :] = 0
    return bt


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_gqa_several_blocks(splits):
    q, kp, vp, lens, bt = case()
    out = run(q, kp, vp, lens, bt, config=Config(num_stages=2, num_splits=splits))
    assert_close(out, paged_attention_reference(q, kp, vp, lens, clean(bt, lens)), q.dtype)


def test_mixed_batch_with_every_logit_feature():
    q_lens = np.array(Q_LENS, np.int32)
    q, kp, vp, lens, bt = case(q_lens=q_lens, dtype=np.dtype(np.float16))
    feats = dict(soft_cap=3.0, sliding_window=37, alibi_slopes=np.array([0.3, 0.05], np.float32))
    out = run(q, kp, vp, lens, bt, q_lens=q_lens, **feats)
    assert_close(
        out, paged_attention_reference(q, kp, vp, lens, clean(bt, lens), q_lens=q_lens, **feats), q.dtype
    )


@pytest.mark.parametrize("kv_dtype,mode", [(np.dtype(np.int8), "token"), (FP8, "tensor")])
def test_quantized_pages(kv_dtype, mode):
    q, kp, vp, lens, bt = make_cache(1, lens=LENS, **GEOM)  # quantize_pages writes every slot
    qk, qv, ks, vs = (np.asarray(a) for a in quantize_pages(kp, vp, mode, kv_dtype, 1))
    q = q.astype(BF16)
    out = run(q, qk, qv, lens, bt, k_scale=ks, v_scale=vs)
    expected = paged_attention_reference(q, qk, qv, lens, bt, k_scale=ks, v_scale=vs)
    assert normalized_error(out, expected) < tolerance(BF16).nerr


def test_nan_in_q_reaches_only_its_row():
    q, kp, vp, lens, bt = case()
    q = q.copy()
    q[0, 1, 5] = np.nan  # row 1 of the first tile: its neighbour row 0 shares every wgmma
    out = run(q, kp, vp, lens, bt, finite=False).astype(np.float32)
    assert np.isnan(out[0, 1]).all()
    rest = np.ones(out.shape[:2], bool)
    rest[0, 1] = False
    assert np.isfinite(out[rest]).all()


def test_declines_with_a_reason():
    q, kp, vp, _, _ = case()
    assert pallas_unsupported(q, kp, vp) is None
    assert "float32" in pallas_unsupported(q.astype(np.float32), kp.astype(np.float32), kp.astype(np.float32))
    assert "head dim" in pallas_unsupported(q[..., :48], kp[..., :48], vp[..., :48])
    assert "page size" in pallas_unsupported(q, kp[:, :4], vp[:, :4])
    with pytest.raises(ValueError, match="pallas_mosaic_gpu.*does not support"):
        paged_attention(*(jnp.asarray(a) for a in case(dtype=np.float32)), impl=IMPL)


def test_tuning_hooks():
    q, kp, vp, lens, bt = case()
    assert shape_class(q, kp, vp, lens, bt) == "decode"
    assert shape_class(q, kp.astype(np.int8), vp, lens, bt, q_lens=lens) == "prefill-int8"
    space = tune_space(q, kp, vp, lens, bt)
    assert 1 <= len(space) <= 12 and all(isinstance(c, Config) for c in space)


# --------------------------------------------------------------------------------------------------------
# Compiled for an H100 from the CPU
def _report(case_name: str, target: str = "sm_90a"):
    from benchmarks.compiled import gpu_report

    c = arg_specs.get(case_name)
    args, kw = arg_specs.arg_shapes(c)
    fn = functools.partial(paged_attention, impl=IMPL)
    program = compile_only.compile_for(
        target, lambda *a: fn(*a[:5], **dict(zip(kw, a[5:], strict=True))), *args, *kw.values()
    )
    return gpu_report(program, target)


needs_sm90 = pytest.mark.skipif(
    compile_only.missing("sm_90a") is not None, reason=str(compile_only.missing("sm_90a"))
)


@needs_sm90
@pytest.mark.parametrize("case_name", ["test bfloat16", "decode B8 L4096 bf16"])
def test_compiles_for_h100_without_spills_in_at_most_two_kernels(case_name):
    kernels = _report(case_name)
    mosaic = [k for k in kernels if k["backend"] == IMPL]
    assert len(mosaic) == 1 and len(kernels) <= 2, kernels
    k = mosaic[0]
    assert k["spill_bytes"] == 0 and k["tensor_core"] == "wgmma" and k["tma"], k


@needs_sm90
def test_declines_before_hopper():
    q, kp, vp, _, _ = case()
    with compile_only.on_target("sm_80"):
        reason = pallas_unsupported(q, kp, vp)
    assert reason is not None and "9.0" in reason


def test_foreign_pages_cannot_reach_the_output():
    """A covered block-table entry outside [0, P) (unchecked under jit): its keys are masked, and no page but
    the sequences' own can change the output."""
    q, kp, vp, lens, bt = case()
    bt = bt.copy()
    bt[0, 1] = 10_000
    mine = np.zeros(kp.shape[0], bool)
    for i, n in enumerate(lens):
        mine[bt[i, : -(-n // 16)][bt[i, : -(-n // 16)] < kp.shape[0]]] = True
    other = np.random.default_rng(1).standard_normal(kp.shape).astype(kp.dtype)
    kp2 = np.where(mine[:, None, None, None], kp, other)
    vp2 = np.where(mine[:, None, None, None], vp, other)
    fn = jax.jit(functools.partial(paged_attention, impl=IMPL, config=Config(num_stages=2, num_splits=1)))
    a = fn(*(jnp.asarray(x) for x in (q, kp, vp, lens, bt)))
    b = fn(*(jnp.asarray(x) for x in (q, kp2, vp2, lens, bt)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(a, np.float32)).all()
