"""The queue contract, run against every backend: in-process, and Redis Streams on a private
redis-server, on Sentinel (primary, replica, three sentinels) and on a three-master Redis Cluster,
all on loopback. No model needed."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid

import pytest

from service.queue import create_queue
from service.queue.protocol import (
    JobQueue,
    JobRecord,
    JobResult,
    JobSpec,
    JobState,
    QueueFullError,
    SubjectSpec,
)
from service.settings import Settings

# A 2x2 RGB reference with its located token (fields the spec of an older version ignores).
SUBJECT = {"image": bytes(range(12)), "width": 2, "height": 2, "target": "cat", "token_indices": [2]}


def make_spec(timeout_s: float = 60.0, seed: int = 7) -> JobSpec:
    now = time.time()
    return JobSpec(
        id=uuid.uuid4().hex,
        prompt="a cat in the snow",
        subjects=[SubjectSpec.model_validate(SUBJECT)],
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=3.0,
        mask_scope=0.25,
        mask_reused_step=1,
        seed=seed,
        num_images=1,
        output_format="png",
        return_masks=False,
        enqueued_at=now,
        deadline=now + timeout_s,
    )


def done_record(spec: JobSpec, worker: str = "w1") -> JobRecord:
    return JobRecord(
        id=spec.id,
        state=JobState.DONE,
        seed=spec.seed,
        output_format=spec.output_format,
        enqueued_at=spec.enqueued_at,
        deadline=spec.deadline,
        worker=worker,
        result=JobResult(
            images=[b"image-bytes"],
            queue_wait_seconds=0.1,
            inference_seconds=0.2,
            finished_at=time.time(),
            worker=worker,
        ),
    )


def spec_with_image(size: int) -> JobSpec:
    subject = SUBJECT | {"image": os.urandom(size)}
    return make_spec().model_copy(update={"subjects": [SubjectSpec.model_validate(subject)]})


def result_of(spec: JobSpec, image: bytes, worker: str = "w1") -> JobRecord:
    record = done_record(spec, worker)
    return record.model_copy(update={"result": record.result.model_copy(update={"images": [image]})})


# Redis topologies: one server, Sentinel (primary + replica + 3 sentinels), Cluster (3 masters).
REDIS_FIXTURES = {"redis": "redis_server", "sentinel": "redis_sentinel", "cluster": "redis_cluster"}


@pytest.fixture(params=["in_process", "redis", "sentinel", "cluster"])
def make_queue(request: pytest.FixtureRequest):
    """Factory of fresh queues of one backend (Redis ones isolated by a unique key prefix)."""

    def factory(**overrides) -> JobQueue:
        # One owner may fill the queue unless a test sets a share (the global limits are tested so).
        values = {"queue_max_depth": 8, "heartbeat_s": 0.2, "reclaim_idle_s": 0.4, "queue_key_share": 1.0}
        values |= overrides
        if request.param in REDIS_FIXTURES:
            server = request.getfixturevalue(REDIS_FIXTURES[request.param])
            values |= {"redis_url": server.url, "queue_name": f"test-{uuid.uuid4().hex[:8]}"}
        return create_queue(Settings(**values))

    return factory


def run(coroutine):
    return asyncio.run(coroutine)


def test_job_lifecycle_stores_result_and_acks(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        spec = make_spec(seed=2**62 + 1)  # large seeds survive the round trip exactly
        record = await queue.submit(spec)
        assert record.state == JobState.QUEUED and await queue.depth() == 1
        [taken] = await queue.take("w1", 4, block_s=1.0)
        assert taken.spec == spec
        assert await queue.start("w1", taken)
        assert (await queue.get(spec.id)).state == JobState.RUNNING
        await queue.finish(taken, done_record(spec))
        stored = await queue.get(spec.id)
        assert stored.state == JobState.DONE and stored.result.images == [b"image-bytes"]
        assert stored.seed == spec.seed
        assert await queue.depth() == 0
        assert await queue.take("w1", 4, block_s=0.1) == []
        await queue.close()

    run(scenario())


def test_waiter_is_woken_when_the_result_is_stored(make_queue) -> None:
    async def scenario() -> float:
        queue = make_queue()
        spec = make_spec()
        await queue.submit(spec)
        waiter = asyncio.create_task(queue.wait(spec.id, timeout_s=10))
        [taken] = await queue.take("w1", 1, block_s=1.0)
        await queue.start("w1", taken)
        await asyncio.sleep(0.2)  # the waiter is parked now
        finished_at = time.monotonic()
        await queue.finish(taken, done_record(spec))
        record = await waiter
        assert record.state == JobState.DONE
        latency = time.monotonic() - finished_at
        await queue.close()
        return latency

    # Far below the 1 s safety re-read: the wake-up came from the notification.
    assert run(scenario()) < 0.5


def test_depth_is_bounded(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(queue_max_depth=2, queue_full_retry_after_s=3)
        await queue.submit(make_spec())
        await queue.submit(make_spec())
        with pytest.raises(QueueFullError) as full:
            await queue.submit(make_spec())
        assert full.value.retry_after_s == 3
        await queue.close()

    run(scenario())


def test_idempotency_key_returns_the_same_job(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        first = await queue.submit(make_spec(), idempotency_key="abc")
        again = await queue.submit(make_spec(), idempotency_key="abc")
        other = await queue.submit(make_spec(), idempotency_key="xyz")
        assert again.id == first.id != other.id
        assert await queue.depth() == 2
        await queue.close()

    run(scenario())


def test_cancel_only_queued_jobs_and_workers_skip_them(make_queue, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        queue = make_queue()
        cancelled, running = make_spec(), make_spec()
        await queue.submit(running)
        [taken_running] = await queue.take("w1", 1, block_s=1.0)
        assert await queue.start("w1", taken_running)
        await queue.submit(cancelled)
        [taken_cancelled] = await queue.take("w1", 1, block_s=1.0)  # taken, not yet started
        assert (await queue.cancel(cancelled.id)).state == JobState.CANCELLED
        assert not await queue.start("w1", taken_cancelled)
        await queue.heartbeat("w1", ready=True, in_flight=[taken_running, taken_cancelled])
        assert "taken over" not in caplog.text  # a cancellation is not a takeover
        assert (await queue.cancel(running.id)).state == JobState.RUNNING
        assert await queue.depth() == 1
        assert await queue.cancel("no-such-job") is None
        await queue.close()

    run(scenario())


def test_released_job_goes_to_another_worker(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        spec = make_spec()
        await queue.submit(spec)
        [taken] = await queue.take("w1", 1, block_s=1.0)
        await queue.release(taken)
        [again] = await queue.take("w2", 1, block_s=1.0)
        assert again.spec.id == spec.id
        assert await queue.start("w2", again)
        await queue.close()

    run(scenario())


def test_finished_records_expire_after_the_ttl(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(result_ttl_s=1)
        spec = make_spec()
        await queue.submit(spec)
        [taken] = await queue.take("w1", 1, block_s=1.0)
        await queue.finish(taken, done_record(spec))
        assert await queue.get(spec.id) is not None
        await asyncio.sleep(1.3)
        assert await queue.get(spec.id) is None
        await queue.close()

    run(scenario())


def test_readiness_follows_heartbeats(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        assert await queue.ready_workers() == 0
        await queue.heartbeat("w1", ready=True, in_flight=[])
        assert await queue.ready_workers() == 1
        await queue.heartbeat("w1", ready=False, in_flight=[])
        assert await queue.ready_workers() == 0
        assert await queue.ping()
        await queue.close()

    run(scenario())


@pytest.mark.parametrize("make_queue", list(REDIS_FIXTURES), indirect=True)
def test_jobs_of_a_silent_worker_are_reclaimed_and_live_ones_are_not(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(reclaim_idle_s=0.4)
        dead_job, live_job = make_spec(), make_spec()
        await queue.submit(dead_job)
        [from_dead] = await queue.take("dead", 1, block_s=1.0)
        await queue.start("dead", from_dead)
        await queue.submit(live_job)
        [from_live] = await queue.take("live", 1, block_s=1.0)
        await queue.start("live", from_live)
        for _ in range(6):  # 0.6 s: "live" keeps refreshing its job, "dead" is silent
            await queue.heartbeat("live", ready=True, in_flight=[from_live])
            await asyncio.sleep(0.1)
        reclaimed = await queue.take("rescuer", 4, block_s=0.2)
        assert [job.spec.id for job in reclaimed] == [dead_job.id]
        assert await queue.start("rescuer", reclaimed[0])
        await queue.finish(reclaimed[0], done_record(dead_job, worker="rescuer"))
        assert (await queue.get(dead_job.id)).worker == "rescuer"
        await queue.close()

    run(scenario())


def test_a_released_job_that_ended_meanwhile_is_never_queued_again(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        cancelled, finished = make_spec(), make_spec()
        await queue.submit(cancelled)
        await queue.submit(finished)
        taken = {job.spec.id: job for job in await queue.take("w1", 2, block_s=1.0)}
        assert (await queue.cancel(cancelled.id)).state == JobState.CANCELLED
        await queue.finish(taken[finished.id], done_record(finished))
        for job in taken.values():  # e.g. a stopping worker returning its backlog
            await queue.release(job)
        assert (await queue.get(cancelled.id)).state == JobState.CANCELLED
        assert (await queue.get(finished.id)).state == JobState.DONE
        assert await queue.depth() == 0
        assert await queue.take("w2", 4, block_s=0.2) == []
        await queue.close()

    run(scenario())


def test_a_failed_job_keeps_its_error_text(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        spec = make_spec()
        await queue.submit(spec)
        [taken] = await queue.take("w1", 1, block_s=1.0)
        assert await queue.start("w1", taken)
        failed = done_record(spec).model_copy(
            update={"state": JobState.FAILED, "result": None, "error": "RuntimeError: out of memory"}
        )
        await queue.finish(taken, failed)
        stored = await queue.get(spec.id)
        assert stored.state == JobState.FAILED and stored.error == "RuntimeError: out of memory"
        assert stored.result is None and stored.worker == "w1"
        await queue.close()

    run(scenario())


def test_the_byte_budget_counts_payloads_and_results_until_they_expire(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(queue_max_bytes=2**20, result_ttl_s=1)
        first, second = spec_with_image(400_000), spec_with_image(400_000)
        await queue.submit(first)
        await queue.submit(second)
        with pytest.raises(QueueFullError, match="bytes") as full:
            await queue.submit(spec_with_image(400_000))
        assert full.value.retry_after_s == 2
        taken = {job.spec.id: job for job in await queue.take("w1", 2, block_s=1.0)}
        await queue.finish(taken[first.id], result_of(first, os.urandom(500_000)))
        with pytest.raises(QueueFullError):  # the result counts while it is kept
            await queue.submit(spec_with_image(400_000))
        await queue.finish(taken[second.id], result_of(second, b"small"))
        await asyncio.sleep(1.2)  # the big result expired
        await queue.submit(spec_with_image(400_000))
        assert await queue.held_bytes() < 500_000
        await queue.close()

    run(scenario())


# --- tenant-fair take, shares and admission (service/queue/fair.py, policy.py) ------------------
def owned_spec(
    owner: str, priority: str = "interactive", weight: float = 1.0, timeout_s: float = 60.0, **fields
) -> JobSpec:
    """A job of `owner`; `fields` override the spec's (e.g. its size)."""
    update = {"owner": owner, "priority": priority, "weight": weight, **fields}
    return make_spec(timeout_s).model_copy(update=update)


async def take_one_by_one(queue: JobQueue, count: int) -> list[str]:
    """Ids of the next `count` jobs, each run to its end (no delivery left to reclaim)."""
    taken = []
    for _ in range(count):
        [job] = await queue.take("w1", 1, block_s=1.0)
        assert await queue.start("w1", job)
        await queue.finish(job, done_record(job.spec))
        taken.append(job.spec.id)
    return taken


def test_a_light_owners_job_is_not_behind_a_heavy_owners_backlog(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        heavy = [owned_spec("heavy") for _ in range(6)]
        for spec in heavy:
            await queue.submit(spec)
        light = owned_spec("light")
        await queue.submit(light)
        # Start-time fair order: the light job starts level with the heavy backlog's head.
        assert await take_one_by_one(queue, 3) == [heavy[0].id, light.id, heavy[1].id]
        await queue.close()

    run(scenario())


def test_weights_share_the_cost_taken(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(queue_max_depth=16)
        double, single = [], []
        for _ in range(6):
            double.append(owned_spec("double", weight=2.0))
            single.append(owned_spec("single"))
            await queue.submit(double[-1])
            await queue.submit(single[-1])
        taken = await take_one_by_one(queue, 6)
        assert sum(job_id in {spec.id for spec in double} for job_id in taken) == 4
        await queue.close()

    run(scenario())


def test_cost_not_job_count_decides_the_share(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(queue_max_depth=16)
        big = [owned_spec("big", width=128, height=128) for _ in range(3)]  # 4x the pixels each
        small = [owned_spec("small") for _ in range(8)]
        for spec in big + small:
            await queue.submit(spec)
        taken = await take_one_by_one(queue, 6)
        # Equal shares of cost: while one big job is taken, about four small ones are.
        assert sum(job_id in {spec.id for spec in big} for job_id in taken) == 2
        await queue.close()

    run(scenario())


def test_interactive_jobs_overtake_batch_and_batch_is_not_starved(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(batch_max_wait_s=1.2)  # far longer than the takes before the sleep
        batch = [owned_spec("a", "batch") for _ in range(2)]
        interactive = [owned_spec("b") for _ in range(3)]
        for spec in batch + interactive:
            await queue.submit(spec)
        assert [await queue.position(spec.id) for spec in batch] == [3, 4]  # behind every interactive
        assert await take_one_by_one(queue, 2) == [interactive[0].id, interactive[1].id]
        await asyncio.sleep(1.3)  # batch has waited its bound: one batch job goes first
        assert await take_one_by_one(queue, 2) == [batch[0].id, interactive[2].id]
        assert await take_one_by_one(queue, 1) == [batch[1].id]  # no interactive job waits
        await queue.close()

    run(scenario())


def test_positions_follow_the_fair_order_and_releases_keep_their_place(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        heavy = [owned_spec("heavy") for _ in range(3)]
        light = owned_spec("light")
        for spec in [*heavy, light]:
            await queue.submit(spec)
        assert [await queue.position(spec.id) for spec in [*heavy, light]] == [0, 2, 3, 1]
        [first] = await queue.take("w1", 1, block_s=1.0)
        assert first.spec.id == heavy[0].id and await queue.position(heavy[0].id) == 0  # taken
        assert await queue.position(light.id) == 0
        await queue.release(first)  # back to its place, ahead of everyone
        assert [await queue.position(spec.id) for spec in (heavy[0], light, heavy[1])] == [0, 1, 2]
        assert (await queue.cancel(light.id)).state == JobState.CANCELLED
        assert await take_one_by_one(queue, 3) == [heavy[0].id, heavy[1].id, heavy[2].id]
        await queue.close()

    run(scenario())


def test_an_owner_holds_at_most_its_share_and_others_find_room(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(queue_max_depth=4, queue_key_share=0.5)
        for _ in range(2):
            await queue.submit(owned_spec("flooder"))
        with pytest.raises(QueueFullError) as refused:
            await queue.submit(owned_spec("flooder"))
        assert refused.value.code == "key_queue_full" and "share" in str(refused.value)
        await queue.submit(owned_spec("other"))  # room for another key
        [taken] = await queue.take("w1", 1, block_s=1.0)
        await queue.finish(taken, done_record(taken.spec))
        await queue.submit(owned_spec("flooder"))  # its job ended: room again
        await queue.close()

    run(scenario())


def test_an_owners_bytes_and_in_flight_cost_are_capped(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(queue_max_bytes=2**20, queue_key_share=0.5)
        await queue.submit(spec_with_image(300_000).model_copy(update={"owner": "big"}))
        with pytest.raises(QueueFullError) as refused:
            await queue.submit(spec_with_image(300_000).model_copy(update={"owner": "big"}))
        assert refused.value.code == "key_queue_full" and "bytes" in str(refused.value)
        await queue.submit(spec_with_image(300_000).model_copy(update={"owner": "small"}))
        await queue.close()

        cost = make_spec().cost
        queue = make_queue(key_max_inflight_cost=2.5 * cost, max_request_cost=cost)
        await queue.submit(owned_spec("costly"))
        await queue.submit(owned_spec("costly"))
        with pytest.raises(QueueFullError) as refused:
            await queue.submit(owned_spec("costly"))
        assert refused.value.code == "key_cost_in_flight"
        await queue.submit(owned_spec("cheap"))
        await queue.close()

    run(scenario())


def test_a_job_that_cannot_start_before_its_deadline_is_refused(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue(queue_max_depth=16, deadline_admission=True)
        probe = owned_spec("heavy")
        await queue.submit(probe)  # nothing measured yet and nothing ahead: admitted
        await asyncio.sleep(0.5)  # half a second of busy time
        [taken] = await queue.take("w1", 1, block_s=1.0)
        await queue.finish(taken, done_record(probe))
        rate = (await queue.usage(["default"])).seconds_per_cost
        cost = probe.cost
        assert 0.45 / cost < rate < 5 / cost
        # A deadline that leaves room for 3.5 jobs of work at the measured rate.
        budget_s = 3.5 * cost * rate
        for _ in range(3):
            await queue.submit(owned_spec("heavy", timeout_s=budget_s))
        with pytest.raises(QueueFullError) as refused:
            await queue.submit(owned_spec("heavy", timeout_s=budget_s))
        assert refused.value.code == "deadline_unmeetable" and refused.value.retry_after_s >= 1
        assert "megapixel-steps" in str(refused.value)
        # Another key's job starts level with that backlog's head: nothing of it is ahead.
        await queue.submit(owned_spec("light", timeout_s=budget_s))
        # Batch work waits behind every interactive job: the same deadline is out of reach.
        with pytest.raises(QueueFullError):
            await queue.submit(owned_spec("light", "batch", timeout_s=budget_s))
        await queue.close()

    run(scenario())


@pytest.mark.parametrize("make_queue", list(REDIS_FIXTURES), indirect=True)
def test_both_backends_hand_out_the_same_jobs_in_the_same_order(make_queue) -> None:
    """The Lua order (redis_scripts.py) and the Python one (fair.py) are the same arithmetic."""
    rng = random.Random(19)
    specs = [
        owned_spec(
            rng.choice("abc"),
            rng.choice(["interactive", "interactive", "batch"]),
            rng.choice([1.0, 2.0, 3.0]),
            width=rng.choice([64, 96, 128]),
            height=64,
            num_inference_steps=rng.randint(1, 5),
            num_images=rng.randint(1, 3),
        )
        for _ in range(40)
    ]
    script = [(spec, rng.random() < 0.3, rng.random() < 0.1) for spec in specs]

    async def replay(queue: JobQueue) -> list[str]:
        order: list[str] = []
        for spec, take, cancel in script:
            await queue.submit(spec)
            if cancel:
                await queue.cancel(spec.id)
            if take:
                order += [job.spec.id for job in await queue.take("w1", rng_take(spec), block_s=0.2)]
        order += [job.spec.id for job in await queue.take("w1", 40, block_s=0.2)]
        await queue.close()
        return order

    def rng_take(spec: JobSpec) -> int:
        return 1 + spec.num_images % 2

    settings = {"queue_max_depth": 64, "batch_max_wait_s": 3600}
    in_process = run(replay(create_queue(Settings(queue_key_share=1.0, **settings))))
    redis_order = run(replay(make_queue(**settings)))
    assert redis_order == in_process and len(in_process) == sum(not cancel for _, _, cancel in script)
    assert in_process != [spec.id for spec, _, cancel in script if not cancel]  # not arrival order
