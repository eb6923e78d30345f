"""Every lab program compiled for its real targets (sm_80, sm_90a, v5e, v6e) on this CPU-only machine, through
`benchmarks.compiled` (the command's own code), and the sm_90a report held against its committed baseline.

Default run (tests/compile_run.py, beside the rest of the suite): every Pallas kernel at the small and the
benchmark cases on sm_90a, forward and backward, and on sm_80 at the small cases (paged attention's and
INT4's forward at the benchmark cases too), with no spills and shared memory within the target; the XLA
path's own strategy choice (what `impl="auto"` runs there), float32 and bf16, at the small cases on sm_80,
sm_90a, v5e and v6e. `--full` compiles the rest (the XLA paths and sm_80's MoE kernels at the benchmark
cases, every XLA strategy). Skipped with the reason where the toolchain is absent
(`pip install tokenlab[compile]`).
"""

from __future__ import annotations

import functools
import json
import pathlib

import pytest

from benchmarks import compiled
from kernels import compile_only
from tests import compile_run

BASELINE = pathlib.Path(__file__).parents[1] / "benchmarks" / "baselines" / "compiled_sm_90a.json"
# How much worse than the baseline a figure may get before the test fails (registers are allocated in
# steps of 8; instruction counts move a little with unrelated code).
TOLERANCE = {"registers": 8, "loop_instructions": 0.05, "shared_bytes": 0.0}


def _needs(target: str) -> None:
    reason = compile_only.missing(target)
    if reason:
        pytest.skip(f"{target}: {reason}")


@functools.cache
def _run(target: str, family: str) -> tuple[dict, ...]:
    """The records of `family` ("pallas" or "xla") for `target` from the session's background run
    (tests/compile_run.py)."""
    records = compile_run.records() if compile_run.covers(target, family) else []
    return tuple(r for r in records if r["target"] == target and compiled.family(r["impl"]) == family)


def _failures(records: tuple[dict, ...]) -> list[str]:
    return [f"{r['kernel']} {r['case']} {r['impl']}: {r['status']}" for r in records if r["status"] != "ok"]


@pytest.mark.parametrize("target", compiled.GPU_TARGETS)
def test_pallas_kernels_compile_for_gpus(target):
    _needs(target)
    records = _run(target, "pallas")
    assert {r["kernel"] for r in records} == set(compiled.KERNELS)
    bad = [f for f in _failures(records) if "unsupported" not in f]
    assert not bad, "\n".join(bad)
    info = compile_only.gpu_info(target)
    for rec in records:
        if rec["status"] != "ok":
            continue
        pallas = [k for k in rec["kernels"] if k["pallas"]]
        if not rec["impl"].endswith("grad"):  # INT4's backward is the XLA path's: no Pallas kernel in it
            assert pallas, f"{rec['case']} {rec['impl']}: no Pallas kernel among {rec['kernels']}"
        for k in pallas:
            where = f"{rec['kernel']} {rec['case']} {rec['impl']} {k['name']}"
            assert k["spill_bytes"] == 0, f"{where} spills {k['spill_bytes']} bytes"
            assert k["shared_bytes"] <= info.shared_per_block_optin, f"{where}: {k['shared_bytes']} B shared"
            assert k["ctas_per_sm"] >= 1, where
            assert k["registers"] <= 255, where


@pytest.mark.parametrize("target", (*compiled.GPU_TARGETS, *compiled.TPU_TARGETS))
def test_xla_paths_compile(target):
    _needs(target)
    records = _run(target, "xla")
    assert {r["kernel"] for r in records} == set(compiled.KERNELS)
    assert {r["dtype"] for r in records} == {"float32", "bfloat16"}
    assert not _failures(records), "\n".join(_failures(records))


@pytest.mark.slow
@pytest.mark.parametrize("target", (*compiled.GPU_TARGETS, *compiled.TPU_TARGETS))
def test_the_rest_compiles(target):
    """What the default run leaves out: the XLA paths at the benchmark cases (libtpu takes minutes over the
    largest), every XLA strategy, sm_80's MoE kernels at the benchmark cases."""
    _needs(target)
    records = compiled.run(targets=(target,), select=lambda p: not compile_run.select(p, target))["records"]
    assert not _failures(tuple(records)), "\n".join(_failures(tuple(records)))


def _figures(records) -> dict[tuple, dict]:
    return {
        (r["kernel"], r["case"], r["impl"], k["name"]): k
        for r in records
        if r["status"] == "ok"
        for k in r["kernels"]
        if k["pallas"]
    }


def worse_than(base: dict, now: dict) -> list[str]:
    """The figures of `now` that are worse than `base` beyond TOLERANCE."""
    out = []
    if now["registers"] > base["registers"] + TOLERANCE["registers"]:
        out.append(f"registers {base['registers']} -> {now['registers']}")
    if now["spill_bytes"] > base["spill_bytes"]:
        out.append(f"spill_bytes {base['spill_bytes']} -> {now['spill_bytes']}")
    if now["shared_bytes"] > base["shared_bytes"] * (1 + TOLERANCE["shared_bytes"]):
        out.append(f"shared_bytes {base['shared_bytes']} -> {now['shared_bytes']}")
    if now["ctas_per_sm"] < base["ctas_per_sm"]:
        out.append(f"ctas_per_sm {base['ctas_per_sm']} -> {now['ctas_per_sm']}")
    b, n = base["loop_instructions"], now["loop_instructions"]
    if b and n and n > b * (1 + TOLERANCE["loop_instructions"]):
        out.append(f"loop_instructions {b} -> {n}")
    return out


def test_sm90a_report_no_worse_than_baseline():
    """The lab's Pallas kernels on sm_90a against the committed report. Regenerate it deliberately, in a
    reviewed change: python -m benchmarks.compiled --targets sm_90a --impls pallas --json BASELINE"""
    _needs("sm_90a")
    base = _figures(json.loads(BASELINE.read_text())["records"])
    now = _figures(_run("sm_90a", "pallas"))
    assert base, "the baseline holds no Pallas kernel"
    missing = sorted(set(base) - set(now))
    assert not missing, f"kernels in the baseline but not compiled now (update the baseline?): {missing}"
    worse = {key: w for key in base if (w := worse_than(base[key], now[key]))}
    assert not worse, "worse than benchmarks/baselines/compiled_sm_90a.json:\n" + "\n".join(
        f"{' '.join(k)}: {', '.join(w)}" for k, w in worse.items()
    )


def test_baseline_check_catches_a_regression():
    k = {
        "registers": 128,
        "spill_bytes": 0,
        "shared_bytes": 32768,
        "ctas_per_sm": 2,
        "loop_instructions": 500,
    }
    assert worse_than(k, k) == []
    assert worse_than(k, {**k, "registers": 136}) == []
    assert worse_than(k, {**k, "registers": 137}) == ["registers 128 -> 137"]
    assert worse_than(k, {**k, "spill_bytes": 4}) == ["spill_bytes 0 -> 4"]
    assert worse_than(k, {**k, "ctas_per_sm": 1}) == ["ctas_per_sm 2 -> 1"]
    assert worse_than(k, {**k, "loop_instructions": 600}) == ["loop_instructions 500 -> 600"]


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0030*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0040*/               @!P0 BRA 0x10 ;
        /*0050*/                   FADD R2, R2, R3 ;
        /*0060*/               @!P1 BRA 0x0 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_sass_figures_find_the_innermost_loop_and_the_tensor_cores():
    fig = compiled.sass_figures(SASS)
    assert fig == {"tensor_core": "mma", "tma": False, "loop_instructions": 4}
    hopper = SASS.replace("HMMA.16816.F32.BF16", "HGMMA.64x128x16.F32.BF16").replace("FADD", "UTMALDG.2D")
    assert compiled.sass_figures(hopper) == {"tensor_core": "wgmma", "tma": True, "loop_instructions": 4}


def test_occupancy_is_limited_by_each_resource():
    info = compile_only.GpuInfo(
        capability=(9, 0),
        sms=132,
        registers_per_sm=65536,
        shared_per_sm=233472,
        shared_per_block_optin=232448,
        shared_reserved_per_block=1024,
        threads_per_sm=2048,
        ctas_per_sm=32,
    )
    assert info.occupancy(threads=128, registers=32, shared=0) == 16  # threads
    assert info.occupancy(threads=128, registers=168, shared=0) == 3  # registers: 168·32 -> 5376 per warp
    assert info.occupancy(threads=128, registers=64, shared=100 * 1024) == 2  # shared memory
    assert info.occupancy(threads=32, registers=16, shared=0) == 32  # the hardware's cap


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match="target='sm_75' is not one of"):
        compile_only.missing("sm_75")


@pytest.mark.parametrize("asked", [None, 40 << 20])
@pytest.mark.parametrize("target", compiled.TPU_TARGETS)
def test_tpu_report_reads_the_vmem_a_mosaic_kernel_uses(target, asked):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    _needs(target)

    def double(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def fn(x):
        params = None if asked is None else pltpu.CompilerParams(vmem_limit_bytes=asked)
        return pl.pallas_call(
            double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), compiler_params=params
        )(x)

    program = compile_only.compile_for(target, fn, jax.ShapeDtypeStruct((256, 512), jnp.float32))
    report = compiled.tpu_report(program, target)
    # One 512 KiB block in and one out, each double-buffered or not: between 1 and 4 blocks of VMEM.
    assert 512 << 10 <= report["vmem"] <= 2 << 20, report
    assert report["vmem_limit"] == (
        asked or compiled.DEFAULT_SCOPED_VMEM[target]
    )  # the limit asked, else libtpu's
    assert report["vmem_capacity"] == 128 << 20


# --------------------------------------------------------------------------------------------------------
# Mosaic GPU kernels in the report, and the GPU kernels' compile targets on the records that exist


def _wgmma_matmul(a, b):
    """A minimal Mosaic GPU kernel: one [64, 128] output tile per program, K streamed through a 2-stage TMA
    pipeline into wgmma."""
    import functools as ft

    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (m, k), (_, n) = a.shape, b.shape
    tm, tn, tk = 64, 128, 64
    swizzle = plgpu.find_swizzle(tk * 16)
    transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))

    def body(a_gmem, b_gmem, o_gmem):
        mi, ni = jax.lax.axis_index("m"), jax.lax.axis_index("n")

        def accumulate(acc_ref):
            def step(_, a_smem, b_smem):
                plgpu.wgmma(acc_ref, a_smem, b_smem)
                plgpu.wgmma_wait(1)

            specs = [
                plgpu.BlockSpec((tm, tk), lambda kk: (mi, kk), transforms=transforms),
                plgpu.BlockSpec((tk, tn), lambda kk: (kk, ni), transforms=transforms),
            ]
            plgpu.emit_pipeline(step, grid=(k // tk,), in_specs=specs, max_concurrent_steps=2)(a_gmem, b_gmem)
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((tm, tn), jnp.float32))

        @ft.partial(pl.run_scoped, o_smem=plgpu.SMEM((tm, tn), jnp.float16))
        def _(o_smem):
            o_smem[...] = acc.astype(jnp.float16)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)])
            plgpu.wait_smem_to_gmem(0)

    out = jax.ShapeDtypeStruct((m, n), jnp.float16)
    return plgpu.kernel(body, out_type=out, grid=(m // tm, n // tn), grid_names=("m", "n"))(a, b)


def test_gpu_report_reads_a_mosaic_gpu_kernel_from_the_executable():
    """XLA:GPU compiles a Mosaic GPU kernel with the program and keeps its cubin in the custom call's thunk,
    not as a kernel launch: the report finds it there, with its launch from the kernel's MLIR module."""
    import jax
    import jax.numpy as jnp

    _needs("sm_90a")
    a, b = jax.ShapeDtypeStruct((128, 256), jnp.float16), jax.ShapeDtypeStruct((256, 512), jnp.float16)
    program = compile_only.compile_for("sm_90a", _wgmma_matmul, a, b)
    assert compile_only.gpu_kernels(program) == []  # XLA's own listing has no launch of it
    (k,) = compiled.gpu_report(program, "sm_90a")
    assert k["backend"] == "pallas_mosaic_gpu" and k["pallas"], k
    assert k["name"].endswith("mosaic_gpu_kernel"), k
    assert (k["threads"], k["programs"]) == (128, 2 * 4), k
    assert k["spill_bytes"] == 0 and 0 < k["registers"] <= 255, k
    # Two stages of a [64, 64] and a [64, 128] f16 tile and their barriers (the output tile reuses them).
    assert 2 * (64 * 64 + 64 * 128) * 2 <= k["shared_bytes"] <= 64 << 10, k
    assert k["tensor_core"] == "wgmma" and k["tma"], k
    # The K loop, not the barrier wait inside it (a 5-instruction try-wait loop).
    assert k["loop_instructions"] is not None and k["loop_instructions"] > compiled.SPIN_LOOP_MAX, k


def test_mlir_strings_decode_as_printed():
    assert compile_only._mlir_string(r"ab\22c\\d\0A\FF") == b'ab"c\\d\n\xff'


def test_sass_figures_skip_barrier_wait_loops():
    sass = """
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R7+URZ], R6 ;
        /*0030*/               @!P0 NANOSLEEP.SYNCS 0x989680 ;
        /*0040*/               @!P0 SYNCS.PHASECHK.TRANS64 P0, [R7+URZ], R6 ;
        /*0050*/               @!P0 BRA 0x20 ;
        /*0060*/                   HGMMA.64x128x16.F32 R24, gdesc[UR16].tnspB, R24 ;
        /*0070*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0080*/                   ISETP.GE.AND P1, PT, R0, 0x10, PT ;
        /*0090*/               @!P1 BRA 0x10 ;
        /*00a0*/                   EXIT ;
"""
    assert compiled.sass_figures(sass) == {"tensor_core": "wgmma", "tma": True, "loop_instructions": 9}


def _records(target: str, impl: str, kernel: str, cases=None) -> list[dict]:
    """The default run's `impl` records of `kernel` on `target` (at `cases`); a skip naming what is absent."""
    from kernels import available_impls

    if impl not in available_impls(kernel):
        pytest.skip(f"{kernel} has no {impl} implementation here")
    _needs(target)
    recs = [r for r in _run(target, "pallas") if r["kernel"] == kernel and r["impl"] == impl]
    if cases is not None:
        recs = [r for r in recs if r["case"] in cases]
    bad = [f"{r['case']}: {r['status']}" for r in recs if r["status"].startswith(("failed", "missing"))]
    assert not bad, "\n".join(bad)
    recs = [r for r in recs if r["status"] == "ok"]  # the rest: calls the backend declines
    if not recs:
        pytest.skip(f"the compile run holds no compiled {impl} {kernel} program on {target} at {cases}")
    return recs


def _kernels(rec: dict, backend: str) -> list[dict]:
    ks = [k for k in rec["kernels"] if k["backend"] == backend]
    assert ks, f"{rec['kernel']} {rec['case']} {rec['impl']}: no {backend} kernel in {rec['kernels']}"
    return ks


INT4_DECODE = ("4096x14336 M1 bf16", "4096x14336 M16 bf16", "8192x28672 M1 bf16", "8192x28672 M16 bf16")
MIN_WEIGHTS_PER_WARP_INSTRUCTION = 16


@pytest.mark.parametrize("kernel", compiled.KERNELS)
def test_sm90a_mosaic_gpu_kernels_compile_without_spills(kernel):
    for rec in _records("sm_90a", "pallas_mosaic_gpu", kernel):
        for k in _kernels(rec, "pallas_mosaic_gpu"):
            assert k["spill_bytes"] == 0, f"{rec['case']} {k['name']} spills {k['spill_bytes']} bytes"


def test_sm90a_mosaic_gpu_int4_decode_weights_per_warp_instruction():
    for rec in _records("sm_90a", "pallas_mosaic_gpu", "int4_matmul", INT4_DECODE):
        for k in _kernels(rec, "pallas_mosaic_gpu"):
            got = k["weights_per_warp_instruction"]
            assert got is not None, f"{rec['case']} {k['name']}: no main loop or no weights per pass"
            assert got >= MIN_WEIGHTS_PER_WARP_INSTRUCTION, f"{rec['case']} {k['name']}: {got}"


@pytest.mark.parametrize(
    ("kernel", "case"), [("moe_ffn", "mixtral T256 bf16"), ("int4_matmul", "4096x14336 M64 bf16")]
)
def test_sm90a_mosaic_gpu_uses_wgmma(kernel, case):
    for rec in _records("sm_90a", "pallas_mosaic_gpu", kernel, (case,)):
        for k in _kernels(rec, "pallas_mosaic_gpu"):
            assert k["tensor_core"] == "wgmma", f"{case} {k['name']}: {k['tensor_core']}"


def test_sm90a_mosaic_gpu_paged_decode_launches_at_most_two_kernels():
    for rec in _records("sm_90a", "pallas_mosaic_gpu", "paged_attention", ("decode B8 L4096 bf16",)):
        assert rec["kernels_per_call"] <= 2, [k["name"] for k in rec["kernels"]]


def test_sm80_triton_int4_decode_weights_per_warp_instruction():
    for rec in _records("sm_80", "pallas_triton", "int4_matmul", INT4_DECODE):
        for k in _kernels(rec, "pallas_triton"):
            got = k["weights_per_warp_instruction"]
            assert got is not None and got >= MIN_WEIGHTS_PER_WARP_INSTRUCTION, (
                f"{rec['case']} {k['name']}: {got}"
            )


def test_sm80_triton_paged_decode_fits_three_ctas_per_sm_pipelined():
    decode = ("decode B8 L4096 bf16", "decode B64 L4096 bf16", "decode B16 L16384 bf16")
    for rec in _records("sm_80", "pallas_triton", "paged_attention", decode):
        for k in _kernels(rec, "pallas_triton"):
            where = f"{rec['case']} {k['name']}"
            assert k["ctas_per_sm"] >= 3, f"{where}: {k['ctas_per_sm']} CTAs/SM ({k['registers']} registers)"
            assert k["num_stages"] is not None and k["num_stages"] >= 3, (
                f"{where}: num_stages {k['num_stages']}"
            )
