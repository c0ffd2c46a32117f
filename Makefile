# slm-monitoring — every target does its own set-up (`deps`), so each works on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Python prints as it goes (progress of long steps shows up in CI logs).
export PYTHONUNBUFFERED := 1

.PHONY: help deps venv tools generate demo test unit e2e lint bench gpu-bundle images image-digests kind-up kind-down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

deps: venv tools ## Python environment + pinned binaries (cached in ~/.cache/slm-monitoring, keyed by version)

venv:
	@scripts/deps/venv.sh
	@scripts/deps/checkov.sh >/dev/null

tools:
	@scripts/deps/build-tools.sh

generate: venv ## rewrite every generated file (chart CRD copy, chart dashboard and README, docs/reference)
	@scripts/sync-crds.sh
	@$(PY) scripts/chart_dashboards.py
	@$(PY) scripts/chart_readme.py
	@$(PY) scripts/gen_docs.py

demo: deps ## the whole product on this machine (local control plane, operator, server, Prometheus, Alertmanager)
	@$(PY) -m slm_devtools demo $(DEMO_ARGS)

# Coverage of the two products (in-process code; the servers and operators the tests start as processes
# are not counted). The figure is printed at the end of `make test`.
COVERAGE := --cov=slm_operator --cov=slm_server --cov-report=term:skip-covered
# The tests spread over worker processes (pytest-xdist), a test file per worker at a time: most of the
# suite's time is spent waiting on real servers (API server, Prometheus evaluations, Alertmanager
# notifications, model servers), not computing. Each worker starts its own local control plane on its
# own pod network (slm_devtools.cluster). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: deps ## set-up, lint (ruff, mypy), then every test (unit, data plane, e2e on the local control plane)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy
	@$(PYTEST) $(XDIST) $(COVERAGE) $(PYTEST_ARGS)

unit: deps ## tests that need no control plane
	@$(PYTEST) -m "not e2e" $(PYTEST_ARGS)

e2e: deps ## e2e tests (local control plane, or KUBECONFIG=... make e2e E2E_EXISTING=1 for kind)
	@$(PYTEST) -m e2e $(if $(E2E_EXISTING),--existing-kubeconfig=$(KUBECONFIG)) $(PYTEST_ARGS)

lint: deps ## ruff + mypy
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy

bench: deps ## benchmarks, printed as ratios against a baseline run side by side
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

gpu-bundle: deps ## .gpu/: wheels + tiny model for running scripts/gpu-check.sh on a GPU machine with no network
	@scripts/gpu-bundle.sh

images: ## build the operator and server images with Docker or Podman (IMAGES="operator server sidecar" adds the sidecar; IMAGE_REGISTRY, IMAGE_TAG, CONTAINER_ENGINE)
	@scripts/images.sh $(IMAGES)

image-digests: venv ## check every pinned image digest against its registry (crane or docker buildx; UPDATE=1 bumps)
	@$(PY) scripts/image_digests.py $(if $(UPDATE),--update)

kind-up: ## a kind cluster with this checkout's images, for the e2e tests on a laptop (Docker or Podman)
	@scripts/kind-up.sh

kind-down: ## delete the kind cluster
	@kind delete cluster --name slm-monitoring

clean: ## remove checkout-local build outputs (the shared cache stays; rm -rf ~/.cache/slm-monitoring for all)
	rm -rf .venv .bin .gpu .pytest_cache .ruff_cache .mypy_cache
