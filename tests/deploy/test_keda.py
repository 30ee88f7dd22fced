"""The workers' ScaledObject against the rules of every KEDA version we support (keda_rules.py),
and the signal it scales on, read from a real Redis holding the real queue's jobs."""

from __future__ import annotations

import asyncio
import copy
import math
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from deploy_checks import KUSTOMIZE_TARGETS, render
from keda_rules import KEDA_VERSIONS, MINIMUM_KEDA, desired_replicas, scaled_object_errors

from service.queue import create_queue
from service.queue.protocol import JobSpec, SubjectSpec
from service.settings import Settings

# Per worker: a running batch plus the prefetched one (service/worker/loop.py).
HELD_PER_WORKER = 2 * Settings.model_fields["max_batch"].default


def scaled_object(target: str) -> dict:
    (scaled,) = [doc for doc in render(target) if doc["kind"] == "ScaledObject"]
    return scaled


@pytest.mark.parametrize("version", KEDA_VERSIONS, ids=lambda v: f"keda-{v[0]}.{v[1]}")
@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_every_supported_keda_accepts_the_scaled_object(target: str, version: tuple[int, int]) -> None:
    assert scaled_object_errors(scaled_object(target), version) == []


def test_the_minimum_keda_version_is_stated_where_operators_read_it() -> None:
    minimum = f"{MINIMUM_KEDA[0]}.{MINIMUM_KEDA[1]}"
    from deploy_checks import ROOT

    assert f"KEDA {minimum}+" in (ROOT / "k8s/base/worker.yaml").read_text()
    assert f"KEDA {minimum}+" in (ROOT / "k8s/overlays/prod/kustomization.yaml").read_text()
    assert f"KEDA {minimum}+" in (ROOT / "docs/DEPLOYMENT.md").read_text()


def _with(scaled: dict, trigger: int, **metadata: str | None) -> dict:
    changed = copy.deepcopy(scaled)
    for key, value in metadata.items():
        if value is None:
            changed["spec"]["triggers"][trigger]["metadata"].pop(key, None)
        else:
            changed["spec"]["triggers"][trigger]["metadata"][key] = value
    return changed


def test_the_rules_refuse_what_each_keda_version_refuses() -> None:
    """The findings of issue 14, one per version: the rules are not vacuous."""
    scaled = scaled_object("k8s/overlays/prod")
    lag = next(i for i, t in enumerate(scaled["spec"]["triggers"]) if "lagCount" in t["metadata"])
    zero = _with(scaled, lag, activationLagCount="0")
    assert scaled_object_errors(zero, (2, 16)) and not scaled_object_errors(zero, (2, 17))
    assert not scaled_object_errors(zero, (2, 15))
    absent = _with(scaled, lag, activationLagCount=None)
    assert scaled_object_errors(absent, (2, 15)) and scaled_object_errors(absent, (2, 16))
    assert not scaled_object_errors(absent, (2, 20))
    # A streamLength beside a consumerGroup is ignored: KEDA would read XPENDING with target 5.
    assert scaled_object_errors(_with(scaled, lag, streamLength="8"), (2, 20))
    # fallback: every trigger needs metricType AverageValue before 2.17, one of them after.
    untyped = copy.deepcopy(scaled)
    del untyped["spec"]["triggers"][lag]["metricType"]
    assert scaled_object_errors(untyped, (2, 15)) and not scaled_object_errors(untyped, (2, 17))
    behaviour = copy.deepcopy(scaled)
    behaviour["spec"]["fallback"]["behavior"] = "currentReplicasIfHigher"
    assert scaled_object_errors(behaviour, (2, 16)) and not scaled_object_errors(behaviour, (2, 17))


def test_prod_runs_two_workers_and_falls_back_to_at_least_that() -> None:
    """One worker would make every drain or restart a full outage of the GPU side."""
    spec = scaled_object("k8s/overlays/prod")["spec"]
    assert spec["minReplicaCount"] >= 2
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]


# --- the signal, on a real Redis --------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (apt install redis)"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _spec() -> JobSpec:
    now = time.time()
    subject = {"image": bytes(12), "width": 2, "height": 2, "target": "cat", "token_indices": [2]}
    return JobSpec(
        id=uuid.uuid4().hex,
        prompt="a cat in the snow",
        subjects=[SubjectSpec.model_validate(subject)],
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=3.0,
        mask_scope=0.25,
        mask_reused_step=1,
        seed=7,
        num_images=1,
        output_format="png",
        return_masks=False,
        enqueued_at=now,
        deadline=now + 600,
    )


def _keda_reads(client: redis.Redis, stream: str, group: str) -> dict[str, int | None]:
    """What KEDA's three modes read: XINFO GROUPS lag (None = Redis' NULL, which go-redis reads as
    0), XPENDING's count, XLEN."""
    (info,) = [g for g in client.xinfo_groups(stream) if g["name"].decode() == group]
    return {
        "lag": info["lag"],
        "pending": client.xpending(stream, group)["pending"],
        "length": client.xlen(stream),
    }


def test_scaling_signal_counts_prefetched_and_cancelled_around_jobs(redis_url: str) -> None:
    """Two workers each hold a running and a prefetched batch, 6 jobs wait, one waiting job is
    cancelled: the queue keeps the group's lag at the 5 jobs waiting (its take and cancel scripts
    set the group's read counter), and lag alone would let KEDA scale the busy workers down; the
    ScaledObject still asks for every unfinished job's worker."""
    scaled = scaled_object("k8s/overlays/prod")
    triggers = scaled["spec"]["triggers"]
    group = next(t["metadata"]["consumerGroup"] for t in triggers if "consumerGroup" in t["metadata"])
    prefix = f"keda-{uuid.uuid4().hex[:8]}"
    config = Settings(redis_url=redis_url, queue_name=prefix, queue_max_depth=1000)

    async def scenario() -> int:
        queue = create_queue(config)
        try:
            records = [await queue.submit(_spec()) for _ in range(2 * HELD_PER_WORKER + 6)]
            for worker in ("w1", "w2"):
                taken = await queue.take(worker, HELD_PER_WORKER, block_s=0.0)
                assert len(taken) == HELD_PER_WORKER
            await queue.cancel(records[-1].id)
            return len(records) - 1
        finally:
            await queue.close()

    unfinished = asyncio.run(scenario())
    client = redis.Redis.from_url(redis_url)
    # The job stream is the one with the workers' consumer group (the dead-letter stream has none).
    streams = [key.decode() for key in client.scan_iter(_type="stream") if prefix in key.decode()]
    (stream,) = [key for key in streams if client.xinfo_groups(key)]
    # The ScaledObject watches the key the queue writes (with the deployment's prefix).
    deployed = stream.replace(prefix, Settings.model_fields["queue_name"].default)
    assert {t["metadata"]["stream"] for t in triggers} == {deployed}
    reads = _keda_reads(client, stream, group)
    assert reads["lag"] == 5, "the queue no longer keeps the lag exact; update keda_rules' notes"
    assert reads["pending"] == 2 * HELD_PER_WORKER
    assert reads["length"] == unfinished == reads["pending"] + 5
    wanted = desired_replicas(scaled, lag=reads["lag"], pending=reads["pending"], length=reads["length"])
    assert wanted >= math.ceil(unfinished / HELD_PER_WORKER) >= 3
    lag_only = copy.deepcopy(scaled)
    lag_only["spec"]["triggers"] = [t for t in triggers if "lagCount" in t["metadata"]]
    lag_wants = desired_replicas(lag_only, lag=reads["lag"], pending=reads["pending"], length=reads["length"])
    assert lag_wants == 2
