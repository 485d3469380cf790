# alexops: `make run` installs and runs the pipeline; `make test` installs and tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MIRROR := /usr/share/datasets/fashion-mnist

.PHONY: install mirror run flow test lint format bench bench-gpu mlflow-ui mlflow-server clean

install: $(STAMP)

# constraints.txt pins the whole dependency tree, so every machine installs the same set
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# The offline Fashion-MNIST mirror (Debian package), installed where we are root with apt.
mirror:
	@if [ -d $(MIRROR) ]; then \
	  echo "mirror: $(MIRROR) present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    && echo "mirror: installed dataset-fashion-mnist" \
	    || echo "mirror: apt-get failed; fetch will use the official URLs"; \
	else \
	  echo "mirror: not root or no apt-get; fetch will use the official URLs"; \
	fi

# PRESET=gpu runs the paper's recipe as a DVC experiment (dvc exp run -S ...): DVC records the
# values with the experiment; the workspace params.yaml then holds them until `git checkout params.yaml`
PRESET ?=
run: install mirror
	@if [ -n "$(PRESET)" ]; then \
	  flags=$$($(BIN)/python -m alexops.presets $(PRESET)) || exit 2; \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run $$flags; \
	else \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro; \
	fi
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show
	@$(BIN)/python -m alexops.summary

flow: install mirror
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline.flows

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests pipeline benchmarks
	$(BIN)/ruff format --check src tests pipeline benchmarks

format: install
	$(BIN)/ruff format src tests pipeline benchmarks
	$(BIN)/ruff check --fix src tests pipeline benchmarks

# Side-by-side measurements; results in benchmarks/results/*.json (see README, Benchmarks).
bench: install mirror
	$(BIN)/python benchmarks/bench_lrn.py
	$(BIN)/python benchmarks/bench_train.py --device cpu --image-size 227 --width 1.0 --steps 3 --seed-steps 3 \
	  --out benchmarks/results/train-cpu-227.json
	$(BIN)/python benchmarks/bench_train.py --device cpu --params params.yaml --steps 10 --seed-steps 3 \
	  --epochs $$($(BIN)/python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['train']['epochs'])") \
	  --out benchmarks/results/train-cpu-default.json

# The prepared GPU run (one call on a machine with CUDA and PyTorch).
bench-gpu:
	PY=$(BIN)/python bash benchmarks/gpu_check.sh

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# A tracking server for the pipeline: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
mlflow-server: install
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts \
	  --host 127.0.0.1 --port 5000

clean:
	rm -rf data artifacts mlruns mlflow.db
