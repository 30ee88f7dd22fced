"""Every Prometheus metric of the service, defined once. Durations are in seconds.

The API process records requests, end-to-end latency and queue depth; workers record queue wait,
inference, batch sizes, busy state and GPU memory (each process serves its own registry; the
all-in-one process serves all of them).
"""

from prometheus_client import Counter, Gauge, Histogram

# Covers tiny CPU jobs (milliseconds) up to large GPU batches (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

REQUESTS = Counter(
    "realcustom_http_requests_total",
    "HTTP requests by route template, method and status code.",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "realcustom_http_request_seconds",
    "HTTP request duration by route template (end to end for /customize).",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
JOBS_ACCEPTED = Counter("realcustom_jobs_accepted_total", "Jobs accepted into the queue.")
REQUESTS_REJECTED = Counter(
    "realcustom_requests_rejected_total",
    "Requests refused with an error reply, by its code (invalid_image, queue_full, ...).",
    ["reason"],
)
# The HTTP edge (service/api/http_protocol.py, service/background.py).
HTTP_CONNECTIONS_CLOSED = Counter(
    "realcustom_http_connections_closed_total",
    "Connections the API's HTTP server closed on its own, by reason: header_timeout, body_timeout, silent "
    "(nothing sent within the header timeout), evicted (past HTTP_MAX_CONNECTIONS), header_too_large, "
    "ambiguous_framing, malformed_request, not_implemented.",
    ["reason"],
)
BACKGROUND_RESTARTS = Counter(
    "realcustom_background_task_restarts_total",
    "Restarts of the API process' background tasks after they ended, by task.",
    ["task"],
)
JOBS_FINISHED = Counter(
    "realcustom_jobs_finished_total", "Jobs finished by workers, by terminal state.", ["state"]
)
QUEUE_DEPTH = Gauge("realcustom_queue_depth", "Accepted jobs not yet finished (read at scrape time).")
QUEUE_BYTES = Gauge(
    "realcustom_queue_bytes",
    "Bytes held against QUEUE_MAX_BYTES: payloads of unfinished jobs and kept results (read at scrape time).",
)
# Key classes (bounded labels): the owner's tier and the job's priority. A tier label is kept for the
# first MAX_TIER_LABELS tiers a process sees (tiers come from settings, a handful); others are "other".
MAX_TIER_LABELS = 16
PRIORITY_LABELS = ("interactive", "batch")
_tiers: set[str] = set()


def key_class(tier: str, priority: str) -> dict[str, str]:
    """The `tier` and `priority` labels of a job, bounded whatever its spec says."""
    if tier not in _tiers and len(_tiers) < MAX_TIER_LABELS and tier.isidentifier() and len(tier) <= 32:
        _tiers.add(tier)
    return {
        "tier": tier if tier in _tiers else "other",
        "priority": priority if priority in PRIORITY_LABELS else "other",
    }


ADMISSION_REFUSALS = Counter(
    "realcustom_admission_refusals_total",
    "Requests refused by a limit of the queue, the subject store or the caller's tier, by the caller's tier "
    "(TIERS), the job's priority (`none` before it is known) and the limit's code (queue_full, "
    "key_queue_full, key_cost_in_flight, deadline_unmeetable, subjects_full, key_subjects_full, "
    "request_too_costly, priority_not_allowed).",
    ["tier", "priority", "reason"],
)
QUEUE_TIER_JOBS = Gauge(
    "realcustom_queue_tier_jobs", "Unfinished jobs of the keys of each tier (read at scrape time).", ["tier"]
)
QUEUE_TIER_BYTES = Gauge(
    "realcustom_queue_tier_bytes",
    "Bytes the keys of each tier hold: job payloads, kept results, stored subjects (read at scrape time).",
    ["tier"],
)
QUEUE_SECONDS_PER_COST = Gauge(
    "realcustom_queue_seconds_per_cost",
    "Measured busy seconds per megapixel-step finished, what deadline admission estimates with (0 until "
    "measured; read at scrape time).",
)
QUEUE_WAIT_SECONDS = Histogram(
    "realcustom_queue_wait_seconds",
    "Acceptance until a worker takes the job, by key class (tier, priority).",
    ["tier", "priority"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "realcustom_inference_seconds",
    "Compute time of one job: its first step until its images are decoded.",
    buckets=LATENCY_BUCKETS,
)
ROWS_IN_FLIGHT = Gauge(
    "realcustom_rows_in_flight",
    "Rows (images) in this worker's running batches, by key class (tier, priority).",
    ["tier", "priority"],
)
JOINS_PER_STEP = Histogram(
    "realcustom_joins_per_step",
    "Jobs that joined a running batch at one step boundary.",
    buckets=(0, 1, 2, 4, 8, 16),
)
STEP_SECONDS = Histogram(
    "realcustom_step_seconds",
    "Wall time of one scheduler step (every running batch once), by rows stepped.",
    ["rows"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STEP_GAP_SECONDS = Histogram(
    "realcustom_step_gap_seconds",
    "Host time between two consecutive steps of a busy worker, beyond loading joining rows (the device "
    "waits this long at a boundary), by whether jobs joined at it.",
    ["joined"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
PREPARE_SECONDS = Histogram(
    "realcustom_prepare_seconds",
    "Preparing one job to join (its references as images, token-cache lookup, text and reference "
    "encoding, projector, image K/V, noise), off the stepping thread.",
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_STEP_SECONDS = Histogram(
    "realcustom_time_to_first_step_seconds",
    "Acceptance until the job's rows join a running batch.",
    buckets=LATENCY_BUCKETS,
)
CANCELLED_RUNNING = Counter(
    "realcustom_cancelled_running_total", "Running jobs whose rows were dropped at a step boundary on cancel."
)
DEAD_LETTERS = Counter(
    "realcustom_queue_dead_letters_total",
    "Queue messages this worker could not read (e.g. another version's format), set aside in the "
    "dead-letter stream; their jobs fail with the reason.",
)
UNREPLICATED_ACCEPTS = Counter(
    "realcustom_queue_unreplicated_accepts_total",
    "Jobs accepted while fewer than REDIS_ACK_REPLICAS replicas acknowledged them within "
    "REDIS_ACK_TIMEOUT_MS (a failover at that moment could lose them).",
)
WORKER_BUSY = Gauge("realcustom_worker_busy", "1 while this worker runs a batch.")
WORKER_STEPS = Counter(
    "realcustom_worker_steps_total",
    "Denoising steps issued by this worker (every backend; the liveness probe's progress signal).",
)
BATCHES_ABANDONED = Counter(
    "realcustom_worker_batches_abandoned_total",
    "Batches still computing at their compute deadline: their jobs were released and the worker exited.",
)
WORKER_READY = Gauge("realcustom_worker_ready", "1 once this worker's model is loaded and warm.")
ENGINE_EVENTS = Counter(
    "realcustom_engine_events_total",
    "Engine counters by event: graph_replays, graph_misses (steps run without a captured CUDA "
    "graph), eager_loops (loops that fell back to the reference), graphs_captured; steps of the "
    "running batches: steps_mask_update, steps_mask_reuse, and the UNet rows their passes computed, "
    "rows_guidance, rows_generation (conditional rows + the unconditional rows of rows with CFG).",
    ["event"],
)
WEBHOOK_DELIVERIES = Counter(
    "realcustom_webhook_deliveries_total",
    "Webhook attempts by outcome: delivered, retried (failed, another attempt is due), failed (the last "
    "attempt failed), expired (the job's record was gone before delivery).",
    ["outcome"],
)
SUBJECT_TOKENS = Counter(
    "realcustom_subject_tokens_total",
    "Reference token lookups of this worker by outcome: device_hit (its LRU), shared_hit (the store "
    "every worker shares), miss (encoded by SigLIP + DINOv2 and the projector).",
    ["outcome"],
)
ENCODER_SECONDS_SAVED = Counter(
    "realcustom_encoder_seconds_saved_total",
    "Encoder + projector seconds the token cache saved this worker (each hit counts what encoding that "
    "reference took when it was computed).",
)
GPU_MEMORY_BYTES = Gauge(
    "realcustom_gpu_memory_bytes", "GPU memory of this worker's device, by kind.", ["kind"]
)


class EngineStatsExporter:
    """Turns the runner's monotonic counter snapshots into increments of ENGINE_EVENTS."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def record(self, snapshot: dict[str, int]) -> None:
        for event, value in snapshot.items():
            delta = value - self._last.get(event, 0)
            if delta > 0:
                ENGINE_EVENTS.labels(event=event).inc(delta)
            self._last[event] = value
