"""The native grouped SwiGLU expert FFN (kernels/cpu/moe_ffn.cc) that `moe_ffn(impl="auto")` runs on the CPU
for float32 experts: every instruction-set path this CPU runs against the NumPy reference (dropless,
capacity, padding rows, empty experts, skewed routing; the decode and the prefill algorithm, vector tails),
the choice of impl="auto", gradients, export without a native call, and the handler's errors. Needs the
built library."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu, targets
from kernels.moe import combine, dispatch, expert_capacity, moe_ffn, moe_ffn_reference
from tests.kernels.moe.cases import make_routing, make_weights, make_x
from tests.tolerances import normalized_error, tolerance

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU-native library not available: {cpu.load()}")
NATIVE_CALL = "tokenlab_moe_ffn"


def runs(name):
    return pytest.mark.skipif(
        name not in cpu.supported_isas(),
        reason=f"this CPU does not run the {name} path ({cpu.supported_isas()})",
    )


EVERY_PATH = [pytest.param(name, marks=runs(name)) for name in cpu.ISAS]


def native_moe(x, w, ids, ws, isa, capacity=None, row_align=1):
    """moe_ffn through the raw native call: dispatch, the native grouped FFN on one ISA path, combine."""
    num_experts = ws[0].shape[0]
    xs, plan = dispatch(jnp.asarray(x), jnp.asarray(ids), num_experts, capacity=capacity, row_align=row_align)
    ys = cpu.moe_ffn_native(xs, plan.group_sizes, plan.group_offsets, *map(jnp.asarray, ws), isa=isa)
    return combine(ys, jnp.asarray(w), plan), ys, plan


# (tokens, experts, top_k, d, f, routing): rows per expert <= 8 run the decode (streaming) algorithm, more the
# register-blocked one; d and f off the vector widths exercise the vector tails; d, f >= 128 split K in slabs.
CASES = {
    "decode": (4, 8, 2, 40, 72, "random"),
    "decode-slabs-tails": (3, 4, 2, 132, 200, "random"),
    "decode-empty-experts": (6, 8, 2, 36, 48, "empty_experts"),
    "prefill": (24, 4, 2, 48, 80, "random"),
    "prefill-skewed": (40, 8, 2, 36, 72, "one_expert"),
    "prefill-empty-experts": (30, 8, 3, 40, 56, "empty_experts"),
}


@pytest.mark.parametrize("isa", EVERY_PATH)
@pytest.mark.parametrize("case", list(CASES))
def test_native_matches_reference(case, isa):
    t, e, k, d, f, pattern = CASES[case]
    w, ids = make_routing(len(case), k, e=e, t=t, pattern=pattern)
    x, ws = make_x(1, t=t, d=d), make_weights(2, e=e, d=d, f=f)
    y, _, _ = native_moe(x, w, ids, ws, isa)
    ref = moe_ffn_reference(x, w, ids, *ws)
    assert normalized_error(y, ref) <= tolerance(np.float32).nerr


@pytest.mark.parametrize("isa", EVERY_PATH)
@pytest.mark.parametrize("tokens", [4, 32])
def test_native_with_capacity_and_padding_rows(isa, tokens):
    e, k, d, f, cf = 8, 2, 40, 56, 0.75
    w, ids = make_routing(3, k, e=e, t=tokens, pattern="one_expert")  # experts 0 and 1 overflow
    x, ws = make_x(3, t=tokens, d=d), make_weights(3, e=e, d=d, f=f)
    cap = expert_capacity(tokens, e, k, cf)
    y, ys, plan = native_moe(x, w, ids, ws, isa, capacity=cap, row_align=4)
    ref = moe_ffn_reference(x, w, ids, *ws, capacity_factor=cf)
    assert normalized_error(y, ref) <= tolerance(np.float32).nerr
    padding = np.asarray(plan.row_token) == tokens
    assert padding.any() and not np.asarray(ys)[padding].any()


def _auto(x, w, ids, *ws):
    return moe_ffn(x, w, ids, *ws, impl="auto")


@pytest.mark.parametrize("num_experts", [8, 32])  # "auto" takes the native grouped path for every E
def test_auto_runs_native_and_matches_reference(num_experts):
    w, ids = make_routing(4, 2, e=num_experts, t=16)
    x, ws = make_x(4, t=16, d=32), make_weights(4, e=num_experts, d=32, f=48)
    args = (x, w, ids, *ws)
    assert NATIVE_CALL in jax.jit(_auto).lower(*args).as_text()
    assert normalized_error(_auto(*args), moe_ffn_reference(*args)) <= tolerance(np.float32).nerr


def test_auto_keeps_the_xla_path_where_native_does_not_apply(monkeypatch):
    w, ids = make_routing(5, 2, t=16)
    x, ws = make_x(5, t=16, d=24), make_weights(5, d=24, f=40)
    args = (x, w, ids, *ws)
    for impl in ("xla", "grouped", "bucketed"):  # named strategies are portable XLA
        text = jax.jit(functools.partial(moe_ffn, impl=impl)).lower(*args).as_text()
        assert NATIVE_CALL not in text, impl
    cap = functools.partial(moe_ffn, impl="auto", capacity_factor=1.25)  # capacity mode: batched
    assert NATIVE_CALL not in jax.jit(cap).lower(*args).as_text()
    bf16 = (jnp.asarray(x, jnp.bfloat16), w, ids, *(jnp.asarray(a, jnp.bfloat16) for a in ws))
    assert NATIVE_CALL not in jax.jit(_auto).lower(*bf16).as_text()
    # The fast_enough rule (never the scalar fallback); a shape not traced before, so nothing is cached.
    monkeypatch.setattr(cpu, "fast_enough", lambda op: False)
    x2, ws2 = make_x(5, t=16, d=20), make_weights(5, d=20, f=28)
    assert NATIVE_CALL not in jax.jit(_auto).lower(x2, w, ids, *ws2).as_text()


def test_gradients_through_native_forward_match_dense_autodiff():
    w, ids = make_routing(6, 2, t=12, pattern="empty_experts")
    args = (make_x(6, t=12), w, *make_weights(6))

    def loss(x, w, wg, wu, wd, impl):
        return jnp.sum(moe_ffn(x, w, ids, wg, wu, wd, impl=impl) ** 2)

    assert NATIVE_CALL in jax.jit(jax.grad(functools.partial(loss, impl="auto"))).lower(*args).as_text()
    want = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args, "dense")
    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args, "auto")
    for a, b in zip(got, want, strict=True):
        assert normalized_error(a, b) <= tolerance(np.float32).nerr


@pytest.mark.parametrize("impl", ["auto", "xla", "grouped", "bucketed"])
def test_export_for_accelerators_has_no_native_call(impl):
    w, ids = make_routing(7, 2, t=8)
    args = (make_x(7, t=8), w, ids, *make_weights(7))

    def loss(x, w, ids, wg, wu, wd):
        return jnp.sum(moe_ffn(x, w, ids, wg, wu, wd, impl=impl) ** 2)

    # impl="auto" runs the Pallas (Triton) kernel on cuda/rocm: a custom call that exports only when allowed.
    # The native call is not allowed, so export itself refuses it too.
    for fn in (functools.partial(moe_ffn, impl=impl), jax.grad(loss, argnums=(0, 3))):
        exported = targets.export(
            fn, *args, platforms=("cuda", "rocm", "tpu"), disabled_checks=["__gpu$xla.gpu.triton"]
        )
        assert NATIVE_CALL not in exported.mlir_module()


def _raw(xs, sizes, offsets, ws, **kw):
    return cpu.moe_ffn_native(
        jnp.asarray(xs), jnp.asarray(sizes, jnp.int32), jnp.asarray(offsets, jnp.int32), *ws, **kw
    ).block_until_ready()


@pytest.mark.parametrize(
    "sizes, offsets, message",
    [
        (
            [2, 3],
            [0, 4],
            r"expert 1 has group_offsets=4, group_sizes=3; a group must lie within the R=6 rows",
        ),
        ([2, -1], [0, 2], r"expert 1 has group_offsets=2, group_sizes=-1"),
        ([2, 2], [-1, 2], r"expert 0 has group_offsets=-1"),
        ([3, 3], [0, 2], r"row 2 belongs to two groups \(expert 1\); groups must be disjoint"),
    ],
)
def test_handler_rejects_groups_outside_the_rows(sizes, offsets, message):
    ws = tuple(jnp.asarray(a) for a in make_weights(8, e=2, d=8, f=16))
    with pytest.raises(Exception, match=r"tokenlab_moe_ffn: " + message):
        _raw(np.ones((6, 8), np.float32), sizes, offsets, ws)


def test_handler_rejects_bad_shapes_and_isa():
    wg, wu, wd = (jnp.asarray(a) for a in make_weights(9, e=2, d=8, f=16))
    xs = np.ones((6, 8), np.float32)
    with pytest.raises(
        Exception, match=r"tokenlab_moe_ffn: w_down must be \[E=2, f=16, d=8\]; got \[2, 8, 16\]"
    ):
        _raw(xs, [1, 1], [0, 1], (wg, wu, wg))
    with pytest.raises(Exception, match=r"tokenlab_moe_ffn: w_gate must be \[E, d=6, f\]; got \[2, 8, 16"):
        _raw(np.ones((6, 6), np.float32), [1, 1], [0, 1], (wg, wu, wd))
    with pytest.raises(
        Exception, match=r"group_sizes and group_offsets must be \[E=2\]; got \[3\] and \[2\]"
    ):
        _raw(xs, [1, 1, 1], [0, 1], (wg, wu, wd))
    with pytest.raises(ValueError, match=r"isa='bogus' must be a path this CPU runs"):
        _raw(xs, [1, 1], [0, 1], (wg, wu, wd), isa="bogus")


@pytest.mark.parametrize("path", ["avx2", "avx512"])
def test_auto_prefill_rule(monkeypatch, path):
    """Above NATIVE_MAX_TOKENS tokens only the NATIVE_PREFILL_ISAS paths take the native kernel."""
    from kernels.moe.cpu_native import NATIVE_MAX_TOKENS, NATIVE_PREFILL_ISAS

    monkeypatch.setattr(cpu, "isa", lambda: path)
    d = {"avx2": 12, "avx512": 14}[path]  # shapes not traced elsewhere, so nothing is cached
    for t, want in ((NATIVE_MAX_TOKENS, True), (NATIVE_MAX_TOKENS + 1, path in NATIVE_PREFILL_ISAS)):
        w, ids = make_routing(10, 2, t=t)
        text = jax.jit(_auto).lower(make_x(10, t=t, d=d), w, ids, *make_weights(10, d=d, f=16)).as_text()
        assert (NATIVE_CALL in text) == want, (t, path)


@pytest.mark.parametrize("cf", [None, 1.0])
def test_cpu_native_impl_of_the_xla_module(cf):
    """moe_ffn_native: the native forward (dropless or with a capacity), the XLA backward; float32 only."""
    from kernels.moe.cpu_native import moe_ffn_native

    t, e, k = 16, 8, 2
    w, ids = make_routing(11, k, e=e, t=t, pattern="one_expert")
    x, ws = make_x(11, t=t), make_weights(11, e=e)
    cap = None if cf is None else expert_capacity(t, e, k, cf)
    kw = dict(capacity=cap, drop_priority="choice", row_align=1, block_rows=8)
    y = moe_ffn_native(x, w, ids, *ws, **kw)
    assert (
        normalized_error(y, moe_ffn_reference(x, w, ids, *ws, capacity_factor=cf))
        <= tolerance(np.float32).nerr
    )
    text = jax.jit(functools.partial(moe_ffn_native, **kw)).lower(x, w, ids, *ws).as_text()
    assert NATIVE_CALL in text
    grad = jax.grad(lambda x: jnp.sum(moe_ffn_native(x, w, ids, *ws, **kw) ** 2))(jnp.asarray(x))
    want = jax.grad(lambda x: jnp.sum(moe_ffn(x, w, ids, *ws, impl="dense", capacity_factor=cf) ** 2))(
        jnp.asarray(x)
    )
    assert normalized_error(grad, want) <= tolerance(np.float32).nerr
    bf16 = tuple(jnp.asarray(a, jnp.bfloat16) for a in (x, *ws))
    with pytest.raises(ValueError, match=r"impl='cpu_native' does not support .*needs float32 x and float32"):
        moe_ffn(bf16[0], w, ids, *bf16[1:], impl="cpu_native")
