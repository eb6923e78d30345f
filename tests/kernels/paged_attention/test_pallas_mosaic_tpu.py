"""The Pallas Mosaic TPU paged attention kernel (kernels/paged_attention/pallas_mosaic_tpu.py): interpreted on
the CPU against the NumPy reference, its tiling by chip, its tpu lowering, and its compilation for v5e and v6e
with libtpu's compile-only devices (skipped with the reason where libtpu is absent).

The shared suite (test_shared.py) runs the kernel, interpreted, through every property; here: float32 to
float32 accuracy, mixed ragged batches over many key blocks (so the double buffer crosses blocks), the three
ways a kv head's rows are copied, and what the TPU compiler makes of it at one small and one benchmark case
per chip (`python -m benchmarks.compiled --only paged_attention` covers every benchmark case). Interpret mode
compiles for a few seconds per shape, so the cases share a few small shapes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels import available_impls, compile_only, paged_attention, paged_attention_reference, targets
from kernels.paged_attention import arg_specs
from kernels.paged_attention import pallas_mosaic_tpu as pt
from tests.tolerances import assert_close

# The kernel's own platforms choose at lowering (interpreted on the CPU, compiled on a TPU); elsewhere (a GPU
# host) these tests interpret it explicitly.
INTERPRET = None if jax.default_backend() in ("cpu", "tpu") else True
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
KV_LENS = (13, 0, 8, 41)  # sequence 1 is empty
Q_LENS = (1, 0, 3, 6)  # a decode, an empty sequence, speculative verification, a prefill chunk
MAX_PAGES, NUM_PAGES = 6, 16


def make_case(
    *, q_dtype=np.float32, kv_dtype=None, scales=None, head_dim=64, page_size=8, decode=True, seed=0
):
    """Inputs as the public entry passes them, H=4, K=2, with NaN/Inf in every slot no sequence may read and
    out-of-range block-table entries past each sequence's pages. scales: None, "tensor" or "token"."""
    rng = np.random.default_rng(seed)
    h, kh, d, s, p = 4, 2, head_dim, page_size, NUM_PAGES
    kv_dtype = np.dtype(q_dtype) if kv_dtype is None else np.dtype(kv_dtype)
    kv_lens = np.array(KV_LENS, np.int32)
    q_lens = None if decode else np.array(Q_LENS, np.int32)
    t = len(kv_lens) if decode else int(q_lens.sum())
    q = rng.standard_normal((t, h, d)).astype(q_dtype)
    perm = rng.permutation(p)
    bt = np.full((len(kv_lens), MAX_PAGES), p + 7, np.int32)
    bt[:, -1] = -1
    used = np.zeros((p, s), bool)
    nxt = 0
    for i, n in enumerate(kv_lens):
        pages = -(-int(n) // s)
        bt[i, :pages] = perm[nxt : nxt + pages]
        for j in range(pages):
            used[bt[i, j], : min(s, int(n) - j * s)] = True
        nxt += pages
    if kv_dtype == np.int8:
        k = rng.integers(-127, 128, (p, s, kh, d)).astype(np.int8)
        v = rng.integers(-127, 128, (p, s, kh, d)).astype(np.int8)
    else:
        k = rng.standard_normal((p, s, kh, d)).astype(np.float32)
        v = rng.standard_normal((p, s, kh, d)).astype(np.float32)
        k[~used], v[~used] = np.nan, np.inf
        k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    kw = {"q_lens": q_lens}
    if scales == "tensor":
        kw["k_scale"], kw["v_scale"] = np.float32(0.02), np.float32(0.03)
    elif scales == "token":
        kw["k_scale"] = rng.uniform(0.005, 0.03, (p, s, kh)).astype(np.float32)
        kw["v_scale"] = rng.uniform(0.005, 0.03, (p, s, kh)).astype(np.float32)
    return (q, k, v, kv_lens, bt), kw


def check(args, kw, dtype, **options):
    """The kernel (through its module entry) against the reference on the same inputs."""
    tunables = {k: options.pop(k) for k in ("q_tile", "block_pages") if k in options}
    q, k, v, lens, bt = args
    expected = paged_attention_reference(q, k, v, lens, bt, **kw, **options)
    full = {"scale": 1 / np.sqrt(q.shape[-1]), "soft_cap": None, "sliding_window": None, "alibi_slopes": None,
            "k_scale": None, "v_scale": None, **kw, **options}  # fmt: skip
    arrays = {n: jnp.asarray(a) if isinstance(a, np.ndarray) else a for n, a in full.items()}
    out = pt.paged_attention_tpu(*map(jnp.asarray, args), **arrays, **tunables, interpret=INTERPRET)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_float32_to_float32_accuracy(decode):
    # Pages of 8, one page per block: sequence 3 walks six blocks (two buffer slots, reused three times each).
    args, kw = make_case(decode=decode)
    check(args, kw, np.float32, block_pages=1, q_tile=2)


@pytest.mark.parametrize(
    "q_dtype,kv_dtype,scales",
    [(jnp.bfloat16, None, None), (np.float32, np.int8, "token"), (jnp.bfloat16, F8, "tensor")],
    ids=["bf16", "int8_token_scales", "fp8_tensor_scales"],
)
def test_mixed_ragged_batch_over_many_blocks(q_dtype, kv_dtype, scales):
    # Two pages per block and tiles of 2 tokens with every logit feature: window and causal limits skip
    # blocks, the double buffer crosses blocks, the prefill chunk spans three tiles.
    args, kw = make_case(q_dtype=q_dtype, kv_dtype=kv_dtype, scales=scales, decode=False, seed=1)
    features = {
        "soft_cap": 3.0,
        "sliding_window": 17,
        "alibi_slopes": np.array([0.3, 0.2, 0.1, 0.05], np.float32),
    }
    check(args, kw, np.dtype(q_dtype), block_pages=2, q_tile=2, **features)


@pytest.mark.parametrize(
    "kv_dtype,head_dim,mode",
    [(np.float32, 80, "rows"), (jnp.bfloat16, 128, "heads"), (np.float16, 64, "heads")],
)
def test_each_copy_mode(kv_dtype, head_dim, mode):
    # "rows": one kv head per program, its rows of each page; "heads": whole pages, all kv heads per program
    # (float16 pages as their bits, decoded in the kernel).
    assert pt.copy_mode(np.dtype(kv_dtype)) == mode
    args, kw = make_case(q_dtype=kv_dtype, head_dim=head_dim, seed=2)
    check(args, kw, np.dtype(kv_dtype), block_pages=2)


def test_copy_mode_rules():
    assert pt.copy_mode(np.dtype(np.float32)) == "rows"
    for dtype in (jnp.bfloat16, np.float16, np.int8, F8):
        assert pt.copy_mode(np.dtype(dtype)) == "heads"


def test_float32_dots_ask_for_full_precision():
    args, _ = make_case()
    for dtype in (np.float32, jnp.bfloat16):
        shapes = [jax.ShapeDtypeStruct(a.shape, dtype if i < 3 else a.dtype) for i, a in enumerate(args)]

        def fn(q, k, v, lens, bt):
            return pt.paged_attention_tpu(q, k, v, lens, bt, q_lens=None, scale=0.1, soft_cap=None,
                                          sliding_window=None, alibi_slopes=None, k_scale=None, v_scale=None,
                                          interpret=True)  # fmt: skip

        jaxpr = str(jax.make_jaxpr(fn)(*shapes))
        assert "preferred_element_type=float32" in jaxpr
        highest = jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)")
        assert highest == (2 if dtype == np.float32 else 0), dtype


def test_choose_tiling_by_chip():
    for name, chip in pt.CHIPS.items():
        for decode in (True, False):
            t = pt.choose_tiling(32, 8, 128, 16, 256, np.dtype(jnp.bfloat16), decode=decode, chip=chip)
            assert t.block_pages * 16 == chip.block_keys, name
            assert t.q_tile == (1 if decode else chip.tile_rows // 4)
            assert 16 << 20 <= t.vmem_limit <= chip.vmem_cap
    interp = pt.choose_tiling(4, 2, 64, 1, 40, np.dtype(np.float32), decode=True, chip=pt.INTERPRET_CHIP)
    assert interp.vmem_limit is None and interp.block_pages == pt.INTERPRET_CHIP.max_block_pages
    assert pt.choose_tiling(4, 2, 64, 16, 3, np.dtype(np.float32), decode=True).block_pages == 3  # the table
    assert pt.choose_tiling(4, 2, 64, 16, 8, np.dtype(np.float32), decode=False, q_tile=5).q_tile == 5


def test_chip_is_read_from_the_tpu_being_lowered_for():
    if jax.default_backend() != "tpu":
        assert pt.chip_tiles() == pt.DEFAULT_CHIP  # no TPU to ask
    with targets.device_context("tpu", device_kind="TPU v5 lite"):
        assert pt.chip_tiles() == pt.CHIPS["v5e"]
    with targets.device_context("tpu", device_kind="TPU v6 lite"):
        assert pt.chip_tiles() == pt.CHIPS["v6e"]


def _entry(impl, kwargs):
    names = list(kwargs)

    def fn(*a):
        return paged_attention(*a[:5], impl=impl, **dict(zip(names, a[5:], strict=True)))

    return fn


@pytest.mark.parametrize("case", ["test mixed T48", "decode B8 L4096 bf16"])
@pytest.mark.parametrize("impl", ["pallas_mosaic_tpu", "auto"])
def test_lowers_for_tpu_as_one_mosaic_kernel(case, impl):
    args, kwargs = arg_specs.arg_shapes(arg_specs.get(case))
    fn = _entry(impl, kwargs)
    tpu = targets.lower(fn, *args, *kwargs.values(), platforms=("tpu",)).as_text()
    assert len(re.findall(r"tpu_custom_call", tpu)) == 1
    assert "dot_general" not in tpu  # no XLA dot over the KV cache: the attention is inside the kernel
    cpu = targets.lower(_entry("pallas_mosaic_tpu", kwargs), *args, *kwargs.values(), platforms=("cpu",))
    assert "tpu_custom_call" not in cpu.as_text()  # interpreted there


def test_exports_for_cpu_and_tpu_and_runs_the_export_on_the_cpu():
    args, kw = make_case(q_dtype=jnp.bfloat16, decode=False, seed=3)
    kw = {k: v for k, v in kw.items() if v is not None}
    fn = _entry("pallas_mosaic_tpu", kw)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*args, *kw.values())]
    exported = targets.export(fn, *shapes, platforms=("cpu", "tpu"), disabled_checks=["tpu_custom_call"])
    assert "tpu_custom_call" in exported.mlir_module()
    out = exported.call(*map(jnp.asarray, (*args, *kw.values())))
    assert_close(out, paged_attention_reference(*args, **kw), np.dtype(jnp.bfloat16))


def test_cuda_is_a_clear_error():
    args, kwargs = arg_specs.arg_shapes(arg_specs.get("test base"))
    with pytest.raises(
        ValueError, match="Mosaic TPU paged attention kernel runs on cpu .interpreted. and tpu"
    ):
        targets.lower(_entry("pallas_mosaic_tpu", kwargs), *args, platforms=("cuda",))


# One small case and one benchmark case per chip (benchmarks.compiled compiles the full set).
COMPILE_CASES = ("test mixed T48", "decode B8 L4096 bf16")


@pytest.mark.parametrize("case", COMPILE_CASES)
@pytest.mark.parametrize("target", ["v5e", "v6e"])
def test_compiles_for_tpu(target, case):
    reason = compile_only.missing(target)
    if reason:
        pytest.skip(f"{target}: {reason}")
    from benchmarks.compiled import tpu_report

    args, kwargs = arg_specs.arg_shapes(arg_specs.get(case))
    compiled = compile_only.compile_for(target, _entry("pallas_mosaic_tpu", kwargs), *args, *kwargs.values())
    assert "tpu_custom_call" in compiled.as_text()
    report = tpu_report(compiled, target)
    # The VMEM the kernel uses: its double-buffered K/V blocks and more, well inside what it asks for.
    assert 0 < report["vmem"] <= 16 << 20


def test_serves_every_validated_call_and_checks_its_tunables():
    (q, k, v, _, _), _ = make_case()
    assert pt.pallas_unsupported(q, k, v) is None
    assert pt.pallas_unsupported(q.astype(np.float16), k.astype(np.int8), v.astype(F8)) is None
    for bad, match in (({"q_tile": 0}, "q_tile=0"), ({"block_pages": 2.5}, "block_pages=2.5"),
                       ({"interpret": "yes"}, "interpret='yes'")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            pt.paged_attention_tpu(q, k, v, np.zeros(4, np.int32), np.zeros((4, 2), np.int32), q_lens=None,
                                   scale=0.1, soft_cap=None, sliding_window=None, alibi_slopes=None,
                                   k_scale=None, v_scale=None, **bad)  # fmt: skip
    with pytest.raises(ValueError, match="block_pages=0"):
        pt.Config(block_pages=0)


@pytest.mark.skipif(
    "pallas_mosaic_tpu" not in available_impls("paged_attention"), reason="the TPU kernel does not run here"
)
def test_public_entry_runs_the_kernel_with_a_config():
    args, kw = make_case(decode=False, seed=4)
    out = paged_attention(*args, **kw, impl="pallas_mosaic_tpu", config=pt.Config(q_tile=3, block_pages=3))
    assert_close(out, paged_attention_reference(*args, **kw), np.float32)
