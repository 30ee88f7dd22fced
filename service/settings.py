"""Every setting of the service, read from the environment in one place.

Field names map to upper-case environment variables (``PORT``, ``REDIS_URL``, ...). Nothing reads
the environment at import time: processes call :func:`load_settings` in their entry point.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from realcustom.lora.requests import HUB_ID, is_name
from realcustom.native_size import native_size

PRIORITIES = ("interactive", "batch")
# The key class of keys `API_KEY_TIERS` does not name (and of every caller of an open API).
DEFAULT_TIER = "default"
# Tier names are metric labels and parts of Redis members: short, no separators.
TIER_NAME = r"^[a-z0-9_-]{1,32}$"


class TierPolicy(BaseModel):
    """One key class of `TIERS`: its fair-share weight, the priorities its keys may use, its shares.
    A share left out is the deployment's (`QUEUE_KEY_SHARE`, `SUBJECT_KEY_SHARE`, `KEY_MAX_INFLIGHT_COST`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, gt=0, le=1000, description="Fair-share weight of each key of the tier.")
    priorities: tuple[Literal["interactive", "batch"], ...] = Field(
        PRIORITIES, min_length=1, description="Priorities its keys may ask for; the first is their default."
    )
    queue_share: float | None = Field(None, gt=0, le=1, description="Share of the queue one key may hold.")
    subject_share: float | None = Field(None, gt=0, le=1, description="Share of SUBJECT_MAX_BYTES per key.")
    max_inflight_cost: float | None = Field(None, gt=0, description="Unfinished cost one key may have.")


class Settings(BaseSettings):
    """Configuration shared by the API, the workers and the all-in-one process."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # --- process -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface the HTTP server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the HTTP server.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of every service process."
    )

    # --- model (workers) -----------------------------------------------------------------------
    model: str = Field(
        "tiny",
        description="`tiny` (random tiny weights, CPU friendly) or a local directory with the "
        "official weights layout. `tiny` is used when no weights are configured.",
    )
    backend: Literal["eager", "compiled", "tensorrt"] = Field(
        "eager", description="Execution backend of `engines.runner.load_runner`."
    )
    device: str | None = Field(None, description="Torch device of the worker; unset = cuda when present.")
    buckets: str | None = Field(
        None,
        description="Shapes the compiled/tensorrt backends capture at warm-up, comma-separated "
        "BATCHxHEIGHTxWIDTH (e.g. `1x1024x1024,4x1024x1024`); unset = batch 1 at the model's size.",
    )
    warmup: bool = Field(True, description="Run one warm-up generation before a worker reports ready.")
    tokenizer_path: str | None = Field(
        None, description="Directory of a CLIP tokenizer; unset = the bundled CLIP BPE vocabulary."
    )

    # --- queue ---------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="Redis URL: `redis://host:6379/0` (one server), "
        "`redis+sentinel://host:26379,host:26379/<service>` (Sentinel: follows failovers) or "
        "`redis+cluster://host:6379,host:6379` (Cluster); `rediss...` for TLS (service/queue/connect.py). "
        "Unset = the in-process queue of the all-in-one process; required by `python -m service.api` "
        "and `python -m service.worker`.",
    )
    redis_password: SecretStr | None = Field(
        None,
        description="Password of Redis (AUTH), kept out of `redis_url` so that it can come from a "
        "Secret; a password inside the URL works too.",
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, description="Password of the sentinels of a `redis+sentinel://` URL, when they require one."
    )
    redis_ack_replicas: int = Field(
        0,
        ge=0,
        description="Replicas that must acknowledge an accepted job (Redis `WAIT`) before the API answers; "
        "0 = none (a failover can lose jobs accepted in the last replication lag). A job not acknowledged "
        "within `redis_ack_timeout_ms` is still accepted, logged and counted "
        "(realcustom_queue_unreplicated_accepts_total). Not with redis+cluster://.",
    )
    redis_ack_timeout_ms: int = Field(
        100, ge=1, description="Longest wait for `redis_ack_replicas` acknowledgements of one accepted job."
    )
    queue_name: str = Field(
        "realcustom",
        pattern=r"^[^{}]+$",
        description="Prefix of every Redis key, so that several deployments share a Redis. The keys are "
        "`{<queue_name>}:...`, one Redis Cluster slot per queue (no braces in the name).",
    )
    queue_max_depth: int = Field(
        64, ge=1, description="Accepted jobs not yet finished; beyond it requests get 429 + Retry-After."
    )
    queue_max_bytes: int = Field(
        256 * 2**20,
        ge=2**20,
        description="Bytes of job data the queue may hold (in Redis, or in the all-in-one process): the "
        "payloads (spec and reference images) of unfinished jobs plus the results of finished ones until "
        "`result_ttl_s`; past it requests get 429 + Retry-After. Checked at start-up against Redis' "
        "`maxmemory` (docs/DEPLOYMENT.md).",
    )
    queue_full_retry_after_s: int = Field(2, ge=1, description="Retry-After of a 429 for a full queue.")
    job_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Deadline of a job from its acceptance. Past it the synchronous request gets 504 "
        "and workers drop the job without computing it.",
    )
    result_ttl_s: int = Field(600, ge=1, description="How long finished jobs and their results are kept.")
    subject_ttl_s: int = Field(
        86400,
        ge=1,
        description="How long a subject of `POST /subjects` (its image, and its projected tokens once a "
        "worker computed them) is kept after its last upload; counted against `queue_max_bytes` meanwhile.",
    )
    subject_max_bytes: int | None = Field(
        None,
        ge=0,
        description="Part of `queue_max_bytes` subjects and their shared tokens may hold, so that stored "
        "subjects never leave jobs without room; past it `POST /subjects` gets 429 and tokens are not "
        "shared. Unset = half of `queue_max_bytes`.",
    )
    subject_cache_size: int = Field(
        32, ge=0, description="Projected reference tokens each worker keeps on its device (LRU entries)."
    )
    model_version: str | None = Field(
        None,
        description="Version of the reference encoders and projector the workers load, part of every "
        "subject id and token-cache key: change it with the weights so no stale tokens are served. "
        "Unset = `model`.",
    )
    reclaim_idle_s: float = Field(
        60.0,
        gt=0,
        description="A job held this long by a worker that stopped heart-beating is taken over by "
        "another worker (XAUTOCLAIM). Live workers refresh their jobs every `heartbeat_s`, so this "
        "only has to exceed the heartbeat, and is kept longer than the slowest job for safety.",
    )
    heartbeat_s: float = Field(
        2.0, gt=0, description="Period of worker presence updates and in-flight job refreshes."
    )

    # --- worker --------------------------------------------------------------------------------
    worker_id: str = Field("", description="Name of this worker in the consumer group; unset = host-pid.")
    max_batch: int = Field(
        4,
        ge=1,
        description="Most rows (images) one running batch of a worker holds; jobs join and leave it at "
        "step boundaries, and a worker holds up to twice this many jobs (running + prepared).",
    )
    compute_deadline_s: float = Field(
        120.0,
        gt=0,
        description="Fixed part of a step's compute deadline. A scheduler step still computing after "
        "`COMPUTE_DEADLINE_S + COMPUTE_S_PER_IMAGE_STEP x rows it steps` (a job run alone: x its steps x "
        "images) is abandoned: the running jobs go back to the queue for another worker and this worker "
        "exits (code 3) to be restarted.",
    )
    compute_s_per_image_step: float = Field(
        0.5,
        ge=0,
        description="Per denoising step of one image, the compute deadline's allowance (set it to a few "
        "times the measured step time of the slowest bucket).",
    )
    worker_stall_s: float = Field(
        60.0,
        gt=0,
        description="Liveness: a worker's `/healthz` (on its metrics port) answers 503 when it made no "
        "progress for this long (an idle loop that stopped ticking, or a batch between two steps; with "
        "compiled/TensorRT backends a batch may take its compute deadline plus this).",
    )
    worker_metrics_host: str = Field(
        "127.0.0.1",
        description="Interface of a worker's Prometheus endpoint; `0.0.0.0` (or the pod IP) where "
        "Prometheus scrapes it from another host.",
    )
    worker_metrics_port: int = Field(
        9101,
        ge=0,
        le=65535,
        description="Port of a worker's Prometheus endpoint; 0 = a free port (logged). A port already "
        "taken (another worker on the host) falls back to a free port, with a warning.",
    )

    # --- worker: fair step planning (engines/planner.py) ----------------------------------------
    scheduler_max_wait_steps: int = Field(
        64,
        ge=0,
        description="Starvation bound of a worker's step planner: the first prepared job of a key's queue "
        "(per priority) passed over for this many step boundaries (by fair order across keys, or by "
        "priority) then goes first, and its family takes no other job until it has joined. Ages count from "
        "becoming the key's first job, so one key's backlog never turns the worker back to arrival order.",
    )

    # --- edge: security and limits -------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer tokens accepted by the API; none = the API is open. Jobs "
        "belong to the key that created them; with keys set, `/metrics` needs a key too.",
    )
    require_api_keys: bool = Field(
        False, description="Refuse to start without `API_KEYS` (set in deployments that must not run open)."
    )
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Requests per minute per API key (or client address when open); 0 = off."
    )
    max_body_bytes: int = Field(40 * 2**20, ge=1024, description="Largest request body accepted.")
    max_image_bytes: int = Field(12 * 2**20, ge=1024, description="Largest encoded reference image.")
    max_image_pixels: int = Field(
        25_000_000,
        ge=1,
        description="Largest reference image (width x height), read from its header before decoding.",
    )
    min_image_side: int = Field(16, ge=1, description="Smallest width or height of a reference image.")
    max_subjects: int = Field(4, ge=1, description="Most reference subjects in one request.")
    min_side: int = Field(64, ge=32, description="Smallest output width/height (a multiple of 32).")
    max_side: int = Field(2048, ge=32, description="Largest output width/height (a multiple of 32).")
    max_steps: int = Field(100, ge=1, description="Most denoising steps per request.")
    max_num_images: int = Field(4, ge=1, description="Most images per request.")
    intake_concurrency: int = Field(
        4,
        ge=1,
        description="Generation requests whose body is read and validated at once; others wait (bounds "
        "the API's memory: JSON bodies are held in memory while parsed).",
    )
    intake_concurrency_per_key: int = Field(
        2,
        ge=1,
        description="Of `intake_concurrency`, the most one API key (or client address when open) holds; "
        "its other requests wait behind its own, and waiting keys are served round robin.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest time a client may take to send a request body: 408 and the connection closed. "
        "Counted by the HTTP server while it reads the body (not while a request waits for an intake slot "
        "with its body unread), and by the intake from the moment it has a slot.",
    )
    http_limit_concurrency: int = Field(
        1000,
        ge=1,
        description="Requests in progress the HTTP server serves at once; beyond it 503 `server_busy` "
        "(+ Retry-After, connection closed). Idle connections and connections still sending their headers "
        "do not count (see `http_max_connections`).",
    )
    http_keep_alive_s: int = Field(5, ge=1, description="Idle keep-alive connections are closed after this.")
    http_max_header_bytes: int = Field(
        16384,
        ge=1024,
        description="Largest request line + headers, complete or not; past it 431 and the connection closed.",
    )
    # --- edge: HTTP server (service/api/http_protocol.py, service/api/health.py) -----------------
    health_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the health listener: `/healthz` and `/readyz` on a listener of their own (on "
        "`host`) that no flood of client connections on `port` can starve; point the probes at it. 0 = a "
        "free port (logged); a taken port falls back to a free one, with a warning.",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest time a client may take to send a request line and headers, from its connection "
        "(or from the first byte after a keep-alive reply): 408 and the connection closed (a connection that "
        "sent nothing is just closed).",
    )
    http_max_connections: int = Field(
        2000,
        ge=1,
        description="Open connections on `port`; a new one past it closes the oldest connection that has no "
        "request in progress (idle, or still sending its headers), or itself when every one has one.",
    )

    cancel_wait_s: float = Field(
        2.5,
        ge=0,
        description="How long `DELETE /jobs/{id}` of a running job waits for its worker to stop it at the "
        "next step before answering 202.",
    )
    events_max_duration_s: float = Field(
        600.0,
        gt=0,
        description="Longest time one `GET /jobs/{id}/events` stream stays open; clients reconnect with "
        "Last-Event-ID (EventSource does so by itself).",
    )
    events_max_streams: int = Field(
        200, ge=1, description="Event streams one API process serves at once; beyond it 429."
    )
    events_max_streams_per_caller: int = Field(
        8,
        ge=1,
        description="Event streams one API key (or client address when open) holds at once; beyond it 429.",
    )

    # --- reference decoding (realcustom/decoding.py, service/decoders.py) ------------------------
    decode_concurrency: int = Field(
        2,
        ge=1,
        description="Decoder processes of the API: reference images decoded at once (each process takes "
        "at most `decode_max_bytes` while decoding).",
    )
    decode_concurrency_per_key: int = Field(
        1,
        ge=1,
        description="Of `decode_concurrency`, the most one API key (or client address) decodes at once; "
        "its other images wait behind its own, and waiting keys are served round robin.",
    )
    decode_max_bytes: int = Field(
        160 * 2**20,
        ge=16 * 2**20,
        description="Memory one reference decode may take, computed from the image's header before "
        "decoding (per format: service/README.md); past it 422 `image_too_complex`. Also sets the decoder "
        "process's address-space limit.",
    )
    decode_cpu_s: float = Field(
        5.0,
        gt=0,
        description="CPU seconds one decode may take in its decoder process (RLIMIT_CPU, whole seconds); "
        "past it the process is killed (and restarted) and the request gets 422 `image_too_complex`.",
    )
    jpeg_max_scans: int = Field(
        64,
        ge=1,
        description="Most scans (SOS segments) of a JPEG; each is a pass over every coefficient block. "
        "libjpeg's progressive encoding writes 6 (grey), 10 (colour) or 18 (CMYK).",
    )
    image_max_chunks: int = Field(
        8192,
        ge=16,
        description="Most structural units of an image (PNG chunks, JPEG marker segments, WebP RIFF "
        "chunks), walked before decoding.",
    )
    image_max_metadata_chunks: int = Field(
        256,
        ge=0,
        description="Most metadata units of an image: PNG ancillary chunks (the animation's aside), "
        "JPEG APPn and COM segments, WebP ICCP/EXIF/XMP and unknown chunks.",
    )
    image_max_metadata_bytes: int = Field(
        4 * 2**20, ge=0, description="Most bytes those metadata units may hold together."
    )
    image_max_frames: int = Field(
        1000,
        ge=1,
        description="Most frames of an animated PNG, animated WebP or multi-picture JPEG (only the first "
        "is decoded; the others are still parsed).",
    )

    # --- webhooks (service/webhooks) -----------------------------------------------------------
    webhook_secret: SecretStr | None = Field(
        None,
        description="Server secret each API key's webhook signing secret is derived from (GET "
        "/webhooks/secret); at least 32 characters. Unset = `webhook_url` is refused (422). Changing it "
        "changes every key's signing secret.",
    )
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated host names or IP addresses webhooks may reach although they resolve "
        "to private, loopback or link-local addresses, and over plain http (e.g. an in-cluster receiver; "
        "tests use 127.0.0.1). Every other URL must be https to a public address.",
    )
    webhook_max_attempts: int = Field(8, ge=1, le=30, description="Delivery attempts of one webhook.")
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="Delay before the first retry; doubled per attempt (with jitter)."
    )
    webhook_backoff_max_s: float = Field(120.0, gt=0, description="Longest delay between two attempts.")
    webhook_connect_timeout_s: float = Field(5.0, gt=0, description="Connect (and TLS) timeout.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="Longest wait for the receiver's reply.")
    webhook_concurrency: int = Field(8, ge=1, description="Webhooks one API process sends at once.")
    webhook_concurrency_per_key: int = Field(
        2,
        ge=1,
        description="Webhooks of one API key in flight at once across every API process: a key whose "
        "receiver never answers holds at most this many delivery slots, and its other due deliveries "
        "wait for them while other keys' are claimed in due order.",
    )
    webhook_poll_s: float = Field(
        1.0, gt=0, description="How often the delivery loop looks for due webhooks."
    )
    webhook_ca_file: str | None = Field(
        None,
        description="PEM file of CA certificates trusted for https receivers besides the public CAs "
        "(e.g. an internal CA of in-cluster receivers).",
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[^/]+$",
        description="Scheme and host of the API as clients reach it (e.g. `https://api.example.com`): the "
        "result URLs of webhooks are absolute under it; unset = paths (`/jobs/<id>`).",
    )

    # --- tenants: key classes, shares, priorities (service/README.md, "Tenants") -------------------
    tiers: dict[str, TierPolicy] = Field(
        default_factory=dict,
        description="Key classes as JSON, name -> {weight, priorities, queue_share, subject_share, "
        'max_inflight_cost} (each optional), e.g. `{"free": {"priorities": ["batch"], '
        '"queue_share": 0.1}, "pro": {"weight": 4}}`. The tier `default` (keys `API_KEY_TIERS` does '
        "not name, every caller of an open API) has weight 1, both priorities and the deployment's shares "
        "unless listed here.",
    )
    api_key_tiers: dict[str, str] = Field(
        default_factory=dict,
        description="JSON object API key -> tier name (a key of `API_KEYS`, a tier of `TIERS`); keys not "
        "named are in the tier `default`.",
    )
    queue_key_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of `QUEUE_MAX_DEPTH` jobs and of `QUEUE_MAX_BYTES` one API key may hold (its "
        "unfinished jobs, their payloads and its kept results); past it that key gets 429 `key_queue_full` "
        "while other keys still find room.",
    )
    subject_key_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of `SUBJECT_MAX_BYTES` the stored subjects of one API key may hold; past it "
        "`POST /subjects` of that key gets 429 `key_subjects_full`.",
    )
    batch_max_wait_s: float = Field(
        30.0,
        gt=0,
        description="Starvation bound of `batch` jobs: they are taken only when no `interactive` job waits, "
        "except that while batch jobs wait, one is taken at least every this many seconds.",
    )

    # --- cost caps and admission (cost = megapixels x steps x images, realcustom/cost.py) -----------
    max_request_cost: float | None = Field(
        None,
        gt=0,
        description="Largest cost (megapixel-steps, realcustom/cost.py) of one request; past it 422 "
        "`request_too_costly`. Unset = `COMPUTE_DEADLINE_S / COMPUTE_S_PER_IMAGE_STEP` image-steps at the "
        'model\'s native size (service/README.md, "Cost caps").',
    )
    key_max_inflight_cost: float | None = Field(
        None,
        gt=0,
        description="Cost one API key may have unfinished (queued and running) at once; past it 429 "
        "`key_cost_in_flight`. Unset = 8 x the request cost cap.",
    )
    deadline_admission: bool = Field(
        True,
        description="Refuse (429 `deadline_unmeetable`) a job that the work queued ahead of it, at the "
        "throughput the queue measured, would keep from finishing before its deadline (`JOB_TIMEOUT_S`).",
    )

    # --- LoRA adapters and fast mode (service/README.md, "Adapters and fast mode") ---------------
    lora_slots: int = Field(
        0,
        ge=0,
        le=64,
        description="Adapters a worker holds loaded at once: the slots of the adapter bank it installs on "
        "its UNet before capture. 0 = no per-row LoRA (no bank: requests naming adapters get 422). Every row "
        "of a worker with a bank pays for `LORA_MAX_RANK` x `LORA_MAX_PER_REQUEST` ranks on the targeted "
        "layers.",
    )
    lora_dir: str | None = Field(
        None,
        description="Directory of adapter files on the workers: the adapter named `x` is "
        "`<dir>/x.safetensors` or the one safetensors file of `<dir>/x/` (safetensors only).",
    )
    lora_adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Adapters every worker loads at start-up, comma-separated `name=source` or `source` "
        "(the name is then the source): a name in `LORA_DIR`, or a hub id `owner/repo[/file.safetensors]` "
        "(one listed here is allowed). A worker that cannot load one of these does not start.",
    )
    lora_hub_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated hub ids the admin route may load besides names in `LORA_DIR` (and the "
        "hub ids of `LORA_ADAPTERS`); never arbitrary URLs.",
    )
    lora_max_rank: int = Field(
        64, ge=1, le=1024, description="Largest adapter rank served (smaller ranks are zero-padded to it)."
    )
    lora_max_per_request: int = Field(
        4, ge=1, le=16, description="Most adapters one request names (`loras`); each row carries this many."
    )
    lora_targets: Literal["attention", "transformer", "all"] = Field(
        "transformer",
        description="Layers adapters may change: `attention` (attention projections), `transformer` (+ "
        "feed-forward and projections in/out: most style and distilled adapters) or `all` (every Linear and "
        "Conv2d: LoCon); an adapter touching other layers is refused when loaded.",
    )
    lora_load_wait_s: float = Field(
        30.0,
        gt=0,
        description="How long `POST /v1/loras` waits for the workers to report the adapter loaded before "
        "answering 202 (loading).",
    )
    graph_schedulers: Annotated[list[Literal["dpm", "ddim", "euler", "lcm", "tcd"]], NoDecode] = Field(
        default_factory=lambda: ["dpm"],
        description="Samplers whose steps the compiled/tensorrt backends capture at warm-up, comma-separated "
        "(a family of graphs each, for every bucket): add the fast-mode presets' (`euler,lcm,tcd,ddim`) so "
        "their jobs share running batches; a job of another sampler runs alone. The eager backend makes "
        "families on demand.",
    )
    graph_uncond_prefixes: bool = Field(
        False,
        description="The compiled backend also captures steps whose generation pass runs the unconditional "
        "half on the first 0, 1, 2, 4 ... rows, so CFG-free rows (guidance <= 1) run passes of B rows "
        "instead of 2B (4x the graphs of a 4-row bucket). Eager families always have them; TensorRT "
        "engines cannot (refused).",
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer tokens of the operators who may load and unload adapters at run "
        "time (`POST /v1/loras`, `DELETE /v1/loras/{name}`); none = those routes answer 403. Separate from "
        "`API_KEYS`: a client key never loads adapters.",
    )

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _check_webhook_secret(cls, value: object) -> object:
        if value is None or value == "":  # an empty variable (compose's `${WEBHOOK_SECRET:-}`) is unset
            return None
        secret = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        if len(secret) < 32:
            raise ValueError("WEBHOOK_SECRET must be at least 32 characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value:
            # Imported here: service.queue imports this module.
            from service.queue.connect import check_redis_url

            check_redis_url(value)
        return value

    @field_validator(
        "api_keys",
        "webhook_allow_hosts",
        "lora_adapters",
        "lora_hub_ids",
        "admin_api_keys",
        "graph_schedulers",
        mode="before",
    )
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _check_health_port(self) -> Settings:
        if self.health_port and self.health_port == self.port:
            raise ValueError("HEALTH_PORT must differ from PORT (or be 0: a free port)")
        return self

    @model_validator(mode="after")
    def _check_sides(self) -> Settings:
        if self.min_side % 32 or self.max_side % 32 or self.min_side > self.max_side:
            raise ValueError("min_side and max_side must be multiples of 32 with min_side <= max_side")
        return self

    @model_validator(mode="after")
    def _check_adapters(self) -> Settings:
        for hub_id in self.lora_hub_ids:
            if not HUB_ID.match(hub_id):
                raise ValueError(f"LORA_HUB_IDS: {hub_id!r} is not a hub id (owner/repo[/file.safetensors])")
        names = [name for name, _ in self.lora_startup]
        if len(set(names)) != len(names):
            raise ValueError("LORA_ADAPTERS names an adapter twice")
        if len(names) > self.lora_slots:
            raise ValueError(f"LORA_ADAPTERS lists {len(names)} adapters but LORA_SLOTS is {self.lora_slots}")
        if self.graph_uncond_prefixes and self.backend == "tensorrt":
            raise ValueError("GRAPH_UNCOND_PREFIXES: TensorRT engines run both halves of the generation pass")
        return self

    @property
    def lora_startup(self) -> list[tuple[str, str]]:
        """(name, source) of every `LORA_ADAPTERS` entry, each checked: a name and a name or hub id."""
        entries = []
        for entry in self.lora_adapters:
            name, _, source = entry.rpartition("=")
            name = name or source
            if not is_name(name) or not (is_name(source) or HUB_ID.match(source)):
                raise ValueError(
                    f"LORA_ADAPTERS: {entry!r} must be `name=source` or `source`, the source a name in "
                    "LORA_DIR or a hub id (owner/repo[/file.safetensors]), the name 1-100 letters, digits, "
                    "'.', '_' or '-'"
                )
            entries.append((name, source))
        return entries

    @property
    def lora_allowed_hub_ids(self) -> set[str]:
        """Hub ids adapters may be loaded from: `LORA_HUB_IDS` and those of `LORA_ADAPTERS`."""
        return set(self.lora_hub_ids) | {source for _, source in self.lora_startup if not is_name(source)}

    @model_validator(mode="after")
    def _check_tiers(self) -> Settings:
        for name in self.tiers:
            if not re.match(TIER_NAME, name):
                raise ValueError(f"TIERS: tier name {name!r} must match {TIER_NAME} (it is a metric label)")
        for key, tier in self.api_key_tiers.items():
            if tier != DEFAULT_TIER and tier not in self.tiers:
                raise ValueError(f"API_KEY_TIERS names tier {tier!r}, which TIERS does not define")
            if key not in self.api_keys:
                raise ValueError("API_KEY_TIERS names a key that is not in API_KEYS (keys must be accepted)")
        for name in (DEFAULT_TIER, *self.tiers):
            if self.key_cost_cap(name) < self.request_cost_cap:
                raise ValueError(
                    f"tier {name!r}: its in-flight cost cap {self.key_cost_cap(name):g} is below the request "
                    f"cost cap {self.request_cost_cap:g}, so its largest requests could never run"
                )
        return self

    @property
    def worker_name(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def subject_budget(self) -> int:
        """`subject_max_bytes`, or its default."""
        return self.queue_max_bytes // 2 if self.subject_max_bytes is None else self.subject_max_bytes

    @property
    def request_cost_cap(self) -> float:
        """`max_request_cost`, or its default: the image-steps at native size that the compute
        deadline's fixed part covers at its per-image-step allowance (service/README.md)."""
        if self.max_request_cost is not None:
            return self.max_request_cost
        if self.compute_s_per_image_step == 0:
            return float("inf")
        native_megapixels = native_size(self.model) ** 2 / 1e6
        return self.compute_deadline_s / self.compute_s_per_image_step * native_megapixels

    def tier_policy(self, tier: str) -> TierPolicy:
        """The policy of `tier` with every share resolved (an unknown tier is `default`'s)."""
        policy = self.tiers.get(tier) or self.tiers.get(DEFAULT_TIER) or TierPolicy()
        return policy.model_copy(
            update={
                "queue_share": policy.queue_share or self.queue_key_share,
                "subject_share": policy.subject_share or self.subject_key_share,
                "max_inflight_cost": self.key_cost_cap(tier),
            }
        )

    def key_cost_cap(self, tier: str) -> float:
        policy = self.tiers.get(tier) or self.tiers.get(DEFAULT_TIER) or TierPolicy()
        if policy.max_inflight_cost is not None:
            return policy.max_inflight_cost
        if self.key_max_inflight_cost is not None:
            return self.key_max_inflight_cost
        return 8 * self.request_cost_cap

    def tier_of_key(self, key: str) -> str:
        return self.api_key_tiers.get(key, DEFAULT_TIER)

    @property
    def tier_names(self) -> list[str]:
        """Every configured key class (the bounded values of the `tier` metric label)."""
        return list(dict.fromkeys([DEFAULT_TIER, *self.tiers]))

    @property
    def reference_version(self) -> str:
        """What subject ids and token-cache keys depend on besides the image (`model_version`)."""
        return self.model_version or self.model


def load_settings() -> Settings:
    """Read the settings from the environment (called once per process, in its entry point)."""
    return Settings()
