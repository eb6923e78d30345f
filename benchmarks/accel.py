"""The lab's check on whatever accelerator is present: every lab kernel against the device's own baselines.

    python -m benchmarks.accel [--smoke] [--out FILE] [--only KERNEL[,KERNEL]]

Cases (bf16 throughout; `--smoke` runs the same code at tiny shapes, on any backend, the CPU included):
- paged_attention: decode, (B, L) in {(8, 4096), (64, 4096), (16, 16384)}, H=32, K=8, D=128, page 16, every
  sequence at length L, its pages shuffled over the pool. Lab: every implementation in
  `kernels.available_impls("paged_attention")` but "reference". Baselines: `jax.nn.dot_product_attention`
  (implementation "cudnn" and "xla") on a contiguous [B, L, K, D] cache; JAX's own Pallas op
  `jax.experimental.pallas.ops.gpu.paged_attention` (its [K, P, S, D] page layout, GPU only); PyTorch's
  `scaled_dot_product_attention` (contiguous, GQA) when torch imports with a CUDA device.
- int4_matmul: (K, N) in {(4096, 14336), (8192, 28672)}, group 128, M in {1, 16, 64}, asymmetric codes
  with float16 scales. Lab: `kernels.available_impls("int4_matmul")` but "reference". Baselines: the bf16
  matmul through XLA and through torch, and torch's `_weight_int4pack_mm` (tinygemm) when available.
- moe_ffn: Mixtral-like (E8 k2 d4096 f14336) and DeepSeek-like (E64 k6 d2048 f1408) at T in {8, 256,
  4096}, routed top-k by softmax from random logits plus a per-expert popularity offset linspace(0, 1.5, E)
  (a trained router's skew). Lab: `kernels.available_impls("moe_ffn")` but "reference". Baselines: a
  balanced batched einsum (E experts × T·k/E rows: the same FLOPs and weights with no routing), the SwiGLU
  FFN on `jax.lax.ragged_dot`, and the same on JAX's Mosaic GPU ragged dot example
  (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`, Hopper only).

A peer that cannot run here is a row with status "missing: <why>"; one that raises is "failed: <error>";
nothing is dropped.

Timing, as a GPU needs it:
- `ms`: device-side time per call: one jitted program runs the call many times (a `lax.fori_loop` whose
  body calls the kernel once on each of C rotated copies of the inputs, C chosen so the copies exceed
  ~128 MB, beyond the 50–60 MB L2 of an H100/H200, and at most ~40 GB), median of a few such runs. Each call
  takes its inputs through an optimization barrier with the loop carry, and the carry takes the sum of the
  output, so XLA can neither hoist any part of a call out of the loop nor drop it (the sum adds one read of
  the output). Torch rows replay a CUDA graph of the same calls, timed with CUDA events.
- `ms_dispatch`: the same calls dispatched back to back from Python, one sync at the end (includes JAX's
  10–16 µs host dispatch per call).
- `frac_datasheet`, `frac_measured`: bytes the row's implementation must move (from roofline's cost
  functions: `paged_attention_cost`, `int4_matmul_cost`, `matmul_cost`, `moe_ffn_cost`) over `ms`, as a
  fraction of the recognized chip's datasheet HBM bandwidth (`roofline.catalogue_chip`; null for an
  unknown device) and of the bandwidth `roofline.measure_host()` measured on this device.
- `ratio`: ms over the best baseline's ms in the same case (lab rows and baselines alike; < 1 is faster).

Output: a table on stdout and, with `--out`, JSON {"device", "chip", "smoke", "records": [...]}, one record
per (case, implementation): kernel, case, params, impl, role ("lab" | "baseline"), status, ms, ms_dispatch,
bytes, frac_datasheet, frac_measured, ratio, calls, copies.

Nothing heavy is imported at module level, and no module-level name starts with time_/track_, so asv's
discovery skips this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

KERNELS = ("paged_attention", "int4_matmul", "moe_ffn")

FULL = {
    "paged": {"batch_len": ((8, 4096), (64, 4096), (16, 16384)), "heads": (32, 8, 128), "page": 16},
    "int4": {"kn": ((4096, 14336), (8192, 28672)), "group": 128, "m": (1, 16, 64)},
    "moe": {
        "models": {"mixtral": (8, 2, 4096, 14336), "deepseek": (64, 6, 2048, 1408)},
        "tokens": (8, 256, 4096),
    },
    "copy_bytes": 128 << 20,  # rotate copies until they exceed this: well past a 50-60 MB L2
    "max_bytes": 40 << 30,  # and stay within this much device memory per case
    "max_copies": 8,
    "target_s": 0.02,  # device time per timed loop
    "max_calls": 400,
    "repeats": 3,
}
SMOKE = {
    "paged": {"batch_len": ((2, 64),), "heads": (4, 2, 16), "page": 16},
    "int4": {"kn": ((256, 128),), "group": 128, "m": (1, 4)},
    "moe": {"models": {"mixtral": (4, 2, 32, 64), "deepseek": (8, 3, 32, 16)}, "tokens": (8,)},
    "copy_bytes": 1 << 16,
    "max_bytes": 1 << 26,
    "max_copies": 2,
    "target_s": 0.001,
    "max_calls": 4,
    "repeats": 1,
}
POPULARITY = 1.5  # router skew: logits + linspace(0, POPULARITY, E)


# --------------------------------------------------------------------------------------------------
# status and records


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


class Missing(Exception):
    """A peer that cannot run on this machine (reported as "missing: <why>")."""


def _record(kernel: str, case: str, params: dict, impl: str, role: str) -> dict:
    return {
        "kernel": kernel,
        "case": case,
        "params": params,
        "impl": impl,
        "role": role,
        "status": None,
        "ms": None,
        "ms_dispatch": None,
        "bytes": None,
        "frac_datasheet": None,
        "frac_measured": None,
        "ratio": None,
        "calls": None,
        "copies": None,
    }


# --------------------------------------------------------------------------------------------------
# timing


def _copies(per_copy_bytes: float, cfg: dict) -> int:
    want = max(2, math.ceil(cfg["copy_bytes"] / max(per_copy_bytes, 1.0)))
    fit = max(1, int(cfg["max_bytes"] // max(per_copy_bytes, 1.0)))
    return max(1, min(want, cfg["max_copies"], fit))


def _tree_bytes(tree: Any) -> float:
    import jax

    return float(sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(tree)))


def _sync(out: Any) -> None:
    import jax

    jax.block_until_ready(out)


def _measure_jax(fn: Callable, args: tuple, cfg: dict) -> dict:
    """Device-side and dispatch-inclusive ms per call of `fn(*args)` (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from roofline import copy_inputs

    copies = _copies(_tree_bytes(args), cfg)
    sets = copy_inputs(args, copies)
    jfn = jax.jit(fn)
    _sync(jfn(*sets[0]))  # compile
    t0 = time.perf_counter()
    _sync(jfn(*sets[0]))
    est = max(time.perf_counter() - t0, 1e-6)
    iters = max(1, min(cfg["max_calls"] // copies, math.ceil(cfg["target_s"] / est / copies)))
    calls = iters * copies

    def run_dispatch() -> float:
        t0 = time.perf_counter()
        out = None
        for i in range(calls):
            out = jfn(*sets[i % copies])
        _sync(out)
        return time.perf_counter() - t0

    def loop(all_sets):
        def body(_, acc):
            for s in all_sets:
                # Tie every input to the loop carry (free: the barrier only orders), so that no part of
                # the call (a page gather, a dequantized weight) is loop-invariant and hoisted out.
                acc, s = lax.optimization_barrier((acc, s))
                out = fn(*s)
                acc = acc + jnp.sum(out.astype(jnp.float32)) * 1e-30
            return acc

        return lax.fori_loop(0, iters, body, jnp.float32(0.0))

    jloop = jax.jit(loop)
    _sync(jloop(sets))  # compile

    def run_loop() -> float:
        t0 = time.perf_counter()
        _sync(jloop(sets))
        return time.perf_counter() - t0

    reps = cfg["repeats"]
    dispatch = statistics.median(run_dispatch() for _ in range(reps))
    device = statistics.median(run_loop() for _ in range(reps))
    return {
        "ms": 1e3 * device / calls,
        "ms_dispatch": 1e3 * dispatch / calls,
        "calls": calls,
        "copies": copies,
    }


def _measure_torch(fn: Callable, sets: list, cfg: dict) -> dict:
    """CUDA-graph replay of `calls` calls over rotated input sets (device ms) and back-to-back calls."""
    import torch

    copies = len(sets)
    fn(*sets[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*sets[0])
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    iters = max(1, min(cfg["max_calls"] // copies, math.ceil(cfg["target_s"] / est / copies)))
    calls = iters * copies

    def run_dispatch() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(calls):
            fn(*sets[i % copies])
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for s in sets:  # warm up on the side stream, as graph capture requires
            fn(*s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*sets[i % copies])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run_graph() -> float:
        graph.replay()  # warm
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    reps = cfg["repeats"]
    dispatch = statistics.median(run_dispatch() for _ in range(reps))
    device = statistics.median(run_graph() for _ in range(reps))
    return {
        "ms": 1e3 * device / calls,
        "ms_dispatch": 1e3 * dispatch / calls,
        "calls": calls,
        "copies": copies,
    }


def _torch_cuda():
    """torch, when it imports and sees a CUDA device; else raise Missing."""
    try:
        import torch
    except Exception as err:  # any import failure means the peer is missing, whatever it is
        raise Missing(f"torch does not import ({type(err).__name__})") from err
    if not torch.cuda.is_available():
        raise Missing("torch sees no CUDA device")
    return torch


def _torch_sets(make: Callable[[], tuple], per_copy_bytes: float, cfg: dict) -> list:
    return [make() for _ in range(_copies(per_copy_bytes, cfg))]


# --------------------------------------------------------------------------------------------------
# the device


def _device_info(smoke: bool) -> dict:
    import jax

    import roofline

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "") or ""
    info: dict[str, Any] = {
        "platform": dev.platform,
        "device_kind": kind,
        "jax": jax.__version__,
        "compute_capability": getattr(dev, "compute_capability", None),
    }
    catalogue = getattr(roofline, "catalogue_chip", None)
    key = None
    if catalogue is not None:
        try:
            key = catalogue(kind)
        except Exception as err:  # the device check must run even if the recognizer trips
            info["chip_error"] = _short(err)
    info["chip"] = key
    info["datasheet_bandwidth"] = float(roofline.CHIPS[key].bandwidth) if key in roofline.CHIPS else None
    try:
        host = (
            roofline.measure_host(matmul_n=256, stream_bytes=64 << 20) if smoke else roofline.measure_host()
        )
        info["measured_bandwidth"] = float(host.bandwidth)
    except Exception as err:  # report the device anyway; fractions of the measured roof become null
        info["measured_bandwidth"] = None
        info["measure_error"] = _short(err)
    return info


def _is_gpu() -> bool:
    import jax

    return jax.devices()[0].platform == "gpu"


def _is_hopper() -> bool:
    import jax

    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def _lab_impls(op: str) -> tuple[str, ...]:
    import kernels

    available = getattr(kernels, "available_impls", None)
    impls = available(op) if available is not None else ("xla",)
    return tuple(i for i in impls if i != "reference")


# --------------------------------------------------------------------------------------------------
# paged attention


def _paged_rows(cfg: dict) -> list[tuple[dict, Callable[[], dict]]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kernels

    p = cfg["paged"]
    h, kh, d = p["heads"]
    page = p["page"]
    rows = []
    for b, seq in p["batch_len"]:
        case = f"decode B{b} L{seq}"
        params = {"B": b, "L": seq, "H": h, "K": kh, "D": d, "page": page, "dtype": "bf16"}
        pages_per_seq = seq // page
        num_pages = b * pages_per_seq
        state: dict[str, Any] = {}

        def inputs(b=b, seq=seq, num_pages=num_pages, pages_per_seq=pages_per_seq, state=state):
            if "q" not in state:
                k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
                state["q"] = jax.random.normal(k1, (b, h, d), jnp.bfloat16)
                state["k"] = jax.random.normal(k2, (num_pages, page, kh, d), jnp.bfloat16)
                state["v"] = jax.random.normal(k3, (num_pages, page, kh, d), jnp.bfloat16)
                perm = np.random.default_rng(0).permutation(num_pages).astype(np.int32)
                state["bt"] = jnp.asarray(perm.reshape(b, pages_per_seq))
                state["lens"] = jnp.full((b,), seq, jnp.int32)
            return state

        def lab_bytes(b=b, seq=seq):
            return kernels.paged_attention_cost(b, h, kh, d, np.full(b, seq), dtype="bf16").bytes

        for impl in _lab_impls("paged_attention"):

            def run(impl=impl, inputs=inputs, lab_bytes=lab_bytes):
                s = inputs()

                def fn(q, kp, vp, lens, bt):
                    return kernels.paged_attention(q, kp, vp, lens, bt, impl=impl)

                args = (s["q"], s["k"], s["v"], s["lens"], s["bt"])
                try:
                    jax.eval_shape(fn, *args)
                except ValueError as err:  # the implementation declines this case
                    raise Missing(f"unsupported: {_short(err)}") from err
                return {**_measure_jax(fn, args, cfg), "bytes": lab_bytes()}

            rows.append(
                (
                    {
                        "kernel": "paged_attention",
                        "case": case,
                        "params": params,
                        "impl": impl,
                        "role": "lab",
                    },
                    run,
                )
            )

        def contiguous(s, b=b, seq=seq):
            # The same tokens, gathered once (outside the timing) into [B, L, K, D].
            k = s["k"][s["bt"]].reshape(b, seq, kh, d)
            v = s["v"][s["bt"]].reshape(b, seq, kh, d)
            return k, v

        for dpa_impl in ("cudnn", "xla"):

            def run(dpa_impl=dpa_impl, inputs=inputs, lab_bytes=lab_bytes, contiguous=contiguous, b=b):
                if dpa_impl == "cudnn" and not _is_gpu():
                    raise Missing("cuDNN attention needs an NVIDIA GPU")
                s = inputs()
                k, v = contiguous(s)

                def fn(q, k, v):
                    return jax.nn.dot_product_attention(q[:, None], k, v, implementation=dpa_impl)[:, 0]

                return {**_measure_jax(fn, (s["q"], k, v), cfg), "bytes": lab_bytes()}

            rows.append(
                (
                    {
                        "kernel": "paged_attention",
                        "case": case,
                        "params": params,
                        "impl": f"jax.nn.dot_product_attention[{dpa_impl}] contiguous",
                        "role": "baseline",
                    },
                    run,
                )
            )

        def run_pallas(inputs=inputs, lab_bytes=lab_bytes, pages_per_seq=pages_per_seq):
            if not _is_gpu():
                raise Missing("JAX's Pallas paged attention is a GPU kernel")
            try:
                from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
            except Exception as err:  # absent from this JAX
                raise Missing(f"jax.experimental.pallas.ops.gpu.paged_attention: {_short(err)}") from err
            s = inputs()
            kp = jnp.transpose(s["k"], (2, 0, 1, 3))  # its layout: [K, P, S, D]
            vp = jnp.transpose(s["v"], (2, 0, 1, 3))
            splits = math.gcd(16, pages_per_seq)
            per_block = max(1, math.gcd(8, pages_per_seq // splits))

            def fn(q, kp, vp, bt, lens):
                return jax_paged.paged_attention(
                    q, kp, vp, bt, lens, k_splits=splits, pages_per_compute_block=per_block
                )

            return {**_measure_jax(fn, (s["q"], kp, vp, s["bt"], s["lens"]), cfg), "bytes": lab_bytes()}

        rows.append(
            (
                {
                    "kernel": "paged_attention",
                    "case": case,
                    "params": params,
                    "impl": "jax.experimental.pallas.ops.gpu.paged_attention",
                    "role": "baseline",
                },
                run_pallas,
            )
        )

        def run_torch(inputs=inputs, lab_bytes=lab_bytes, contiguous=contiguous, b=b, seq=seq):
            torch = _torch_cuda()
            import torch.nn.functional as tf

            def make():
                q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(b, kh, seq, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(b, kh, seq, d, device="cuda", dtype=torch.bfloat16)
                return q, k, v

            sets = _torch_sets(make, 2.0 * b * kh * seq * d * 2, cfg)

            def fn(q, k, v):
                return tf.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            return {**_measure_torch(fn, sets, cfg), "bytes": lab_bytes()}

        rows.append(
            (
                {
                    "kernel": "paged_attention",
                    "case": case,
                    "params": params,
                    "impl": "torch scaled_dot_product_attention contiguous",
                    "role": "baseline",
                },
                run_torch,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------------
# INT4 matmul


def _int4_rows(cfg: dict) -> list[tuple[dict, Callable[[], dict]]]:
    import jax
    import jax.numpy as jnp

    import kernels
    from quant import Int4Weight
    from roofline import matmul_cost

    c = cfg["int4"]
    group = c["group"]
    rows = []
    for k, n in c["kn"]:
        state: dict[str, Any] = {}

        def weight(k=k, n=n, state=state):
            if "w" not in state:
                k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
                g = k // group
                packed = jax.random.randint(k1, (k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8)
                scales = (jax.random.uniform(k2, (g, n), jnp.float32, 0.5, 1.5) * 0.01).astype(jnp.float16)
                zeros = jax.random.randint(k3, (g, n), 0, 16, jnp.int32).astype(jnp.uint8)
                state["w"] = Int4Weight(packed, scales, zeros, group_size=group)
                state["w_bf16"] = jax.random.normal(k1, (k, n), jnp.bfloat16) * 0.02
            return state

        for m in c["m"]:
            case = f"{k}x{n} M{m}"
            params = {"M": m, "K": k, "N": n, "group": group, "dtype": "bf16"}

            def x_of(m=m, k=k):
                return jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)

            def int4_bytes(m=m, k=k, n=n, scale_dtype="float16"):
                return kernels.int4_matmul_cost(
                    m, k, n, group_size=group, x_dtype="bf16", scale_dtype=scale_dtype
                ).bytes

            for impl in _lab_impls("int4_matmul"):

                def run(impl=impl, weight=weight, x_of=x_of, int4_bytes=int4_bytes):
                    w = weight()["w"]

                    def fn(x, w):
                        return kernels.int4_matmul(x, w, impl=impl)

                    try:
                        jax.eval_shape(fn, x_of(), w)
                    except ValueError as err:
                        raise Missing(f"unsupported: {_short(err)}") from err
                    return {**_measure_jax(fn, (x_of(), w), cfg), "bytes": int4_bytes()}

                rows.append(
                    (
                        {
                            "kernel": "int4_matmul",
                            "case": case,
                            "params": params,
                            "impl": impl,
                            "role": "lab",
                        },
                        run,
                    )
                )

            def run_xla(weight=weight, x_of=x_of, m=m, k=k, n=n):
                wb = weight()["w_bf16"]

                def fn(x, w):
                    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

                cost = matmul_cost(m, k, n, x_dtype="bf16")
                return {**_measure_jax(fn, (x_of(), wb), cfg), "bytes": cost.bytes}

            rows.append(
                (
                    {
                        "kernel": "int4_matmul",
                        "case": case,
                        "params": params,
                        "impl": "bf16 matmul (XLA)",
                        "role": "baseline",
                    },
                    run_xla,
                )
            )

            def run_torch_bf16(m=m, k=k, n=n):
                torch = _torch_cuda()

                def make():
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    return x, torch.randn(k, n, device="cuda", dtype=torch.bfloat16)

                sets = _torch_sets(make, 2.0 * k * n, cfg)
                return {
                    **_measure_torch(torch.mm, sets, cfg),
                    "bytes": matmul_cost(m, k, n, x_dtype="bf16").bytes,
                }

            rows.append(
                (
                    {
                        "kernel": "int4_matmul",
                        "case": case,
                        "params": params,
                        "impl": "torch bf16 mm",
                        "role": "baseline",
                    },
                    run_torch_bf16,
                )
            )

            def run_tinygemm(m=m, k=k, n=n, int4_bytes=int4_bytes):
                torch = _torch_cuda()
                mm = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
                convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack", None)
                if mm is None or convert is None:
                    raise Missing("this torch has no _weight_int4pack_mm")

                def make():
                    # Codes [N, K] in 0..15, two per byte along K (torch >= 2.5's uint8 input), then the
                    # kernel's tiled layout; scales and zeros [K/g, N, 2] bf16.
                    codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
                    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
                    wq = convert(packed, 8)
                    sz = torch.rand(k // group, n, 2, device="cuda", dtype=torch.bfloat16)
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    return x, wq, sz

                sets = _torch_sets(make, k * n / 2.0, cfg)

                def fn(x, wq, sz):
                    return mm(x, wq, group, sz)

                return {**_measure_torch(fn, sets, cfg), "bytes": int4_bytes(scale_dtype="bf16")}

            rows.append(
                (
                    {
                        "kernel": "int4_matmul",
                        "case": case,
                        "params": params,
                        "impl": "torch _weight_int4pack_mm (tinygemm)",
                        "role": "baseline",
                    },
                    run_tinygemm,
                )
            )
    return rows


# --------------------------------------------------------------------------------------------------
# MoE


def _swiglu_ragged(dot: Callable, x, weights, ids, wg, wu, wd):
    """The MoE FFN with the three expert GEMMs as grouped (ragged) dots: sort assignments by expert, run,
    scatter back weighted (a baseline; the lab's "ragged" strategy is the same idea)."""
    import jax
    import jax.numpy as jnp

    t, k = ids.shape
    e = wg.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros((e,), jnp.int32).at[flat].add(1)
    xs = x[order // k]
    g = dot(xs, wg, sizes)
    u = dot(xs, wu, sizes)
    hdn = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(x.dtype)
    ys = dot(hdn, wd, sizes).astype(jnp.float32)
    w = weights.reshape(-1)[order].astype(jnp.float32)
    y = jnp.zeros((t, x.shape[1]), jnp.float32).at[order // k].add(ys * w[:, None])
    return y.astype(x.dtype)


def _moe_rows(cfg: dict) -> list[tuple[dict, Callable[[], dict]]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kernels

    c = cfg["moe"]
    rows = []
    for model, (e, top_k, d, f) in c["models"].items():
        wstate: dict[str, Any] = {}

        def experts(e=e, d=d, f=f, wstate=wstate):
            if "wg" not in wstate:
                k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
                wstate["wg"] = jax.random.normal(k1, (e, d, f), jnp.bfloat16) * (d**-0.5)
                wstate["wu"] = jax.random.normal(k2, (e, d, f), jnp.bfloat16) * (d**-0.5)
                wstate["wd"] = jax.random.normal(k3, (e, f, d), jnp.bfloat16) * (f**-0.5)
            return wstate["wg"], wstate["wu"], wstate["wd"]

        for t in c["tokens"]:
            case = f"{model} T{t}"
            params = {
                "model": model,
                "E": e,
                "k": top_k,
                "d": d,
                "f": f,
                "T": t,
                "dtype": "bf16",
                "popularity": POPULARITY,
            }
            tstate: dict[str, Any] = {}

            def tokens(t=t, e=e, top_k=top_k, d=d, tstate=tstate):
                if "x" not in tstate:
                    k1, k2 = jax.random.split(jax.random.key(4))
                    logits = jax.random.normal(k2, (t, e), jnp.float32) + jnp.linspace(0.0, POPULARITY, e)
                    w, ids = kernels.route(logits, top_k=top_k)
                    tstate["x"] = jax.random.normal(k1, (t, d), jnp.bfloat16)
                    tstate["w"], tstate["ids"] = w, ids
                    tstate["touched"] = int(np.unique(np.asarray(ids)).size)
                return tstate

            def cost(touched, t=t, e=e, top_k=top_k, d=d, f=f):
                return kernels.moe_ffn_cost(t, e, top_k, d, f, dtype="bf16", experts_touched=touched).bytes

            for impl in _lab_impls("moe_ffn"):

                def run(impl=impl, tokens=tokens, experts=experts, cost=cost):
                    s = tokens()

                    def fn(x, w, ids, wg, wu, wd):
                        return kernels.moe_ffn(x, w, ids, wg, wu, wd, impl=impl)

                    args = (s["x"], s["w"], s["ids"], *experts())
                    try:
                        jax.eval_shape(fn, *args)
                    except ValueError as err:
                        raise Missing(f"unsupported: {_short(err)}") from err
                    return {**_measure_jax(fn, args, cfg), "bytes": cost(s["touched"])}

                rows.append(
                    ({"kernel": "moe_ffn", "case": case, "params": params, "impl": impl, "role": "lab"}, run)
                )

            def run_balanced(experts=experts, cost=cost, t=t, e=e, top_k=top_k, d=d):
                per = max(1, t * top_k // e)
                xb = jax.random.normal(jax.random.key(5), (e, per, d), jnp.bfloat16)

                def fn(xb, wg, wu, wd):
                    g = jnp.einsum("ecd,edf->ecf", xb, wg, preferred_element_type=jnp.float32)
                    u = jnp.einsum("ecd,edf->ecf", xb, wu, preferred_element_type=jnp.float32)
                    hdn = (jax.nn.silu(g) * u).astype(xb.dtype)
                    return jnp.einsum("ecf,efd->ecd", hdn, wd, preferred_element_type=jnp.float32)

                return {**_measure_jax(fn, (xb, *experts()), cfg), "bytes": cost(e)}

            rows.append(
                (
                    {
                        "kernel": "moe_ffn",
                        "case": case,
                        "params": params,
                        "impl": "balanced batched einsum",
                        "role": "baseline",
                    },
                    run_balanced,
                )
            )

            def run_ragged(tokens=tokens, experts=experts, cost=cost):
                s = tokens()

                def dot(a, b, sizes):
                    return jax.lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32).astype(a.dtype)

                def fn(x, w, ids, wg, wu, wd):
                    return _swiglu_ragged(dot, x, w, ids, wg, wu, wd)

                args = (s["x"], s["w"], s["ids"], *experts())
                return {**_measure_jax(fn, args, cfg), "bytes": cost(s["touched"])}

            rows.append(
                (
                    {
                        "kernel": "moe_ffn",
                        "case": case,
                        "params": params,
                        "impl": "jax.lax.ragged_dot",
                        "role": "baseline",
                    },
                    run_ragged,
                )
            )

            def run_mgpu(tokens=tokens, experts=experts, cost=cost):
                if not _is_hopper():
                    raise Missing(
                        "JAX's Mosaic GPU ragged dot example needs a Hopper GPU (compute capability 9.x)"
                    )
                try:
                    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
                except Exception as err:  # absent from this JAX, or absl-py missing
                    raise Missing(f"ragged_dot_mgpu does not import: {_short(err)}") from err
                s = tokens()

                def dot(a, b, sizes):
                    return ragged_dot_mgpu.ragged_dot(
                        a,
                        b,
                        group_sizes=sizes,
                        block_m=128,
                        block_n=math.gcd(128, b.shape[2]),  # whole blocks at the smoke shapes too
                        block_k=math.gcd(64, a.shape[1]),
                        max_concurrent_steps=4,
                        grid_block_n=1,
                    )

                def fn(x, w, ids, wg, wu, wd):
                    return _swiglu_ragged(dot, x, w, ids, wg, wu, wd)

                args = (s["x"], s["w"], s["ids"], *experts())
                return {**_measure_jax(fn, args, cfg), "bytes": cost(s["touched"])}

            rows.append(
                (
                    {
                        "kernel": "moe_ffn",
                        "case": case,
                        "params": params,
                        "impl": "jax.experimental.pallas.ops.gpu.ragged_dot_mgpu",
                        "role": "baseline",
                    },
                    run_mgpu,
                )
            )
    return rows


# --------------------------------------------------------------------------------------------------
# driver


def run(
    smoke: bool = False, only: tuple[str, ...] = KERNELS, progress: Callable[[str], None] | None = None
) -> dict:
    """Run every case; returns {"device", "chip", "smoke", "records"} (see the module docstring)."""
    for name in only:
        if name not in KERNELS:
            raise ValueError(f"kernel {name!r} must be one of {KERNELS}")
    cfg = SMOKE if smoke else FULL
    info = _device_info(smoke)
    builders = {"paged_attention": _paged_rows, "int4_matmul": _int4_rows, "moe_ffn": _moe_rows}
    records = []
    for kernel in only:
        try:
            rows = builders[kernel](cfg)
        except Exception as err:  # a kernel whose cases cannot even be set up is one failed record
            rec = _record(kernel, "setup", {}, "-", "lab")
            rec["status"] = f"failed: {_short(err)}"
            records.append(rec)
            continue
        for meta, fn in rows:
            rec = _record(meta["kernel"], meta["case"], meta["params"], meta["impl"], meta["role"])
            try:
                rec.update(fn())
                rec["status"] = "ok"
            except Missing as err:
                rec["status"] = f"missing: {err}"
            except Exception as err:  # every failure is reported in its row, never dropped
                rec["status"] = f"failed: {_short(err)}"
            _fractions(rec, info)
            records.append(rec)
            if progress is not None:
                progress(_row(rec))
    _ratios(records)
    return {"device": info, "chip": info.get("chip"), "smoke": smoke, "records": records}


def _fractions(rec: dict, info: dict) -> None:
    if rec["status"] != "ok" or not rec.get("bytes") or not rec.get("ms"):
        return
    rate = rec["bytes"] / (rec["ms"] * 1e-3)
    if info.get("datasheet_bandwidth"):
        rec["frac_datasheet"] = rate / info["datasheet_bandwidth"]
    if info.get("measured_bandwidth"):
        rec["frac_measured"] = rate / info["measured_bandwidth"]


def _ratios(records: list[dict]) -> None:
    best: dict[tuple[str, str], float] = {}
    for r in records:
        if r["role"] == "baseline" and r["status"] == "ok" and r["ms"]:
            key = (r["kernel"], r["case"])
            best[key] = min(best.get(key, math.inf), r["ms"])
    for r in records:
        b = best.get((r["kernel"], r["case"]))
        if r["status"] == "ok" and b:
            r["ratio"] = r["ms"] / b


def _fmt(v: Any, spec: str) -> str:
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return f"{'-':>{width}}" if v is None else format(v, spec)


HEADER = (
    f"{'kernel':<16} {'case':<22} {'impl':<50} {'ms':>9} {'ms_disp':>9} {'%sheet':>7} {'%meas':>7} "
    f"{'ratio':>7}  status"
)


def _row(r: dict) -> str:
    pct = {k: None if r[k] is None else 100 * r[k] for k in ("frac_datasheet", "frac_measured")}
    return (
        f"{r['kernel']:<16} {r['case']:<22} {r['impl'][:50]:<50} {_fmt(r['ms'], '9.4f')} "
        f"{_fmt(r['ms_dispatch'], '9.4f')} {_fmt(pct['frac_datasheet'], '7.1f')} "
        f"{_fmt(pct['frac_measured'], '7.1f')} {_fmt(r['ratio'], '7.2f')}  {r['status']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accel",
        description="The lab's kernels against the accelerator's own baselines (see the module docstring).",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, any backend (the test suite's run)"
    )
    parser.add_argument("--out", help="write the records as JSON to this file")
    parser.add_argument("--only", default=",".join(KERNELS), help="comma-separated kernels to run")
    args = parser.parse_args(argv)
    only = tuple(s for s in args.only.split(",") if s)
    t0 = time.perf_counter()
    result = run(smoke=args.smoke, only=only, progress=lambda line: print(line, file=sys.stderr, flush=True))
    dev = result["device"]
    print(HEADER)
    for rec in result["records"]:
        print(_row(rec))
    print(
        f"\ndevice: {dev['platform']} {dev['device_kind']!r} (catalogue: {dev['chip']}), jax {dev['jax']}; "
        f"datasheet {_fmt(dev['datasheet_bandwidth'] and dev['datasheet_bandwidth'] / 1e9, '.0f')} GB/s, "
        f"measured {_fmt(dev['measured_bandwidth'] and dev['measured_bandwidth'] / 1e9, '.0f')} GB/s; "
        f"{time.perf_counter() - t0:.0f} s. ratio: ms over the best baseline's ms in the same case."
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")
    bad = [r for r in result["records"] if r["status"].startswith("failed") and r["role"] == "lab"]
    return 1 if bad else 0


if __name__ == "__main__":
    # PyTorch shares the device: keep JAX from reserving 75% of it when it starts.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
