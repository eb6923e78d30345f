import jax
import pytest

from roofline import CHIPS, catalogue_chip, get_chip
from roofline.hardware import DTYPES, measure_host

REQUIRED_CHIPS = ("h100-sxm", "h200", "a100-80gb", "l4", "mi300x", "tpu-v5e", "tpu-v5p", "tpu-v6e")


def test_catalogue_has_the_required_chips():
    assert set(REQUIRED_CHIPS) <= set(CHIPS)


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_every_figure_has_a_source(name):
    chip = CHIPS[name]
    for field in ("peak_flops", "bandwidth", "memory", "price_per_hour"):
        assert chip.sources.get(field, "").strip(), f"{name}: no source for {field}"
    assert "as of" in chip.sources["price_per_hour"]


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_figures_are_plausible(name):
    chip = CHIPS[name]
    assert set(chip.peak_flops) <= set(DTYPES)
    assert "bf16" in chip.peak_flops
    assert 1e13 < chip.peak("bf16") < 1e16
    # Low-precision peaks are at least the bf16 peak; fp32 is below it.
    for dtype in ("fp8", "int8"):
        if dtype in chip.peak_flops:
            assert chip.peak(dtype) >= chip.peak("bf16")
    if "fp32" in chip.peak_flops:
        assert chip.peak("fp32") <= chip.peak("bf16")
    assert 1e11 < chip.bandwidth < 1e14
    assert 1e9 < chip.memory < 1e12
    assert 0.1 < chip.price_per_hour < 50
    assert 10 < chip.ridge_point("bf16") < 2000


def test_unknown_chip_lists_the_choices():
    with pytest.raises(ValueError, match="unknown chip 'h100'.*h100-sxm.*host"):
        get_chip("h100")


def test_missing_dtype_names_the_dtypes_the_chip_has():
    with pytest.raises(ValueError, match=r"tpu-v5e.*fp32.*\['bf16', 'int8'\]"):
        CHIPS["tpu-v5e"].peak("fp32")


def test_price_override_must_be_positive():
    assert CHIPS["l4"].with_price(1.5).price_per_hour == 1.5
    with pytest.raises(ValueError, match="price_per_hour"):
        CHIPS["l4"].with_price(0.0)


def test_measure_host_is_plausible_and_cached(host_chip):
    assert host_chip.name == "host"
    # A 2-core CPU reaches tens of GFLOP/s; no single device reaches 10 PFLOP/s in fp32.
    assert 1e9 < host_chip.peak("fp32") < 1e16
    assert 1e9 < host_chip.bandwidth < 1e13
    assert host_chip.memory > 1e9
    assert host_chip.price_per_hour is None
    assert "measured on this machine" in host_chip.sources["bandwidth"]
    again = measure_host(matmul_n=1024, stream_bytes=256 << 20, repeats=3)
    assert again.peak_flops == host_chip.peak_flops and again.bandwidth == host_chip.bandwidth
    assert measure_host(matmul_n=1024, stream_bytes=256 << 20, price_per_hour=0.1).price_per_hour == 0.1


def test_measure_host_rejects_bad_arguments():
    with pytest.raises(ValueError, match="matmul_n"):
        measure_host(matmul_n=8, cache=False)
    with pytest.raises(ValueError, match="repeats"):
        measure_host(repeats=0, cache=False)


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_memory_matches_the_number_and_unit_in_its_source(name):
    """The source states memory as '<n> GB' (1e9 bytes) or '<n> GiB' (2^30 bytes); the catalogue holds
    exactly that many bytes."""
    import re

    found = re.findall(r"([\d,.]+)\s*(GiB|GB)\b", CHIPS[name].sources["memory"])
    assert len(found) == 1, f"{name}: memory source should state one size: {CHIPS[name].sources['memory']!r}"
    number, unit = found[0]
    expected = float(number.replace(",", "")) * (2**30 if unit == "GiB" else 1e9)
    assert CHIPS[name].memory == expected


@pytest.mark.parametrize(
    "device_kind,name",
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA L4", "l4"),
        ("TPU v5 lite", "tpu-v5e"),
        ("TPU v5", "tpu-v5p"),
        ("TPU v6 lite", "tpu-v6e"),
        ("AMD Instinct MI300X", "mi300x"),
        # Case and spacing do not matter.
        ("nvidia h100 80gb hbm3", "h100-sxm"),
        ("NVIDIA  H200 ", "h200"),
        ("tpu V5 LITE", "tpu-v5e"),
    ],
)
def test_catalogue_chip_recognizes_each_device_kind(device_kind, name):
    assert catalogue_chip(device_kind) == name


@pytest.mark.parametrize(
    "device_kind",
    [
        # Variants with other memory or bandwidth than the catalogue entry they resemble.
        "NVIDIA H100 PCIe",
        "NVIDIA H100 NVL",
        "NVIDIA H100 80GB HBM3e",
        "NVIDIA H200 NVL",
        "NVIDIA GH200 480GB",
        "NVIDIA A100-SXM4-40GB",
        "NVIDIA A100-PCIE-40GB",
        "NVIDIA A100 80GB PCIe",
        "NVIDIA L40S",
        "AMD Instinct MI300A",
        "AMD Instinct MI325X",
        "TPU v4",
        "TPU v5p lite",
        "TPU v6",
        # Unknown devices and the CPU.
        "cpu",
        "",
        "Tesla T4",
    ],
)
def test_catalogue_chip_never_maps_a_look_alike(device_kind):
    assert catalogue_chip(device_kind) is None


def test_catalogue_chip_rejects_a_non_string():
    with pytest.raises(ValueError, match="device_kind=None must be a string"):
        catalogue_chip(None)


def test_measure_host_on_cpu_has_no_catalogue_entry(host_chip):
    assert host_chip.catalogue_entry is None
    assert host_chip.peak("bf16") == host_chip.peak("fp32")  # bf16 runs as float32 blocks on the CPU


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU or TPU")
def test_measure_host_on_an_accelerator_measures_bf16_and_recognizes_the_chip(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENLAB_CACHE", str(tmp_path))
    chip = measure_host(repeats=3)
    kind = jax.devices()[0].device_kind
    assert chip.catalogue_entry == catalogue_chip(kind)
    assert chip.peak("bf16") > chip.peak("fp32")  # native bf16 dots, fp32 at full precision
    if chip.catalogue_entry is not None:
        sheet = CHIPS[chip.catalogue_entry]
        # Measured roofs land below the datasheet's and within an order of magnitude of it.
        assert 0.1 * sheet.bandwidth < chip.bandwidth <= 1.05 * sheet.bandwidth
        assert 0.1 * sheet.peak("bf16") < chip.peak("bf16") <= 1.05 * sheet.peak("bf16")


def _fake_measurement(matmul_n, stream_bytes, repeats):
    return {
        "fp32_matmul_flops": 1e11,
        "matmul_n": matmul_n,
        "stream_bytes": stream_bytes,
        "bandwidth_xla": 1e10,
        "bandwidth_numpy": 1e10,
        "bandwidth": 1e10,
        "device": "cpu:cpu",
        "cpu": "test",
        "cores": 1,
        "jax": jax.__version__,
        "measured_at": "now",
    }


def test_an_unusable_tokenlab_cache_fails_before_measuring_and_names_the_variable(tmp_path, monkeypatch):
    import roofline.hardware as hw

    def no_measurement(*args):
        raise AssertionError("measured before checking the cache")

    monkeypatch.setattr(hw, "_measure", no_measurement)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TOKENLAB_CACHE", str(blocker / "cache"))
    with pytest.raises(ValueError, match=r"TOKENLAB_CACHE='.*a-file/cache'.*cannot be created or written"):
        measure_host(matmul_n=64, stream_bytes=1 << 20, repeats=1)


def test_an_unusable_default_cache_measures_without_caching_and_says_so(tmp_path, monkeypatch):
    import roofline.hardware as hw

    monkeypatch.setattr(hw, "_measure", _fake_measurement)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.delenv("TOKENLAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    lines = []
    chip = measure_host(matmul_n=64, stream_bytes=1 << 20, repeats=1, progress=lines.append)
    assert chip.bandwidth == 1e10
    assert "measuring without caching" in lines[0] and str(blocker / "tokenlab") in lines[0]
    assert lines[1].startswith("measuring this host's roofline (not cached)")
    with pytest.warns(UserWarning, match="measuring without caching"):
        measure_host(matmul_n=64, stream_bytes=1 << 20, repeats=1)
