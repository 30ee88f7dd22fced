"""Fixtures of the service tests: a private Redis, fixture photos, request bodies."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_topologies import ClusterSetup, SentinelSetup
from service_processes import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session (tests isolate themselves with key prefixes)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """A primary, a replica and three sentinels for the session (`.url` is redis+sentinel://)."""
    setup = SentinelSetup(tmp_path_factory.mktemp("sentinel"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    """A three-master Redis Cluster for the session (`.url` is redis+cluster://)."""
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture(scope="session")
def cat_b64(dreambench_dir: Path) -> str:
    return base64.b64encode((dreambench_dir / "cat.jpg").read_bytes()).decode()


@pytest.fixture(scope="session")
def photos_b64(dreambench_dir: Path) -> dict[str, str]:
    """Target word -> base64 photo, for every DreamBench fixture."""
    words = {"backpack": "backpack", "berry_bowl": "bowl", "can": "can", "cat": "cat"}
    return {
        word: base64.b64encode((dreambench_dir / f"{name}.jpg").read_bytes()).decode()
        for name, word in words.items()
    }
