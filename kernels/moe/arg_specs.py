"""The MoE expert FFN cases, written once: the tests' shape sets, the asv benchmarks (benchmarks/moe.py) and
the accelerator check (benchmarks/accel.py) all take their shapes from `CASES`.

A `Case` is T tokens routed top-k over E SwiGLU experts `[d -> f -> d]`, with a routing rule; `make_args(case,
seed)` builds `(x, weights, expert_ids, w_gate, w_up, w_down)` for `moe_ffn(*args, **kwargs)`. `cost(case,
args)` is what one call must move (the experts it touches, from the routing actually drawn).

Routings: "router" is softmax top-k (`kernels.moe.route`) of standard normal logits plus a popularity ramp
`linspace(0, popularity, E)` (a trained router's skew: the last experts draw more tokens) plus a per-expert
bias of std `bias_std`; "random" gives each token k distinct experts uniformly, "one_expert" puts every
token on experts 0..k-1, "empty_experts" draws from experts 0..k only (the rest get nothing), each with
weights uniform in [0.1, 1).

Tags say who uses a case: "test" (the shared suite's T=16, E=8, d=32, f=48 and its INT4-expert variant),
"asv" (CPU benchmarks, float32, Mixtral- and DeepSeek-like at d=1024), "accel" (the full model widths in
bf16: benchmarks.accel and the asv GPU class) and "smoke" (tiny, for `python -m benchmarks.accel --smoke`).

Axes: T tokens, E experts, k experts per token, d model width, f expert hidden width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kernels import case_table

ROUTINGS = ("router", "random", "one_expert", "empty_experts")


@dataclasses.dataclass(frozen=True)
class Case:
    """One MoE FFN call: shapes, dtype, the routing rule and the expert weights' format."""

    name: str
    tokens: int  # T
    num_experts: int  # E
    top_k: int  # k
    d_model: int  # d
    d_ff: int  # f
    dtype: str = "float32"  # x and float experts; routing weights stay float32
    routing: str = "router"
    popularity: float = 0.0
    bias_std: float = 0.0
    experts: str = "float"  # "float" or "int4" (RTN-like random codes, group 32)
    capacity_factor: float | None = None
    tags: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        """The shape in a few numbers, for reports."""
        return {
            "T": self.tokens,
            "E": self.num_experts,
            "k": self.top_k,
            "d": self.d_model,
            "f": self.d_ff,
            "dtype": self.dtype,
            "routing": self.routing,
            "popularity": self.popularity,
        }


# (E, k, d, f) of the model families the benchmarks follow, at the asv (host) and full widths.
ASV_MODELS = {"mixtral": (8, 2, 1024, 2816), "deepseek": (64, 6, 1024, 512)}
FULL_MODELS = {"mixtral": (8, 2, 4096, 14336), "deepseek": (64, 6, 2048, 1408)}
SMOKE_MODELS = {"mixtral": (4, 2, 32, 64), "deepseek": (8, 3, 32, 16)}
POPULARITY = 1.5  # the accelerator cases' router skew
ROUTER_BIAS_STD = 0.1  # the asv cases' per-expert bias


def model_case(
    model: str, widths: dict, tokens: int, *, tags: tuple[str, ...], prefix: str = "", **kw: Any
) -> Case:
    e, k, d, f = widths[model]
    short = {"float32": "f32", "bfloat16": "bf16"}.get(kw.get("dtype", "float32"), kw.get("dtype"))
    return Case(f"{prefix}{model} T{tokens} {short}", tokens, e, k, d, f, tags=tags, **kw)


_TEST = {"tokens": 16, "num_experts": 8, "top_k": 2, "d_model": 32, "d_ff": 48, "routing": "random"}

CASES: tuple[Case, ...] = (
    Case("test base", **_TEST, tags=("test",)),
    Case("test k1", **{**_TEST, "top_k": 1}, tags=("test",)),
    Case("test one_expert", **{**_TEST, "routing": "one_expert"}, tags=("test",)),
    Case("test empty_experts", **{**_TEST, "routing": "empty_experts"}, tags=("test",)),
    Case("test capacity 1.0", **_TEST, capacity_factor=1.0, tags=("test",)),
    *(Case(f"test {dt}", **_TEST, dtype=dt, tags=("test",)) for dt in ("bfloat16", "float16")),
    # INT4 experts: K of every expert matmul must hold whole groups of 32.
    Case("test int4 experts", **{**_TEST, "d_model": 64, "d_ff": 128}, experts="int4", tags=("test",)),
    *(
        model_case(m, ASV_MODELS, t, bias_std=ROUTER_BIAS_STD, tags=("asv",))
        for m in ASV_MODELS
        for t in (256, 8)
    ),
    *(
        model_case(m, FULL_MODELS, t, dtype="bfloat16", popularity=POPULARITY, tags=("accel",))
        for m in FULL_MODELS
        for t in (8, 256, 4096)
    ),
    *(
        model_case(
            m, SMOKE_MODELS, 8, dtype="bfloat16", popularity=POPULARITY, tags=("smoke",), prefix="smoke "
        )
        for m in SMOKE_MODELS
    ),
)


def cases(tag: str) -> tuple[Case, ...]:
    """The cases carrying `tag`, in `CASES` order."""
    return case_table.with_tag(CASES, tag, "MoE")


def get(name: str) -> Case:
    """The case called `name`."""
    return case_table.named(CASES, name, "MoE")


def _routing(case: Case, key: Any) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    from kernels.moe.routing import route

    t, e, k = case.tokens, case.num_experts, case.top_k
    kl, kb, kw = jax.random.split(key, 3)
    if case.routing == "router":
        logits = jax.random.normal(kl, (t, e), jnp.float32) + jnp.linspace(0.0, case.popularity, e)
        logits = logits + case.bias_std * jax.random.normal(kb, (e,), jnp.float32)
        return route(logits, top_k=k)
    if case.routing == "one_expert":
        ids = jnp.tile(jnp.arange(k, dtype=jnp.int32), (t, 1))
    else:
        pool = k + 1 if case.routing == "empty_experts" else e
        # k distinct experts per token: the k smallest of `pool` uniform scores.
        scores = jax.random.uniform(kl, (t, pool))
        ids = jnp.argsort(scores, axis=1)[:, :k].astype(jnp.int32)
    return jax.random.uniform(kw, (t, k), jnp.float32, 0.1, 1.0), ids


def _int4_experts(key: Any, e: int, k: int, n: int) -> Any:
    """E stacked `Int4Weight`s [k, n] (leaves with a leading expert axis, as the FFN takes them)."""
    import jax
    import jax.numpy as jnp

    from quant.format import Int4Weight

    group = 32

    def one(key: Any) -> Int4Weight:
        kp, ks, kz = jax.random.split(key, 3)
        return Int4Weight(
            jax.random.randint(kp, (k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8),
            jax.random.uniform(ks, (k // group, n), jnp.float32, 0.5, 1.5) * (0.1 / k**0.5),
            jax.random.randint(kz, (k // group, n), 0, 16, jnp.int32).astype(jnp.uint8),
            group_size=group,
        )

    return jax.tree.map(lambda *a: jnp.stack(a), *[one(kk) for kk in jax.random.split(key, e)])


def make_args(case: Case, seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`(args, kwargs)` for `moe_ffn(*args, **kwargs)`: `x [T, d]` standard normal, routing `weights [T, k]
    float32` and `expert_ids [T, k] int32` by `case.routing`, experts `w_gate, w_up [E, d, f]`, `w_down
    [E, f, d]` normal with std d^-1/2 (f^-1/2 for w_down) in `case.dtype`, or stacked `Int4Weight`s; kwargs
    carry `capacity_factor` when the case sets one. Drawn on the default device with `jax.random`."""
    import jax
    import jax.numpy as jnp

    if case.routing not in ROUTINGS:
        raise ValueError(f"case {case.name!r}: routing={case.routing!r} must be one of {ROUTINGS}")
    kx, kr, kg, ku, kd = jax.random.split(jax.random.key(seed), 5)
    e, d, f, dtype = case.num_experts, case.d_model, case.d_ff, jnp.dtype(case.dtype)
    x = jax.random.normal(kx, (case.tokens, d), dtype)
    weights, ids = _routing(case, kr)
    if case.experts == "int4":
        experts = (_int4_experts(kg, e, d, f), _int4_experts(ku, e, d, f), _int4_experts(kd, e, f, d))
    else:
        experts = (
            (jax.random.normal(kg, (e, d, f), jnp.float32) * d**-0.5).astype(dtype),
            (jax.random.normal(ku, (e, d, f), jnp.float32) * d**-0.5).astype(dtype),
            (jax.random.normal(kd, (e, f, d), jnp.float32) * f**-0.5).astype(dtype),
        )
    kwargs = {} if case.capacity_factor is None else {"capacity_factor": case.capacity_factor}
    return (x, weights, ids, *experts), kwargs


def experts_touched(args: tuple[Any, ...]) -> int:
    """How many distinct experts the routing in `args` (from `make_args`) sends tokens to."""
    import numpy as np

    return int(np.unique(np.asarray(args[2])).size)


def arg_shapes(case: Case) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`make_args(case)` as shapes only (`jax.ShapeDtypeStruct` leaves): for compiling, no array is made."""
    import jax

    kwargs = {} if case.capacity_factor is None else {"capacity_factor": case.capacity_factor}
    return jax.eval_shape(lambda: make_args(case)[0]), kwargs


def cost(case: Case, args: tuple[Any, ...] | None = None) -> Any:
    """`moe_ffn_cost` of one call on `case` (a `kernels.cost.Cost`): the experts `args` touch, or the
    expectation under uniform routing without `args`."""
    from kernels.moe import moe_ffn_cost

    return moe_ffn_cost(
        case.tokens,
        case.num_experts,
        case.top_k,
        case.d_model,
        case.d_ff,
        dtype=case.dtype,
        w_dtype="int4" if case.experts == "int4" else None,
        experts_touched=None if args is None else experts_touched(args),
    )
