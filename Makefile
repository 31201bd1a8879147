# Two commands: `make demo` (set up + run the main job offline) and `make test` (set up + lint,
# type check, tests). Both create .venv and install everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo study test lint typecheck test-slow test-gpu posthoc-agreement system-data clean

setup: $(STAMP) system-data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package; elsewhere torchvision downloads it on first use.
# Chromium (Debian package) is what the HTML report's browser test drives.
# WordNet 3.0 (Debian wordnet-base, /usr/share/wordnet) is the offline text corpus of the
# label-mining detectors (src/oodprobe/corpus.py); without it, pass a corpus file.
system-data:
	@if [ ! -f /usr/share/wordnet/index.noun ] && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null) \
	    || echo "note: could not install wordnet-base; the wordnet corpora need it (or pass a corpus file)"; \
	fi
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded when used"; \
	fi
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "note: could not install chromium; the browser test of the HTML report will be skipped"; \
	fi

# The main job: the built-in offline benchmark (EfficientNet-Lite0 on built-in data), its table
# printed and its report written to oodprobe-results/offline-default/report.html.
demo: setup
	$(BIN)/oodprobe bench

# The paper's model-selection study, offline: nine EfficientNet-Lite encoders (three models x
# two blocks + final features, one forward pass per model) on the offline benchmark; report in
# oodprobe-results/offline-study/report.html.
study: setup
	$(BIN)/oodprobe study

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q -m "not slow and not gpu"

test-slow: setup
	$(BIN)/pytest -q -m slow

test-gpu: setup
	$(BIN)/pytest -q -m gpu

# The post-hoc family against pytorch-ood (or the authors' formulas) on identical
# EfficientNet-Lite0 features and ImageNet head: AUROC both sides, Spearman, largest difference,
# time; writes benchmarks/results/posthoc.json.
posthoc-agreement: setup
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/posthoc.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
