"""The Pallas GPU paged attention kernel, run in interpret mode on the CPU against the NumPy reference, and
lowered for cuda (Triton) from the CPU.

Interpret mode is slow (every distinct shape and option set compiles for a few seconds), so the cases share
a few small shapes: H=4, K=2 (GQA) or K=1 (MQA), D=80 (padded to 128 in the kernel) or 64, pages of 8 or 16,
four sequences, one of them empty. Every case carries the hazards the kernel must mask: block-table entries
past a sequence's pages that are outside [0, P), and NaN in every slot no sequence may read.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels import paged_attention_reference, targets
from kernels.paged_attention.pallas_triton import default_tunables, paged_attention_pallas, pallas_unsupported
from kernels.targets import TRITON_CALL
from tests.tolerances import assert_close, normalized_error, tolerance

F8 = np.dtype(ml_dtypes.float8_e4m3fn)
KV_LENS = (13, 0, 8, 41)  # sequence 1 is empty
Q_LENS = (1, 0, 3, 6)  # a decode, an empty sequence, speculative verification, a prefill chunk
MAX_PAGES = 6
NUM_PAGES = 16


def make_case(
    *,
    q_dtype=np.float32,
    kv_dtype=None,
    scales=None,
    num_kv_heads=2,
    head_dim=80,
    page_size=8,
    decode=True,
    seed=0,
):
    """Inputs as the public entry passes them, with garbage wherever no sequence may read.

    scales: None, "tensor" (scalar k/v scales) or "token" ([P, S, K] scales) for quantized kv_dtype.
    """
    rng = np.random.default_rng(seed)
    h, kh, d, s, p = 4, num_kv_heads, head_dim, page_size, NUM_PAGES
    kv_dtype = np.dtype(q_dtype) if kv_dtype is None else np.dtype(kv_dtype)
    kv_lens = np.array(KV_LENS, np.int32)
    b = len(kv_lens)
    q_lens = None if decode else np.array(Q_LENS, np.int32)
    t = b if decode else int(q_lens.sum())
    q = rng.standard_normal((t, h, d)).astype(q_dtype)
    # Pages: sequences own distinct shuffled pages; entries past a sequence's pages point nowhere valid.
    perm = rng.permutation(p)
    bt = np.full((b, MAX_PAGES), p + 7, np.int32)
    bt[:, -1] = -1
    nxt = 0
    used = np.zeros((p, s), bool)  # slots some sequence reads
    for i, n in enumerate(kv_lens):
        pages = -(-int(n) // s)
        bt[i, :pages] = perm[nxt : nxt + pages]
        for j in range(pages):
            used[bt[i, j], : min(s, int(n) - j * s)] = True
        nxt += pages
    k_scale = v_scale = None
    if kv_dtype == np.int8:
        k = rng.integers(-127, 128, (p, s, kh, d)).astype(np.int8)
        v = rng.integers(-127, 128, (p, s, kh, d)).astype(np.int8)
    else:
        k = rng.standard_normal((p, s, kh, d)).astype(np.float32)
        v = rng.standard_normal((p, s, kh, d)).astype(np.float32)
        k[~used], v[~used] = np.nan, np.inf
        k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    if scales == "tensor":
        k_scale, v_scale = np.float32(0.02), np.float32(0.03)
    elif scales == "token":
        k_scale = rng.uniform(0.005, 0.03, (p, s, kh)).astype(np.float32)
        v_scale = rng.uniform(0.005, 0.03, (p, s, kh)).astype(np.float32)
        k_scale[~used], v_scale[~used] = np.nan, np.inf
    return dict(
        q=q,
        k_pages=k,
        v_pages=v,
        kv_lens=kv_lens,
        block_tables=bt,
        q_lens=q_lens,
        scale=1.0 / np.sqrt(d),
        soft_cap=None,
        sliding_window=None,
        alibi_slopes=None,
        k_scale=k_scale,
        v_scale=v_scale,
    )


def run(case, **tunables):
    args = {n: case[n] for n in ("q", "k_pages", "v_pages", "kv_lens", "block_tables")}
    kw = {n: v for n, v in case.items() if n not in args}
    return np.asarray(paged_attention_pallas(*args.values(), **kw, **tunables))


def expected(case):
    return paged_attention_reference(**case)


def check(case, **tunables):
    out = run(case, **tunables)
    ref = expected(case)
    assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
    assert np.isfinite(out.astype(np.float32)).all()
    assert_close(out, ref, case["q"].dtype)
    empty = np.repeat(np.asarray(case["kv_lens"]) == 0, 1 if case["q_lens"] is None else case["q_lens"])
    assert not out[empty].astype(np.float32).any()
    return out


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_gqa_float32(num_splits):
    # pages_per_block=2 (16 keys) walks several blocks; 3 splits give some splits no keys at all.
    check(make_case(), num_splits=num_splits, pages_per_block=2)


def test_decode_mqa_bfloat16():
    check(make_case(q_dtype=jnp.bfloat16, num_kv_heads=1, head_dim=64, page_size=16))


@pytest.mark.parametrize("q_dtype", [np.float32, jnp.bfloat16])
def test_multi_token_mixed_batch(q_dtype):
    check(make_case(q_dtype=q_dtype, decode=False))


def test_multi_token_small_tiles_and_splits():
    # q_block=2 cuts the 6-token chunk into three tiles of one sequence and leaves a tile half empty.
    check(make_case(decode=False, seed=1), q_block=2, num_splits=2, pages_per_block=2)


@pytest.mark.parametrize("decode", [True, False])
def test_soft_cap_alibi_sliding_window(decode):
    case = make_case(decode=decode, seed=2)
    case.update(
        soft_cap=1.5,
        sliding_window=11,
        alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32),
        scale=0.3,
    )
    # 16-key blocks: the window (11) lets the long sequence's tiles skip whole blocks.
    check(case, pages_per_block=2, num_splits=2)


@pytest.mark.parametrize(
    ("q_dtype", "kv_dtype", "scales", "decode"),
    [
        (jnp.bfloat16, np.int8, "tensor", True),
        (np.float32, F8, "token", False),
        (jnp.bfloat16, np.int8, "token", False),
        (np.float16, F8, "tensor", True),
    ],
    ids=["int8-tensor-decode", "fp8-token-multi", "int8-token-multi", "fp8-tensor-decode-f16"],
)
# The reference dequantizes every page, the NaN/Inf scales of unread slots included.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")
def test_quantized_pages(q_dtype, kv_dtype, scales, decode):
    case = make_case(q_dtype=q_dtype, kv_dtype=kv_dtype, scales=scales, decode=decode, seed=3)
    out = run(case)
    ref = expected(case)
    assert np.isfinite(out.astype(np.float32)).all()
    assert normalized_error(out, ref) <= tolerance(q_dtype).nerr
    assert_close(out, ref, q_dtype)


def test_nan_in_q_reaches_exactly_its_outputs():
    case = make_case()
    q = case["q"].copy()
    q[0, 3, 5] = np.nan  # sequence 0 attends to 13 keys: its head 3 becomes NaN, nothing else
    q[1, 0, 0] = np.nan  # sequence 1 is empty: its output stays zero
    case["q"] = q
    out = run(case, num_splits=3, pages_per_block=2)  # the shapes of test_decode_gqa_float32: no recompile
    nan = np.zeros(out.shape, bool)
    nan[0, 3] = True
    np.testing.assert_array_equal(np.isnan(out), nan)
    assert not out[1].any()
    assert_close(out, expected(case), np.float32)  # NaN where the reference has NaN, equal elsewhere


def test_vmap_over_query_batches():
    case = make_case(seed=5)
    qs = np.stack([case["q"], -case["q"]])
    rest = {n: v for n, v in case.items() if n != "q"}
    out = jax.vmap(lambda q: paged_attention_pallas(q, **rest))(qs)
    for q, o in zip(qs, np.asarray(out), strict=True):
        assert_close(o, expected(dict(case, q=q)), np.float32)


def test_out_of_range_pages_are_never_read():
    # The same inputs with every unread page and slot overwritten by other garbage give the same result.
    case = make_case(seed=4)
    a = run(case)
    k, v = case["k_pages"].copy(), case["v_pages"].copy()
    k[np.isnan(k)], v[np.isinf(v)] = 1e30, -1e30
    case.update(k_pages=k, v_pages=v)
    np.testing.assert_array_equal(run(case), a)


def _lowered(decode: bool, kv_dtype, platform: str) -> str:
    case = make_case(
        q_dtype=jnp.bfloat16, kv_dtype=kv_dtype, scales="token" if kv_dtype == F8 else None, decode=decode
    )
    names = ("q", "k_pages", "v_pages", "kv_lens", "block_tables", "q_lens", "k_scale", "v_scale")
    arrays = {n: case[n] for n in names if case[n] is not None}

    def f(arrays):
        kw = dict(case, **arrays)
        kw.setdefault("q_lens", None)
        return paged_attention_pallas(**kw)

    return targets.lower(f, arrays, platforms=(platform,)).as_text()


@pytest.mark.parametrize(
    ("decode", "kv_dtype"), [(True, jnp.bfloat16), (False, F8)], ids=["decode", "multi-fp8"]
)
def test_lowers_for_cuda_as_one_triton_kernel(decode, kv_dtype):
    text = _lowered(decode, kv_dtype, "cuda")
    assert text.count(TRITON_CALL) == 1
    assert "stablehlo.while" not in text  # the interpreter's grid loop is not lowered for cuda
    assert re.search(r"num_warps = \d+ : i32", text)


def test_exports_for_gpus_only_with_disabled_checks():
    case = make_case(q_dtype=jnp.bfloat16)
    names = ("q", "k_pages", "v_pages", "kv_lens", "block_tables")
    args = [jax.ShapeDtypeStruct(np.shape(case[n]), case[n].dtype) for n in names]

    def f(*arrays):
        return paged_attention_pallas(*arrays, **{n: v for n, v in case.items() if n not in names})

    with pytest.raises(ValueError, match="custom calls"):
        targets.export(f, *args, platforms=("cuda",))
    checks = [TRITON_CALL]
    exported = targets.export(f, *args, platforms=("cuda", "rocm"), disabled_checks=checks)
    assert exported.platforms == ("cuda", "rocm")
    # With cpu and tpu too: each platform lowers only its own rule (a caller's per-platform choice keeps
    # the kernel off tpu; on its own, tpu is refused).
    everywhere = ("cpu", "cuda", "rocm", "tpu")
    exported = targets.export(f, *args, platforms=everywhere, disabled_checks=checks)
    assert exported.mlir_module().count(TRITON_CALL) == 2  # cuda's and rocm's
    with pytest.raises(ValueError, match="not tpu"):
        targets.export(f, *args, platforms=("tpu",), disabled_checks=checks)


def test_lowers_for_cpu_as_the_interpreter():
    text = _lowered(True, jnp.bfloat16, "cpu")
    assert TRITON_CALL not in text
    assert "stablehlo.while" in text


def test_unsupported_shapes_have_reasons():
    def reason(d, h=4, kh=2):
        return pallas_unsupported(np.zeros((1, h, d), np.float32), np.zeros((2, 8, kh, d), np.float32), None)

    assert reason(80) is None and reason(64) is None and reason(256) is None
    assert "head dim" in reason(8)
    assert "head dim" in reason(512)
    assert "query heads per kv head" in reason(64, h=512, kh=1)
    with pytest.raises(ValueError, match="head dim"):
        run(dict(make_case(), q=np.zeros((4, 4, 8), np.float32), k_pages=np.zeros((16, 8, 2, 8), np.float32)))


@pytest.mark.parametrize("name", ["pages_per_block", "num_splits", "q_block", "num_warps", "num_stages"])
def test_bad_tunables_raise(name):
    with pytest.raises(ValueError, match=name):
        run(make_case(), **{name: 0})


def test_default_tunables_follow_the_shape():
    # The benchmark decode shape (bf16, H=32, K=8, D=128, page 16): 8 KiB of K a step (32 keys), 16-row
    # tiles, 5 stages (Triton double-buffers the gathered K/V blocks from there).
    small = default_tunables(8, 8, 32, 8, 128, 16, 256, 2, decode=True)
    big = default_tunables(64, 64, 32, 8, 128, 16, 256, 2, decode=True)
    assert small["block_k"] == big["block_k"] == 32
    assert small["num_stages"] == big["num_stages"] == 5
    assert small["num_splits"] > 1 and big["num_splits"] == 1  # split the context only when B·K is small
    fp8 = default_tunables(8, 8, 32, 8, 128, 16, 256, 1, decode=True)
    assert fp8["block_k"] == 64  # one-byte pages: twice the keys for the same bytes
    fp32 = default_tunables(8, 8, 32, 8, 128, 16, 256, 4, decode=True, q_itemsize=4)
    assert fp32["block_k"] == 16 and fp32["num_warps"] == 8  # FMA dots: small tiles, more warps
    chunk = default_tunables(519, 8, 32, 8, 128, 16, 256, 2, decode=False)
    assert chunk["q_block"] * 4 == 64 and chunk["num_warps"] == 8  # 16 tokens × 4 heads of a group
    assert default_tunables(519, 8, 32, 8, 128, 16, 256, 2, decode=False, q_block=3)["q_block"] == 4


ARGS = ("q", "k_pages", "v_pages", "kv_lens", "block_tables")


def test_shape_class_and_tune_space():
    from kernels.paged_attention import pallas_triton as pt

    case = make_case()
    q, k_pages, v_pages, kv_lens, block_tables = (case[n] for n in ARGS)
    assert pt.shape_class(q, k_pages, v_pages, kv_lens, block_tables) == "decode-f32"
    assert pt.shape_class(
        q.astype(jnp.bfloat16), k_pages, v_pages, kv_lens, block_tables, q_lens=kv_lens
    ) == ("prefill")
    for q_lens in (None, kv_lens):
        space = pt.tune_space(q, k_pages, v_pages, kv_lens, block_tables, q_lens=q_lens)
        assert space[0] == pt.Config() and 1 < len(space) <= 13 and len(set(space)) == len(space)


def test_default_config_reads_the_tuned_file(tmp_path, monkeypatch):
    from kernels import tuning
    from kernels.paged_attention import pallas_triton as pt

    case = make_case()
    args = [case[n] for n in ARGS]
    monkeypatch.setenv("TOKENLAB_TUNED", str(tmp_path / "tuned.json"))
    monkeypatch.setattr(pt, "target_gpu", lambda: ("NVIDIA A100-SXM4-40GB", 80))
    assert pt.default_config(*args[:5]) == pt.Config()
    entry = tuning.entry("paged_attention", "pallas_triton", "decode-f32", "NVIDIA A100-SXM4-40GB",
                         {"block_pages": 2, "num_stages": 3}, 0.1)  # fmt: skip
    tuning.write([entry])
    assert pt.default_config(*args[:5]) == pt.Config(block_pages=2, num_stages=3)
    monkeypatch.setattr(pt, "target_gpu", lambda: None)  # a CPU host: no device kind, built-in defaults
    assert pt.default_config(*args[:5]) == pt.Config()
