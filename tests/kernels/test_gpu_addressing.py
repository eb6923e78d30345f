"""The Pallas Triton kernels at sizes real GPUs hold, and on GPUs without float8: lowered (and some compiled)
for GPUs that are not attached (`kernels.compile_only`), from shapes only, so a 5 GiB KV pool or DeepSeek-V3's
expert stack costs nothing.

Addressing. JAX's Pallas Triton lowering gives the element offsets of a load or store 64 bits when the operand
holds more than 2**32 bytes and 32 bits otherwise, and the address add sign-extends 32-bit offsets, so they
reach 2**31 elements; one-byte operands of 2**31 to 2**32 elements therefore go in as 16-bit words (the rule,
its evidence and the word view are in `kernels.triton_addressing`). These tests capture the Triton module of
every kernel the public entries lower and read the offset width of each `tt.addptr` on a kernel argument.
They check the lowering's rule itself, that no operand addressed with 32-bit offsets has more than 2**31
elements, and, on both sides of each boundary, the form each big operand takes: its own dtype with 32-bit
offsets up to 2**31 elements, 16-bit words with 32-bit offsets for one-byte operands of 2**31 to 2**32
elements, its own dtype with 64-bit offsets past 2**32 bytes. Reading the lowered Triton module is enough for
that; each kernel is also compiled in full once, at a big shape in the word range (a module that lowers can
still fail to compile): the paged attention kernel on float8 pools for the H100, the INT4 kernel at 2**32
bytes for the H100, the MoE kernels on INT4 stacks for the A100. `--full` compiles every other case too.
On the CPU, interpret mode checks that word loads and byte loads give bit-identical outputs, at tiny shapes.

fp8 pages below sm_89: for an A100 target impl="auto" lowers to the XLA path (no Pallas kernel in the
program; `--full` compiles it) and impl="pallas_triton" is a ValueError naming the pages and the GPU; for an
H100 the Pallas kernel compiles.

Axis legend as in the kernels: P pages, S page size, K kv heads (paged) or input features (INT4), D head dim,
N output features, E experts, d model width, f expert width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import registry
from kernels import triton_addressing as addressing
from kernels.int4_matmul import int4_matmul
from kernels.int4_matmul import pallas_triton as int4_triton
from kernels.moe import moe_ffn
from kernels.moe import pallas_triton as moe_triton
from kernels.paged_attention import paged_attention
from kernels.paged_attention import pallas_triton as paged_triton
from kernels.targets import TRITON_CALL
from quant.format import Int4Weight

GiB = 2**30
sds = jax.ShapeDtypeStruct
slow = pytest.mark.slow


# --------------------------------------------------------------------------------------------------------
# Compiling for an absent GPU, and the Triton modules of what was lowered


@pytest.fixture(scope="module")
def on_gpu() -> Any:
    """`on_gpu(target)`: a context for tracing, lowering and compiling for "sm_80" (A100) or "sm_90a" (H100);
    it yields `place`, which puts a pytree of ShapeDtypeStructs on the target. Skips, with the reason, where
    the CUDA plugin (or a JAX whose compile-only GPU targets `kernels.compile_only` knows) is missing."""
    from kernels import compile_only

    reason = compile_only.missing("sm_90a")
    if reason:
        pytest.skip(f"cannot compile for GPUs here: {reason}")
    try:
        with compile_only.on_target("sm_90a"):
            pass
    except NotImplementedError as err:  # "topology not implemented for cuda"
        pytest.skip(
            f"cannot compile for GPUs here: the CUDA plugin registered no compile-only targets ({err}); on a "
            "host without CUDA its version check fails unless JAX_PLATFORMS=cpu or "
            "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 is set before JAX starts"
        )
    return compile_only.on_target


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One lowered Pallas Triton kernel: its name, its arguments as the pallas_call sees them (inputs, then
    outputs; batched under vmap) as (shape, dtype), and its Triton module's text."""

    name: str
    operands: tuple[tuple[tuple[int, ...], np.dtype], ...]
    asm: str

    def offset_bits(self) -> dict[int, set[int]]:
        """Kernel argument -> the widths of the element offsets its loads and stores add to it."""
        splat = dict(re.findall(r"(%[\w.]+) = tt\.splat %arg(\d+)\b", self.asm))
        found: dict[int, set[int]] = {}
        for base, bits in re.findall(
            r"tt\.addptr (%[\w.]+), %[\w.]+ : [^,]+, (?:tensor<(?:\d+x)*)?i(\d+)", self.asm
        ):
            arg = re.fullmatch(r"%arg(\d+)", base)
            index = int(arg.group(1)) if arg else int(splat[base])
            assert index < len(self.operands), (self.name, base)
            found.setdefault(index, set()).add(int(bits))
        return found

    def form(self, index: int) -> tuple[tuple[int, ...], str, int]:
        """(shape, dtype name, offset bits) of kernel argument `index`."""
        shape, dtype = self.operands[index]
        (bits,) = self.offset_bits()[index]
        return shape, dtype.name, bits


@contextlib.contextmanager
def triton_kernels() -> Iterator[list[TritonKernel]]:
    """Collects every Pallas Triton kernel lowered inside the context."""
    from jax._src.pallas.triton import lowering

    kernels: list[TritonKernel] = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr: Any, grid_mapping: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(jaxpr, grid_mapping, *args, **kwargs)
        operands = tuple(
            (tuple(bm.array_aval.shape), np.dtype(bm.array_aval.dtype)) for bm in grid_mapping.block_mappings
        )
        kernels.append(TritonKernel(jaxpr.debug_info.func_name, operands, result.module.operation.get_asm()))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield kernels
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def lower(on_gpu: Any, target: str, fn: Any, *args: Any, full: bool = False) -> list[TritonKernel]:
    """Lower `fn` jitted for `target` at the shapes of `args` (compile it too if `full`); returns its Triton
    kernels, each checked against the lowering's offset rule. A fresh function is jitted each time, so that
    no lowering comes from JAX's caches (the same case may be lowered, then compiled)."""
    with on_gpu(target) as place, triton_kernels() as kernels:
        lowered = jax.jit(lambda *a: fn(*a)).trace(*place(args)).lower()
        if full:
            lowered.compile()
    assert kernels, "no Pallas Triton kernel was lowered"
    for k in kernels:
        for index, bits in k.offset_bits().items():
            shape, dtype = k.operands[index]
            n = math.prod(shape)
            # JAX's rule, pinned: a change in it must be looked at (`kernels.triton_addressing` relies on it).
            assert bits == {64 if n * dtype.itemsize > 2**32 else 32}, (k.name, index, shape, dtype, bits)
            # Nothing wraps: 32-bit offsets only where they reach every element.
            assert bits == {64} or n <= 2**31, (k.name, index, shape, dtype, bits)
    return kernels


def kernel(kernels: list[TritonKernel], name: str) -> TritonKernel:
    (found,) = [k for k in kernels if k.name == name]
    return found


def cases(*rows: tuple[Any, ...]) -> list[Any]:
    """pytest params from rows whose last field says whether the default run compiles the case in full (else
    it is only lowered); each lowered-only row also comes compiled, marked slow (`--full`)."""
    params = []
    for *fields, full in rows:
        name = "-".join(map(str, fields))
        params.append(pytest.param(*fields, full, id=f"{name}-{'compiled' if full else 'lowered'}"))
        if not full:
            params.append(pytest.param(*fields, True, id=f"{name}-compiled", marks=slow))
    return params


LOWERED_OR_COMPILED = [pytest.param(False, id="lowered"), pytest.param(True, id="compiled", marks=slow)]


# --------------------------------------------------------------------------------------------------------
# The 16-bit word view, on the CPU


def test_needs_words_only_for_one_byte_operands_between_2_31_and_2_32_elements():
    assert not addressing.needs_words(sds((2**31,), jnp.int8))  # offsets 0 .. 2**31 - 1: fine
    assert addressing.needs_words(sds((2**31 + 2,), jnp.int8))
    assert addressing.needs_words(sds((2**16, 2**16), jnp.uint8))  # 2**32 bytes: still 32-bit offsets
    assert not addressing.needs_words(sds((2**32 + 2,), jnp.float8_e4m3fn))  # 64-bit offsets
    assert not addressing.needs_words(sds((2**31 + 2,), jnp.bfloat16))  # 4 GiB + 4 bytes: 64-bit offsets
    assert not addressing.needs_words(sds((2**31,), jnp.bfloat16))


def test_the_kernels_share_one_word_view():
    for module in (int4_triton, moe_triton, paged_triton):
        assert module.to_words is addressing.to_words and module.from_words is addressing.from_words
        assert module.needs_words is addressing.needs_words


@pytest.mark.parametrize("dtype", ["uint8", "int8", "float8_e4m3fn"])
def test_words_hold_the_bytes_in_memory_order(dtype):
    x = jax.lax.bitcast_convert_type(
        jnp.arange(3 * 2 * 8, dtype=jnp.uint8).reshape(3, 2, 8), jnp.dtype(dtype)
    )
    words = addressing.to_words(x)
    assert words.shape == (3, 2, 4) and words.dtype == jnp.uint16
    assert int(words[0, 0, 0]) == 0x0100  # bytes 0 (low) and 1 (high)
    back = addressing.from_words(words, x.dtype)
    np.testing.assert_array_equal(
        np.asarray(jax.lax.bitcast_convert_type(back, jnp.uint8)),
        np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint8)),
    )
    with pytest.raises(ValueError, match="even last axis"):
        addressing.to_words(x[..., :7])


# XLA's CPU compile is most of an interpret-mode check's cost, and these programs run once, at tiny shapes.
QUICK_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def assert_words_match_bytes(fn: Any, *args: Any) -> None:
    """fn(*args, words=False) and fn(*args, words=True), in interpret mode: bit-identical nonzero outputs."""
    outs = []
    for words in (False, True):
        f = jax.jit(functools.partial(fn, words=words))
        out = f.trace(*args).lower().compile(compiler_options=QUICK_CPU_COMPILE)(*args)
        outs.append(np.asarray(out, np.float32))
    assert np.abs(outs[0]).max() > 0
    np.testing.assert_array_equal(outs[1], outs[0])


def test_word_loads_match_byte_loads_in_paged_attention():
    """int8 K pages and float8 V pages, read as bytes and as 16-bit words (split-K, two sequences)."""
    p, s, k, d, b, h = 4, 8, 1, 16, 2, 2
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, h, d)), jnp.bfloat16)
    k_pages = jnp.asarray(rng.integers(-127, 128, (p, s, k, d), np.int8))
    v_pages = jnp.asarray(rng.standard_normal((p, s, k, d)), jnp.float8_e4m3fn)
    kv_lens = jnp.array([11, 19], jnp.int32)
    tables = jnp.array([[3, 1, 0], [2, 0, 1]], jnp.int32)
    k_scale = jnp.asarray(rng.uniform(0.01, 0.02, (p, s, k)), jnp.float32)
    args = (q, k_pages, v_pages, kv_lens, tables, None, None, k_scale, jnp.float32(0.5))
    tun = dict(block_k=16, q_block=1, num_splits=2, num_warps=4, num_stages=2, interpret=True)
    logits = dict(scale=0.2, soft_cap=None, sliding_window=None)
    assert_words_match_bytes(functools.partial(paged_triton._paged_attention_pallas, **logits, **tun), *args)


def test_word_loads_match_byte_loads_in_int4_matmul():
    """The packed weight and the zero points, read as bytes and as 16-bit words (two groups, two N tiles)."""
    k, n, group, m = 64, 32, 32, 3
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    packed = jnp.asarray(rng.integers(0, 256, (k // 2, n), np.uint8))
    scales = jnp.asarray(rng.uniform(0.5, 1.5, (k // group, n)), jnp.float32)
    zeros = jnp.asarray(rng.integers(0, 16, (k // group, n), np.uint8))
    cfg = int4_triton.choose_config(m, k, n, group, dtype=x.dtype, block_n=16)
    xe, xo = int4_triton.split_even_odd(jnp.pad(x, ((0, cfg.block_m - m), (0, 0))))
    spec = int4_triton._Spec(cfg, group, None, k, n, cfg.block_m, np.dtype(x.dtype))
    fn = functools.partial(int4_triton._pallas_kernel, spec=spec, interpret=True)
    assert_words_match_bytes(fn, xe, xo, packed, scales, zeros)


def test_word_loads_match_byte_loads_in_moe_int4_experts():
    """INT4 expert stacks' packed codes and zero points, as bytes and as words. Column tiles of 16: two of
    w_gate and w_up, four of w_down, so a word slice at the wrong column cannot hide behind interpret mode's
    clamping of out-of-range slices."""
    e, d, f, rows, block_m, group = 2, 64, 32, 32, 16, 32
    rng = np.random.default_rng(0)

    def experts(k, n):  # a stack of E Int4Weight [k, n] (leaves with a leading expert axis)
        packed = rng.integers(0, 256, (e, k // 2, n), np.uint8)
        scales = rng.uniform(0.01, 0.02, (e, k // group, n)).astype(np.float32)
        zeros = rng.integers(0, 16, (e, k // group, n), np.uint8)
        return Int4Weight.tree_unflatten(
            (4, group), tuple(map(jnp.asarray, (packed, scales, zeros))) + (None,) * 2
        )

    stacks = (experts(d, f), experts(d, f), experts(f, d))
    xs = jnp.asarray(rng.standard_normal((rows, d)), jnp.bfloat16)
    sched = jax.jit(moe_triton.tile_schedule, static_argnums=(1, 2))(jnp.array([11, 17]), rows, block_m)
    fn = functools.partial(moe_triton._kernels, blocks=(block_m, 16, 64), interpret=True)
    assert_words_match_bytes(fn, xs, sched, *stacks)


# --------------------------------------------------------------------------------------------------------
# Paged attention: the KV pool


def _paged_args(pool_bytes: int, dtype: str, *, layers: int | None = None) -> tuple[Any, ...]:
    """Decode of 4 sequences, H32 K8 D128, pages of 16 tokens, a pool of `pool_bytes` per layer (K and V
    each); `layers` stacks that many layers' q and pools for jax.vmap."""
    s, k, d = 16, 8, 128
    pages = pool_bytes // (s * k * d * np.dtype(dtype).itemsize)
    lead = () if layers is None else (layers,)
    pool = sds((*lead, pages, s, k, d), jnp.dtype(dtype))
    return (sds((*lead, 4, 32, d), jnp.bfloat16), pool, pool, sds((4,), jnp.int32), sds((4, 64), jnp.int32))


def _paged(*args: Any) -> Any:
    scales = {} if args[1].dtype == jnp.bfloat16 else dict(k_scale=0.5, v_scale=0.5)
    return paged_attention(*args, impl="pallas_triton", **scales)


# (pool dtype, bytes per pool, target, the pool as the kernel takes it: dtype, offset bits; compiled by
# default)
PAGED_POOLS = cases(
    ("int8", 2 * GiB, "sm_90a", "int8", 32, False),  # 2**31 elements: 32-bit offsets reach them all
    ("float8_e4m3fn", 3 * GiB, "sm_90a", "uint16", 32, True),  # 16-bit words: 1.5 * 2**30 of them
    ("int8", 5 * GiB, "sm_80", "int8", 64, False),
    ("bfloat16", 3 * GiB, "sm_90a", "bfloat16", 32, False),  # 1.5 * 2**30 elements
    ("bfloat16", 5 * GiB, "sm_80", "bfloat16", 64, False),
)


@pytest.mark.parametrize("dtype, pool_bytes, target, as_dtype, bits, full", PAGED_POOLS)
def test_paged_attention_addresses_the_whole_pool(on_gpu, dtype, pool_bytes, target, as_dtype, bits, full):
    args = _paged_args(pool_bytes, dtype)
    (k,) = lower(on_gpu, target, _paged, *args, full=full)
    pages, s, kh, d = args[1].shape
    words = as_dtype == "uint16"
    pool = ((pages * s, kh, d // 2 if words else d), as_dtype, bits)
    assert k.form(4) == pool and k.form(5) == pool  # the K and V pools


def test_paged_attention_counts_a_vmapped_stack_of_pools_whole(on_gpu):
    """Two layers' 1.5 GiB int8 pools under jax.vmap are one 3 GiB operand of the batched kernel: words."""
    args = _paged_args(3 * GiB // 2, "int8", layers=2)
    fn = jax.vmap(_paged, in_axes=(0, 0, 0, None, None))
    (k,) = lower(on_gpu, "sm_90a", fn, *args)
    _, pages, s, kh, d = args[1].shape
    assert k.form(4) == ((2, pages * s, kh, d // 2), "uint16", 32)


# --------------------------------------------------------------------------------------------------------
# INT4 matmul: the packed weight


def _int4_weight(k: int, n: int, *, group: int = 128, lead: tuple[int, ...] = ()) -> Int4Weight:
    """An Int4Weight [K, N] of ShapeDtypeStructs (bf16 scales, uint8 zero points); `lead` stacks it."""
    leaves = (
        sds((*lead, k // 2, n), jnp.uint8),
        sds((*lead, k // group, n), jnp.bfloat16),
        sds((*lead, k // group, n), jnp.uint8),
        None,
        None,
    )
    return Int4Weight.tree_unflatten((4, group), leaves)


def _int4(x: Any, w: Int4Weight) -> Any:
    return int4_matmul(x, w, impl="pallas_triton")


# (K, N, target, the packed weight as the kernel takes it: dtype, offset bits; compiled by default). float32
# activations take the kernel that reads the canonical bytes (a 16-bit word view past 2**31 of them).
INT4_WEIGHTS = cases(
    (16384, 262144, "sm_90a", "uint8", 32, False),  # 2**31 bytes
    (16384, 262272, "sm_90a", "uint16", 32, False),  # just past: words
    (32768, 262144, "sm_90a", "uint16", 32, True),  # 2**32 bytes: the lowering still picks 32-bit offsets
    (32768, 262272, "sm_80", "uint8", 64, False),
)


@pytest.mark.parametrize("k, n, target, as_dtype, bits, full", INT4_WEIGHTS)
def test_int4_matmul_addresses_the_whole_packed_weight(on_gpu, k, n, target, as_dtype, bits, full):
    (kern,) = lower(on_gpu, target, _int4, sds((1, k), jnp.float32), _int4_weight(k, n), full=full)
    words = as_dtype == "uint16"
    assert kern.form(2) == ((k // 2, n // 2 if words else n), as_dtype, bits)
    assert kern.form(4) == ((k // 128, n), "uint8", 32)  # zero points: small


@pytest.mark.parametrize("k, n, target, bits", [(16384, 262272, "sm_90a", 32), (32768, 262272, "sm_80", 64)])
def test_int4_matmul_zero_folded_kernel_reads_the_weight_as_int32_words(on_gpu, k, n, target, bits):
    """bf16 activations take the zero-folded kernel: the packed weight as int32 words [K/2, N/4] (4 GiB and
    more is still under 2**31 words), 16-bit scales as int32 words [G, N/2], and no zero-point operand (the
    zeros enter outside, as a rank-1 term)."""
    (kern,) = lower(on_gpu, target, _int4, sds((1, k), jnp.bfloat16), _int4_weight(k, n))
    assert kern.name == "int4_matmul_w4a16_folded"
    assert kern.form(1) == ((k // 2, n // 4), "int32", bits)
    assert kern.form(2)[:2] == ((k // 128, n // 2), "int32")
    assert [dt.name for _, dt in kern.operands] == ["bfloat16", "int32", "int32", "float32"]


def test_int4_matmul_counts_a_vmapped_stack_of_weights_whole(on_gpu):
    """Eight packed experts of 256.25 MiB under jax.vmap: one 2 GiB + 2 MiB operand of the batched kernel."""
    k, n, e = 4096, 131200, 8
    fn = jax.vmap(_int4)
    (kern,) = lower(on_gpu, "sm_90a", fn, sds((e, 1, k), jnp.float32), _int4_weight(k, n, lead=(e,)))
    assert kern.form(2) == ((e, k // 2, n // 2), "uint16", 32)


# --------------------------------------------------------------------------------------------------------
# MoE: the expert stacks


def _moe_args(e: int, d: int, f: int, *, int4: bool = False, tokens: int = 64, top_k: int = 8) -> tuple:
    x = sds((tokens, d), jnp.bfloat16)
    routing = (sds((tokens, top_k), jnp.float32), sds((tokens, top_k), jnp.int32))
    if int4:
        experts = (
            _int4_weight(d, f, lead=(e,)),
            _int4_weight(d, f, lead=(e,)),
            _int4_weight(f, d, lead=(e,)),
        )
    else:
        experts = (sds((e, d, f), jnp.bfloat16), sds((e, d, f), jnp.bfloat16), sds((e, f, d), jnp.bfloat16))
    return (x, *routing, *experts)


def _moe(*args: Any) -> Any:
    return moe_ffn(*args, impl="pallas_triton")


@pytest.mark.parametrize("full", LOWERED_OR_COMPILED)
def test_moe_addresses_deepseek_v3_stacks_and_their_gradients_with_64_bit_offsets(on_gpu, full):
    """DeepSeek-V3's experts in bf16, E256 d7168 f2048: 7.5 GB a stack, forward and backward kernels."""
    e, d, f = 256, 7168, 2048

    def loss(x, weights, ids, w_gate, w_up, w_down):
        return _moe(x, weights, ids, w_gate, w_up, w_down).astype(jnp.float32).sum()

    fn = jax.value_and_grad(loss, argnums=(0, 3, 4, 5))  # the value keeps the forward kernels
    kernels = lower(on_gpu, "sm_90a", fn, *_moe_args(e, d, f), full=full)
    gate_up, down = kernel(kernels, "moe_gate_up_swiglu"), kernel(kernels, "moe_down")
    assert gate_up.form(2) == gate_up.form(3) == ((e, d, f), "bfloat16", 64)
    assert down.form(2) == ((e, f, d), "bfloat16", 64)
    dw_gate_up, dw_down = kernel(kernels, "moe_dw_gate_up"), kernel(kernels, "moe_dw_down")
    outs = [k.form(len(k.operands) - 1) for k in (dw_gate_up, dw_down)]  # the float32 weight gradients
    assert outs == [((e, d, f), "float32", 64), ((e, f, d), "float32", 64)]


def test_moe_bf16_stacks_below_4_gib_keep_32_bit_offsets(on_gpu):
    e, d, f = 128, 7168, 2048  # 3.5 GiB a stack, 1.75 * 2**30 elements
    kernels = lower(on_gpu, "sm_90a", _moe, *_moe_args(e, d, f))
    assert kernel(kernels, "moe_gate_up_swiglu").form(2) == ((e, d, f), "bfloat16", 32)


@pytest.mark.parametrize(
    "e, target, words, full",
    cases(
        (256, "sm_90a", False, False),  # DeepSeek-V3 in INT4: 1.75 GiB of packed codes a stack
        (384, "sm_80", True, True),  # E384 (Kimi K2's experts): 2.6 GiB, words; compiled for the A100
    ),
)
def test_moe_int4_stacks_are_addressed_whole(on_gpu, e, target, words, full):
    d, f = 7168, 2048
    kernels = lower(on_gpu, target, _moe, *_moe_args(e, d, f, int4=True), full=full)
    gate_up, down = kernel(kernels, "moe_gate_up_swiglu"), kernel(kernels, "moe_down")
    as_dtype = "uint16" if words else "uint8"
    packed_gate = ((e, d // 2, f // 2 if words else f), as_dtype, 32)
    assert gate_up.form(2) == gate_up.form(5) == packed_gate  # w_gate and w_up's packed codes
    assert down.form(2) == ((e, f // 2, d // 2 if words else d), as_dtype, 32)


# --------------------------------------------------------------------------------------------------------
# fp8 pages below sm_89


def _fp8_paged_args() -> tuple[Any, ...]:
    pool = sds((64, 16, 2, 64), jnp.float8_e4m3fn)
    return (sds((4, 8, 64), jnp.bfloat16), pool, pool, sds((4,), jnp.int32), sds((4, 8), jnp.int32))


def _fp8_paged(impl: str) -> Any:
    return lambda *a: paged_attention(*a, impl=impl, k_scale=0.5, v_scale=0.5)


@pytest.mark.parametrize("full", LOWERED_OR_COMPILED)
def test_fp8_pages_on_an_a100_take_the_xla_path(on_gpu, full):
    args = _fp8_paged_args()
    with on_gpu("sm_80") as place:
        assert registry.auto_impl("paged_attention", *args, platform="cuda") == "xla"
        why = paged_triton.pallas_unsupported(*args[:3])
        assert why is not None and "k_pages.dtype=float8_e4m3fn" in why and "NVIDIA A100" in why
        lowered = jax.jit(_fp8_paged("auto")).trace(*place(args)).lower()
        program = lowered.compile().as_text() if full else lowered.as_text()
    assert TRITON_CALL not in program and "paged_attention_r" not in program


def test_fp8_pages_on_an_a100_refuse_the_pallas_kernel(on_gpu):
    with (
        on_gpu("sm_80") as place,
        pytest.raises(ValueError, match=r"k_pages\.dtype=float8_e4m3fn on NVIDIA A100"),
    ):
        jax.jit(_fp8_paged("pallas_triton")).trace(*place(_fp8_paged_args()))


def test_fp8_pages_on_an_h100_compile_the_pallas_kernel(on_gpu):
    """The byte-load form of float8 pages (the 3 GiB pool above compiles the word form); `auto` takes the
    Mosaic GPU kernel on an H100, so the Triton one is named."""
    with on_gpu("sm_90a") as place:
        assert (
            registry.auto_impl("paged_attention", *_fp8_paged_args(), platform="cuda") == "pallas_mosaic_gpu"
        )
        program = (
            jax.jit(_fp8_paged("pallas_triton")).trace(*place(_fp8_paged_args())).lower().compile().as_text()
        )
    assert TRITON_CALL in program and "paged_attention_r" in program


def test_int8_pages_on_an_a100_keep_the_pallas_kernel(on_gpu):
    pool = sds((64, 16, 2, 64), jnp.int8)
    args = (sds((4, 8, 64), jnp.bfloat16), pool, pool, sds((4,), jnp.int32), sds((4, 8), jnp.int32))
    with on_gpu("sm_80"):
        assert registry.auto_impl("paged_attention", *args, platform="cuda") == "pallas_triton"
