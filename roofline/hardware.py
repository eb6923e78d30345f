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
import time
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
    """

    name: str
    description: str
    peak_flops: Mapping[str, float]
    bandwidth: float
    memory: float
    price_per_hour: float | None
    sources: Mapping[str, str]

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

    # Peak: a square float32 matmul, large enough to be compute-bound on any CPU or accelerator.
    a = jnp.asarray(np.random.default_rng(0).standard_normal((matmul_n, matmul_n), dtype=np.float32))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t_mm = _best_seconds(lambda: mm(a).block_until_ready(), repeats)
    peak = 2.0 * matmul_n**3 / t_mm

    # Bandwidth: a read-only reduction over an array several times the last-level cache.
    n = stream_bytes // 4
    host = np.ones(n, dtype=np.float32)
    dev = jnp.asarray(host)
    total = jax.jit(jnp.sum)
    total(dev).block_until_ready()
    t_xla = _best_seconds(lambda: total(dev).block_until_ready(), repeats)
    t_np = _best_seconds(lambda: host.sum(), repeats)
    bw_xla, bw_np = stream_bytes / t_xla, stream_bytes / t_np
    return {
        "fp32_matmul_flops": peak,
        "matmul_n": matmul_n,
        "stream_bytes": stream_bytes,
        "bandwidth_xla": bw_xla,
        "bandwidth_numpy": bw_np,
        "bandwidth": max(bw_xla, bw_np),
        "device": f"{jax.devices()[0].platform}:{getattr(jax.devices()[0], 'device_kind', '')}",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def measure_host(
    *,
    refresh: bool = False,
    cache: bool = True,
    matmul_n: int = 2048,
    stream_bytes: int | None = None,
    repeats: int = 5,
    price_per_hour: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> Chip:
    """Measure (or read from the per-machine cache) this machine's roofline as a `Chip` named "host".

    peak_flops["fp32"] is the best float32 `matmul_n`³ matmul rate through XLA on the default device. On a
    CPU, "bf16" maps to the same figure: bf16 weights are computed there in float32 blocks, because XLA's
    bf16 dots on CPU are far slower than float32 ones. bandwidth is the best of an XLA `sum` and a NumPy
    `sum` over `stream_bytes` (default: 4x the last-level cache, at least 1 GiB), so caches do not flatter it.
    memory is the physical RAM (CPU) or the device memory reported by JAX.
    `progress`, if given, is told in one line whether the roofline is being measured or read from the cache.
    """
    import jax

    if stream_bytes is None:
        stream_bytes = max(1 << 30, 4 * _last_level_cache_bytes())
    if matmul_n < 64:
        raise ValueError(f"matmul_n={matmul_n} must be at least 64")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    path = _cache_dir() / f"host-{host_key()}-mm{matmul_n}-stream{stream_bytes >> 20}MiB.json"
    data = None
    if cache and not refresh and path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
    if data is not None and progress is not None:
        progress(f"this host's roofline: cached, measured {data['measured_at']} ({path})")
    if data is None:
        if progress is not None:
            progress("measuring this host's roofline (cached per machine after the first run) ...")
        data = _measure(matmul_n, stream_bytes, repeats)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2))

    device = jax.devices()[0]
    if device.platform == "cpu":
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        peaks = {"fp32": data["fp32_matmul_flops"], "bf16": data["fp32_matmul_flops"]}
    else:
        stats = device.memory_stats() or {}
        memory = float(stats.get("bytes_limit", 0.0))
        peaks = {"fp32": data["fp32_matmul_flops"]}
    where = f"measured on this machine {data['measured_at']} ({data['cpu']}, {data['cores']} cores)"
    sources = {
        "peak_flops": f"{where}: float32 {data['matmul_n']}^3 matmul through XLA"
        + ("; bf16 computed in float32 blocks on CPU" if "bf16" in peaks else ""),
        "bandwidth": f"{where}: best of XLA sum ({data['bandwidth_xla'] / 1e9:.1f} GB/s) and NumPy sum "
        f"({data['bandwidth_numpy'] / 1e9:.1f} GB/s) over {data['stream_bytes'] / 2**20:.0f} MiB",
        "memory": "physical memory reported by the OS" if device.platform == "cpu" else "JAX memory_stats",
        "price_per_hour": "not known: pass a price for this machine" if price_per_hour is None else "given",
    }
    chip = Chip(
        name="host",
        description=f"this machine ({data['device']}, {data['cpu']})",
        peak_flops=MappingProxyType(peaks),
        bandwidth=float(data["bandwidth"]),
        memory=memory,
        price_per_hour=None,
        sources=MappingProxyType(sources),
    )
    return chip if price_per_hour is None else chip.with_price(price_per_hour)
