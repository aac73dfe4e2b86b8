# Every target creates and uses its own virtual environment in .venv.
# The main job:  make report   (installs, fetches MNIST, trains the default ablation, reports)
# The tests:     make test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MATRIX ?= ablations/default.yaml
STORE ?= stores/default.sqlite
REPORT_DIR ?= reports/default
PYTEST_ARGS ?=

.PHONY: setup data ablate report check baseline test bench bench-gpu system-packages clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	touch $(STAMP)

data: setup
	$(BIN)/mnistbench data fetch

ablate: data
	$(BIN)/mnistbench ablate $(MATRIX) --store $(STORE)

report: ablate
	$(BIN)/mnistbench report $(STORE) --out $(REPORT_DIR)

# The CI gate: train the smoke ablation and hold it to the thresholds and the committed baseline.
check: data
	$(BIN)/mnistbench ablate ablations/smoke.yaml --store stores/smoke.sqlite $(CHECK_ABLATE_ARGS)
	$(BIN)/mnistbench check stores/smoke.sqlite --thresholds ablations/thresholds.yaml \
		--baseline ablations/baseline-smoke.json --summary stores/check-summary.md \
		--junit stores/check-junit.xml

# Rewrite the committed baseline from a fresh smoke run (after an intended change).
baseline: data
	rm -f stores/smoke-baseline.sqlite
	$(BIN)/mnistbench ablate ablations/smoke.yaml --store stores/smoke-baseline.sqlite
	$(BIN)/mnistbench baseline save stores/smoke-baseline.sqlite --out ablations/baseline-smoke.json

test: data system-packages
	$(BIN)/pytest tests --ignore=tests/benchmarks $(PYTEST_ARGS)

bench: data
	$(BIN)/pytest tests/benchmarks --benchmark-json=bench/cpu.json $(PYTEST_ARGS)

bench-gpu: data
	MNISTBENCH_BENCH_DEVICE=cuda $(BIN)/pytest tests/benchmarks --benchmark-json=bench/gpu.json $(PYTEST_ARGS)

# Debian packages some tests use: headless Chromium for the report's browser test and
# Fashion-MNIST for the test that reads another dataset in MNIST's layout.
SYSTEM_PACKAGES := chromium chromium-driver dataset-fashion-mnist
system-packages:
	@if ! command -v chromium >/dev/null 2>&1 || [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
		else \
			echo "missing Debian packages: run 'sudo apt-get install $(SYSTEM_PACKAGES)'"; exit 1; \
		fi; \
	fi

clean:
	rm -rf $(VENV) stores bench reports/default .pytest_cache
