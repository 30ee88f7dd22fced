"""The queue contract shared by the in-process and the Redis Streams backends.

The API side submits, waits for, reads and cancels jobs; the worker side takes, starts, finishes
and releases them. A job is accepted once `submit` returns; from then on it ends in exactly one
terminal state (done, failed, cancelled or expired) and is never silently dropped.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Literal, Protocol

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from realcustom.cost import generation_cost
from service.images import OutputFormat

Priority = Literal["interactive", "batch"]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def finished(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


# Bytes travel as base64 inside JSON and stay raw bytes in Python.
BYTES_AS_BASE64 = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class SubjectSpec(BaseModel):
    """One subject, decoded and located once at the edge: workers neither decode nor tokenize."""

    model_config = BYTES_AS_BASE64

    image: bytes = Field(description="The decoded reference: 8-bit RGB, row-major, width*height*3 bytes.")
    width: int
    height: int
    target: str
    token_indices: list[int] = Field(description="Tokens of `target` in the prompt (BOS = 0).")
    shared: bool = Field(
        False, description="From a stored subject: the worker that encodes it shares its tokens."
    )

    @classmethod
    def from_image(
        cls,
        image: Image.Image,
        target: str,
        token_indices: list[int],
        shared: bool = False,
    ) -> SubjectSpec:
        return cls(
            image=image.tobytes(),
            width=image.width,
            height=image.height,
            target=target,
            token_indices=token_indices,
            shared=shared,
        )

    def to_image(self) -> Image.Image:
        """The reference as a PIL image (a view of the bytes, no decoding)."""
        return Image.frombytes("RGB", (self.width, self.height), self.image)


class WebhookTarget(BaseModel):
    """Where a finished job is announced (service/webhooks), and for which events."""

    url: str
    events: list[str] = Field(description="`job.completed`, `job.failed`, `job.cancelled`: the ones wanted.")


class LoRASpec(BaseModel):
    """One adapter of a job: its name, scale, and its rank (what the job is priced by)."""

    name: str
    scale: float = 1.0
    rank: int = Field(0, ge=0, description="Its rank as the workers reported it (the price counts it).")


class JobSpec(BaseModel):
    """A validated job as it travels through the queue (no torch, JSON-serialisable)."""

    model_config = BYTES_AS_BASE64

    id: str
    prompt: str
    negative_prompt: str | None = None
    subjects: list[SubjectSpec]
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    mask_scope: float
    mask_reused_step: int
    seed: int
    num_images: int
    output_format: OutputFormat
    return_masks: bool
    enqueued_at: float = Field(description="Unix time of acceptance.")
    deadline: float = Field(description="Unix time after which the job is dropped, not computed.")
    owner: str = Field("", description="Hash of the caller's scope; only it may read or cancel the job.")
    request_hash: str = Field("", description="Hash of the canonical request (Idempotency-Key checks).")
    webhook: WebhookTarget | None = None
    priority: Priority = Field(
        "interactive", description="`interactive` rows join first; `batch` jobs fill spare rows."
    )
    tier: str = Field("default", description="The owner's key class (bounded metric label).")
    weight: float = Field(1.0, gt=0, description="The owner's fair-share weight (its tier's).")
    # Fast mode and adapters (a preset sets the sampler and its options).
    scheduler: str = Field("dpm", description="The sampler (realcustom.schedulers).")
    timesteps: list[int] | None = Field(None, description="The sampler's custom timesteps (LCM, TCD).")
    eta: float | None = Field(None, description="TCD's stochasticity.")
    loras: list[LoRASpec] = Field(default_factory=list, description="LoRA adapters of its rows.")
    preset: str | None = Field(None, description="The fast-mode preset the request selected.")

    @property
    def lora_rank(self) -> int:
        return sum(lora.rank for lora in self.loras)

    @property
    def cost(self) -> float:
        """Its work in megapixel-steps (realcustom.cost): what shares, caps and fair order count."""
        return generation_cost(self, len(self.subjects), self.lora_rank)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.deadline

    def meta(self) -> JobMeta:
        return JobMeta.model_validate(self.model_dump(include=set(JobMeta.model_fields)))

    def record(
        self,
        state: JobState,
        worker: str | None = None,
        error: str | None = None,
        result: JobResult | None = None,
    ) -> JobRecord:
        """The one way a record is made from a job."""
        return JobRecord.from_meta(self.id, state, self.meta(), worker=worker, error=error, result=result)


class JobResult(BaseModel):
    """What a worker stores for a finished job: encoded images and masks, and its timings."""

    model_config = BYTES_AS_BASE64

    images: list[bytes]
    masks: list[bytes] | None = None
    queue_wait_seconds: float
    inference_seconds: float
    prepare_seconds: float = Field(0.0, description="Part of the queue wait spent preparing the job to join.")
    finished_at: float = Field(description="Unix time the result was produced.")
    worker: str


class JobMeta(BaseModel):
    """What a job's record keeps of its spec (stored beside its state)."""

    seed: int
    output_format: OutputFormat
    enqueued_at: float
    deadline: float
    owner: str = ""
    request_hash: str = ""

    # In the record's meta so the terminal-state scripts schedule its delivery (redis_scripts.py).
    webhook: WebhookTarget | None = None


class JobRecord(JobMeta):
    """State of one job as the API reports it."""

    id: str
    state: JobState
    worker: str | None = None
    error: str | None = None
    result: JobResult | None = None

    @classmethod
    def from_meta(
        cls,
        job_id: str,
        state: JobState,
        meta: JobMeta,
        worker: str | None = None,
        error: str | None = None,
        result: JobResult | None = None,
    ) -> JobRecord:
        return cls(id=job_id, state=state, worker=worker, error=error, result=result, **meta.model_dump())


# Ids of progress events: "<int>-<int>" (Redis stream ids), ordered as pairs of integers. The API
# checks a client's Last-Event-ID against this before handing it to the queue.
EVENT_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"
# Progress events kept per job (the newest): a client that reconnects resumes from these.
PROGRESS_EVENTS_KEPT = 16


class JobProgress(BaseModel):
    """One progress event of a running job, published by its worker at a step boundary."""

    model_config = BYTES_AS_BASE64

    step: int = Field(ge=0, description="Denoising steps done.")
    steps: int = Field(ge=1, description="Denoising steps of the job.")
    eta_s: float | None = Field(None, description="Estimated seconds until the last step.")
    preview: bytes | None = Field(None, description="Small PNG of the current x0 estimate (watched jobs).")
    masks: list[bytes] | None = Field(
        None, description="One PNG per subject: its current mask (watched jobs)."
    )


class StepSignals(BaseModel):
    """What a worker learns about its running jobs at a step boundary."""

    cancelled: set[str] = Field(
        default_factory=set, description="Running jobs whose cancellation was requested."
    )
    watched: set[str] = Field(default_factory=set, description="Jobs a client watches with previews.")


class TakenJob(BaseModel):
    """A job handed to a worker; `token` identifies the delivery (a stream id for Redis)."""

    spec: JobSpec
    token: str


class QueueFullError(Exception):
    """A limit refuses the job (`code` names which, `reason` says why); retry after `retry_after_s`.

    Codes: `queue_full` (the queue's depth, bytes, or Redis memory), `key_queue_full` (the owner's
    share of them), `key_cost_in_flight` (the owner's unfinished cost), `deadline_unmeetable` (the
    work ahead would keep it past its deadline), `subjects_full`, `key_subjects_full` (the subject
    budget, the owner's share of it)."""

    def __init__(self, reason: str, retry_after_s: int, code: str = "queue_full") -> None:
        super().__init__(f"{reason}; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s
        self.code = code

    @classmethod
    def for_bytes(cls, held: int, size: int, limit: int, retry_after_s: int) -> QueueFullError:
        return cls(
            f"the queue holds {held} bytes of jobs and results; this job's {size} bytes would pass its "
            f"limit of {limit}",
            retry_after_s,
        )


class TierUsage(BaseModel):
    """What the keys of one tier hold in the queue (metrics)."""

    jobs: int = Field(0, description="Unfinished jobs.")
    bytes: int = Field(0, description="Bytes of their payloads, kept results and stored subjects.")


class QueueUsage(BaseModel):
    """The queue's load as the metrics endpoint reports it."""

    tiers: dict[str, TierUsage] = Field(default_factory=dict)
    seconds_per_cost: float | None = Field(
        None, description="Measured busy seconds per unit of cost finished (None until measured)."
    )


class QueueUnavailableError(Exception):
    """The queue backend cannot be reached (e.g. Redis restarting)."""


class JobQueue(Protocol):
    """Both sides of the queue. Every method is safe to call from several tasks and processes."""

    # --- API side ------------------------------------------------------------------------------
    async def submit(self, spec: JobSpec, idempotency_key: str | None = None) -> JobRecord:
        """Accept a job (or return the job already accepted under `idempotency_key`)."""
        ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """Return as soon as the job is finished, or its current record after `timeout_s`."""
        ...

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job at once; for a running job record a cancellation request (its worker
        ends it `cancelled` at the next step boundary, see `step_signals`) and return it running;
        a finished job is returned unchanged."""
        ...

    async def events(self, job_id: str, after: str | None, block_s: float) -> list[tuple[str, JobProgress]]:
        """The job's progress events with ids after `after` (every kept one when None), oldest
        first, waiting up to `block_s` for the first. Only the newest `PROGRESS_EVENTS_KEPT` are kept."""
        ...

    async def position(self, job_id: str) -> int | None:
        """Queued jobs that will be handed to workers before this one, in the fair order as it stands
        (a batch job counts every interactive one); 0 once a worker took it; None when not queued."""
        ...

    async def watch(self, job_id: str, previews: bool, ttl_s: float) -> None:
        """A client watches the job; with `previews` it is in `StepSignals.watched` for `ttl_s`
        (watchers refresh this while they watch)."""
        ...

    async def depth(self) -> int:
        """Accepted jobs not yet finished."""
        ...

    async def held_bytes(self) -> int:
        """Bytes counted against the byte budget: payloads of unfinished jobs, results still kept."""
        ...

    async def usage(self, tiers: list[str]) -> QueueUsage:
        """Jobs and bytes held by the keys of each of `tiers`, and the measured throughput."""
        ...

    async def ready_workers(self) -> int:
        """Workers that reported ready within the last few heartbeats."""
        ...

    async def ping(self) -> bool: ...

    # --- worker side ---------------------------------------------------------------------------
    async def take(self, worker: str, max_jobs: int, block_s: float) -> list[TakenJob]:
        """Up to `max_jobs` jobs (waiting at most `block_s` for the first): jobs reclaimed from
        workers that died first, then in the tenant-fair order (service/queue/fair.py)."""
        ...

    async def start(self, worker: str, job: TakenJob) -> bool:
        """Mark a taken job running; False (and the delivery acknowledged) when it was cancelled
        or already finished, so the worker must skip it."""
        ...

    async def finish(self, job: TakenJob, record: JobRecord) -> None:
        """Store the terminal record (with its TTL), wake waiters, then acknowledge the delivery."""
        ...

    async def step_signals(self, job_ids: list[str]) -> StepSignals:
        """Cancellation requests and preview watchers of running jobs, in one round trip."""
        ...

    async def publish_progress(self, job_id: str, progress: JobProgress) -> None:
        """Append to the job's bounded event log; ignored once the job is no longer running."""
        ...

    async def release(self, job: TakenJob) -> None:
        """Give a taken, unstarted job back to the queue (graceful shutdown)."""
        ...

    async def heartbeat(self, worker: str, ready: bool, in_flight: list[TakenJob]) -> None:
        """Report the worker alive (and ready) and keep its in-flight jobs from being reclaimed."""
        ...

    async def close(self) -> None: ...
