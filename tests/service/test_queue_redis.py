"""The Redis queue against real redis-servers: images as bytes, dead letters, the byte budget,
Redis at maxmemory, job ownership, a restart without persistence, the start-up capacity check.
No model needed."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY
from service_processes import RedisServer
from test_queue_contract import done_record, make_spec, result_of, spec_with_image

from service.queue import create_queue, redis_streams
from service.queue.capacity import REDIS_OVERHEAD, RedisCapacityError, check_redis_capacity
from service.queue.keys import QueueKeys
from service.queue.protocol import JobResult, JobState, QueueFullError, QueueUnavailableError
from service.queue.redis_streams import RedisStreamsQueue
from service.settings import Settings


def run(coroutine):
    return asyncio.run(coroutine)


def settings(url: str, **overrides) -> Settings:
    values = {"heartbeat_s": 0.2, "reclaim_idle_s": 0.4, "queue_name": f"rq-{uuid.uuid4().hex[:8]}"}
    return Settings(redis_url=url, **(values | overrides))


def make_queue(config: Settings) -> RedisStreamsQueue:
    queue = create_queue(config)
    assert isinstance(queue, RedisStreamsQueue)
    return queue


def fill_until_out_of_memory(client: redis.Redis) -> None:
    """Someone else's data takes Redis past its maxmemory."""
    for index in range(32):
        client.set(f"filler:{index}", os.urandom(64 * 1024))
    used = client.info("memory")["used_memory"]
    client.config_set("maxmemory", used - 512 * 1024)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("filler:more", b"x")


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A private redis-server; `@pytest.mark.parametrize("own_redis", [(args...)], indirect=True)`
    passes its extra arguments."""
    server = RedisServer(tmp_path, extra_args=getattr(request, "param", ()))
    server.start()
    yield server
    server.stop()


def test_images_travel_and_are_stored_as_raw_bytes(redis_server) -> None:
    async def scenario() -> None:
        config = settings(redis_server.url)
        queue, client = make_queue(config), redis.Redis.from_url(redis_server.url)
        spec = spec_with_image(100_000)
        image = spec.subjects[0].image
        await queue.submit(spec)
        [(_message_id, fields)] = client.xrange(QueueKeys(config.queue_name).stream)
        assert fields[b"blob:0"] == image and base64.b64encode(image[:300])[:200] not in fields[b"spec"]
        assert int(fields[b"size"]) == len(fields[b"spec"]) + len(image) == await queue.held_bytes()
        assert len(b"".join(fields.values())) < 1.01 * len(image) + 1000  # no base64 third on top

        [taken] = await queue.take("w1", 1, block_s=1.0)
        assert taken.spec == spec and await queue.start("w1", taken)
        picture = os.urandom(50_000)
        await queue.finish(taken, result_of(spec, picture))
        stored = client.hgetall(QueueKeys(config.queue_name).job(spec.id))
        assert stored[b"rblob:0"] == picture and b"$blob" in stored[b"result"]
        assert await queue.held_bytes() == len(stored[b"result"]) + len(picture)  # payload freed
        assert (await queue.get(spec.id)).result.images == [picture]
        client.close()
        await queue.close()

    run(scenario())


def test_unreadable_messages_are_dead_lettered_once_and_their_jobs_failed(
    redis_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_streams, "DEAD_LETTER_MAX", 2)

    async def scenario() -> None:
        config = settings(redis_server.url)
        queue, client = make_queue(config), redis.Redis.from_url(redis_server.url)
        prefix = config.queue_name
        good = make_spec()
        await queue.submit(good)
        # A message of an older version (spec JSON with base64 images, no format field), with the
        # record that version's API wrote: what a rolling upgrade leaves in the stream.
        old = make_spec()
        old_message = client.xadd(
            QueueKeys(prefix).stream,
            {"id": old.id, "deadline": repr(old.deadline), "spec": old.model_dump_json()},
        )
        meta = {
            "seed": old.seed,
            "output_format": "png",
            "enqueued_at": old.enqueued_at,
            "deadline": old.deadline,
        }
        client.hset(
            QueueKeys(prefix).job(old.id),
            mapping={"state": "queued", "meta": json.dumps(meta), "msg": old_message},
        )
        for junk in ({"junk": b"\xff\x00"}, {"v": "2", "spec": b"{not json", "blobs": "0"}):
            client.xadd(QueueKeys(prefix).stream, junk)
        counted = REGISTRY.get_sample_value("realcustom_queue_dead_letters_total") or 0.0

        taken = await queue.take("w1", 8, block_s=1.0)
        assert [job.spec.id for job in taken] == [good.id]
        assert REGISTRY.get_sample_value("realcustom_queue_dead_letters_total") == counted + 3
        dead = client.xrange(QueueKeys(prefix).dead)
        assert len(dead) == 2  # bounded: the oldest of the three was dropped
        assert b"JSON" in dead[-1][1][b"reason"] or b"json" in dead[-1][1][b"reason"]
        failed = await queue.get(old.id)
        assert failed.state == JobState.FAILED and "message format" in failed.error
        # Acknowledged and deleted: only the good job is left, and nothing comes back.
        assert client.xlen(QueueKeys(prefix).stream) == 1
        assert client.xpending(QueueKeys(prefix).stream, "workers")["pending"] == 1
        assert await queue.start("w1", taken[0])
        await queue.finish(taken[0], done_record(good))
        await asyncio.sleep(0.5)  # past the reclaim idle time
        assert await queue.take("w2", 8, block_s=0.2) == []
        client.close()
        await queue.close()

    run(scenario())


@pytest.mark.parametrize("own_redis", [("--maxmemory", "8mb")], indirect=True)
def test_redis_at_maxmemory_refuses_submissions_with_429_and_recovers_once_freed(own_redis) -> None:
    async def scenario() -> None:
        config = settings(own_redis.url, queue_max_bytes=64 * 2**20)
        queue, client = make_queue(config), redis.Redis.from_url(own_redis.url)
        running, waiting = make_spec(), make_spec()
        await queue.submit(running)
        await queue.submit(waiting)
        [taken] = await queue.take("w1", 1, block_s=1.0)
        assert await queue.start("w1", taken)
        fill_until_out_of_memory(client)
        with pytest.raises(QueueFullError, match="memory limit"):
            await queue.submit(make_spec())

        # Workers keep working: presence, a new worker joining, finishing (which frees memory).
        await queue.heartbeat("w1", ready=True, in_flight=[taken])
        assert await queue.ready_workers() == 1
        newcomer = make_queue(config)
        [other] = await newcomer.take("w2", 1, block_s=1.0)
        assert other.spec.id == waiting.id and await newcomer.start("w2", other)
        await queue.finish(taken, done_record(running))
        await newcomer.finish(other, done_record(waiting, "w2"))
        assert (await queue.get(running.id)).state == JobState.DONE

        client.delete(*client.keys("filler:*"))  # freed
        await queue.submit(make_spec())  # recovered, nobody intervened in the queue
        assert await queue.depth() == 1
        client.close()
        await queue.close()
        await newcomer.close()

    run(scenario())


def test_a_worker_that_lost_its_job_cannot_take_it_back_or_overwrite_the_result(
    redis_server, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        config = settings(redis_server.url, reclaim_idle_s=0.3)
        slow, rescuer = make_queue(config), make_queue(config)  # two worker processes
        spec = make_spec()
        await slow.submit(spec)
        [mine] = await slow.take("slow", 1, block_s=1.0)
        assert await slow.start("slow", mine)
        await asyncio.sleep(0.5)  # slow's heartbeats fail for longer than the reclaim time
        [theirs] = await rescuer.take("rescuer", 1, block_s=1.0)
        assert theirs.spec.id == spec.id and await rescuer.start("rescuer", theirs)
        await slow.heartbeat("slow", ready=True, in_flight=[mine])  # Redis answers again
        await slow.heartbeat("slow", ready=True, in_flight=[mine])  # reported once, then left alone
        assert caplog.text.count(f"delivery {mine.token} was taken over") == 1
        assert not await slow.start("slow", mine)  # ownership stays with the rescuer
        await slow.finish(mine, done_record(spec, worker="slow"))
        record = await slow.get(spec.id)
        assert record.state == JobState.RUNNING and record.worker == "rescuer"
        await rescuer.finish(theirs, done_record(spec, worker="rescuer"))
        record = await slow.get(spec.id)
        assert record.state == JobState.DONE and record.worker == "rescuer"
        assert await slow.depth() == 0
        await slow.close()
        await rescuer.close()

    run(scenario())


@pytest.mark.parametrize("own_redis", [("--appendonly", "no")], indirect=True)
def test_the_consumer_group_is_recreated_after_a_restart_without_persistence(own_redis) -> None:
    async def retry(call):
        for _ in range(5):
            try:
                return await call()
            except QueueUnavailableError:
                await asyncio.sleep(0.2)
        return await call()

    async def scenario() -> None:
        queue = make_queue(settings(own_redis.url))
        before = make_spec()
        await queue.submit(before)
        assert len(await queue.take("w1", 1, block_s=1.0)) == 1
        own_redis.kill()
        own_redis.start()  # empty: no AOF, no RDB
        after = make_spec()
        await retry(lambda: queue.submit(after))
        taken = await retry(lambda: queue.take("w1", 4, block_s=1.0))
        assert [job.spec.id for job in taken] == [after.id]
        assert await queue.get(before.id) is None  # lost with Redis' memory, as documented
        await queue.close()

    run(scenario())


@pytest.mark.parametrize("own_redis", [("--maxmemory", "64mb")], indirect=True)
def test_start_up_check_compares_the_byte_budget_with_redis_maxmemory(own_redis) -> None:
    with pytest.raises(RedisCapacityError, match=r"QUEUE_MAX_BYTES=67108864 needs Redis maxmemory"):
        check_redis_capacity(settings(own_redis.url, queue_max_bytes=64 * 2**20), own_redis.url)
    fitting = settings(own_redis.url, queue_max_bytes=16 * 2**20, max_body_bytes=8 * 2**20)
    level, line = check_redis_capacity(fitting, own_redis.url)
    assert level == logging.INFO and "fits" in line
    with pytest.raises(RedisCapacityError, match="MAX_BODY_BYTES"):
        check_redis_capacity(settings(own_redis.url, queue_max_bytes=2**20), own_redis.url)
    client = redis.Redis.from_url(own_redis.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(RedisCapacityError, match="noeviction"):
        check_redis_capacity(fitting, own_redis.url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "0")
    level, line = check_redis_capacity(settings(own_redis.url), own_redis.url)
    assert level == logging.WARNING and "no maxmemory" in line
    client.close()


def test_redis_memory_per_byte_held_stays_within_the_sizing_factor(own_redis) -> None:
    """What capacity.REDIS_OVERHEAD claims, measured: Redis' used memory per byte of job data the
    budget counts, for payloads and results of several sizes."""

    async def scenario() -> float:
        queue, client = make_queue(settings(own_redis.url)), redis.Redis.from_url(own_redis.url)
        await queue.ping()
        baseline = client.info("memory")["used_memory"]
        specs = [spec_with_image(size) for size in (20_000, 150_000, 700_000, 2_500_000) for _ in range(4)]
        for spec in specs:
            await queue.submit(spec)
        taken = await queue.take("w1", 8, block_s=1.0)
        for job in taken:
            await queue.finish(job, result_of(job.spec, os.urandom(len(job.spec.subjects[0].image) // 2)))
        ratio = (client.info("memory")["used_memory"] - baseline) / await queue.held_bytes()
        client.close()
        await queue.close()
        return ratio

    ratio = run(scenario())
    print(f"Redis used memory per byte held: {ratio:.3f}")
    assert 0.9 < ratio <= REDIS_OVERHEAD, ratio


def test_results_decode_with_every_field(redis_server) -> None:
    """A result round-trips through the split JSON + blobs with masks and timings intact."""

    async def scenario() -> None:
        queue = make_queue(settings(redis_server.url))
        spec = make_spec()
        await queue.submit(spec)
        [taken] = await queue.take("w1", 1, block_s=1.0)
        result = JobResult(
            images=[b"a", b"bb"],
            masks=[b"m"],
            queue_wait_seconds=0.25,
            inference_seconds=1.5,
            finished_at=1.0e9,
            worker="w1",
        )
        await queue.finish(taken, done_record(spec).model_copy(update={"result": result}))
        assert (await queue.get(spec.id)).result == result
        await queue.close()

    run(scenario())


@pytest.mark.parametrize("own_redis", [("--requirepass", "s3cret", "--protected-mode", "yes")], indirect=True)
def test_redis_password_comes_from_its_own_setting(own_redis) -> None:
    async def scenario() -> None:
        anonymous = make_queue(settings(own_redis.url))
        with pytest.raises(QueueUnavailableError):
            await anonymous.submit(make_spec())
        await anonymous.close()
        queue = make_queue(settings(own_redis.url, redis_password="s3cret"))
        spec = make_spec()
        await queue.submit(spec)
        assert [job.spec.id for job in await queue.take("w1", 1, block_s=1.0)] == [spec.id]
        await queue.close()

    run(scenario())
    config = settings(own_redis.url, redis_password="s3cret", max_body_bytes=8 * 2**20)
    assert "s3cret" not in repr(config)
    level, line = check_redis_capacity(config, own_redis.url)
    assert level == logging.WARNING and "no maxmemory" in line  # it could read the configuration


def test_a_result_stored_by_the_previous_version_still_reads(redis_server) -> None:
    """During a rolling upgrade old workers still store results as JSON with base64 images."""

    async def scenario() -> None:
        config = settings(redis_server.url)
        queue, client = make_queue(config), redis.Redis.from_url(redis_server.url)
        spec = make_spec()
        await queue.submit(spec)
        old_result = done_record(spec).result
        client.hset(
            QueueKeys(config.queue_name).job(spec.id),
            mapping={"state": "done", "result": old_result.model_dump_json()},
        )
        assert (await queue.get(spec.id)).result.images == [b"image-bytes"]
        client.close()
        await queue.close()

    run(scenario())


def test_release_never_requeues_a_job_whose_record_says_it_ended(redis_server) -> None:
    """The record is the authority: a finished job whose message is still pending (a cancel by an
    older version that did not acknowledge it) is dropped, not queued again."""

    async def scenario() -> None:
        config = settings(redis_server.url)
        queue, client = make_queue(config), redis.Redis.from_url(redis_server.url)
        spec = make_spec()
        await queue.submit(spec)
        [taken] = await queue.take("w1", 1, block_s=1.0)
        client.hset(QueueKeys(config.queue_name).job(spec.id), "state", "cancelled")
        await queue.release(taken)
        assert (await queue.get(spec.id)).state == JobState.CANCELLED
        assert await queue.depth() == 0 and await queue.held_bytes() == 0
        client.close()
        await queue.close()

    run(scenario())


def test_the_fencing_token_tells_apart_two_processes_with_the_same_worker_name(redis_server) -> None:
    """A worker restarted under the same WORKER_ID reclaims its own idle delivery; the old process,
    still running somewhere, cannot store its late result over the new run's."""

    async def scenario() -> None:
        config = settings(redis_server.url, reclaim_idle_s=0.3)
        old, new = make_queue(config), make_queue(config)
        spec = make_spec()
        await old.submit(spec)
        [first] = await old.take("w", 1, block_s=1.0)
        assert await old.start("w", first)
        await asyncio.sleep(0.5)
        [again] = await new.take("w", 1, block_s=1.0)
        assert again.token == first.token and await new.start("w", again)
        await old.finish(first, done_record(spec, worker="w").model_copy(update={"error": "stale"}))
        assert (await new.get(spec.id)).state == JobState.RUNNING
        await new.finish(again, done_record(spec, worker="w"))
        record = await new.get(spec.id)
        assert record.state == JobState.DONE and record.error is None
        await old.close()
        await new.close()

    run(scenario())


def test_the_group_lag_counts_the_jobs_waiting_in_the_fair_order(redis_server) -> None:
    """KEDA scales workers on the consumer group's lag: it stays the number of jobs no worker took,
    although the fair take delivers out of arrival order."""

    async def scenario() -> None:
        config = settings(redis_server.url)
        queue, client = make_queue(config), redis.Redis.from_url(redis_server.url)
        stream = QueueKeys(config.queue_name).stream

        def lag() -> int | None:
            [group] = client.xinfo_groups(stream)
            return group["lag"]

        specs = [make_spec().model_copy(update={"owner": owner}) for owner in ("a", "a", "a", "b")]
        for spec in specs:
            await queue.submit(spec)
        [first] = await queue.take("w1", 1, block_s=1.0)
        assert lag() == 3
        [second] = await queue.take("w1", 1, block_s=1.0)
        assert second.spec.id == specs[3].id and lag() == 2  # b's job, out of arrival order
        await queue.cancel(specs[2].id)
        assert lag() == 1
        await queue.release(first)
        await queue.submit(make_spec())
        assert lag() == 3
        newest = make_spec()
        await queue.submit(newest)
        await queue.cancel(newest.id)  # the stream's last entry deleted: Redis alone says NULL here
        assert lag() == 3
        await queue.finish(second, done_record(second.spec))
        assert len(await queue.take("w2", 8, block_s=1.0)) == 3 and lag() == 0
        client.close()
        await queue.close()

    run(scenario())
