# raggen: `make demo` runs the quickstart, `make test` runs the tests. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU wheel of torch lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo lint format test test-unit test-integration bench reader clean gpu image

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/raggen quickstart --config configs/quickstart.yaml

# ruff (configured in pyproject.toml): lint rules and the formatter's verdict; `make format` fixes both.
lint: venv
	$(BIN)/ruff check raggen jobs tests benchmarks
	$(BIN)/ruff format --check raggen jobs tests benchmarks

format: venv
	$(BIN)/ruff check --fix raggen jobs tests benchmarks
	$(BIN)/ruff format raggen jobs tests benchmarks

# Every test on two processes (pytest-xdist), a test file at a time per process (--dist loadfile:
# an integration module's Ray, Serve or job cluster lives in one process; each process has its own
# RAY_TMPDIR, see tests/conftest.py); the 15 slowest tests are listed at the end.
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --timeout=600 --durations=15

test-unit: venv
	$(BIN)/python -m pytest -q -n 2 -m "not integration"

test-integration: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m integration --timeout=600 --durations=15

bench: venv
	$(BIN)/python benchmarks/estimators.py
	$(BIN)/python benchmarks/index.py --n 100000 --queries 200
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/serve.py

# Rebuild the shipped reader (raggen/assets/reader) on an endless stream of fresh world facts:
# a BART whose encoder is MiniLM's first 3 layers, with an extractive span loss on the encoder
# (the defaults of `raggen pretrain-reader`; about 50 min on 2 CPU cores; saved in float16).
# The shipped weights are the step-1500 save of this command (it saves at every evaluation), in float16.
reader: venv
	$(BIN)/raggen pretrain-reader --out raggen/assets/reader --seed 3 --half

# On a CUDA node: swap faiss-cpu for the GPU build (both provide the `faiss` module).
gpu: venv
	$(BIN)/python -m pip uninstall -y faiss-cpu
	$(BIN)/python -m pip install -q --no-deps --force-reinstall "faiss-gpu>=1.8"

# The container image (docker/Dockerfile), the one k8s/ and cluster/aws-gpu.yaml name:
# `make image` -> $(IMAGE):$(VERSION)-cpu, `make image VARIANT=cuda` -> $(IMAGE):$(VERSION)-cuda.
IMAGE   ?= ghcr.io/raggen-ai/raggen
VARIANT ?= cpu
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)

image:
	@case "$(VARIANT)" in cpu|cuda) ;; *) echo "make image: VARIANT must be cpu or cuda, not '$(VARIANT)'" >&2; exit 2 ;; esac
	@command -v docker >/dev/null 2>&1 || { echo "make image: docker is not installed here. Install Docker (with buildx) and run it again, or build docker/Dockerfile from the repository root with another OCI builder." >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make image: docker is installed but its daemon does not answer (docker info failed). Start it, or point DOCKER_HOST at one." >&2; exit 1; }
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile --build-arg VARIANT=$(VARIANT) -t $(IMAGE):$(VERSION)-$(VARIANT) .

clean:
	rm -rf $(VENV) artifacts runs
