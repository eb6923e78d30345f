"""The chips a kernel can run on: published peaks for the catalogue, a measured roofline for this host.

A chip is described by what bounds a kernel on it:

    time >= max(flops / peak_flops[dtype], bytes / bandwidth)

The catalogue (`CHIPS`) holds vendor datasheet figures: *dense* peak FLOP/s per dtype (sparse figures,
which vendors often quote, are half as useful and are not used), HBM bandwidth and size. On-demand prices
per chip-hour live in a separate, dated file (`data/prices.json`) because they change far more often than
the silicon. Every figure carries its source in `Chip.sources`.

`measure_host()` builds the same record for the machine we are running on by measuring it: the best
float32 matmul rate through XLA and the best streaming-read rate (through XLA and NumPy) over an array much
larger than the last-level cache. The result is cached on disk per machine, so the measurement is paid once.

dtype names used as keys of `peak_flops`: "fp32", "tf32", "bf16", "fp16", "fp8", "int8".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator (or the host), as the roofline sees it.

    peak_flops: dtype name -> dense FLOP/s (ops/s for int8).
    bandwidth: main-memory bandwidth in bytes/s.
    memory: main-memory size in bytes.
    price_per_hour: on-demand USD per chip-hour, or None when unknown (the host, unless the user gives one).
    sources: field name -> where the figure comes from, with its date.
    catalogue_entry: for the measured host, the `CHIPS` key of its device when `catalogue_chip` recognizes
        it (so its datasheet roof can be compared with the measured one); None otherwise.
    link: the chip-to-chip link collectives run over ("NVLink 4", "ICI", ...), None when unknown.
    link_bandwidth: that link's bandwidth per chip and per direction, bytes/s.
    link_latency: seconds a collective costs before any byte moves (launch and synchronization).
    """

    name: str
    description: str
    peak_flops: Mapping[str, float]
    bandwidth: float
    memory: float
    price_per_hour: float | None
    sources: Mapping[str, str]
    catalogue_entry: str | None = None
    link: str | None = None
    link_bandwidth: float | None = None
    link_latency: float | None = None

    @property
    def has_interconnect(self) -> bool:
        return self.link_bandwidth is not None and self.link_latency is not None

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype`; raises with the dtypes this chip has when it has none."""
        if dtype not in self.peak_flops:
            raise ValueError(
                f"chip {self.name!r} has no published peak for dtype={dtype!r}; "
                f"it has {sorted(self.peak_flops)}"
            )
        return self.peak_flops[dtype]

    def ridge_point(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel is compute-bound on this chip."""
        return self.peak(dtype) / self.bandwidth

    def with_price(self, price_per_hour: float | None) -> Chip:
        if price_per_hour is not None and not price_per_hour > 0:
            raise ValueError(f"price_per_hour={price_per_hour} must be a positive number of USD")
        sources = dict(self.sources)
        sources["price_per_hour"] = "given by the user"
        return dataclasses.replace(self, price_per_hour=price_per_hour, sources=MappingProxyType(sources))


def _read_json(name: str) -> dict[str, Any]:
    return json.loads(resources.files("roofline").joinpath("data", name).read_text())


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def load_chips() -> Mapping[str, Chip]:
    """Read the catalogue from the package's data files (specs and dated prices)."""
    specs = _read_json("chips.json")
    prices = _read_json("prices.json")
    chips = {}
    for name, spec in specs["chips"].items():
        price = prices["prices"].get(name)
        sources = dict(spec["sources"])
        if price is not None:
            sources["price_per_hour"] = f"{price['source']} (prices as of {prices['as_of']})"
        chips[name] = Chip(
            name=name,
            description=spec["description"],
            peak_flops=MappingProxyType({k: float(v) for k, v in spec["peak_flops"].items()}),
            bandwidth=float(spec["bandwidth"]),
            memory=float(spec["memory"]),
            price_per_hour=None if price is None else float(price["usd_per_chip_hour"]),
            sources=MappingProxyType(sources),
            link=spec.get("interconnect", {}).get("link"),
            link_bandwidth=_float_or_none(spec.get("interconnect", {}).get("bandwidth")),
            link_latency=_float_or_none(spec.get("interconnect", {}).get("latency")),
        )
    return MappingProxyType(chips)


CHIPS: Mapping[str, Chip] = load_chips()


def get_chip(name: str) -> Chip:
    """The catalogue entry for `name`, or "host" for this machine's measured roofline."""
    if name == "host":
        return measure_host()
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; valid chips: {', '.join([*CHIPS, 'host'])}")
    return CHIPS[name]


# JAX's `device_kind` (lower-cased, whitespace collapsed) -> catalogue key. Only exact names: a variant with
# other memory or bandwidth (H100 PCIe or NVL, A100 40GB or PCIe, H200 NVL, GH200) is a different chip and
# has no entry here until the catalogue has one, so it never borrows a look-alike's roof.
_DEVICE_KINDS = {
    "nvidia h100 80gb hbm3": "h100-sxm",
    "nvidia h200": "h200",
    "nvidia a100-sxm4-80gb": "a100-80gb",
    "nvidia l4": "l4",
    "tpu v5 lite": "tpu-v5e",
    "tpu v5": "tpu-v5p",
    "tpu v6 lite": "tpu-v6e",
    "amd instinct mi300x": "mi300x",
}


def catalogue_chip(device_kind: str) -> str | None:
    """The `CHIPS` key for a JAX `device_kind` string (`jax.devices()[0].device_kind`), or None.

    Case-insensitive, exact names only: "NVIDIA H100 80GB HBM3" -> "h100-sxm", "NVIDIA H200" -> "h200",
    "NVIDIA A100-SXM4-80GB" -> "a100-80gb", "NVIDIA L4" -> "l4", "TPU v5 lite" -> "tpu-v5e", "TPU v5" ->
    "tpu-v5p", "TPU v6 lite" -> "tpu-v6e", "AMD Instinct MI300X" -> "mi300x". Anything else, including
    variants of these chips with other memory or bandwidth (e.g. "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB"),
    is None.
    """
    if not isinstance(device_kind, str):
        raise ValueError(f"device_kind={device_kind!r} must be a string (jax.Device.device_kind)")
    name = _DEVICE_KINDS.get(" ".join(device_kind.lower().split()))
    return name if name in CHIPS else None


# ---------------------------------------------------------------------------------------------------------
# The host's own roofline.


def _last_level_cache_bytes() -> int:
    """Largest CPU cache reported by sysfs; 256 MiB when it cannot be read (safe: arrays are made larger)."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return best or (256 << 20)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_key() -> str:
    """Identifies this machine and software stack; measurements are cached under it."""
    import jax

    device = jax.devices()[0]
    ident = "|".join(
        [
            platform.node(),
            _cpu_model(),
            str(os.cpu_count()),
            device.platform,
            getattr(device, "device_kind", ""),
            jax.__version__,
        ]
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    root = os.environ.get("TOKENLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokenlab"
    )
    return Path(root)


def _usable_cache_dir(root: Path, say: Callable[[str], None]) -> bool:
    """Whether measurements can be cached under `root` (created if missing). When they cannot: with
    $TOKENLAB_CACHE set, a ValueError naming the variable and the path (the user asked for that place);
    with the default location, `say` that this run measures without caching, and False."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
        return True
    except OSError as err:
        reason = err.strerror or type(err).__name__
    if os.environ.get("TOKENLAB_CACHE"):
        raise ValueError(
            f"TOKENLAB_CACHE={os.environ['TOKENLAB_CACHE']!r}: the measurement cache directory '{root}' "
            f"cannot be created or written ({reason}); set TOKENLAB_CACHE to a writable directory or unset it"
        )
    say(
        f"the measurement cache '{root}' cannot be created or written ({reason}); measuring without caching "
        "(set TOKENLAB_CACHE to a writable directory to keep the result)"
    )
    return False


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(matmul_n: int, stream_bytes: int, repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    device = jax.devices()[0]
    accelerator = device.platform != "cpu"
    rng = np.random.default_rng(0)
    # Peak: a square matmul, large enough to be compute-bound on any CPU or accelerator. On an accelerator
    # float32 is asked for at full precision (GPUs otherwise run TF32), and bf16 runs as a native bf16 dot
    # with float32 accumulation.
    a32 = jnp.asarray(rng.standard_normal((matmul_n, matmul_n), dtype=np.float32) / np.sqrt(matmul_n))
    precision = jax.lax.Precision.HIGHEST if accelerator else None
    mm = jax.jit(lambda x: jnp.matmul(x, x, precision=precision))
    mm(a32).block_until_ready()
    peak = 2.0 * matmul_n**3 / _best_seconds(lambda: mm(a32).block_until_ready(), repeats)
    peak_bf16 = None
    if accelerator:
        a16 = a32.astype(jnp.bfloat16)
        mm16 = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        mm16(a16).block_until_ready()
        peak_bf16 = 2.0 * matmul_n**3 / _best_seconds(lambda: mm16(a16).block_until_ready(), repeats)

    # Bandwidth: a read-only reduction over an array several times the last-level cache (the GPU's L2 or
    # the TPU's on-chip memory is tens of MB; the array is GiBs).
    n = stream_bytes // 4
    total = jax.jit(jnp.sum)
    if accelerator:
        dev = jnp.ones(n, dtype=jnp.float32)
        total(dev).block_until_ready()
        t_xla = _best_seconds(lambda: total(dev).block_until_ready(), repeats)
        bw_np = 0.0
    else:
        host = np.ones(n, dtype=np.float32)
        dev = jnp.asarray(host)
        total(dev).block_until_ready()
        t_xla = _best_seconds(lambda: total(dev).block_until_ready(), repeats)
        bw_np = stream_bytes / _best_seconds(lambda: host.sum(), repeats)
    bw_xla = stream_bytes / t_xla
    kind = getattr(device, "device_kind", "")
    data = {
        "fp32_matmul_flops": peak,
        "matmul_n": matmul_n,
        "stream_bytes": stream_bytes,
        "bandwidth_xla": bw_xla,
        "bandwidth_numpy": bw_np,
        "bandwidth": max(bw_xla, bw_np),
        "device": f"{device.platform}:{kind}",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if accelerator:
        data["bf16_matmul_flops"] = peak_bf16
        data["device_kind"] = kind
        data["catalogue_entry"] = catalogue_chip(kind)
    return data


def measure_host(
    *,
    refresh: bool = False,
    cache: bool = True,
    matmul_n: int | None = None,
    stream_bytes: int | None = None,
    repeats: int = 5,
    price_per_hour: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> Chip:
    """Measure (or read from the per-machine cache) this machine's roofline as a `Chip` named "host".

    On a CPU: peak_flops["fp32"] is the best float32 `matmul_n`³ matmul rate through XLA (matmul_n default
    2048), and "bf16" maps to the same figure: bf16 weights are computed there in float32 blocks, because
    XLA's bf16 dots on CPU are far slower than float32 ones. bandwidth is the best of an XLA `sum` and a
    NumPy `sum` over `stream_bytes` (default: 4x the last-level cache, at least 1 GiB), so caches do not
    flatter it. memory is the physical RAM.

    On a GPU or TPU: peak_flops["bf16"] is a native bf16 `matmul_n`³ matmul (float32 accumulation) and
    peak_flops["fp32"] a float32 one at full precision (`Precision.HIGHEST`: not TF32), matmul_n default
    8192; bandwidth is an XLA `sum` over `stream_bytes` of device memory (default 4 GiB, at most a quarter of
    the device's memory), far beyond the GPU's L2 or the TPU's on-chip memory; memory is what JAX reports.
    The device is recognized with `catalogue_chip` and recorded in `Chip.catalogue_entry`.

    `progress`, if given, is told in one line whether the roofline is being measured or read from the cache.
    """
    import jax

    device = jax.devices()[0]
    accelerator = device.platform != "cpu"
    if matmul_n is None:
        matmul_n = 8192 if accelerator else 2048
    if matmul_n < 64:
        raise ValueError(f"matmul_n={matmul_n} must be at least 64")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    if accelerator:
        memory = float((device.memory_stats() or {}).get("bytes_limit", 0.0))
    else:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if stream_bytes is None:
        if accelerator:
            stream_bytes = 4 << 30 if memory <= 0 else min(4 << 30, int(memory // 4) >> 20 << 20)
        else:
            stream_bytes = max(1 << 30, 4 * _last_level_cache_bytes())
    path = _cache_dir() / f"host-{host_key()}-mm{matmul_n}-stream{stream_bytes >> 20}MiB.json"
    data = None
    if cache and not refresh:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        if data is not None and accelerator and data.get("bf16_matmul_flops") is None:
            data = None  # written before accelerators were measured in bf16
    if data is not None and progress is not None:
        progress(f"this host's roofline: cached, measured {data['measured_at']} ({path})")
    if data is None:
        say = progress or (lambda msg: warnings.warn(msg, stacklevel=3))
        # Checked before measuring: a cache that cannot be written fails (or is skipped) at once, not after.
        cache = cache and _usable_cache_dir(path.parent, say)
        if progress is not None:
            cached = "cached per machine after the first run" if cache else "not cached"
            progress(f"measuring this host's roofline ({cached}) ...")
        data = _measure(matmul_n, stream_bytes, repeats)
        if cache:
            try:
                path.write_text(json.dumps(data, indent=2))
            except OSError as err:
                say(f"could not cache this host's roofline in '{path}': {err.strerror or err}")

    where = f"measured on this machine {data['measured_at']} ({data['cpu']}, {data['cores']} cores)"
    entry = None
    if accelerator:
        peaks = {"fp32": data["fp32_matmul_flops"], "bf16": data["bf16_matmul_flops"]}
        entry = catalogue_chip(data.get("device_kind", getattr(device, "device_kind", "")))
        where = f"measured on this device {data['measured_at']} ({data['device']})"
        flops_source = (
            f"{where}: bf16 {data['matmul_n']}^3 matmul (float32 accumulation) and float32 at "
            "Precision.HIGHEST, through XLA"
        )
        bw_source = f"{where}: XLA sum over {data['stream_bytes'] / 2**30:.1f} GiB of device memory"
    else:
        peaks = {"fp32": data["fp32_matmul_flops"], "bf16": data["fp32_matmul_flops"]}
        flops_source = (
            f"{where}: float32 {data['matmul_n']}^3 matmul through XLA; "
            "bf16 computed in float32 blocks on CPU"
        )
        bw_source = (
            f"{where}: best of XLA sum ({data['bandwidth_xla'] / 1e9:.1f} GB/s) and NumPy sum "
            f"({data['bandwidth_numpy'] / 1e9:.1f} GB/s) over {data['stream_bytes'] / 2**20:.0f} MiB"
        )
    sources = {
        "peak_flops": flops_source,
        "bandwidth": bw_source,
        "memory": "JAX memory_stats" if accelerator else "physical memory reported by the OS",
        "price_per_hour": "not known: pass a price for this machine" if price_per_hour is None else "given",
    }
    recognized = f"; datasheet: {entry}" if entry else ""
    chip = Chip(
        name="host",
        description=f"this machine ({data['device']}, {data['cpu']}{recognized})",
        peak_flops=MappingProxyType(peaks),
        bandwidth=float(data["bandwidth"]),
        memory=memory,
        price_per_hour=None,
        sources=MappingProxyType(sources),
        catalogue_entry=entry,
    )
    return chip if price_per_hour is None else chip.with_price(price_per_hour)
