"""The queue's part of live progress and cancellation of running jobs (issue 13), run against every
backend of the contract (in-process, Redis, Sentinel, Cluster)."""

from __future__ import annotations

import asyncio
import time

from test_queue_contract import done_record, make_queue, make_spec, run

from service.queue.protocol import PROGRESS_EVENTS_KEPT, JobProgress, JobState

__all__ = ["make_queue"]  # the backend-parametrised fixture, shared with the contract


def test_a_running_job_is_cancelled_through_its_worker(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        doomed, other = make_spec(), make_spec()
        await queue.submit(doomed)
        await queue.submit(other)
        taken = {job.spec.id: job for job in await queue.take("w1", 2, block_s=1.0)}
        for job in taken.values():
            assert await queue.start("w1", job)
        ids = [doomed.id, other.id]
        signals = await queue.step_signals(ids)
        assert signals.cancelled == set() and signals.watched == set()
        assert (await queue.cancel(doomed.id)).state == JobState.RUNNING  # requested, not done
        assert (await queue.step_signals(ids)).cancelled == {doomed.id}
        waiter = asyncio.create_task(queue.wait(doomed.id, timeout_s=10))
        await asyncio.sleep(0.1)
        cancelled = done_record(doomed).model_copy(
            update={"state": JobState.CANCELLED, "result": None, "error": "cancelled while running"}
        )
        await queue.finish(taken[doomed.id], cancelled)  # the worker's fenced finish
        assert (await asyncio.wait_for(waiter, 0.5)).state == JobState.CANCELLED
        assert (await queue.cancel(doomed.id)).state == JobState.CANCELLED
        assert await queue.depth() == 1
        await queue.watch(other.id, previews=False, ttl_s=10)
        assert (await queue.step_signals([other.id])).watched == set()
        await queue.watch(other.id, previews=True, ttl_s=0.3)
        assert (await queue.step_signals([other.id])).watched == {other.id}
        await asyncio.sleep(0.4)
        assert (await queue.step_signals([other.id])).watched == set()
        assert await queue.step_signals([]) == type(signals)()
        await queue.close()

    run(scenario())


def test_progress_events_are_ordered_bounded_and_resumable(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        spec = make_spec()
        await queue.submit(spec)
        await queue.publish_progress(spec.id, JobProgress(step=1, steps=2))  # not running: ignored
        assert await queue.events(spec.id, None, block_s=0) == []
        [taken] = await queue.take("w1", 1, block_s=1.0)
        assert await queue.start("w1", taken)
        steps = PROGRESS_EVENTS_KEPT + 4
        for step in range(1, steps):
            event = JobProgress(
                step=step, steps=steps, eta_s=0.5, preview=b"png%d" % step, masks=[b"m", b"n"]
            )
            await queue.publish_progress(spec.id, event)
        kept = await queue.events(spec.id, None, block_s=0)
        assert [event.step for _id, event in kept] == list(range(steps - PROGRESS_EVENTS_KEPT, steps))
        assert kept[-1][1].preview == b"png%d" % (steps - 1) and kept[-1][1].masks == [b"m", b"n"]
        assert [event.step for _id, event in await queue.events(spec.id, kept[-3][0], 0)] == [
            steps - 2,
            steps - 1,
        ]
        # A blocked reader wakes at the next event.
        reader = asyncio.create_task(queue.events(spec.id, kept[-1][0], block_s=5))
        await asyncio.sleep(0.2)
        published = time.monotonic()
        await queue.publish_progress(spec.id, JobProgress(step=steps, steps=steps))
        [(last_id, last)] = await asyncio.wait_for(reader, 2)
        assert last.step == steps and last.preview is None and time.monotonic() - published < 0.5
        await queue.finish(taken, done_record(spec))
        await queue.publish_progress(spec.id, JobProgress(step=1, steps=steps))  # finished: ignored
        assert await queue.events(spec.id, last_id, block_s=0.1) == []
        await queue.close()

    run(scenario())


def test_positions_count_the_jobs_waiting_ahead(make_queue) -> None:
    async def scenario() -> None:
        queue = make_queue()
        first, second, third = make_spec(), make_spec(), make_spec()
        for spec in (first, second, third):
            await queue.submit(spec)
        assert [await queue.position(spec.id) for spec in (first, second, third)] == [0, 1, 2]
        [taken] = await queue.take("w1", 1, block_s=1.0)
        assert taken.spec.id == first.id and await queue.start("w1", taken)
        assert await queue.position(first.id) is None
        assert (await queue.cancel(second.id)).state == JobState.CANCELLED
        assert [await queue.position(spec.id) for spec in (second, third)] == [None, 0]
        await queue.release(taken)  # back to its place of acceptance
        assert [await queue.position(spec.id) for spec in (first, third)] == [0, 1]
        assert await queue.position("no-such-job") is None
        await queue.close()

    run(scenario())
