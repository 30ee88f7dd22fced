"""What the queue enforces per owner, and the admission of a job against its deadline.

Both backends enforce the same rules (the Redis one in its SUBMIT script, on the same numbers):
- quotas by the owner's tier: unfinished jobs, bytes held (payloads and kept results) and
  unfinished cost, each a share of the queue's limits (`QUEUE_KEY_SHARE`, `KEY_MAX_INFLIGHT_COST`);
- deadline admission: the queue measures its throughput as cost finished per busy second (a busy
  second: one in which it held unfinished jobs), decayed with a half-life of `RATE_HALF_LIFE_S`;
  a job whose queued cost ahead (service/queue/fair.py, `cost_ahead`) plus its own cost would, at
  that rate, take it past its deadline is refused. With nothing queued ahead a job is always
  admitted: the estimate then has nothing to say (and a queue that refused everything would never
  measure again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from service.queue.protocol import QueueFullError
from service.settings import DEFAULT_TIER, Settings

# Half-life of the throughput measure: long enough to span many jobs, short enough to follow a
# change of load or of the number of workers within minutes.
RATE_HALF_LIFE_S = 300.0


@dataclass(frozen=True)
class OwnerQuota:
    jobs: int
    bytes: int
    cost: float


@dataclass(frozen=True)
class QueuePolicy:
    """`quotas` by tier (a tier not listed is `default`'s; no `default`: no per-owner limits)."""

    quotas: dict[str, OwnerQuota] = field(default_factory=dict)
    batch_max_wait_s: float = 30.0
    deadline_admission: bool = False

    def quota(self, tier: str) -> OwnerQuota | None:
        return self.quotas.get(tier) or self.quotas.get(DEFAULT_TIER)

    @classmethod
    def from_settings(cls, settings: Settings) -> QueuePolicy:
        quotas = {}
        for tier in settings.tier_names:
            policy = settings.tier_policy(tier)
            share = policy.queue_share or 1.0
            quotas[tier] = OwnerQuota(
                jobs=max(1, math.floor(share * settings.queue_max_depth)),
                bytes=int(share * settings.queue_max_bytes),
                cost=policy.max_inflight_cost or math.inf,
            )
        return cls(quotas, settings.batch_max_wait_s, settings.deadline_admission)


def quota_refusal(
    quota: OwnerQuota | None,
    jobs: int,
    held: int,
    cost: float,
    size: int,
    job_cost: float,
    retry_after_s: int,
) -> QueueFullError | None:
    """Why an owner holding `jobs` unfinished jobs, `held` bytes and `cost` may not add a job of
    `size` bytes and `job_cost`, or None."""
    if quota is None:
        return None
    if jobs + 1 > quota.jobs:
        return QueueFullError(
            f"this API key has {jobs} unfinished jobs, its share of the queue ({quota.jobs}); wait for "
            "some to finish",
            retry_after_s,
            "key_queue_full",
        )
    if held + size > quota.bytes:
        return QueueFullError(
            f"this API key holds {held} bytes of jobs and results; this job's {size} bytes would pass its "
            f"share of the queue, {quota.bytes} bytes",
            retry_after_s,
            "key_queue_full",
        )
    if cost + job_cost > quota.cost:
        return QueueFullError(
            f"this API key has {cost:.4g} megapixel-steps of unfinished work; this job's {job_cost:.4g} "
            f"would pass its in-flight cost cap of {quota.cost:.4g}",
            retry_after_s,
            "key_cost_in_flight",
        )
    return None


def deadline_refusal(
    ahead: float, job_cost: float, seconds_per_cost: float | None, now: float, deadline: float
) -> QueueFullError | None:
    """Refuse when `ahead` cost (> 0) plus the job's own, at the measured rate, ends past `deadline`."""
    if ahead <= 0 or seconds_per_cost is None:
        return None
    needed_s = (ahead + job_cost) * seconds_per_cost
    late_s = now + needed_s - deadline
    if late_s <= 0:
        return None
    return QueueFullError(
        f"the work queued ahead of this job ({ahead:.4g} megapixel-steps) and its own ({job_cost:.4g}) take "
        f"about {needed_s:.0f} s at the measured {seconds_per_cost:.3g} s per megapixel-step, past its "
        f"deadline of {deadline - now:.0f} s; retry later or send a cheaper request",
        max(1, math.ceil(late_s)),
        "deadline_unmeetable",
    )


@dataclass
class Throughput:
    """Cost finished per busy second, both decayed (the in-process twin of the Redis `rate` hash)."""

    updated: float = 0.0
    cost: float = 0.0
    busy_s: float = 0.0

    def busy_from(self, now: float) -> None:
        """A busy period starts (a job was accepted into an empty queue): idle time is not counted."""
        self.updated = now

    def finished(self, now: float, cost: float) -> None:
        elapsed = max(0.0, now - self.updated)
        decay = 0.5 ** (elapsed / RATE_HALF_LIFE_S)
        self.cost = self.cost * decay + cost
        self.busy_s = self.busy_s * decay + elapsed
        self.updated = now

    @property
    def seconds_per_cost(self) -> float | None:
        return self.busy_s / self.cost if self.cost > 0 else None
