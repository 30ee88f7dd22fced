# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU torch wheel lies on disk on the development machines; elsewhere pip finds it on its index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: install serve test test-fast lint format bench engines clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(FIND_LINKS) torch==2.13.0
	$(PIP) install --quiet $(FIND_LINKS) -e '.[dev,deploy]'
	# Only the CLIP BPE vocabulary file is used from open-clip (to build a real tokenizer offline).
	$(PIP) install --quiet --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

# The demo page's browser test drives Debian's chromium (not Playwright's download); installed
# here, as root or through sudo, only when it is missing.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo -E) apt-get install -y -qq chromium

# The all-in-one service: API + in-process queue + one worker (HOST, PORT, MODEL from the environment).
serve: install
	@if [ -z "$${MODEL:-}" ] || [ "$${MODEL}" = tiny ]; then \
		echo "make serve: no model weights configured (MODEL unset): running the TINY random-weight model"; fi
	$(PY) -m service

# Two pytest processes (TEST_WORKERS; 0 = one process), each taking whole files: module fixtures
# (service stacks) stay in one process, and much of the suite waits on the processes it starts.
TEST_WORKERS ?= 2
test: install $(CHROMIUM)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not gpu" -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The edit-test loop (under 2 minutes): the step planner, the import direction, the method's
# contracts (settings, cost, phrases, schedulers, masks, golden fixture), the executor on the tiny
# model, and the settings/README contract. No process is started. `make test` stays the whole suite.
TEST_FAST := tests/engines/test_planner.py tests/test_import_direction.py tests/test_cost.py \
	tests/test_phrases.py tests/test_settings_check.py tests/test_schedulers.py tests/test_masks.py \
	tests/test_golden.py tests/engines/test_engines_keys.py tests/engines/test_engines_step_batching.py \
	tests/engines/test_engines_step_scheduler.py tests/service/test_service_docs.py
test-fast: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not gpu and not integration" -q $(TEST_FAST)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) outputs .pytest_cache

# ONNX graphs of ENGINE_MODEL's ENGINE_BUCKETS into artifacts/engines/onnx/<key>/ (+ TensorRT engines in
# artifacts/engines/trt/<key>/ where TensorRT and a GPU exist). docs/ENGINES.md.
ENGINE_MODEL ?= tiny
ENGINE_BUCKETS ?=
engines: install
	$(PY) -m engines.export --model $(ENGINE_MODEL) $(if $(ENGINE_BUCKETS),--buckets $(ENGINE_BUCKETS),)

# CPU: the batched eager loop vs the official-style three-call loop, one run (ratio, not times);
# writes benchmarks/results/cpu-bench.{json,md}. GPU numbers: benchmarks/gpu_bench.py.
bench: install
	$(PY) benchmarks/cpu_bench.py

# The GPU device kit (docs/ENGINES.md, "Device kit"): pure-Python CPython 3.12 wheels the device
# image lacks (diffusers, open-clip-torch, pytest), checked to fit the 64 MiB one device call
# carries. Then on the device: run with carry=[$(DEVICE_KIT)] the command `bash tools/device_check.sh`.
DEVICE_KIT ?= outputs/device-kit
.PHONY: device-kit
device-kit: install
	$(PY) tools/device_kit.py build --out $(DEVICE_KIT)

# --- Deployment: images, Kubernetes, load tests (docs/DEPLOYMENT.md) ---------------------------
.PHONY: docker-build docker-push deploy lint-deploy loadtest loadtest-cluster
REGISTRY ?=
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
IMAGE_PREFIX := $(if $(REGISTRY),$(REGISTRY)/,)
IMAGE_API ?= $(IMAGE_PREFIX)realcustom-api:$(TAG)
IMAGE_WORKER ?= $(IMAGE_PREFIX)realcustom-worker:$(TAG)
OVERLAY ?= dev
NAMESPACE ?= $(if $(filter prod prod-ha,$(OVERLAY)),realcustom,realcustom-$(OVERLAY))
KUBECTL ?= kubectl
SCENARIO ?= smoke

# Base images: docker/base-images.env, pinned by digest (`make docker-pin`, needs the registries);
# an unpinned line stops the build unless ALLOW_UNPINNED=1. DOCKER=... picks the client.
DOCKER ?= docker
BASE_IMAGES ?= docker/base-images.env
ALLOW_UNPINNED ?=
.PHONY: docker-pin
docker-build:
	@unpinned=$$(grep -E '^[A-Z_]+=' $(BASE_IMAGES) | grep -v '@sha256:[0-9a-f]\{64\}$$' || true); \
	if [ -n "$$unpinned" ] && [ "$(ALLOW_UNPINNED)" != 1 ]; then \
		echo "base images not pinned by digest in $(BASE_IMAGES): run make docker-pin (or ALLOW_UNPINNED=1):" >&2; \
		echo "$$unpinned" >&2; exit 1; fi
	args=$$(grep -E '^[A-Z_]+=' $(BASE_IMAGES) | sed 's/^/--build-arg /'); \
	$(DOCKER) build $$args --target api -t $(IMAGE_API) . && \
	$(DOCKER) build $$args --target worker -t $(IMAGE_WORKER) .

# The images' hashed locks (docker/requirements-{api,worker,nodeps}.lock), resolved for the images'
# Python and platform at the versions requirements.lock (what the tests ran) has; needs uv and PyPI.
# Rerun after regenerating requirements.lock; tests/deploy/test_images.py checks that they agree.
UV ?= uv
LOCK_ARGS := --generate-hashes --python-version 3.11.14 --python-platform x86_64-manylinux_2_28 --no-header
.PHONY: docker-locks
docker-locks:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^+ ]*\).*/\1==\2/p' requirements.lock > "$$tmp/tested.txt" && \
	header='# Generated by `make docker-locks` (uv pip compile, constrained to requirements.lock): do not edit.' && \
	{ echo "$$header"; $(UV) pip compile -q docker/requirements-api.txt -c "$$tmp/tested.txt" $(LOCK_ARGS); } \
		> docker/requirements-api.lock && \
	{ echo "$$header"; $(UV) pip compile -q pyproject.toml -c "$$tmp/tested.txt" --no-emit-package realcustom-service \
		$(LOCK_ARGS); } > docker/requirements-worker.lock && \
	{ echo "$$header"; $(UV) pip compile -q docker/requirements-nodeps.in --no-deps $(LOCK_ARGS); } \
		> docker/requirements-nodeps.lock

# Rewrites every base image of docker/base-images.env to <tag>@sha256:<digest of the tag now>.
docker-pin:
	@while IFS= read -r line; do \
		case "$$line" in \
			[A-Z]*=*) name=$${line%%=*}; ref=$${line#*=}; ref=$${ref%%@*}; \
				digest=$$($(DOCKER) buildx imagetools inspect "$$ref" --format '{{json .Manifest.Digest}}' | tr -d '"') \
					&& case "$$digest" in sha256:*) ;; *) echo "no digest for $$ref" >&2; exit 1 ;; esac \
					&& echo "$$name=$$ref@$$digest" ;; \
			*) echo "$$line" ;; \
		esac; \
	done < $(BASE_IMAGES) > $(BASE_IMAGES).new && mv $(BASE_IMAGES).new $(BASE_IMAGES) && grep -E '^[A-Z_]+=' $(BASE_IMAGES)

docker-push: docker-build
	$(if $(REGISTRY),,$(error set REGISTRY, e.g. make docker-push REGISTRY=ghcr.io/you))
	$(DOCKER) push $(IMAGE_API)
	$(DOCKER) push $(IMAGE_WORKER)

# Applies k8s/overlays/$(OVERLAY) with the images just pushed; API_KEYS (comma-separated), when
# given, becomes the realcustom-api-keys Secret (prod takes its keys only from there; its first key
# is also stored as `metrics`, the credential Prometheus scrapes the API's /metrics with), and
# REDIS_PASSWORD the realcustom-redis Secret (prod: e.g. REDIS_PASSWORD=$$(openssl rand -hex 32)).
# prod and prod-ha need PROVIDER (gke, eks, aks, gpu-operator: k8s/components/providers/) and take
# INGRESS (ingress-nginx or gateway-api: k8s/components/).
comma := ,
PROVIDER ?=
INGRESS ?=
PROVIDERS := gke eks aks gpu-operator
INGRESSES := ingress-nginx gateway-api
# The artifacts set (engines, exports, caches) of this model version and worker image.
ARTIFACT_MODEL ?= ckpts-1
ARTIFACT_SET ?= $(ARTIFACT_MODEL)-$(TAG)
PROD_OVERLAY = $(filter prod prod-ha,$(OVERLAY))
deploy:
	$(if $(REGISTRY),,$(error set REGISTRY to where `make docker-push` pushed the images))
	$(check_provider)
	$(KUBECTL) create namespace $(NAMESPACE) --dry-run=client -o yaml | $(KUBECTL) apply -f -
	$(if $(API_KEYS),$(KUBECTL) -n $(NAMESPACE) create secret generic realcustom-api-keys \
		--from-literal=API_KEYS='$(API_KEYS)' --from-literal=metrics='$(firstword $(subst $(comma), ,$(API_KEYS)))' \
		--dry-run=client -o yaml | $(KUBECTL) apply -f -,)
	$(if $(REDIS_PASSWORD),$(KUBECTL) -n $(NAMESPACE) create secret generic realcustom-redis \
		--from-literal=password='$(REDIS_PASSWORD)' --dry-run=client -o yaml | $(KUBECTL) apply -f -,)
	$(overlay_with_images) && \
	$(KUBECTL) apply -k "$$tmp" -l 'app.kubernetes.io/component notin ($(ON_DEMAND_JOBS))'

define check_provider
$(if $(PROD_OVERLAY),$(if $(filter $(PROVIDERS),$(PROVIDER)),,$(error OVERLAY=$(OVERLAY) needs PROVIDER=one of $(PROVIDERS))),)
$(if $(INGRESS),$(if $(filter $(INGRESSES),$(INGRESS)),,$(error INGRESS must be one of $(INGRESSES))),)
endef

# In "$$tmp": a kustomization of k8s/overlays/$(OVERLAY) with the ingress component and the provider
# profile (in that order: the profile's patches select the ingress objects), both images at
# REGISTRY/TAG, the artifacts set of this image, and with GPU_KIND (the value of the provider's
# GPU-kind node label, see GPU_KIND_LABEL), the engine build pinned to that GPU kind.
define overlay_with_images
tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
printf '%s\n' 'resources:' "  - $$(realpath --relative-to="$$tmp" k8s/overlays/$(OVERLAY))" \
	$(if $(PROD_OVERLAY),'components:' \
		$(if $(INGRESS),"  - $$(realpath --relative-to="$$tmp" k8s/components/$(INGRESS))") \
		"  - $$(realpath --relative-to="$$tmp" k8s/components/providers/$(PROVIDER))" \
		'configMapGenerator:' '  - name: realcustom-worker-config' '    behavior: merge' \
		'    literals:' '      - ARTIFACT_SET=$(ARTIFACT_SET)') \
	'images:' \
	'  - name: realcustom-api' '    newName: $(IMAGE_PREFIX)realcustom-api' '    newTag: "$(TAG)"' \
	'  - name: realcustom-worker' '    newName: $(IMAGE_PREFIX)realcustom-worker' '    newTag: "$(TAG)"' \
	$(if $(GPU_KIND),$(PIN_ENGINE_BUILD)) > "$$tmp/kustomization.yaml"
endef
# The node label whose value names a GPU kind, per provider.
GPU_KIND_LABEL_gke := cloud.google.com/gke-accelerator
GPU_KIND_LABEL_eks := node.kubernetes.io/instance-type
GPU_KIND_LABEL_aks := node.kubernetes.io/instance-type
GPU_KIND_LABEL_gpu-operator := nvidia.com/gpu.product
GPU_KIND_LABEL = $(GPU_KIND_LABEL_$(PROVIDER))
PIN_ENGINE_BUILD = 'patches:' '  - target:' '      kind: Job' '      name: realcustom-engine-build' \
	'    patch: |-' '      - op: add' '        path: /spec/template/spec/nodeSelector' \
	'        value: {"$(GPU_KIND_LABEL)": "$(GPU_KIND)"}'

# The prod overlay's Jobs run on demand, never on each deploy: `make fetch-weights` once per
# model, `make build-engines` once per (model, BUCKETS, GPU kind, image), before the workers need
# them (docs/DEPLOYMENT.md, "Rollout runbook"). A Job's pod template cannot change, so the previous
# run is deleted first; the Job is applied with its ConfigMap, then awaited (its log tail on failure).
ON_DEMAND_JOBS := engine-build,fetch-weights
GPU_KIND ?=
JOB_COMPONENT_fetch-weights := fetch-weights
JOB_COMPONENT_build-engines := engine-build
.PHONY: fetch-weights build-engines
# The Jobs are the same in prod and prod-ha; the ConfigMap applied with them is the overlay's.
fetch-weights build-engines: OVERLAY := $(if $(filter prod-ha,$(OVERLAY)),prod-ha,prod)
fetch-weights build-engines:
	$(if $(REGISTRY),,$(error set REGISTRY to where `make docker-push` pushed the images))
	$(check_provider)
	$(KUBECTL) -n $(NAMESPACE) delete job realcustom-$(JOB_COMPONENT_$@) --ignore-not-found
	$(overlay_with_images) && \
	$(KUBECTL) apply -k "$$tmp" -l 'app.kubernetes.io/component in (worker-config,$(JOB_COMPONENT_$@))'
	@while :; do \
		state=$$($(KUBECTL) -n $(NAMESPACE) get job realcustom-$(JOB_COMPONENT_$@) \
			-o jsonpath='{.status.conditions[?(@.status=="True")].type}') || exit 1; \
		case "$$state" in \
			*Complete*) echo "realcustom-$(JOB_COMPONENT_$@): complete"; break ;; \
			*Failed*) $(KUBECTL) -n $(NAMESPACE) logs job/realcustom-$(JOB_COMPONENT_$@) --tail=50; exit 1 ;; \
		esac; \
		sleep 15; \
	done

# hadolint, yamllint and the Kubernetes schema check; all offline.
lint-deploy: install
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/yamllint --strict -c .yamllint.yaml .yamllint.yaml docker k8s
	$(PY) tests/deploy/deploy_checks.py

# Starts Redis, the API and 2 workers (tiny model) on loopback, runs loadtests/$(SCENARIO).js,
# writes outputs/loadtests/$(SCENARIO)*.{json,md}, stops everything. RATE, DURATION and
# LOADTEST_ARGS (more flags): see loadtests/run.py --help.
loadtest: install
	$(PY) loadtests/run.py --scenario $(SCENARIO) $(if $(RATE),--rate $(RATE),) \
		$(if $(DURATION),--duration $(DURATION),) $(LOADTEST_ARGS)

# loadtests/$(SCENARIO).js inside the cluster (k6 Operator, namespace realcustom) against the API's
# Service: packs the scenario, its library and photos into a k6 archive (the realcustom-k6
# ConfigMap), replaces the previous TestRun and applies k8s/loadtest with RATE / DURATION.
K6 ?= $(VENV)/bin/k6
K6_ARGS = $(if $(RATE),-e RATE=$(RATE),) $(if $(DURATION),-e DURATION=$(DURATION),)
loadtest-cluster:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(K6) archive --quiet loadtests/$(SCENARIO).js -O "$$tmp/archive.tar" && \
	$(KUBECTL) -n realcustom create configmap realcustom-k6 --from-file=archive.tar="$$tmp/archive.tar" \
		--dry-run=client -o yaml | $(KUBECTL) apply -f - && \
	$(KUBECTL) -n realcustom delete testrun realcustom-k6 --ignore-not-found && \
	printf '%s\n' 'resources:' "  - $$(realpath --relative-to="$$tmp" k8s/loadtest)" 'patches:' '  - target:' \
		'      kind: TestRun' '    patch: |-' '      - op: replace' '        path: /spec/arguments' \
		'        value: "--quiet $(strip $(K6_ARGS))"' > "$$tmp/kustomization.yaml" && \
	$(KUBECTL) apply -k "$$tmp"
