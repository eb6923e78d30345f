"""The sharded kernels measured: one decoder layer's kernels on n devices against the same kernels on one.

For a model, batch B and context L, each component is run twice on the same inputs: by the single-device
kernel on the first device, and by its sharded form in `kernels.parallel` over a 1-D mesh of the first n
devices (axis "shard"), laid out as tensor- and expert-parallel serving shards them:

- qkv_proj: every q/k/v (or MLA) projection as `int4_matmul(mode="column")`: N split, no collective.
- attention: `paged_attention` with query heads split (kv heads split, or replicated when n exceeds them).
- o_proj: `int4_matmul(mode="row")`: K split in whole groups, partial products summed with `psum`.
- mlp (dense layers): gate and up column-split, down row-split (one `psum`), as Megatron-LM does.
- moe_experts (MoE layers): `moe_ffn` expert parallel over the routed experts (shared experts left out),
  tokens and experts split, two `all_to_all`s.

Weights are INT4 (group 128), activations float32 on the CPU and bf16 on a GPU or TPU; the cache is
paged (page 16, shuffled). The result is each component's time on one device and on n, and their ratio.
Simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set before JAX starts) share
the machine's cores and memory, so their times check that the sharded kernels run, not how they scale; the
result says so.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from roofline.measure import PAGE_SIZE, Case, _make_weight, _progress, _stack, _time_case
from roofline.models import ModelShape

AXIS = "shard"


@dataclasses.dataclass(frozen=True)
class ShardedComponent:
    name: str
    layout: str  # how the component is split, e.g. "int4_matmul column (N split)"
    single_s: float  # per occurrence on one device
    sharded_s: float  # per occurrence on the n devices together

    @property
    def speedup(self) -> float:
        return self.single_s / self.sharded_s


@dataclasses.dataclass(frozen=True)
class ShardedMeasurement:
    model: str
    devices: int
    platform: str
    batch: int
    context: int
    components: tuple[ShardedComponent, ...]
    shared_cores: bool  # the devices are simulated on one machine's CPU cores: not a scaling result
    notes: tuple[str, ...]


def check_sharding(model: ModelShape, devices: int, batch: int) -> None:
    """The shape conditions the sharded kernels need, as a ValueError naming the numbers."""
    n = devices
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"devices={n!r} must be an integer >= 2")
    if model.heads % n:
        raise ValueError(f"{model.name}: heads={model.heads} must be divisible by devices={n}")
    kv_heads = 1 if model.is_mla else model.kv_heads
    if kv_heads % n and n % kv_heads:
        raise ValueError(f"{model.name}: kv_heads={kv_heads} must divide or be a multiple of devices={n}")
    for name, (k, out) in model.linear_shapes().items():
        if name == "o":
            if (k // 128) % n:
                raise ValueError(
                    f"{model.name}: o_proj's {k // 128} groups of 128 must split over devices={n}"
                )
        elif out % n:
            raise ValueError(f"{model.name}: {name} projection's N={out} must be divisible by devices={n}")
    if model.layers > model.moe_layers and (model.ffn % n or (model.ffn // 128) % n):
        raise ValueError(f"{model.name}: ffn={model.ffn} must split into whole groups over devices={n}")
    if model.is_moe:
        if model.experts % n:
            raise ValueError(f"{model.name}: experts={model.experts} must be divisible by devices={n}")
        if batch % n:
            raise ValueError(f"batch={batch} must be divisible by devices={n} (tokens are split over them)")


def _cases(
    model: ModelShape, n: int, batch: int, context: int, rng: np.random.Generator
) -> dict[str, Callable[[], tuple[str, Case, Case]]]:
    """Per component: a builder of (layout, single-device case, sharded case), on the same inputs."""
    from jax.sharding import Mesh

    from kernels import moe_ffn, paged_attention, route
    from kernels import parallel as par

    mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))
    act = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    shapes = model.linear_shapes()
    h = model.hidden

    def activations(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), act)

    def int4(k: int, out: int) -> Any:
        return _make_weight(k, out, "int4", rng)

    def place(w: Any, mode: str) -> Any:
        return par.shard_int4_weight(w, mesh, AXIS, mode)

    def qkv() -> tuple[str, Case, Case]:
        names = [name for name in shapes if name != "o"]
        ws = [int4(*shapes[name]) for name in names]
        xs = tuple(activations(batch, shapes[name][0]) for name in names)

        def single(ws, *xs):
            from kernels import int4_matmul

            return [int4_matmul(a, w) for a, w in zip(xs, ws, strict=True)]

        def sharded(ws, *xs):
            return [
                par.int4_matmul(a, w, mesh=mesh, axis=AXIS, mode="column")
                for a, w in zip(xs, ws, strict=True)
            ]

        return (
            "int4_matmul column (N split)",
            Case(jax.jit(single), ws, xs),
            Case(jax.jit(sharded), [place(w, "column") for w in ws], xs),
        )

    def o_proj() -> tuple[str, Case, Case]:
        from kernels import int4_matmul

        w = int4(*shapes["o"])
        x = activations(batch, shapes["o"][0])
        return (
            "int4_matmul row (K split, psum)",
            Case(jax.jit(lambda w, a: int4_matmul(a, w)), w, (x,)),
            Case(
                jax.jit(lambda w, a: par.int4_matmul(a, w, mesh=mesh, axis=AXIS, mode="row")),
                place(w, "row"),
                (x,),
            ),
        )

    def mlp() -> tuple[str, Case, Case]:
        from kernels import int4_matmul

        f = model.ffn
        gate, up, down = int4(h, f), int4(h, f), int4(f, h)
        x = activations(batch, h)

        def single(ws, x):
            g, u, d = ws
            return int4_matmul(jax.nn.silu(int4_matmul(x, g)) * int4_matmul(x, u), d)

        def sharded(ws, x):
            g, u, d = ws
            mm = par.int4_matmul
            hidden = jax.nn.silu(mm(x, g, mesh=mesh, axis=AXIS, mode="column")) * mm(
                x, u, mesh=mesh, axis=AXIS, mode="column"
            )
            return mm(hidden, d, mesh=mesh, axis=AXIS, mode="row")

        return (
            "gate/up column, down row (psum)",
            Case(jax.jit(single), (gate, up, down), (x,)),
            Case(jax.jit(sharded), (place(gate, "column"), place(up, "column"), place(down, "row")), (x,)),
        )

    def attention() -> tuple[str, Case, Case]:
        if model.is_mla:
            kv_heads, d = 1, model.kv_lora_rank + model.qk_rope_head_dim
        else:
            kv_heads, d = model.kv_heads, model.head_dim
        pages_per_seq = -(-context // PAGE_SIZE)
        num_pages = batch * pages_per_seq
        shape = (num_pages, PAGE_SIZE, kv_heads, d)
        pages = tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32), act) for _ in range(2))
        bt = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq).astype(np.int32))
        lens = jnp.full((batch,), context, jnp.int32)
        q = activations(batch, model.heads, d)
        layout = "paged_attention heads split" + (" (kv heads replicated)" if n > kv_heads else "")
        return (
            layout,
            Case(
                jax.jit(lambda kv, q, lens, bt: paged_attention(q, kv[0], kv[1], lens, bt)),
                pages,
                (q, lens, bt),
            ),
            Case(
                jax.jit(
                    lambda kv, q, lens, bt: par.paged_attention(
                        q, kv[0], kv[1], lens, bt, mesh=mesh, axis=AXIS
                    )
                ),
                pages,
                (q, lens, bt),
            ),
        )

    def moe_experts() -> tuple[str, Case, Case]:
        e, f = model.experts, model.moe_ffn
        ws = tuple(_stack([int4(k, out) for _ in range(e)]) for k, out in ((h, f), (h, f), (f, h)))
        x = activations(batch, h)
        popularity = jnp.asarray(rng.standard_normal(e).astype(np.float32))
        logits = jnp.asarray(rng.standard_normal((batch, e)).astype(np.float32)) + popularity
        rw, ids = route(logits, top_k=model.top_k, renormalize=True)
        return (
            "moe_ffn expert parallel (all_to_all)",
            Case(jax.jit(lambda ws, x, rw, ids: moe_ffn(x, rw, ids, *ws)), ws, (x, rw, ids)),
            Case(
                jax.jit(lambda ws, x, rw, ids: par.moe_ffn(x, rw, ids, *ws, mesh=mesh, axis=AXIS)),
                tuple(place(w, "expert") for w in ws),
                (x, rw, ids),
            ),
        )

    builders = {"qkv_proj": qkv, "attention": attention, "o_proj": o_proj}
    if model.layers > model.moe_layers:
        builders["mlp"] = mlp
    if model.is_moe:
        builders["moe_experts"] = moe_experts
    return builders


def measure_sharded(
    model: ModelShape,
    *,
    devices: int,
    batch: int,
    context: int,
    min_time_s: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> ShardedMeasurement:
    """Time each sharded kernel of one layer on the first `devices` devices against one device."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an integer >= 1")
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context={context!r} must be an integer >= 1")
    check_sharding(model, devices, batch)
    have = jax.device_count()
    platform = jax.devices()[0].platform
    if have < devices:
        hint = (
            f" (on the CPU, start Python with XLA_FLAGS=--xla_force_host_platform_device_count={devices})"
            if platform == "cpu"
            else ""
        )
        raise ValueError(f"devices={devices} but JAX sees {have} {platform} device(s){hint}")
    builders = _cases(model, devices, batch, context, np.random.default_rng(seed))
    results = []
    for i, (name, build) in enumerate(builders.items()):
        if progress:
            _progress(i, len(builders), name, sys.stderr)
        layout, single, sharded = build()
        results.append(
            ShardedComponent(name, layout, _time_case(single, min_time_s), _time_case(sharded, min_time_s))
        )
        del single, sharded
    if progress:
        _progress(len(builders), len(builders), "done", sys.stderr)
    shared = platform == "cpu"
    notes = ["INT4 weights (group 128); one layer's kernels; lm_head and the router are not sharded here"]
    if shared:
        notes.append(
            f"the {devices} devices are simulated on this machine's {os.cpu_count()} CPU cores: they share "
            "cores and memory, so these times show that the sharded kernels run, not how they scale"
        )
    return ShardedMeasurement(
        model=model.name,
        devices=devices,
        platform=platform,
        batch=batch,
        context=context,
        components=tuple(results),
        shared_cores=shared,
        notes=tuple(notes),
    )


__all__ = ["ShardedComponent", "ShardedMeasurement", "check_sharding", "measure_sharded"]
