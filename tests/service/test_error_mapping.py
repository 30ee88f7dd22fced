"""Every exception type a route can raise maps to its documented reply, and a refusal leaves the
keep-alive connection usable wherever HTTP allows.

The walk: every exception class defined in the code the API process imports (service/ and
realcustom/, found by importing `service.api.app`, not by a list), plus the types the app has
handlers for and those the edge converts, must each have an entry below: triggers (real requests
to a real `python -m service.api` on a private Redis, over one raw keep-alive connection) with
the status and code expected, or the reason it never reaches a route. A new exception type fails
this test until it is mapped and documented. Each expected (status, code) must be a row of the
errors table of service/README.md, and so must every literal (status, code) the service's code
can reply with.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from raw_http import closed_by_server, connect, get, read_reply
from service_processes import REPO_ROOT, Api, free_port, wait_until
from test_queue_contract import done_record

from service.queue import create_queue
from service.settings import Settings

pytestmark = pytest.mark.integration

KEY, OTHER_KEY = "walk-key-a", "walk-key-b"  # OTHER_KEY spends its rate limit
ADMIN_KEY = "walk-admin-key"  # ADMIN_API_KEYS: loads and unloads adapters
BODY_TIMEOUT_S = 2
QUEUE_MAX_DEPTH = 8
RATE_PER_MINUTE = 120
WEBHOOK_SECRET = "walk-webhook-secret-" + "w" * 32


# --- requests ------------------------------------------------------------------------------------
def png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def chatty_png_b64() -> str:
    """A small PNG with 300 text chunks (the default IMAGE_MAX_METADATA_CHUNKS is 256)."""
    info = PngInfo()
    for index in range(300):
        info.add_text(f"k{index}", "v")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 200, 30)).save(buffer, "PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


PNG = png_b64()
BODY = {
    "prompt": "a cat in the snow",
    "subjects": [{"image": PNG, "target": "cat"}],
    "num_inference_steps": 2,
}


def request(
    method: str,
    path: str,
    body: bytes | dict | None = None,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> bytes:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if data is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (data or b"")


def multipart(path: str, files: int) -> bytes:
    parts = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="%d.png"\r\n'
        b"Content-Type: image/png\r\n\r\n%s\r\n" % (index, base64.b64decode(PNG))
        for index in range(files)
    )
    return request("POST", path, parts + b"--b--\r\n", content_type="multipart/form-data; boundary=b")


@dataclass
class Trigger:
    """A request that makes a route raise the type, and the reply it must get."""

    what: str
    request: bytes | Callable[[Stack], bytes]
    status: int
    code: str | None  # None: no reply reaches the client
    keeps_connection: bool = True  # False where HTTP requires closing (framing, timeouts)
    api: str = "api"  # which process: "api" (Redis up) or "no_redis"


@dataclass
class Stack:
    api: Api
    no_redis: Api
    redis_url: str
    queue_name: str
    job_ids: dict[str, str] = field(default_factory=dict)


def submit(stack: Stack, name: str, body: dict, idempotency_key: str | None = None) -> str:
    """A job accepted for the triggers that need one."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    with connect(stack.api.port) as sock:
        sock.sendall(request("POST", "/jobs", body, headers=headers))
        reply = read_reply(sock)
    assert reply.status == 202, reply
    stack.job_ids[name] = json.loads(reply.body)["id"]
    return stack.job_ids[name]


def corrupt_job(stack: Stack) -> bytes:
    """A job record a foreign version wrote (meta not JSON): reading it fails inside."""
    if "corrupt" not in stack.job_ids:
        job_id = submit(stack, "corrupt", {**BODY, "seed": 11})
        store = redis.Redis.from_url(stack.redis_url)
        [key] = store.scan_iter(match=f"*{stack.queue_name}*:job:{job_id}")
        store.hset(key, "meta", "{not json")
        store.close()
    return request("GET", f"/jobs/{stack.job_ids['corrupt']}")


def finished_job(stack: Stack) -> str:
    """A job finished through the queue's worker side (no worker process runs here)."""
    if "finished" in stack.job_ids:
        return stack.job_ids["finished"]
    job_id = submit(stack, "finished", {**BODY, "seed": 12})

    async def finish() -> None:
        queue = create_queue(Settings(redis_url=stack.redis_url, queue_name=stack.queue_name))
        try:
            for taken in await queue.take("walk-worker", 50, block_s=1):
                if taken.spec.id == job_id:
                    assert await queue.start("walk-worker", taken)
                    await queue.finish(taken, done_record(taken.spec, "walk-worker"))
                else:
                    await queue.release(taken)
        finally:
            await queue.close()

    asyncio.run(finish())
    return job_id


def queued_job(stack: Stack) -> str:
    return stack.job_ids.get("queued") or submit(stack, "queued", {**BODY, "seed": 17})


def lora_registered_twice(stack: Stack) -> bytes:
    """An adapter registered (no worker runs here: accepted as loading, 202), then the same name
    from another source."""
    with connect(stack.api.port) as sock:
        sock.sendall(request("POST", "/v1/loras", {"name": "twice"}, key=ADMIN_KEY))
        assert read_reply(sock).status == 202
    return request("POST", "/v1/loras", {"name": "twice", "source": "other"}, key=ADMIN_KEY)


def reused_key(stack: Stack) -> bytes:
    submit(stack, "idempotent", {**BODY, "seed": 13}, idempotency_key="walk-reused")
    return request("POST", "/jobs", {**BODY, "seed": 14}, headers={"Idempotency-Key": "walk-reused"})


def full_queue(stack: Stack) -> bytes:
    """Jobs queued (no worker runs) until the queue is at QUEUE_MAX_DEPTH: one more is refused."""
    with connect(stack.api.port) as sock:
        for index in range(QUEUE_MAX_DEPTH + 1):
            sock.sendall(request("POST", "/jobs", {**BODY, "seed": 100 + index}))
            if read_reply(sock).status == 429:
                return request("POST", "/jobs", BODY)
    raise AssertionError(f"{QUEUE_MAX_DEPTH + 1} jobs accepted")


def rate_limited(stack: Stack) -> bytes:
    """OTHER_KEY spends its bucket (on 404s) first; it refills one request every 0.5 s."""
    with connect(stack.api.port) as sock:
        for _ in range(2 * RATE_PER_MINUTE):
            sock.sendall(request("GET", "/subjects/none", key=OTHER_KEY))
            if read_reply(sock).status == 429:
                return request("GET", "/subjects/none", key=OTHER_KEY)
    raise AssertionError("never rate limited")


def second_stream(stack: Stack) -> bytes:
    """EVENTS_MAX_STREAMS_PER_CALLER=1: a stream held open on another connection first."""
    job_id = stack.job_ids.get("filler-0") or submit(stack, "streamed", {**BODY, "seed": 15})
    holder = connect(stack.api.port)
    holder.sendall(request("GET", f"/jobs/{job_id}/events"))
    holder.recv(1024)  # its first event: the stream is open
    stack.job_ids["holder"] = holder  # closed by the fixture
    return request("GET", f"/jobs/{job_id}/events")


def chunked(size: int) -> bytes:
    head = f"POST /jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(size // len(chunk) + 1))
    return head.encode() + body + b"0\r\n\r\n"


def slow_body() -> bytes:
    return request("POST", "/jobs", b"x" * 100)[:-90]  # 10 of 100 bytes, then nothing


TRIGGERS: dict[str, list[Trigger]] = {
    "service.errors.ApiError": [
        Trigger("no API key", request("GET", "/jobs/x", key=None), 401, "unauthorized"),
        Trigger("someone else's or no job", request("GET", f"/jobs/{uuid.uuid4().hex}"), 404, "not_found"),
        Trigger(
            "Accept nobody serves",
            request("POST", "/customize", BODY, headers={"Accept": "text/csv"}),
            406,
            "not_acceptable",
        ),
        Trigger("a body that stops", slow_body(), 408, "body_timeout", keeps_connection=False),
        Trigger(
            "a finished job cancelled",
            lambda st: request("DELETE", f"/jobs/{finished_job(st)}"),
            409,
            "not_cancellable",
        ),
        Trigger(
            "the images of a queued job",
            lambda st: request("GET", f"/jobs/{queued_job(st)}/images/0"),
            409,
            "not_done",
        ),
        Trigger(
            "an image index past the last",
            lambda st: request("GET", f"/jobs/{finished_job(st)}/images/9"),
            404,
            "not_found",
        ),
        Trigger(
            "no such stored subject",
            request("POST", "/jobs", {**BODY, "subjects": [{"subject_id": "s" * 32, "target": "cat"}]}),
            404,
            "subject_not_found",
        ),
        Trigger(
            "a body declared too large", request("POST", "/jobs", b"x" * 1_100_000), 413, "body_too_large"
        ),
        Trigger(
            "an image too large",
            request("POST", "/jobs", {**BODY, "subjects": [{"image": "A" * 140_000, "target": "cat"}]}),
            413,
            "image_too_large",
        ),
        Trigger(
            "too many JSON values",
            request("POST", "/jobs", b"[" + b"0," * 6000 + b"0]"),
            413,
            "body_too_complex",
        ),
        Trigger("not JSON", request("POST", "/jobs", b"{not json"), 400, "invalid_json"),
        Trigger(
            "a text body",
            request("POST", "/jobs", b"hello", content_type="text/plain"),
            415,
            "unsupported_media_type",
        ),
        Trigger(
            "an unknown field", request("POST", "/jobs", {**BODY, "colour": "red"}), 422, "invalid_request"
        ),
        Trigger("an Idempotency-Key reused", reused_key, 422, "idempotency_key_reused"),
        Trigger("a second event stream", second_stream, 429, "too_many_streams"),
        Trigger("webhooks off", request("GET", "/webhooks/secret"), 404, "webhooks_disabled", api="no_redis"),
        Trigger(
            "webhook URL without webhooks",
            request("POST", "/jobs", {**BODY, "webhook_url": "https://8.8.8.8/"}),
            422,
            "webhooks_disabled",
            api="no_redis",
        ),
        Trigger(
            "a synchronous job past its deadline",
            request("POST", "/customize", {**BODY, "seed": 16}),
            504,
            "deadline_exceeded",
        ),
        Trigger("past RATE_LIMIT_PER_MINUTE", rate_limited, 429, "rate_limited"),
        Trigger(
            "an adapter nobody serves",
            request("POST", "/jobs", {**BODY, "loras": [{"name": "nope"}]}),
            422,
            "unknown_lora",
        ),
        Trigger(
            "more adapters than LORA_MAX_PER_REQUEST",
            request("POST", "/jobs", {**BODY, "loras": [{"name": f"a{i}"} for i in range(5)]}),
            422,
            "too_many_loras",
        ),
        Trigger(
            "an adapter scale past 4",
            request("POST", "/jobs", {**BODY, "loras": [{"name": "a", "scale": 40}]}),
            422,
            "invalid_lora",
        ),
        Trigger(
            "an unknown preset",
            request("POST", "/jobs", {**BODY, "preset": "sd-turbo"}),
            422,
            "unknown_preset",
        ),
        Trigger(
            "an adapter load with a client key",
            request("POST", "/v1/loras", {"name": "style"}),
            403,
            "admin_forbidden",
        ),
        Trigger(
            "unloading an adapter not served",
            request("DELETE", "/v1/loras/nope", key=ADMIN_KEY),
            404,
            "lora_not_found",
        ),
        Trigger(
            "an adapter registered under another source",
            lambda st: lora_registered_twice(st),
            409,
            "lora_exists",
        ),
    ],
    "realcustom.lora.requests.SourceNotAllowed": [
        Trigger(
            "an adapter from a URL",
            request(
                "POST", "/v1/loras", {"name": "web", "source": "https://x.test/a.safetensors"}, key=ADMIN_KEY
            ),
            422,
            "lora_source_not_allowed",
        ),
    ],
    "builtins.Exception": [
        Trigger("a bug (a corrupt record)", corrupt_job, 500, "internal_error"),
    ],
    "service.queue.protocol.QueueUnavailableError": [
        Trigger(
            "Redis unreachable", request("POST", "/jobs", BODY), 503, "queue_unavailable", api="no_redis"
        ),
    ],
    "service.webhooks.addresses.WebhookUrlError": [
        Trigger(
            "a private webhook address",
            request("POST", "/jobs", {**BODY, "webhook_url": "https://[2002:a00:1::1]/"}),
            422,
            "invalid_webhook_url",
        ),
    ],
    "realcustom.image_structure.ImageRejectedError": [
        Trigger(
            "not an image",
            request("POST", "/jobs", {**BODY, "subjects": [{"image": "bm90IGFuIGltYWdl", "target": "cat"}]}),
            422,
            "invalid_image",
        ),
    ],
    "realcustom.image_structure.ImageTooComplexError": [
        Trigger(
            "more metadata chunks than IMAGE_MAX_METADATA_CHUNKS",
            request("POST", "/jobs", {**BODY, "subjects": [{"image": chatty_png_b64(), "target": "cat"}]}),
            422,
            "image_too_complex",
        ),
    ],
    "realcustom.phrases.PhraseNotFoundError": [
        Trigger(
            "a target not in the prompt",
            request("POST", "/jobs", {**BODY, "subjects": [{"image": PNG, "target": "dog"}]}),
            422,
            "target_not_in_prompt",
        ),
    ],
    "realcustom.phrases.PromptTooLongError": [
        Trigger(
            "a prompt past 75 tokens",
            request("POST", "/jobs", {**BODY, "prompt": "a cat " + "very " * 80}),
            422,
            "prompt_too_long",
        ),
    ],
    "realcustom.settings_check.SettingsError": [
        Trigger(
            "a width not a multiple of 32",
            request("POST", "/jobs", {**BODY, "width": 100}),
            422,
            "invalid_request",
        ),
    ],
    "service.api.middleware._BodyTooLargeError": [
        Trigger("a chunked body past MAX_BODY_BYTES", chunked(1_100_000), 413, "body_too_large"),
    ],
    "service.api.http_protocol.Refusal": [
        Trigger(
            "Content-Length and Transfer-Encoding",
            request("POST", "/jobs", b"0\r\n\r\n", headers={"Transfer-Encoding": "chunked"}),
            400,
            "ambiguous_framing",
            keeps_connection=False,
        ),
        Trigger(
            "a header past HTTP_MAX_HEADER_BYTES",
            get("/healthz", extra=f"X-Pad: {'x' * 40_000}\r\n"),
            431,
            "header_too_large",
            keeps_connection=False,
        ),
    ],
    "h11._util.RemoteProtocolError": [
        Trigger(
            "a header line without a colon",
            b"GET /healthz HTTP/1.1\r\nHost: test\r\nnonsense\r\n\r\n",
            400,
            "malformed_request",
            keeps_connection=False,
        ),
        Trigger(
            "an unsupported Transfer-Encoding",
            request("POST", "/jobs", None, headers={"Transfer-Encoding": "gzip"}),
            501,
            "not_implemented",
            keeps_connection=False,
        ),
    ],
    "fastapi.exceptions.RequestValidationError": [
        Trigger(
            "an Idempotency-Key over 200 characters",
            request("POST", "/jobs", BODY, headers={"Idempotency-Key": "k" * 201}),
            422,
            "invalid_request",
        ),
    ],
    "starlette.exceptions.HTTPException": [
        Trigger("no such route", request("GET", "/nowhere"), 404, "http_error"),
        Trigger("a method the route does not serve", request("PUT", "/jobs", b"{}"), 405, "http_error"),
        Trigger("two files where one is allowed", multipart("/subjects", 2), 400, "http_error"),
    ],
    "starlette.requests.ClientDisconnect": [
        Trigger("the client leaves mid-body", slow_body(), 499, None, keeps_connection=False),
    ],
    # Last: it fills the queue.
    "service.queue.protocol.QueueFullError": [
        Trigger("POST /jobs past QUEUE_MAX_DEPTH", full_queue, 429, "queue_full"),
        Trigger(
            "POST /subjects past SUBJECT_MAX_BYTES",
            request("POST", "/subjects", {"image": PNG}),
            429,
            "subjects_full",
        ),
    ],
}
# Defined in code the API process imports, never raised to a route.
NOT_ON_A_REQUEST_PATH = {
    "service.queue.capacity.RedisCapacityError": "the start-up capacity check: the process exits 2",
    "service.queue.connect.RedisUrlError": "REDIS_URL validation when the settings load, at start-up",
    "service.webhooks.sender.DeliveryError": "a failed webhook attempt, in the delivery loop (last_error)",
    "fastapi.exceptions.WebSocketRequestValidationError": "for WebSocket routes: there are none",
}
# Converted on the way, walked through the types they become: pydantic's ValidationError of a body
# (-> ApiError invalid_request) and JSON errors (-> ApiError invalid_json).
HANDLED_ELSEWHERE = {"pydantic_core._pydantic_core.ValidationError", "json.decoder.JSONDecodeError"}


# --- the walk --------------------------------------------------------------------------------------
DISCOVER = """
import inspect, json, sys
import service.api.__main__
from service.api.app import create_app
from service.settings import Settings

def qualified(cls):
    return f"{cls.__module__}.{cls.__qualname__}"

found = {
    qualified(value)
    for name, module in list(sys.modules.items())
    if name.split(".")[0] in ("service", "realcustom")
    for value in vars(module).values()
    if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name
}
found |= {qualified(cls) for cls in create_app(Settings()).exception_handlers if isinstance(cls, type)}
print(json.dumps(sorted(found)))
"""


def exception_types_of_the_api() -> set[str]:
    """Exception classes of the service/ and realcustom/ modules the API process imports (in a
    process of its own: this one has imported more), plus the types the app has handlers for."""
    output = subprocess.run(
        [sys.executable, "-c", DISCOVER], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(output))


def documented_errors() -> set[tuple[int, str]]:
    """(status, code) of every row of the errors table of service/README.md."""
    readme = (REPO_ROOT / "service" / "README.md").read_text()
    table = readme.split("### Errors", 1)[1].split("\n### ", 1)[0]
    rows = set()
    for line in table.splitlines():
        match = re.match(r"\| (\d{3}) \| ([^|]+)\|", line)
        if match:
            rows |= {(int(match.group(1)), code) for code in re.findall(r"`([a-z_]+)`", match.group(2))}
    return rows


# Calls that build an error reply from literals: name -> (status position, code position).
REPLY_BUILDERS = {
    "ApiError": (0, 1),
    "_send_error": (1, 2),
    "error_response": (0, 1),
    "Refusal": (1, 2),
    "_reply": (0, 1),
}


def literal_replies() -> set[tuple[int, str, str]]:
    """Every (status, code, where) the service's code replies with literally."""
    found = set()
    for path in sorted((REPO_ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
            if name in REPLY_BUILDERS:
                status_at, code_at = REPLY_BUILDERS[name]
                args = node.args
                if len(args) > code_at and all(
                    isinstance(args[i], ast.Constant) for i in (status_at, code_at)
                ):
                    found.add((args[status_at].value, args[code_at].value, where))
            elif name == "_reject":  # service/validation.py: code= and status_code= (422) keywords
                keywords = {keyword.arg: keyword.value for keyword in node.keywords}
                code = keywords.get("code", ast.Constant("invalid_request"))
                status = keywords.get("status_code", ast.Constant(422))
                if isinstance(code, ast.Constant) and isinstance(status, ast.Constant):
                    found.add((status.value, code.value, where))
    return {
        (status, code, where) for status, code, where in found if re.fullmatch(r"[a-z][a-z_]*", str(code))
    }


def test_every_exception_type_is_walked() -> None:
    types = exception_types_of_the_api()
    unmapped = types - set(TRIGGERS) - set(NOT_ON_A_REQUEST_PATH) - HANDLED_ELSEWHERE
    assert not unmapped, f"exception types with no trigger nor reason here: {sorted(unmapped)}"
    assert "service.errors.ApiError" in types and "service.queue.protocol.QueueFullError" in types


def test_every_reply_the_code_can_give_is_documented() -> None:
    documented = documented_errors()
    missing = {
        (status, code, where) for status, code, where in literal_replies() if (status, code) not in documented
    }
    assert not missing, f"replies missing from the errors table of service/README.md: {sorted(missing)}"
    for triggers in TRIGGERS.values():
        for trigger in triggers:
            if trigger.code is not None:
                assert (trigger.status, trigger.code) in documented, trigger.what


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory) -> Iterator[Stack]:
    queue_name = f"walk-{uuid.uuid4().hex[:8]}"
    common = {
        "API_KEYS": f"{KEY},{OTHER_KEY}",
        "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "MAX_BODY_BYTES": "1000000",
        "MAX_IMAGE_BYTES": "100000",
        "JOB_TIMEOUT_S": "2",
        "EVENTS_MAX_STREAMS_PER_CALLER": "1",
        "LORA_SLOTS": "2",
        "ADMIN_API_KEYS": ADMIN_KEY,
    }
    log_dir = tmp_path_factory.mktemp("walk")
    api = Api(
        "service.api",
        {
            **common,
            "REDIS_URL": redis_server.url,
            "QUEUE_NAME": queue_name,
            "QUEUE_MAX_DEPTH": str(QUEUE_MAX_DEPTH),
            "SUBJECT_MAX_BYTES": "1000",
            # One key walks everything: the whole queue and subject budget are its share (the
            # per-key refusals are test_tenants.py's).
            "QUEUE_KEY_SHARE": "1",
            "SUBJECT_KEY_SHARE": "1",
            "RATE_LIMIT_PER_MINUTE": str(RATE_PER_MINUTE),
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
        },
        log_dir,
    )
    no_redis = Api("service.api", {**common, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, log_dir)
    stack = Stack(api, no_redis, redis_server.url, queue_name)
    yield stack
    holder = stack.job_ids.get("holder")
    if holder is not None:
        holder.close()
    api.process.stop()
    no_redis.process.stop()


def walked() -> list:
    cases = []
    for type_name, triggers in TRIGGERS.items():
        for trigger in triggers:
            cases.append(
                pytest.param(type_name, trigger, id=f"{type_name.rsplit('.', 1)[1]}: {trigger.what}")
            )
    return cases


@pytest.mark.parametrize(("type_name", "trigger"), walked())
def test_each_exception_type_maps_to_its_documented_reply(
    stack: Stack, type_name: str, trigger: Trigger
) -> None:
    api = stack.api if trigger.api == "api" else stack.no_redis
    raw = trigger.request(stack) if callable(trigger.request) else trigger.request
    with connect(api.port, timeout_s=30) as sock:
        sock.sendall(get("/healthz"))  # the connection was in use before: keep-alive, not a new one
        assert read_reply(sock).status == 200
        if trigger.code is None:  # the client leaves: nothing to read, the metrics record it
            sock.sendall(raw)
            time.sleep(0.3)
            return check_client_gone(api, sock)
        sock.sendall(raw)
        reply = read_reply(sock)
        assert reply is not None, f"{trigger.what}: no reply"
        assert (reply.status, reply.error_code()) == (trigger.status, trigger.code), (trigger.what, reply)
        if trigger.keeps_connection:
            assert reply.headers.get("connection") != "close", reply.headers
            sock.sendall(get("/healthz"))
            assert read_reply(sock).status == 200, f"{trigger.what}: the connection was dropped"
        else:
            assert reply.headers.get("connection") == "close" and closed_by_server(sock, 5)


def check_client_gone(api: Api, sock) -> None:
    """Leaving mid-body is a 499 in the metrics and no internal error in the log."""

    def gone_count() -> float:
        with connect(api.port) as probe:
            probe.sendall(request("GET", "/metrics"))
            text = read_reply(probe).body.decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if 'status="499"' in line and line.startswith("realcustom_http_requests_total")
        )

    before, errors_before = gone_count(), api.process.log().count("internal error")
    sock.close()
    wait_until(lambda: gone_count() > before, 10, "a 499 in the metrics")
    assert api.process.log().count("internal error") == errors_before


def test_an_internal_error_keeps_the_connection_and_hides_the_text(stack: Stack) -> None:
    """(Starlette's last-resort handler re-raised to uvicorn, which dropped the connection.)"""
    raw = corrupt_job(stack)
    with connect(stack.api.port) as sock:
        sock.sendall(raw)
        reply = read_reply(sock)
        assert reply.status == 500 and b"not json" not in reply.body
        sock.sendall(get("/healthz"))
        assert read_reply(sock).status == 200
    assert "Exception in ASGI application" not in stack.api.process.log()


def test_the_documented_table_parses(tmp_path: Path) -> None:
    rows = documented_errors()
    assert (429, "queue_full") in rows and (500, "internal_error") in rows and len(rows) > 25
