"""The CPU-native kernels on every instruction-set path this CPU runs, against the portable XLA path, the
float32 matmul and (when installed) PyTorch's CPU INT4 kernel and SDPA, all timed round-robin in one run.

INT4 matmul (K, N) in {(4096, 14336), (8192, 28672)}, group 128, M in {1, 16}, weights rotated out of cache;
paged decode B=8, H=32, K=8, D=128, page 16, shuffled pages, contexts 4096 and 16384, float32 pages, as a
fraction of the streaming read (a jitted sum over 1 GiB, measured before and after). Each line also gives the
process CPU time per call (both threads), which is steadier than wall time on a shared machine.

Usage: python -m benchmarks.cpu_isa [int4|decode|all] [--quick]
Not an asv benchmark (no time_*/track_* names); it needs the built native library.
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu, int4_matmul, paged_attention
from quant import Int4Weight
from roofline import timing

GROUP = 128
QUICK = False  # set from --quick by main(): fewer rounds, shorter timings, no long scalar decode
MIN_T = 1.0
ROUNDS = 15
CPU_TIMES = {}


def compare(cases, rounds):
    """Round-robin: one call of each case per round (rotating its input sets), so that load changes on the
    shared machine hit every case alike; returns name -> median seconds."""
    for fn, sets in cases.values():
        for s in sets[:2]:
            jax.block_until_ready(fn(*s))
    samples = {name: [] for name in cases}
    cpu_s = {name: [] for name in cases}
    for r in range(rounds):
        for name, (fn, sets) in cases.items():
            s = sets[r % len(sets)]
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(*s))
            samples[name].append(time.perf_counter() - t0)
            cpu_s[name].append(time.process_time() - c0)
    CPU_TIMES.clear()
    CPU_TIMES.update({name: float(np.median(v)) for name, v in cpu_s.items()})
    return {name: float(np.median(v)) for name, v in samples.items()}


def stream_gbps():
    a = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    f = jax.jit(jnp.sum)
    t = timing.time_fn(f, a, min_time_s=MIN_T, min_repeats=3).median_s
    del a
    return (1 << 30) / t / 1e9


def torch_int4(k, n, m):
    """(fn, input sets) for PyTorch's CPU INT4 kernel on the same shape (its own random weights), or None."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    copies = max(2, math.ceil((256 << 20) / (k * n // 2)))
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(torch.bfloat16)
    sets = []
    for _ in range(copies):
        w_int = torch.from_numpy(rng.integers(0, 16, (n, k), dtype=np.int32))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w_int, 2)
        sz = torch.from_numpy(rng.uniform(0.001, 0.01, (k // GROUP, n, 2)).astype(np.float32)).to(
            torch.bfloat16
        )
        sets.append((x, packed, sz))

    def run(x, packed, sz):
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)

    return run, sets


def bench_int4():
    isas = cpu.supported_isas()
    shapes = [(4096, 14336), (8192, 28672)]
    rows = []
    for k, n in shapes:
        rng = np.random.default_rng(0)
        packed_bytes = k * n // 2
        copies = max(2, math.ceil((256 << 20) / packed_bytes))
        ws = []
        for _ in range(copies):
            codes = rng.integers(0, 256, (k // 2, n), dtype=np.uint8)
            ws.append(
                Int4Weight(
                    jnp.asarray(codes),
                    jnp.asarray(rng.uniform(0.001, 0.01, (k // GROUP, n)).astype(np.float32)),
                    jnp.asarray(rng.integers(0, 16, (k // GROUP, n), dtype=np.uint8)),
                    group_size=GROUP,
                )
            )
        fcopies = max(1, math.ceil((256 << 20) / (k * n * 4)))
        wfs = [jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)) for _ in range(fcopies)]
        for m in (1, 16):
            x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
            f32 = jax.jit(lambda x, w: jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST))
            xla = jax.jit(lambda x, w: int4_matmul(x, w, impl="xla"))
            cases = {"f32": (f32, [(x, w) for w in wfs]), "xla": (xla, [(x, w) for w in ws])}
            for name in isas:
                fn = jax.jit(
                    lambda x, w, name=name: cpu.int4_matmul_native(
                        x, w.packed, w.scales, w.zeros, group_size=GROUP, sym_zero=8, isa=name
                    )
                )
                cases[name] = (fn, [(x, w) for w in ws])
            peer = torch_int4(k, n, m)
            if peer is not None:
                cases["torch_int4"] = peer
            res = compare(cases, ROUNDS)
            f32t = res["f32"]
            line = f"int4 K={k} N={n} M={m}: f32 {f32t * 1e3:.2f} ms"
            for key in ["xla", *isas, "torch_int4"]:
                if key in res:
                    line += f" | {key} {res[key] * 1e3:.2f} ms = {res[key] / f32t:.3f}x f32"
                    if key in CPU_TIMES:
                        line += (
                            f" (cpu {CPU_TIMES[key] * 1e3:.1f} ms = {CPU_TIMES[key] / CPU_TIMES['f32']:.3f}x)"
                        )
            print(line, flush=True)
            rows.append(((k, n, m), res))
        del ws, wfs
    return rows


def bench_decode(stream):
    isas = cpu.supported_isas()
    B, H, K, D, S = 8, 32, 8, 128, 16
    for ctx in (4096, 16384):
        rng = np.random.default_rng(0)
        ppseq = ctx // S
        num_pages = B * ppseq + 64
        kp = jnp.asarray(rng.standard_normal((num_pages, S, K, D), dtype=np.float32))
        vp = jnp.asarray(rng.standard_normal((num_pages, S, K, D), dtype=np.float32))
        bt = jnp.asarray(rng.permutation(num_pages)[: B * ppseq].reshape(B, ppseq).astype(np.int32))
        lens = jnp.full((B,), ctx, jnp.int32)
        q = jnp.asarray(rng.standard_normal((B, H, D), dtype=np.float32))
        args = [(q, kp, vp, lens, bt)]
        kv_bytes = 2 * B * ctx * K * D * 4
        cases = {"xla": (jax.jit(lambda *a: paged_attention(*a, impl="xla")), args)}
        for name in isas:
            if name == "scalar" and ctx > 4096 and QUICK:
                continue
            fn = jax.jit(
                lambda q, kp, vp, lens, bt, name=name: cpu.paged_decode_native(
                    q,
                    kp,
                    vp,
                    lens,
                    bt,
                    None,
                    scale=1 / np.sqrt(D),
                    soft_cap=None,
                    sliding_window=None,
                    isa=name,
                )
            )
            cases[name] = (fn, args)
        try:
            import torch

            torch.set_num_threads(2)
            kc = torch.from_numpy(np.asarray(kp[bt].reshape(B, ctx, K, D).transpose(0, 2, 1, 3))).contiguous()
            vc = torch.from_numpy(np.asarray(vp[bt].reshape(B, ctx, K, D).transpose(0, 2, 1, 3))).contiguous()
            qt = torch.from_numpy(np.asarray(q)).reshape(B, H, 1, D)

            def sdpa(qt, kc, vc):
                torch.nn.functional.scaled_dot_product_attention(qt, kc, vc, enable_gqa=True)

            cases["torch_sdpa_contig"] = (sdpa, [(qt, kc, vc)])
        except ImportError:
            pass
        res = compare(cases, ROUNDS)
        line = f"decode ctx={ctx} ({kv_bytes / 1e6:.0f} MB KV):"
        for key in ["xla", *isas, "torch_sdpa_contig"]:
            if key in res:
                gbps = kv_bytes / res[key] / 1e9
                line += f" | {key} {res[key] * 1e3:.2f} ms {gbps:.1f} GB/s = {gbps / stream:.0%} stream"
                if key in CPU_TIMES:
                    line += f" (cpu {CPU_TIMES[key] * 1e3:.1f} ms)"
        print(line, flush=True)
        del kp, vp, cases


def main(argv=None):
    global QUICK, MIN_T, ROUNDS
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu_isa",
        description="The CPU-native kernels on every instruction-set path this CPU runs, against the XLA "
        "path, "
        "the float32 matmul and (when installed) PyTorch, timed round-robin in one run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("what", nargs="?", default="all", choices=("int4", "decode", "all"))
    parser.add_argument("--quick", action="store_true", help="5 rounds of 0.3 s instead of 15 of 1 s")
    args = parser.parse_args(argv)
    QUICK = args.quick
    MIN_T, ROUNDS = (0.3, 5) if QUICK else (1.0, 15)
    if not cpu.available():
        parser.exit(1, f"the native CPU library is not loaded: {cpu.load()}\n")
    print(f"isa in use {cpu.isa()}, runnable {cpu.supported_isas()}, jax {jax.__version__}", flush=True)
    s = stream_gbps()
    print(f"stream (jitted sum over 1 GiB): {s:.1f} GB/s", flush=True)
    if args.what in ("int4", "all"):
        bench_int4()
    if args.what in ("decode", "all"):
        bench_decode(s)
    print(f"stream again: {stream_gbps():.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
