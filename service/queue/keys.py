"""Names of the Redis keys of one queue, all under one hash tag.

Every key of a queue is `{<queue_name>}:...`: Redis Cluster hashes only the part between the braces,
so all of them live in one slot and every Lua script and multi-key command of the queue is
single-slot (no CROSSSLOT on Redis Cluster or on managed Redis in cluster mode). The price is that
one queue lives on one shard; deployments that need more spread run several queues.

Versions before the hash tag used `<queue_name>:...` (no braces); docs/DEPLOYMENT.md says how to
drain those keys when upgrading.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueKeys:
    """The keys of the queue named `prefix`."""

    prefix: str

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    @property
    def stream(self) -> str:
        return f"{self.tag}:stream"

    @property
    def channel(self) -> str:
        return f"{self.tag}:done"

    @property
    def workers(self) -> str:
        return f"{self.tag}:workers"

    @property
    def bytes(self) -> str:
        return f"{self.tag}:bytes"

    @property
    def results(self) -> str:
        return f"{self.tag}:results"

    @property
    def dead(self) -> str:
        return f"{self.tag}:dead"

    @property
    def webhooks_due(self) -> str:
        """Sorted set: job id -> when its webhook's next attempt is due (or its lease ends)."""
        return f"{self.tag}:webhooks"

    def webhook(self, job_id: str) -> str:
        """Hash: the delivery of one job's webhook (url, event, state, attempts, last_error)."""
        return f"{self.tag}:webhook:{job_id}"

    def job(self, job_id: str) -> str:
        return f"{self.tag}:job:{job_id}"

    def idem(self, idempotency_key: str) -> str:
        return f"{self.tag}:idem:{idempotency_key}"

    @property
    def waiting(self) -> str:
        """Sorted set: job id -> acceptance time, of jobs not started yet (queue positions)."""
        return f"{self.tag}:waiting"

    def events(self, job_id: str) -> str:
        """Stream: the newest progress events of one job (expires after its last event)."""
        return f"{self.tag}:events:{job_id}"

    def watch(self, job_id: str) -> str:
        """Present while a client watches the job with previews (expires unless refreshed)."""
        return f"{self.tag}:watch:{job_id}"
