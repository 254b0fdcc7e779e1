# galip — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help
.PHONY: help install demo app smoke test test-slow test-all lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with pip and install galip[dev] (no-op when up to date)

demo: install ## GALIP on the embedded demo world, CPU, ~10 min on 2 cores: grids, judge metrics, checkpoints in outputs/demo/
	$(PY) -m galip.train +experiment=demo

app: install ## a web page on http://127.0.0.1:7860 to play with a generator (the shipped demo one; ckpt=… for yours)
	$(PY) -m galip.app $(if $(ckpt),ckpt=$(ckpt))

smoke: install ## a few training steps with a tiny random CLIP (plumbing check, ~10 s)
	$(PY) -m galip.train +experiment=smoke

test: install ## the default test suite (no slow tests, no network); the slowest tests are listed
	$(PY) -m pytest --durations=15

test-slow: install ## only the tests marked slow
	$(PY) -m pytest -m slow

test-all: install ## every test, slow ones included
	$(PY) -m pytest -m 'slow or not slow'

lint: install ## ruff
	$(VENV)/bin/ruff check src tests benchmarks

format: install ## ruff format + import sorting
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: install ## speed benchmark at the ViT-B/32 geometry (several minutes on CPU)
	$(PY) benchmarks/speed.py --out experiments/log/benchmarks.md

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
