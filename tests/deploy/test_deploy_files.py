"""Offline checks of Dockerfile, docker/ and k8s/: linters, schemas, and drift from the code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from deploy_checks import COMPOSED_TARGETS, EXTRA_TARGETS, KUSTOMIZE_TARGETS, ROOT, config, render, validate

from service.queue.keys import GROUP, QueueKeys
from service.settings import Settings

BIN = Path(sys.executable).parent
# Variables read by libraries in the worker image, not by service.settings.
LIBRARY_ENV = {
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "REDISCLI_AUTH",
    "XDG_CACHE_HOME",
}
# Read by the manifests themselves, not by a process: the workers' artifacts set (a volume's
# subPathExpr) and the engine-build Job's clean-up of older sets.
MANIFEST_ENV = {"ARTIFACT_SET"}


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([BIN / "hadolint", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yaml_passes_yamllint() -> None:
    result = subprocess.run(
        [BIN / "yamllint", "--strict", "-c", ".yamllint.yaml", ".yamllint.yaml", "docker", "k8s"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS + COMPOSED_TARGETS + EXTRA_TARGETS)
def test_rendered_manifests_match_kubernetes_schemas(target: str) -> None:
    docs = render(target)
    assert docs
    errors = [error for doc in docs for error in validate(doc)]
    assert not errors, "\n".join(errors)


def _container_env(docs: list[dict]) -> set[str]:
    names = set()
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith(
            ("realcustom-api-config", "realcustom-worker-config")
        ):
            names |= set(doc.get("data", {}))
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                names |= {item["name"] for item in container.get("env", [])}
    return names


def test_every_service_variable_is_a_setting() -> None:
    """A misspelt variable would be silently ignored by pydantic-settings (extra="ignore")."""
    settings = {name.upper() for name in Settings.model_fields}
    names = set()
    for target in KUSTOMIZE_TARGETS + COMPOSED_TARGETS:
        names |= _container_env(render(target))
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    for service in compose["services"].values():
        if service.get("image", "").startswith("realcustom"):
            names |= set(service.get("environment", {}))
    assert names - settings - LIBRARY_ENV - MANIFEST_ENV == set()


def test_kubernetes_scaler_watches_the_service_stream() -> None:
    """KEDA must read the stream and consumer group that the Redis queue really uses."""
    prefix = Settings.model_fields["queue_name"].default
    for target in KUSTOMIZE_TARGETS:
        (scaled,) = [doc for doc in render(target) if doc["kind"] == "ScaledObject"]
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["metadata"]["stream"] == QueueKeys(prefix).stream
            assert trigger["metadata"].get("consumerGroup", GROUP) == GROUP


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_api_requirements_are_the_project_pins_without_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    project_pins = _pins(project["dependencies"])
    api_pins = _pins((ROOT / "docker/requirements-api.txt").read_text().splitlines())
    assert "torch" not in api_pins
    assert {name: project_pins.get(name) for name in api_pins} == api_pins


# Runs in a fresh interpreter as the API image would: only the standard library, the project and
# the distributions passed in argv[1] can be imported (torch is not among them). Then it imports
# the API as `python -m service.api` does, builds the app and runs its start-up (tokenizer).
_API_IMAGE_PROBE = """
import asyncio, importlib.abc, importlib.machinery, importlib.metadata, json, sys

allowed = set(json.loads(sys.argv[1]))
owners = importlib.metadata.packages_distributions()

# sys.path as the api image has it: site-packages holds only the allowed distributions.
class ApiImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or "." in name:  # a submodule comes with its top-level package
            return spec
        # Standard library and the project itself: not from site-packages.
        if "site-packages" not in str(spec.origin or spec.submodule_search_locations):
            return spec
        if {d.lower().replace("_", "-") for d in owners.get(name, [])} & allowed:
            return spec
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        return importlib.machinery.PathFinder.find_distributions(context)

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = ApiImage()
import service.api.__main__
from service.api.app import create_app
from service.settings import Settings

app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))

async def start_and_stop():
    async with app.router.lifespan_context(app):
        pass

asyncio.run(start_and_stop())
"""


def test_api_starts_with_only_what_the_api_image_installs() -> None:
    """The API image can't be built here; this runs the API start-up with just its packages: those
    of its hashed lock, and open-clip (installed without dependencies, for its vocabulary file)."""
    from test_images import LOCKS, lock_entries

    allowed = set(lock_entries(LOCKS["api"])) | set(lock_entries(LOCKS["nodeps"]))
    assert "torch" not in allowed
    result = subprocess.run(
        [sys.executable, "-c", _API_IMAGE_PROBE, json.dumps(sorted(allowed))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]


# --- rendered manifests: disruptions and rollouts -----------------------------------------------

# Kubernetes' default when a Deployment sets none.
DEFAULT_PROGRESS_DEADLINE_S = 600


def _rendered(kind: str) -> list[tuple[str, dict]]:
    return [
        (target, doc)
        for target in KUSTOMIZE_TARGETS + COMPOSED_TARGETS
        for doc in render(target)
        if doc["kind"] == kind
    ]


def _needs_gpu(pod_spec: dict) -> bool:
    return any(
        "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
        for container in pod_spec["containers"]
    )


def _startup_allowance_s(container: dict) -> int:
    """The longest a container may take to pass its startup probe before it is restarted."""
    probe = container.get("startupProbe", {})
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get(
        "failureThreshold", 3
    )


def test_disruption_budgets_never_count_unready_pods() -> None:
    """An unready pod serves nothing: it must never block a node drain (k8s 1.27+ beta, 1.31 GA)."""
    budgets = _rendered("PodDisruptionBudget")
    assert budgets
    for target, budget in budgets:
        assert budget["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", (
            target,
            budget["metadata"]["name"],
        )


def test_gpu_rollouts_need_no_spare_gpu() -> None:
    """A surge pod needs one more GPU than the pool has in use; a full pool never schedules it."""
    gpu_deployments = [
        (target, doc)
        for target, doc in _rendered("Deployment")
        if _needs_gpu(doc["spec"]["template"]["spec"])
    ]
    assert any(target.endswith("prod") for target, _ in gpu_deployments)
    for target, deployment in gpu_deployments:
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1), target


def test_worker_liveness_is_progress_based() -> None:
    """A TCP check of the metrics port only proves its thread is alive; /healthz answers 503 when
    the worker stopped making progress (service/worker/health.py)."""
    workers = [
        (target, container)
        for target, doc in _rendered("Deployment")
        for container in doc["spec"]["template"]["spec"]["containers"]
        if container["name"] == "worker"
    ]
    assert workers
    for target, container in workers:
        probe = container["livenessProbe"]
        assert probe["httpGet"] == {"path": "/healthz", "port": "metrics"}, target
        assert any(port["name"] == "metrics" for port in container["ports"]), target


def test_rollouts_are_not_declared_stuck_while_a_pod_may_still_start() -> None:
    """progressDeadlineSeconds must exceed a new pod's start-up allowance, plus the old pod's grace
    period where the new one waits for its resources (maxSurge 0)."""
    for target, deployment in _rendered("Deployment"):
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        waits_for_old_pod = spec.get("strategy", {}).get("rollingUpdate", {}).get("maxSurge") == 0
        worst_s = max(_startup_allowance_s(c) for c in pod["containers"])
        if waits_for_old_pod:
            worst_s += pod.get("terminationGracePeriodSeconds", 30)
        deadline_s = spec.get("progressDeadlineSeconds", DEFAULT_PROGRESS_DEADLINE_S)
        assert deadline_s > worst_s, (target, deployment["metadata"]["name"], deadline_s, worst_s)


# --- rendered manifests: engines, storage, monitoring -------------------------------------------


def test_tensorrt_is_never_configured_without_buckets() -> None:
    """Without BUCKETS the TensorRT backend prepares batch 1 only: batches of 2-4 would run eagerly."""
    configs = [config(render(target), "worker") for target in KUSTOMIZE_TARGETS]
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    configs += [service.get("environment", {}) for service in compose["services"].values()]
    tensorrt = [settings for settings in configs if "tensorrt" in str(settings.get("BACKEND", ""))]
    assert tensorrt, "no TensorRT configuration found: the prod overlay and compose's gpu profile have one"
    for settings in tensorrt:
        assert settings.get("BUCKETS"), settings


def _pod_spec(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc["spec"]["template"]["spec"]


def _mounts(pod: dict, container: str | None = None) -> dict[str, tuple[str, bool, str | None]]:
    """Mount path -> (claim name, read-only, subPath or subPathExpr) for the PVC-backed volumes of
    the pod's (only, or named) container."""
    claims = {
        v["name"]: (
            v["persistentVolumeClaim"]["claimName"],
            v["persistentVolumeClaim"].get("readOnly", False),
        )
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    (found,) = [c for c in pod["containers"] if container is None or c["name"] == container]
    return {
        m["mountPath"]: (
            claims[m["name"]][0],
            claims[m["name"]][1] or m.get("readOnly", False),
            m.get("subPath", m.get("subPathExpr")),
        )
        for m in found["volumeMounts"]
        if m["name"] in claims
    }


PROD = "k8s/overlays/prod+ingress-nginx+gke"


def test_engine_build_job_builds_into_the_workers_cache_from_their_settings() -> None:
    docs = render(PROD)
    worker = _pod_spec(docs, "Deployment", "realcustom-worker")
    job = _pod_spec(docs, "Job", "realcustom-engine-build")
    (job_container,) = job["containers"]
    (worker_container,) = worker["containers"]
    # The same MODEL, BUCKETS and ARTIFACT_SET: the ConfigMap the workers read.
    assert job_container["envFrom"] == worker_container["envFrom"]
    # The workers' artifacts set at the same path, writable; the Job also sees every set.
    job_mounts, worker_mounts = _mounts(job), _mounts(worker)
    assert job_mounts["/artifacts"] == worker_mounts["/artifacts"]
    assert worker_mounts["/artifacts"] == ("realcustom-artifacts", False, "sets/$(ARTIFACT_SET)")
    assert job_mounts["/artifact-sets"] == ("realcustom-artifacts", False, "sets")
    # The weights at the path MODEL names, read-only (the workers' copy: see the next test).
    model = config(docs, "worker")["MODEL"]
    assert model.startswith("/weights/") and job_mounts["/weights"] == ("realcustom-models", True, None)
    assert job["affinity"] == worker["affinity"] and job["tolerations"] == worker["tolerations"]
    command = " ".join(job_container["args"])
    assert "python -m engines.export" in command
    assert '--model "$MODEL"' in command and '--buckets "$BUCKETS"' in command
    # The worker image links /app/artifacts (the TensorRT backend's default cache) to /artifacts.
    assert "--out /artifacts/engines" in command
    assert "ln -s /artifacts /app/artifacts" in (ROOT / "Dockerfile").read_text()
    # Then the old sets go, never the current one.
    assert 'python -m engines.artifact_sets --root /artifact-sets --current "$ARTIFACT_SET"' in command
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", config(docs, "worker")["ARTIFACT_SET"])


def test_workers_start_from_a_node_local_copy_of_the_weights() -> None:
    """Every worker reading its weights from one network share at once is the slow cold start:
    an init container copies them once to the pod's local disk, the worker reads them there."""
    docs = render(PROD)
    worker = _pod_spec(docs, "Deployment", "realcustom-worker")
    (copy,) = worker["initContainers"]
    mounts = {m["mountPath"]: m for m in copy["volumeMounts"]}
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == "realcustom-models"
    assert "emptyDir" in volumes[mounts["/weights"]["name"]]
    (container,) = worker["containers"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/weights"}
    assert "/models" not in {m["mountPath"] for m in container["volumeMounts"]}
    assert config(docs, "worker")["MODEL"] == "/weights/realcustom"
    script = " ".join(copy["args"])
    assert "cp -r /models/realcustom /weights/.partial" in script and "timeout" in script
    # The copy fits its volume and the node has to have room for it.
    assert _quantity_gib(volumes["weights"]["emptyDir"]["sizeLimit"]) >= WEIGHTS_GB * 1e9 / 2**30
    assert (
        container["resources"]["requests"]["ephemeral-storage"] == volumes["weights"]["emptyDir"]["sizeLimit"]
    )


def test_worker_memory_limit_is_what_the_export_needs() -> None:
    """A worker exports a bucket's ONNX graphs when the Job has not (first start of an image):
    the same peak as the engine-build Job, so the same limit, or the first start is OOM-killed."""
    for target in COMPOSED_TARGETS:
        docs = render(target)
        (worker,) = _pod_spec(docs, "Deployment", "realcustom-worker")["containers"]
        (job,) = _pod_spec(docs, "Job", "realcustom-engine-build")["containers"]
        assert worker["resources"]["limits"]["memory"] == job["resources"]["limits"]["memory"], target


def _quantity_gib(quantity: str) -> float:
    units = {"Gi": 1, "Ti": 1024, "Mi": 1 / 1024}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * factor
    raise ValueError(quantity)


# Storage sizing (docs/DEPLOYMENT.md, "Storage sizing"; estimates, not measurements): the
# weights; per bucket the ONNX export (guidance + generation UNets in fp32 with external data,
# and the projector) and one GPU kind's engines (two bf16 UNets); compile and hub caches.
WEIGHTS_GB, ONNX_PER_BUCKET_GB, ENGINES_PER_BUCKET_GB, CACHES_GB = 15, 22, 10, 10
# Sets kept by the engine-build Job (the current one and the one a rollback uses); GPU kinds.
KEPT_SETS, GPU_KINDS = 2, 1


def test_storage_is_sized_from_the_model_set() -> None:
    docs = render(PROD)
    buckets = len(config(docs, "worker")["BUCKETS"].split(","))
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    artifacts_gb = KEPT_SETS * buckets * (ONNX_PER_BUCKET_GB + GPU_KINDS * ENGINES_PER_BUCKET_GB) + CACHES_GB
    size = _quantity_gib(claims["realcustom-artifacts"]["spec"]["resources"]["requests"]["storage"])
    assert artifacts_gb * 1e9 / 2**30 <= size <= 1.5 * artifacts_gb * 1e9 / 2**30, (artifacts_gb, size)
    # The next weights land beside the current ones.
    models = _quantity_gib(claims["realcustom-models"]["spec"]["resources"]["requests"]["storage"])
    assert models >= 2 * WEIGHTS_GB * 1e9 / 2**30


# GPU node selection per provider: the label its GPU nodes carry (no GPU Operator on the managed
# ones, so no nvidia.com/gpu.present there), the taint to tolerate, its storage classes.
PROVIDER_GPU_LABELS = {
    "gke": {"cloud.google.com/gke-accelerator"},
    "eks": {
        "karpenter.k8s.aws/instance-gpu-manufacturer",
        "eks.amazonaws.com/instance-gpu-manufacturer",
        "k8s.amazonaws.com/accelerator",
    },
    "aks": {"kubernetes.azure.com/accelerator"},
    "gpu-operator": {"nvidia.com/gpu.present"},
}
PROVIDER_STORAGE = {
    "gke": ("standard-rwx", "premium-rwo"),
    "eks": ("efs-sc", "gp3"),
    "aks": ("azurefile-csi-premium", "managed-csi-premium"),
    "gpu-operator": ("nfs-csi", None),
}


def _provider(target: str) -> str:
    return target.rsplit("+", 1)[1]


@pytest.mark.parametrize("target", COMPOSED_TARGETS)
def test_gpu_pods_select_the_providers_gpu_nodes(target: str) -> None:
    docs = render(target)
    for kind, name in (("Deployment", "realcustom-worker"), ("Job", "realcustom-engine-build")):
        pod = _pod_spec(docs, kind, name)
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        keys = {e["key"] for term in terms["nodeSelectorTerms"] for e in term["matchExpressions"]}
        assert keys == PROVIDER_GPU_LABELS[_provider(target)], (target, name)
        assert "nodeSelector" not in pod, "a nodeSelector would AND with the affinity"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Only the GPU pods: nothing else competes for the GPU nodes.
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet"} and doc["metadata"]["name"] != "realcustom-worker":
            assert "affinity" not in doc["spec"]["template"]["spec"], doc["metadata"]["name"]


@pytest.mark.parametrize("target", COMPOSED_TARGETS)
def test_claims_use_the_providers_storage_classes(target: str) -> None:
    rwx, rwo = PROVIDER_STORAGE[_provider(target)]
    docs = render(target)
    claims = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for name in ("realcustom-models", "realcustom-artifacts"):
        assert claims[name]["accessModes"] == ["ReadWriteMany"] and claims[name]["storageClassName"] == rwx
    redis = [
        d["spec"]["volumeClaimTemplates"][0]["spec"]
        for d in docs
        if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "realcustom-redis"
    ] + [d["spec"]["storage"]["volumeClaimTemplate"]["spec"] for d in docs if d["kind"] == "RedisReplication"]
    (claim,) = redis
    assert claim["accessModes"] == ["ReadWriteOnce"] and claim.get("storageClassName") == rwo
    # Something writes the weights: the fetch Job mounts the models claim writable.
    fetch = _pod_spec(docs, "Job", "realcustom-fetch-weights")
    assert _mounts(fetch)["/models"] == ("realcustom-models", False, None)
    assert not any(d["kind"] == "ConfigMap" and d["metadata"]["name"] == "realcustom-params" for d in docs)


@pytest.mark.parametrize("target", COMPOSED_TARGETS)
def test_gpu_workers_are_spread_and_go_before_batch_work(target: str) -> None:
    docs = render(target)
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PriorityClass"}
    worker = _pod_spec(docs, "Deployment", "realcustom-worker")
    job = _pod_spec(docs, "Job", "realcustom-engine-build")
    serving, batch = classes[worker["priorityClassName"]], classes[job["priorityClassName"]]
    assert serving["value"] > batch["value"] and batch.get("preemptionPolicy") == "Never"
    assert serving["value"] < 1_000_000_000  # below the system classes
    keys = {c["topologyKey"] for c in worker["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in worker["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS + COMPOSED_TARGETS)
def test_api_and_workers_share_no_configmap(target: str) -> None:
    """An API-only setting change must not roll the GPU workers (minutes of warm-up each)."""
    docs = render(target)

    def referenced(name: str) -> set[str]:
        pod = _pod_spec(docs, "Deployment", name)
        return {
            ref["configMapRef"]["name"]
            for c in pod["containers"] + pod.get("initContainers", [])
            for ref in c.get("envFrom", [])
        } | {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}

    api, worker = referenced("realcustom-api"), referenced("realcustom-worker")
    assert api and worker and not api & worker, (api, worker)


def test_an_api_only_change_leaves_the_workers_as_they_are(tmp_path: Path) -> None:
    from deploy_checks import build, compose

    extra = "configMapGenerator:\n  - name: realcustom-api-config\n    behavior: merge\n    literals:\n"
    before = build(compose("k8s/overlays/prod", ["providers/gke"], tmp_path))
    after = build(
        compose("k8s/overlays/prod", ["providers/gke"], tmp_path, extra + "      - RATE_LIMIT_PER_MINUTE=7\n")
    )

    def pod(docs: list[dict], name: str) -> dict:
        return _pod_spec(docs, "Deployment", name)

    assert pod(before, "realcustom-worker") == pod(after, "realcustom-worker")
    assert pod(before, "realcustom-api") != pod(after, "realcustom-api")


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_monitors_carry_the_label_kube_prometheus_stack_selects(target: str) -> None:
    monitors = [d for d in render(target) if d["kind"] in {"ServiceMonitor", "PodMonitor"}]
    assert len(monitors) == 2
    expected = "kube-prometheus-stack"
    if "prod" in target:
        expected = yaml.safe_load((ROOT / "k8s/overlays/prod/params.yaml").read_text())["data"][
            "prometheusRelease"
        ]
    assert {m["metadata"]["labels"].get("release") for m in monitors} == {expected}


def _redis_memory_limits(docs: list[dict]) -> list[tuple[int, int]]:
    """(maxmemory, container memory limit) in bytes for each kind of Redis data pod rendered."""
    units = {"gb": 2**30, "mb": 2**20, "kb": 2**10, "Gi": 2**30, "Mi": 2**20}

    def size(text: str) -> int:
        for unit, factor in units.items():
            if text.endswith(unit):
                return int(float(text[: -len(unit)]) * factor)
        return int(text)

    def maxmemory(conf: str) -> int:
        (line,) = [line for line in conf.splitlines() if line.startswith("maxmemory ")]
        return size(line.split()[1])

    pairs = []
    for doc in docs:
        if doc["kind"] == "StatefulSet" and doc["metadata"]["name"] == "realcustom-redis":
            (conf,) = [
                d["data"]["redis.conf"]
                for d in docs
                if d["metadata"]["name"] == "realcustom-redis" and d["kind"] == "ConfigMap"
            ]
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            pairs.append((maxmemory(conf), size(container["resources"]["limits"]["memory"])))
        if doc["kind"] == "RedisReplication":
            name = doc["spec"]["redisConfig"]["additionalRedisConfig"]
            (conf,) = [d["data"]["redis-additional.conf"] for d in docs if d["metadata"]["name"] == name]
            pairs.append(
                (maxmemory(conf), size(doc["spec"]["kubernetesConfig"]["resources"]["limits"]["memory"]))
            )
    return pairs


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_redis_has_headroom_between_maxmemory_and_its_limit(target: str) -> None:
    """Fragmentation and the AOF-rewrite fork's copy-on-write pages can each add up to half of the
    data: a limit of maxmemory + 25 % is an OOM kill waiting for a busy queue."""
    pairs = _redis_memory_limits(render(target))
    assert pairs
    for maxmemory, limit in pairs:
        assert limit >= 1.5 * maxmemory + 128 * 2**20, (target, maxmemory, limit)


# Start-up estimates (docs/DEPLOYMENT.md, "Start-up budget": estimates, not measurements), minutes:
# the weights from the node's disk onto the GPU; per bucket, the worker's ONNX export (first start
# of an image when the Job has not run), hashing its graphs to find their engines, engine load +
# CUDA graph capture. Engines are built by the Job, never within a worker's start.
LOAD_MIN, EXPORT_MIN, HASH_MIN, CAPTURE_MIN = 1, 5, 4, 2
STARTUP_MARGIN = 1.5
COPY_TIMEOUT_S, GRACE_S, PULL_AND_SCHEDULE_MIN = 900, 300, 15


def test_prod_worker_startup_is_bounded_by_its_budget() -> None:
    """Long enough for an honest start of its buckets, short enough that a hung start frees its GPU
    within the budget rather than hours later."""
    docs = render(PROD)
    buckets = len(config(docs, "worker")["BUCKETS"].split(","))
    budget_s = 60 * STARTUP_MARGIN * (LOAD_MIN + buckets * (EXPORT_MIN + HASH_MIN + CAPTURE_MIN))
    (worker,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "realcustom-worker"
    ]
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    allowance = _startup_allowance_s(container)
    assert budget_s <= allowance <= budget_s + 600, (budget_s, allowance)
    (copy,) = pod["initContainers"]
    assert f"timeout {COPY_TIMEOUT_S} " in " ".join(copy["args"])
    assert pod["terminationGracePeriodSeconds"] == GRACE_S
    deadline = COPY_TIMEOUT_S + allowance + GRACE_S + 60 * PULL_AND_SCHEDULE_MIN
    assert worker["spec"]["progressDeadlineSeconds"] >= deadline, deadline


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_api_probes_use_the_one_probe_port_setting(target: str) -> None:
    """Moving the probes to a health listener is one value (k8s/base/api-probes.yaml); the port it
    names must be one the container declares."""
    port = yaml.safe_load((ROOT / "k8s/base/api-probes.yaml").read_text())["data"]["port"]
    (container,) = _pod_spec(render(target), "Deployment", "realcustom-api")["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == port
    assert port in {p["name"] for p in container["ports"]}


def test_prods_default_artifact_set_is_its_model_and_worker_image() -> None:
    """Applied by hand (not through make, which sets it from TAG), prod's artifacts set must still
    be the one of its own worker image: a set shared by two images would mix their engines."""
    docs = render(PROD)
    (worker,) = _pod_spec(docs, "Deployment", "realcustom-worker")["containers"]
    tag = worker["image"].rsplit(":", 1)[1]
    assert config(docs, "worker")["ARTIFACT_SET"].endswith(f"-{tag}")
