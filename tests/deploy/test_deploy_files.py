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
from deploy_checks import KUSTOMIZE_TARGETS, ROOT, render, validate

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


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_rendered_manifests_match_kubernetes_schemas(target: str) -> None:
    docs = render(target)
    assert docs
    errors = [error for doc in docs for error in validate(doc)]
    assert not errors, "\n".join(errors)


def _container_env(docs: list[dict]) -> set[str]:
    names = set()
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].startswith("realcustom-config"):
            names |= set(doc["data"])
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                names |= {item["name"] for item in container.get("env", [])}
    return names


def test_every_service_variable_is_a_setting() -> None:
    """A misspelt variable would be silently ignored by pydantic-settings (extra="ignore")."""
    settings = {name.upper() for name in Settings.model_fields}
    names = set()
    for target in KUSTOMIZE_TARGETS:
        names |= _container_env(render(target))
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    for service in compose["services"].values():
        if service.get("image", "").startswith("realcustom"):
            names |= set(service.get("environment", {}))
    assert names - settings - LIBRARY_ENV == set()


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


def _closure(requirements: list[str]) -> set[str]:
    """The requirements with everything they depend on, as installed here."""
    from importlib.metadata import PackageNotFoundError, requires

    seen: set[str] = set()
    todo = [re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0] for line in requirements]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dependencies = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [
            re.split(r"[=<>!~;\[ (]", dep, maxsplit=1)[0] for dep in dependencies if "extra ==" not in dep
        ]
    return seen


def test_api_starts_with_only_what_the_api_image_installs() -> None:
    """The API image can't be built here; this runs the API start-up with just its packages."""
    lines = [
        line.split("#")[0].strip() for line in (ROOT / "docker/requirements-api.txt").read_text().splitlines()
    ]
    # The Dockerfile adds open-clip-torch with --no-deps: its files, not its torch dependency.
    allowed = (_closure([line for line in lines if line]) | {"open-clip-torch"}) - {"torch"}
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
    return [(target, doc) for target in KUSTOMIZE_TARGETS for doc in render(target) if doc["kind"] == kind]


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


def _config(docs: list[dict]) -> dict[str, str]:
    (config,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("realcustom-config")
    ]
    return config["data"]


def test_tensorrt_is_never_configured_without_buckets() -> None:
    """Without BUCKETS the TensorRT backend prepares batch 1 only: batches of 2-4 would run eagerly."""
    configs = [_config(render(target)) for target in KUSTOMIZE_TARGETS]
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    configs += [service.get("environment", {}) for service in compose["services"].values()]
    tensorrt = [config for config in configs if "tensorrt" in str(config.get("BACKEND", ""))]
    assert tensorrt, "no TensorRT configuration found: the prod overlay and compose's gpu profile have one"
    for config in tensorrt:
        assert config.get("BUCKETS"), config


def _pod_spec(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc["spec"]["template"]["spec"]


def _mounts(pod: dict) -> dict[str, tuple[str, bool]]:
    """Mount path -> (claim name, read-only) for the pod's PVC-backed volumes."""
    claims = {
        v["name"]: (
            v["persistentVolumeClaim"]["claimName"],
            v["persistentVolumeClaim"].get("readOnly", False),
        )
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    (container,) = pod["containers"]
    return {
        m["mountPath"]: (claims[m["name"]][0], claims[m["name"]][1] or m.get("readOnly", False))
        for m in container["volumeMounts"]
        if m["name"] in claims
    }


def test_engine_build_job_builds_into_the_workers_cache_from_their_settings() -> None:
    docs = render("k8s/overlays/prod")
    worker = _pod_spec(docs, "Deployment", "realcustom-worker")
    job = _pod_spec(docs, "Job", "realcustom-engine-build")
    (job_container,) = job["containers"]
    (worker_container,) = worker["containers"]
    # The same MODEL and BUCKETS: the ConfigMap the workers read.
    assert job_container["envFrom"] == worker_container["envFrom"]
    # The same shared claims at the same paths; weights read-only for both.
    assert _mounts(job) == _mounts(worker)
    assert _mounts(worker)["/models"][1] and not _mounts(worker)["/artifacts"][1]
    assert job["nodeSelector"] == worker["nodeSelector"] and job["tolerations"] == worker["tolerations"]
    command = " ".join(job_container["args"])
    assert "python -m engines.export" in command
    assert '--model "$MODEL"' in command and '--buckets "$BUCKETS"' in command
    # The worker image links /app/artifacts (the TensorRT backend's default cache) to /artifacts.
    assert "--out /artifacts/engines" in command
    assert "ln -s /artifacts /app/artifacts" in (ROOT / "Dockerfile").read_text()


def test_every_claim_can_be_filled_and_names_its_storage_class() -> None:
    """An empty ReadOnlyMany claim can never be written through; the class is an overlay parameter."""
    docs = render("k8s/overlays/prod")
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    params = yaml.safe_load((ROOT / "k8s/overlays/prod/params.yaml").read_text())["data"]
    assert {c["metadata"]["name"]: c["spec"]["storageClassName"] for c in claims} == {
        "realcustom-models": params["modelsStorageClass"],
        "realcustom-artifacts": params["artifactsStorageClass"],
    }
    for claim in claims:
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], claim["metadata"]["name"]
    # Something writes the weights: the fetch Job mounts the models claim writable.
    fetch = _pod_spec(docs, "Job", "realcustom-fetch-weights")
    assert _mounts(fetch)["/models"] == ("realcustom-models", False)
    assert not any(
        d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "realcustom-params" for d in docs
    )


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_monitors_carry_the_label_kube_prometheus_stack_selects(target: str) -> None:
    monitors = [d for d in render(target) if d["kind"] in {"ServiceMonitor", "PodMonitor"}]
    assert len(monitors) == 2
    expected = "kube-prometheus-stack"
    if target.endswith("prod"):
        expected = yaml.safe_load((ROOT / "k8s/overlays/prod/params.yaml").read_text())["data"][
            "prometheusRelease"
        ]
    assert {m["metadata"]["labels"].get("release") for m in monitors} == {expected}


# Start-up estimates per step, minutes (docs/DEPLOYMENT.md, "Start-up budget": estimates, not
# measurements): weights onto the GPU; per bucket, the worker's ONNX export, hashing its graphs to
# find their engines, engine load + CUDA graph capture; per engine (two per bucket), a TensorRT
# build when no Job built it.
LOAD_MIN, EXPORT_MIN, HASH_MIN, CAPTURE_MIN, BUILD_MIN = 5, 5, 4, 2, 15


def test_prod_worker_start_up_allowance_covers_its_buckets() -> None:
    """A worker that must build its own engines (a GPU kind no Job covered) must not be killed
    mid-build by its startup probe: an interrupted build is lost and would restart forever."""
    docs = render("k8s/overlays/prod")
    buckets = _config(docs)["BUCKETS"].split(",")
    worst_min = LOAD_MIN + len(buckets) * (EXPORT_MIN + HASH_MIN + CAPTURE_MIN + 2 * BUILD_MIN)
    (worker,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "realcustom-worker"
    ]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert _startup_allowance_s(container) >= worst_min * 60, (len(buckets), worst_min)
