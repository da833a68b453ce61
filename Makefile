# ViT PTQ pipeline. `make help` lists the targets.
PY      ?= .venv/bin/python
PIP     ?= .venv/bin/pip
PYTHON  ?= python3
RUN_ARGS ?=
MLFLOW_PORT ?= 5000

.DEFAULT_GOAL := help
.PHONY: help setup run search test test-all bench bench-search ui clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

setup:  ## create .venv and install the package with its pinned dependencies
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'

run:  ## main job: reference ViT on CIFAR-10, recommended recipe, calibrate -> quantize -> evaluate -> sensitivity
	$(PY) -m pipeline quant=recommended stages=[calibrate,quantize,evaluate,sensitivity] $(RUN_ARGS)

search:  ## mixed-precision search (INT8/INT16 per site, budget 1.10): calibrate -> sensitivity -> search
	$(PY) -m pipeline quant=recommended stages=[calibrate,sensitivity,search] $(RUN_ARGS)

test:  ## fast test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow"

test-all:  ## every test, slow ones included
	$(PY) -m pytest -q

bench:  ## timing ratios (quantization core, profiler) -> bench/results/{quant,profile,profile_1thread}.json
	$(PY) bench/bench_quant.py
	$(PY) bench/bench_profile.py --isolated-sites 6
	$(PY) bench/bench_profile.py --isolated-sites 6 --threads 1 --out bench/results/profile_1thread.json

bench-search:  ## three search regimes, prior vs random vs greedy (CPU: about 2 h) -> bench/results/search.json
	$(PY) bench/bench_search.py

ui:  ## MLflow UI on the embedded store (http://127.0.0.1:5000; another port: make ui MLFLOW_PORT=N)
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --default-artifact-root $(CURDIR)/mlruns/artifacts --port $(MLFLOW_PORT)

clean:  ## remove caches and run outputs (keeps the MLflow store)
	rm -rf .cache .pytest_cache .hypothesis mlruns/outputs mlruns/multirun
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
