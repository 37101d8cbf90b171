# One command each for the two jobs a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use. torch==2.13.0 goes in first so that the package's
# looser `torch` requirement is already met and pip never pulls CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= demo_out

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-slow test-browser notebooks demo check lint typecheck format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow"

# The report opened in headless Chromium (Debian's package; playwright drives it and
# never downloads a browser of its own).
test-browser: $(STAMP)
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }
	REUSE_LENS_REQUIRE_BROWSER=1 $(BIN)/python -m pytest tests/test_report_browser.py -m ""

# The notebooks run and saved with their outputs (figures as PNG, drawn in Chromium).
notebooks: $(STAMP)
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }
	$(BIN)/python scripts/run_notebooks.py

demo: $(STAMP)
	$(BIN)/reuse-lens demo --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff format --check reuse_lens tests benchmarks scripts
	$(BIN)/ruff check reuse_lens tests benchmarks scripts

typecheck: $(STAMP)
	$(BIN)/pyright

check: lint typecheck test

format: $(STAMP)
	$(BIN)/ruff format reuse_lens tests benchmarks scripts
	$(BIN)/ruff check --fix reuse_lens tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_patching.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(OUT)
