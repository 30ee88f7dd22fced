"""What KEDA does with our ScaledObject, per KEDA version, from its source (kedacore/keda).

A schema cannot say "this key is ignored when that one is set" or "2.16 refuses 0": KEDA parses
trigger metadata in Go and, when it refuses a trigger, creates no HPA at all (workers stay at
their current count). The rules below are read from these files at the tags v2.10.0, v2.11.0,
v2.15.0, v2.16.0, v2.17.0 and v2.20.0 (ranges assume the releases between behave as both ends):

- pkg/scalers/redis_streams_scaler.go
  - v2.11.0 .. v2.15.x (`parseRedisStreamsMetadata`): with `consumerGroup`, `lagCount` selects
    the lag and then `activationLagCount` must be present ("activationLagCount required for
    Redis lag"); without `lagCount` it is XPENDING with `pendingEntriesCount` (default 5).
    Without `consumerGroup` it is XLEN with `streamLength` (default 5). A key of another mode is
    silently ignored.
  - v2.16.x (`redisStreamsMetadata.Validate`, typed config): the same modes, but lag refuses
    `activationLagCount` == 0, absent included (fixed in v2.17.0 by kedacore/keda#6481).
  - v2.17.0 .. v2.20.x: `activationLagCount` optional, default 0.
  - every version: lag = XINFO GROUPS `lag`, which Redis reports as NULL after an entry the group
    has not read yet was deleted (a cancelled queued job); go-redis reads NULL as 0.
- apis/keda/v1alpha1/scaledobject_types.go, `CheckFallbackValid` (run by the admission webhook):
  - v2.15.x, v2.16.x: with `fallback`, EVERY trigger must say `metricType: AverageValue` (the
    field is compared as written: absent is refused).
  - v2.17.0+: at least one non-cpu/memory trigger must say it; `fallback.behavior` exists from
    v2.17.0 (a CRD enum: static, currentReplicas, currentReplicasIfHigher, currentReplicasIfLower).
- apis/keda/v1alpha1/scaletriggers_types.go, `ValidateTriggers`: trigger names unique.
- docs (keda-docs content/docs/2.20/operate/cluster.md): KEDA 2.15 is the first release tested
  with Kubernetes 1.30, the oldest Kubernetes these manifests support; hence the minimum.
"""

from __future__ import annotations

import math
from typing import Any

MINIMUM_KEDA = (2, 15)
# The minimum, the one release with its own rule (2.16), the release that relaxed it, the newest read.
KEDA_VERSIONS = ((2, 15), (2, 16), (2, 17), (2, 20))
FALLBACK_BEHAVIORS = ("static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower")
MODE_KEYS = {"lag": "lagCount", "pending": "pendingEntriesCount", "length": "streamLength"}
DEFAULT_TARGET = 5  # pendingEntriesCount and streamLength when absent


def label(version: tuple[int, int]) -> str:
    return f"KEDA {version[0]}.{version[1]}"


def trigger_mode(metadata: dict[str, str]) -> str:
    """The quantity KEDA measures for a redis-streams trigger (the same choice in 2.11..2.20)."""
    if "consumerGroup" not in metadata:
        return "length"
    return "lag" if "lagCount" in metadata else "pending"


def _count(metadata: dict[str, str], key: str) -> int | None:
    try:
        return int(metadata[key])
    except (KeyError, ValueError):
        return None


def trigger_errors(trigger: dict[str, Any], version: tuple[int, int]) -> list[str]:
    """Why `version` refuses (or silently misreads) one redis-streams trigger."""
    name = trigger.get("name", trigger.get("type"))
    metadata = trigger.get("metadata", {})
    where = f"{label(version)}: trigger {name}"
    if not metadata.get("stream"):
        return [f"{where}: `stream` is required"]
    mode = trigger_mode(metadata)
    errors = []
    # A key of another mode is ignored without a word: the trigger would not measure what it says.
    for other, key in MODE_KEYS.items():
        if other != mode and key in metadata:
            errors.append(f"{where}: `{key}` is ignored when KEDA measures the {mode} (see consumerGroup)")
    target_key = MODE_KEYS[mode]
    if target_key in metadata and (_count(metadata, target_key) or 0) <= 0:
        errors.append(f"{where}: `{target_key}` must be a positive integer, got {metadata[target_key]!r}")
    if mode == "lag":
        activation = metadata.get("activationLagCount")
        if activation is not None and _count(metadata, "activationLagCount") is None:
            errors.append(f"{where}: `activationLagCount` must be an integer, got {activation!r}")
        elif version <= (2, 15) and activation is None:
            errors.append(f"{where}: `lagCount` requires `activationLagCount`")
        elif version == (2, 16) and _count(metadata, "activationLagCount") in (None, 0):
            errors.append(f"{where}: 2.16 refuses `activationLagCount` 0 or absent with `lagCount`")
    return errors


def scaled_object_errors(scaled: dict[str, Any], version: tuple[int, int]) -> list[str]:
    """Every reason `version` would refuse this ScaledObject or scale on something else than meant."""
    spec = scaled["spec"]
    triggers = spec["triggers"]
    errors = [error for trigger in triggers for error in trigger_errors(trigger, version)]
    names = [trigger["name"] for trigger in triggers if trigger.get("name")]
    if len(names) != len(set(names)):
        errors.append(f"{label(version)}: trigger names must be unique, got {names}")
    fallback = spec.get("fallback")
    if fallback is not None:
        average = [trigger.get("metricType") == "AverageValue" for trigger in triggers]
        if version < (2, 17) and not all(average):
            errors.append(f"{label(version)}: with `fallback` every trigger needs metricType AverageValue")
        if version >= (2, 17) and not any(average):
            errors.append(f"{label(version)}: with `fallback` one trigger needs metricType AverageValue")
        if "behavior" in fallback and version < (2, 17):
            errors.append(f"{label(version)}: `fallback.behavior` does not exist before 2.17")
        if fallback.get("behavior", "static") not in FALLBACK_BEHAVIORS:
            errors.append(f"{label(version)}: unknown fallback.behavior {fallback['behavior']!r}")
        if fallback.get("failureThreshold", 0) < 1 or fallback.get("replicas", 0) < 1:
            errors.append(f"{label(version)}: fallback needs failureThreshold >= 1 and replicas >= 1")
    return errors


def desired_replicas(scaled: dict[str, Any], lag: int, pending: int, length: int) -> int:
    """The HPA's answer to KEDA's metrics: each AverageValue trigger asks for ceil(value / target),
    the HPA takes the largest, bounded by the replica counts (activation only matters at 0)."""
    values = {"lag": lag, "pending": pending, "length": length}
    spec = scaled["spec"]
    wanted = 0
    for trigger in spec["triggers"]:
        metadata = trigger["metadata"]
        mode = trigger_mode(metadata)
        target = _count(metadata, MODE_KEYS[mode]) or DEFAULT_TARGET
        wanted = max(wanted, math.ceil(values[mode] / target))
    return min(max(wanted, spec.get("minReplicaCount", 0)), spec.get("maxReplicaCount", 100))
