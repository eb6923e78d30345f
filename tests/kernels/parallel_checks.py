"""Checks of kernels.parallel on 8 simulated CPU devices, run as a script by tests/kernels/test_parallel.py.

The device count must be fixed before JAX starts, so this runs in its own process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.kernels.parallel_checks

Each check compares a sharded kernel with the single-device kernel on the same inputs (tolerances from
tests/tolerances.py) or expects a ValueError; the script prints one line per check and exits non-zero
when any fails.
"""

from __future__ import annotations

import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kernels import int4_matmul, moe_ffn, paged_attention, parallel
from quant import quantize_rtn
from tests.tolerances import assert_close

DEVICE_COUNTS = (2, 4, 8)
PAGE = 4


def mesh_of(n: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), ("model",))


def expect_value_error(fn, *words: str) -> None:
    try:
        fn()
    except ValueError as e:
        missing = [w for w in words if w not in str(e)]
        if missing:
            raise AssertionError(f"ValueError {e!s} does not name {missing}") from e
        return
    raise AssertionError(f"expected a ValueError naming {words}")


# -- paged attention ---------------------------------------------------------------------------------


def paged_inputs(seed: int, h: int, kh: int, d: int = 16, lens=(5, 17, 0, 9)):
    rng = np.random.default_rng(seed)
    b = len(lens)
    max_pages = -(-max(lens) // PAGE)
    num_pages = b * max_pages + 3
    perm = rng.permutation(num_pages)  # shuffled physical pages
    bt = perm[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    q = rng.standard_normal((b, h, d)).astype(np.float32)
    kp = rng.standard_normal((num_pages, PAGE, kh, d)).astype(np.float32)
    vp = rng.standard_normal((num_pages, PAGE, kh, d)).astype(np.float32)
    return q, kp, vp, np.asarray(lens, np.int32), bt


def check_paged(h: int, kh: int, n: int, impl: str = "xla", **kw) -> None:
    q, kp, vp, lens, bt = paged_inputs(h * 100 + kh, h, kh)
    args = [jnp.asarray(a) for a in (q, kp, vp, lens, bt)]
    if kw.get("q_lens") is not None:  # multi-token: q holds sum(q_lens) tokens
        tokens = int(np.sum(kw["q_lens"]))
        args[0] = jnp.asarray(np.random.default_rng(h).standard_normal((tokens, h, q.shape[2])), jnp.float32)
    want = paged_attention(*args, impl="xla", **kw)
    got = parallel.paged_attention(*args, mesh=mesh_of(n), axis="model", impl=impl, **kw)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert len(got.sharding.device_set) == n, got.sharding
    assert_close(got, want, np.float32)


def paged_checks():
    for n in DEVICE_COUNTS:
        yield f"paged_attention H8 K8 n{n} (kv heads split)", lambda n=n: check_paged(8, 8, n)
    for n in (4, 8):
        yield f"paged_attention H8 K2 n{n} (kv heads replicated)", lambda n=n: check_paged(8, 2, n)
    yield "paged_attention H8 K2 n4 impl=auto", lambda: check_paged(8, 2, 4, impl="auto")
    yield (
        "paged_attention H8 K4 n2 multi-token q_lens",
        lambda: check_paged(8, 4, 2, q_lens=jnp.asarray([2, 3, 0, 1], jnp.int32)),
    )
    yield (
        "paged_attention H16 K4 n8 alibi + soft cap",
        lambda: check_paged(
            16, 4, 8, alibi_slopes=jnp.linspace(0.1, 0.8, 16, dtype=jnp.float32), soft_cap=20.0
        ),
    )

    def not_fitting_kv():
        q, kp, vp, lens, bt = paged_inputs(1, 12, 6)
        parallel.paged_attention(q, kp, vp, lens, bt, mesh=mesh_of(4), axis="model")

    def not_fitting_q():
        q, kp, vp, lens, bt = paged_inputs(1, 12, 4)
        parallel.paged_attention(q, kp, vp, lens, bt, mesh=mesh_of(8), axis="model")

    yield (
        "paged_attention K6 over 4 devices: ValueError",
        lambda: expect_value_error(not_fitting_kv, "num_kv_heads=6", "4"),
    )
    yield (
        "paged_attention H12 over 8 devices: ValueError",
        lambda: expect_value_error(not_fitting_q, "num_q_heads=12", "8"),
    )


# -- INT4 matmul -------------------------------------------------------------------------------------


def int4_weight(seed: int, k: int = 256, n: int = 64, group: int = 32, act_order: bool = False, awq=False):
    rng = np.random.default_rng(seed)
    w = quantize_rtn(rng.standard_normal((k, n)).astype(np.float32), group_size=group)
    if not (act_order or awq):
        return w
    from quant import Int4Weight

    codes = w.codes_in_input_order()
    g_idx = rng.permutation(np.arange(k) // group) if act_order else None
    act = rng.uniform(0.5, 2.0, k).astype(np.float32) if awq else None
    return Int4Weight.from_codes(
        codes, np.asarray(w.scales), w.zeros, group_size=group, g_idx=g_idx, act_scales=act
    )


def check_int4(mode: str, n: int, scatter: bool = False, **wkw) -> None:
    w = int4_weight(7, **wkw)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, w.shape[0])).astype(np.float32))
    want = int4_matmul(x, w, impl="xla")
    mesh = mesh_of(n)
    for weight in (w, parallel.shard_int4_weight(w, mesh, "model", mode)):
        got = parallel.int4_matmul(x, weight, mesh=mesh, axis="model", mode=mode, scatter_output=scatter)
        assert got.shape == want.shape, (got.shape, want.shape)
        assert_close(got, want, np.float32)


def int4_checks():
    for n in DEVICE_COUNTS:
        yield f"int4_matmul column n{n}", lambda n=n: check_int4("column", n)
        yield f"int4_matmul row n{n} (psum)", lambda n=n: check_int4("row", n)
    yield "int4_matmul row n4 scatter_output", lambda: check_int4("row", 4, scatter=True)
    yield "int4_matmul row n8 act-order + AWQ scales", lambda: check_int4("row", 8, act_order=True, awq=True)
    yield (
        "int4_matmul column n4 act-order + AWQ scales",
        lambda: check_int4("column", 4, act_order=True, awq=True),
    )

    def row_not_on_groups():
        w = int4_weight(1, k=128, group=32)  # 4 groups over 8 devices
        parallel.int4_matmul(jnp.ones((1, 128)), w, mesh=mesh_of(8), axis="model", mode="row")

    def column_not_dividing():
        w = int4_weight(1, n=12)
        parallel.int4_matmul(jnp.ones((1, 256)), w, mesh=mesh_of(8), axis="model", mode="column")

    yield (
        "int4_matmul row G4 over 8 devices: ValueError",
        lambda: expect_value_error(row_not_on_groups, "G=4", "8"),
    )
    yield (
        "int4_matmul column N12 over 8 devices: ValueError",
        lambda: expect_value_error(column_not_dividing, "N=12", "8"),
    )


# -- MoE ---------------------------------------------------------------------------------------------

T, E, TOP_K, D, F = 16, 8, 2, 16, 32


def routing(seed: int, pattern: str):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    if pattern == "skewed":
        logits += np.linspace(0.0, 4.0, E, dtype=np.float32)  # the last experts take most tokens
    if pattern == "empty":
        logits[:, 3] = -1e9  # expert 3 receives nothing
        logits[:, 4] = -1e9  # nor expert 4
    if pattern == "one_device":
        logits[:, :6] = -1e9  # all rows go to the last experts (one device's experts for n >= 4)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
    w = np.take_along_axis(logits, order, axis=1)
    w = np.exp(w - w.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return jnp.asarray(w, jnp.float32), jnp.asarray(order, jnp.int32)


def float_experts(seed: int):
    rng = np.random.default_rng(seed)
    s = 1.0 / np.sqrt(D)
    wg = rng.standard_normal((E, D, F)).astype(np.float32) * s
    wu = rng.standard_normal((E, D, F)).astype(np.float32) * s
    wd = rng.standard_normal((E, F, D)).astype(np.float32) * s
    return jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd)


def quant_experts(seed: int):
    rng = np.random.default_rng(seed)

    def stack(k, n):
        ws = [quantize_rtn(rng.standard_normal((k, n)).astype(np.float32), group_size=16) for _ in range(E)]
        return jax.tree.map(lambda *a: jnp.stack(a), *ws)

    return stack(D, F), stack(D, F), stack(F, D)


def check_moe(n: int, pattern: str, quantized: bool = False, **kw) -> None:
    w, ids = routing(n * 10 + len(pattern), pattern)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((T, D)).astype(np.float32))
    experts = quant_experts(2) if quantized else float_experts(2)
    want = moe_ffn(x, w, ids, *experts, **kw)
    got = parallel.moe_ffn(x, w, ids, *experts, mesh=mesh_of(n), axis="model", **kw)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert_close(got, want, np.float32)


def moe_checks():
    # impl="dense" inside (every local expert on every received row, masked) compiles fastest; the
    # sharded dispatch and combine under test are the same for every strategy, and "grouped" runs once.
    yield "moe_ffn n2 uniform", lambda: check_moe(2, "uniform", impl="dense")
    yield "moe_ffn n4 skewed", lambda: check_moe(4, "skewed", impl="dense")
    yield "moe_ffn n8 skewed", lambda: check_moe(8, "skewed", impl="dense")
    yield "moe_ffn n4 experts 3 and 4 receive nothing", lambda: check_moe(4, "empty", impl="dense")
    yield "moe_ffn n8 every row to one device", lambda: check_moe(8, "one_device", impl="dense")
    yield "moe_ffn n8 impl=grouped", lambda: check_moe(8, "skewed", impl="grouped")
    for dp, n in (("choice", 4), ("weight", 8)):
        yield (
            f"moe_ffn n{n} capacity 0.75 drop {dp}",
            lambda dp=dp, n=n: check_moe(n, "skewed", capacity_factor=0.75, drop_priority=dp, impl="dense"),
        )
    yield "moe_ffn n2 INT4 experts (grouped)", lambda: check_moe(2, "skewed", quantized=True, impl="grouped")
    yield (
        "moe_ffn n4 INT4 experts, capacity 1.0",
        lambda: check_moe(4, "empty", quantized=True, capacity_factor=1.0, impl="dense"),
    )

    def tokens_not_dividing():
        x = jnp.ones((6, D))
        w, ids = routing(0, "uniform")
        parallel.moe_ffn(x, w[:6], ids[:6], *float_experts(0), mesh=mesh_of(4), axis="model")

    yield "moe_ffn T6 over 4 devices: ValueError", lambda: expect_value_error(tokens_not_dividing, "T=6", "4")


def main() -> int:
    if len(jax.devices()) < max(DEVICE_COUNTS):
        print(f"need {max(DEVICE_COUNTS)} devices, have {len(jax.devices())}: set XLA_FLAGS first")
        return 2
    failures = 0
    for name, check in (*paged_checks(), *int4_checks(), *moe_checks()):
        t0 = time.perf_counter()
        try:
            check()
            print(f"ok    {name} ({time.perf_counter() - t0:.1f} s)")
        except Exception:  # report every failure, then fail the run
            failures += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
