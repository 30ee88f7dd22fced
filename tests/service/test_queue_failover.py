"""Failover under the queue: the primary is SIGKILLed with jobs queued and running. On Sentinel the
clients follow the sentinels to the promoted replica; no accepted job is lost (acceptance waits for
the replica's acknowledgement, REDIS_ACK_REPLICAS=1) and none is run by two workers at once (the
fencing token). The Sentinel setup is the one the Redis HA overlay ships (k8s/overlays/prod-ha,
rendered: its redis.conf, its sentinels' quorum and timings, its password, its REDIS_ACK_REPLICAS).
On Cluster (a replica per master) the client follows the slot to the promoted
replica. Plus the URL errors of the HA schemes and the capacity check on a Cluster. No model
needed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError
from redis_topologies import ClusterSetup, SentinelSetup
from test_queue_contract import done_record, make_spec

from service.queue import create_queue
from service.queue.capacity import RedisCapacityError, check_redis_capacity
from service.queue.connect import RedisUrlError, parse_multi_host
from service.queue.keys import QueueKeys
from service.queue.protocol import JobQueue, JobState, QueueUnavailableError
from service.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    """The shipped Sentinel setup, of its own: the test kills its primary."""
    setup = SentinelSetup.shipped(tmp_path)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


async def retrying(call, timeout_s: float = 30):
    """What a service does during a failover: retry the call while the queue is unavailable."""
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except QueueUnavailableError:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.1)


async def serve_through_a_failover(config: Settings, fail_over) -> None:
    """8 jobs accepted, 2 of them running on w1; `fail_over()` (blocking) kills the primary; 2 more
    accepted; w1 finishes its 2, w2 serves the rest. Every accepted job must end done, w1's by w1
    (never delivered to w2 after it ran)."""
    api, first, second = create_queue(config), create_queue(config), create_queue(config)
    queues: list[JobQueue] = [api, first, second]
    try:
        accepted = [(await api.submit(make_spec(seed=seed))).id for seed in range(8)]
        running = await first.take("w1", 2, block_s=1.0)
        assert len(running) == 2 and all([await first.start("w1", job) for job in running])

        await asyncio.to_thread(fail_over)
        # Accepted during and after the failover (retried while it is unavailable).
        accepted += [(await retrying(lambda: api.submit(make_spec(seed=99)))).id for _ in range(2)]

        # The first worker finishes its running jobs on the new primary.
        for job in running:
            await retrying(lambda job=job: first.finish(job, done_record(job.spec, "w1")))
        # The second serves everything else; its start must refuse nothing that w1 ran.
        served = {job.spec.id for job in running}
        deadline = time.monotonic() + 30
        while len(served) < len(accepted) and time.monotonic() < deadline:
            for job in await retrying(lambda: second.take("w2", 4, block_s=0.2)):
                assert job.spec.id not in served, "a job was delivered again after it ran"
                if await retrying(lambda job=job: second.start("w2", job)):
                    await retrying(lambda job=job: second.finish(job, done_record(job.spec, "w2")))
                    served.add(job.spec.id)
        records = [await retrying(lambda job_id=job_id: api.get(job_id)) for job_id in accepted]
        assert [record and record.state for record in records] == [JobState.DONE] * len(accepted)
        by_id = {record.id: record for record in records}
        assert all(by_id[job.spec.id].worker == "w1" for job in running)
        assert await api.depth() == 0
    finally:
        for queue in queues:
            await queue.close()


def test_killing_the_primary_loses_no_accepted_job_and_runs_none_twice(sentinel: SentinelSetup) -> None:
    shipped = sentinel.config
    assert (shipped.data_nodes, shipped.sentinels, shipped.quorum) == (2, 3, 2)
    assert shipped.data_conf and shipped.ack_replicas == 1
    config = Settings(
        redis_url=sentinel.url,
        redis_password=sentinel.password,
        redis_sentinel_password=sentinel.password,
        queue_name=f"failover-{uuid.uuid4().hex[:8]}",
        heartbeat_s=0.2,
        reclaim_idle_s=1.0,
        redis_ack_replicas=shipped.ack_replicas,
        redis_ack_timeout_ms=1000,
    )
    # The capacity check the services run at start-up passes against the shipped data nodes.
    _level, line = check_redis_capacity(config, config.redis_url)
    assert "maxmemory" in line

    def fail_over() -> None:
        assert sentinel.kill_primary() == sentinel.replica_port

    asyncio.run(serve_through_a_failover(config, fail_over))


def test_a_cluster_master_failing_over_to_its_replica_loses_no_replicated_job(tmp_path: Path) -> None:
    """Cluster has no acknowledged acceptance here (REDIS_ACK_REPLICAS is refused with it), so the
    test waits for replication itself before the kill: what is on the replica survives."""
    cluster = ClusterSetup(tmp_path, replicas=1)
    try:
        cluster.start()
        config = Settings(
            redis_url=cluster.url,
            queue_name=f"failover-{uuid.uuid4().hex[:8]}",
            heartbeat_s=0.2,
            reclaim_idle_s=1.0,
        )
        stream = QueueKeys(config.queue_name).stream

        def fail_over() -> None:
            master = cluster.port_of(stream)
            cluster.wait_replicated(master)
            assert cluster.kill_master_of(stream) != master

        asyncio.run(serve_through_a_failover(config, fail_over))
    finally:
        cluster.stop()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://127.0.0.1:26379", "names the primary's service"),
        ("redis+sentinel://127.0.0.1/queue", "is not host:port"),
        ("redis+cluster://127.0.0.1:7000/0", "has no path"),
        ("redis+sentinel://127.0.0.1:26379/queue?ssl_cert_reqs=none", "takes no query options"),
    ],
)
def test_ha_urls_that_cannot_work_say_what_to_change(url: str, message: str) -> None:
    with pytest.raises(RedisUrlError, match=message):
        parse_multi_host(url)


def test_a_redis_url_that_cannot_work_stops_the_settings_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="the scheme must be one of redis://"):
        Settings(redis_url="redis+sentinal://127.0.0.1:26379/queue")
    with pytest.raises(ValidationError, match="names the primary's service"):
        Settings(redis_url="redis+sentinel://127.0.0.1:26379")
    assert Settings(redis_url="unix:///run/redis.sock").redis_url == "unix:///run/redis.sock"


def test_ha_urls_parse_hosts_service_and_password() -> None:
    sentinel = parse_multi_host("rediss+sentinel://:s%40cret@10.0.0.1:26379,[::1]:26380/queue/2")
    assert sentinel.hosts == [("10.0.0.1", 26379), ("::1", 26380)]
    assert (sentinel.service, sentinel.db, sentinel.password, sentinel.ssl) == ("queue", 2, "s@cret", True)
    cluster = parse_multi_host("redis+cluster://a:7000,b:7001")
    assert cluster.hosts == [("a", 7000), ("b", 7001)] and cluster.password is None and not cluster.ssl


def test_capacity_check_reads_the_node_of_the_queue_s_slot_on_a_cluster(redis_cluster) -> None:
    """Each Cluster node has its own maxmemory: the start-up check reads the one holding the queue."""
    config = Settings(redis_url=redis_cluster.url, queue_name=f"cap-{uuid.uuid4().hex[:8]}")
    port = redis_cluster.port_of(QueueKeys(config.queue_name).stream)
    node = redis.Redis(port=port)
    try:
        node.config_set("maxmemory", 64 * 2**20)
        with pytest.raises(RedisCapacityError, match=r"maxmemory 67108864 \(64 MiB\)"):
            check_redis_capacity(config, config.redis_url)
    finally:
        node.config_set("maxmemory", 0)
        node.close()


def test_sentinels_and_data_nodes_that_require_a_password(tmp_path: Path) -> None:
    """REDIS_PASSWORD authenticates to the data nodes, REDIS_SENTINEL_PASSWORD to the sentinels;
    without the latter the queue is unavailable (it cannot learn where the primary is)."""
    setup = SentinelSetup(tmp_path, password="s3cret")
    try:
        setup.start()
        config = Settings(
            redis_url=setup.url,
            redis_password="s3cret",
            redis_sentinel_password="s3cret",
            queue_name=f"auth-{uuid.uuid4().hex[:8]}",
        )
        _level, line = check_redis_capacity(config, config.redis_url)
        assert "no maxmemory" in line  # read from the primary, through the sentinels

        async def scenario(settings: Settings) -> JobState:
            queue = create_queue(settings)
            try:
                spec = make_spec()
                await queue.submit(spec)
                [taken] = await queue.take("w1", 1, block_s=1.0)
                assert await queue.start("w1", taken)
                await queue.finish(taken, done_record(spec))
                return (await queue.get(spec.id)).state
            finally:
                await queue.close()

        assert asyncio.run(scenario(config)) == JobState.DONE
        without = config.model_copy(update={"redis_sentinel_password": None})
        with pytest.raises(QueueUnavailableError, match="no sentinel of REDIS_URL answered with a primary"):
            asyncio.run(scenario(without))
    finally:
        setup.stop()
