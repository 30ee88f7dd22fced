"""Choosing the next batch: the oldest waiting job and the compatible jobs behind it."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from engines.jobs import GenerationJob
from service.queue.protocol import TakenJob


@dataclass
class PendingJob:
    """A job a worker holds: its queue delivery and the decoded runner job."""

    taken: TakenJob
    job: GenerationJob

    @property
    def key(self) -> Hashable:
        return self.job.batch_key()


def next_batch(backlog: list[PendingJob], max_batch: int) -> tuple[list[PendingJob], list[PendingJob]]:
    """Split the backlog into (batch, rest): up to `max_batch` jobs sharing the oldest job's batch
    key, in arrival order. The oldest job always runs next, so no job starves."""
    if not backlog:
        return [], []
    key = backlog[0].key
    batch: list[PendingJob] = []
    rest: list[PendingJob] = []
    for pending in backlog:
        (batch if pending.key == key and len(batch) < max_batch else rest).append(pending)
    return batch, rest
