"""Names of every Redis key of one queue, its subjects and its webhooks, all under one hash tag.

Every key is `{<queue_name>}:...`: Redis Cluster hashes only the part between the braces, so all of
them live in one slot and every Lua script and multi-key command is single-slot (no CROSSSLOT on
Redis Cluster or on managed Redis in cluster mode). The price is that one queue lives on one shard;
deployments that need more spread run several queues.

The Lua scripts (redis_scripts.py, service/webhooks/outbox.py) build the keys they reach by name
(an owner's counters, the job hashes of the fair order) from the same names: `lua_names()` writes
them as a Lua table, so this module stays the one place that names a key.

Versions before the hash tag used `<queue_name>:...` (no braces); docs/DEPLOYMENT.md says how to
drain those keys when upgrading.
"""

from __future__ import annotations

from dataclasses import dataclass

# The stream's consumer group (every worker is a consumer of it).
GROUP = "workers"

# Name -> key suffix (after "{<queue_name>}:"); a name ending in ":" is followed by an id.
NAMES = {
    # The queue (redis_streams.py).
    "stream": "stream",  # one message per unfinished job, consumer group `workers`
    "channel": "done",  # pub/sub: ids of finished jobs
    "workers": "workers",  # sorted set worker -> last heartbeat
    "dead": "dead",  # dead letters (bounded stream)
    "arrivals": "arrivals",  # capped stream poked at every submit and release: wakes blocked takers
    "job": "job:",  # hash: a job's state, meta, fence, result, its place in the fair order
    "idem": "idem:",  # idempotency key -> job id
    "events": "events:",  # stream of a running job's newest progress events
    "watch": "watch:",  # present while a client watches the job with previews
    # The tenant-fair order (fair.py).
    "ready": "ready:",  # per class: sorted set "<seq>:<job id>:<message id>" -> start tag
    "active": "active:",  # per class: set of owners with jobs in that order
    "sched": "sched",  # hash: virtual time, queued cost per class, batch clock, acceptance sequence
    "owner": "owner:",  # hash: an owner's jobs, bytes, cost, subject bytes, queued cost and finish tags
    "tiers": "tiers",  # hash: "<tier>:jobs", "<tier>:bytes" (metrics)
    "rate": "rate",  # hash: decayed cost finished and busy seconds (deadline admission)
    # The byte budget (budget.py's twin).
    "bytes": "bytes",  # bytes held: payloads of unfinished jobs + every entry of `held`
    "held": "held",  # sorted set "<size>|<owner>|<tier>|<kind>|<id>" -> expiry: results, subjects, tokens
    "totals": "totals",  # hash: bytes of subjects and of tokens
    "token_expiry": "token-expiry",  # sorted set of the tokens' `held` members -> expiry (eviction order)
    # Subjects (service/subjects/store.py).
    "subject": "subject:",  # hash: a stored subject's image and owner
    "tokens": "tokens:",  # hash: a feature key's projected tokens
    # Webhooks (service/webhooks/outbox.py).
    "webhooks_due": "webhooks",  # sorted set job id -> due time of its webhook (or end of its lease)
    "webhook": "webhook:",  # hash: one job's webhook delivery
    "webhook_leases": "webhook-leases:",  # per owner: sorted set job id -> lease end (deliveries in flight)
    "webhook_parked": "webhook-parked:",  # per owner at its cap: sorted set job id -> due time, set aside
    "webhook_parked_owners": "webhook-parked",  # set of the owners with deliveries set aside
    # LoRA adapters (service/adapters.py).
    "loras": "loras",  # hash: adapter name -> source every worker should load
    "lora_reports": "lora-reports",  # hash: worker -> JSON of what it has loaded (and failed to)
}


def lua_names() -> str:
    """The names as a Lua table `N`, the consumer group `GROUP`, and `K(suffix)`: the key of a
    suffix in the queue of the script's first key, which is always the stream."""
    table = ", ".join(f"{name} = '{suffix}'" for name, suffix in NAMES.items())
    return (
        f"local GROUP = '{GROUP}'\n"
        f"local N = {{{table}}}\n"
        f"local TAG = string.sub(KEYS[1], 1, -{len(NAMES['stream']) + 1})\n"
        "local function K(suffix) return TAG .. suffix end\n"
    )


@dataclass(frozen=True)
class QueueKeys:
    """The keys of the queue named `prefix`."""

    prefix: str

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    def _key(self, name: str, ident: str = "") -> str:
        return f"{self.tag}:{NAMES[name]}{ident}"

    stream = property(lambda self: self._key("stream"))
    channel = property(lambda self: self._key("channel"))
    workers = property(lambda self: self._key("workers"))
    dead = property(lambda self: self._key("dead"))
    arrivals = property(lambda self: self._key("arrivals"))
    sched = property(lambda self: self._key("sched"))
    tiers = property(lambda self: self._key("tiers"))
    rate = property(lambda self: self._key("rate"))
    bytes = property(lambda self: self._key("bytes"))
    held = property(lambda self: self._key("held"))
    totals = property(lambda self: self._key("totals"))
    token_expiry = property(lambda self: self._key("token_expiry"))
    webhooks_due = property(lambda self: self._key("webhooks_due"))
    loras = property(lambda self: self._key("loras"))
    lora_reports = property(lambda self: self._key("lora_reports"))

    def job(self, job_id: str) -> str:
        return self._key("job", job_id)

    def idem(self, idempotency_key: str) -> str:
        return self._key("idem", idempotency_key)

    def events(self, job_id: str) -> str:
        return self._key("events", job_id)

    def watch(self, job_id: str) -> str:
        return self._key("watch", job_id)

    def ready(self, priority: str) -> str:
        return self._key("ready", priority)

    def active(self, priority: str) -> str:
        return self._key("active", priority)

    def owner(self, owner: str) -> str:
        return self._key("owner", owner)

    def subject(self, subject_id: str) -> str:
        return self._key("subject", subject_id)

    def tokens(self, feature_key: str) -> str:
        return self._key("tokens", feature_key)

    def webhook(self, job_id: str) -> str:
        return self._key("webhook", job_id)

    def webhook_leases(self, owner: str) -> str:
        return self._key("webhook_leases", owner)
