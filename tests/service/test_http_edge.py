"""The HTTP edge for real: `python -m service.api` (uvicorn with service/api/http_protocol.py, a
private Redis) against raw sockets: header size, request smuggling pairs, slowloris headers and
bodies, a flood of half-sent headers (with /healthz latency measured on both listeners meanwhile),
connection eviction and the bound on requests in progress."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from raw_http import closed_by_server, connect, get, read_reply
from service_processes import Api

pytestmark = pytest.mark.integration

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
# Scheduling slack on 2 shared cores, on top of a timeout.
SLACK_S = 2.5


def start(redis_server, tmp_path_factory, **env: str) -> Api:
    return Api(
        "service.api",
        {"REDIS_URL": redis_server.url, "QUEUE_NAME": f"http-{uuid.uuid4().hex[:8]}", **env},
        tmp_path_factory.mktemp("http-edge"),
    )


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory) -> Iterator[Api]:
    api = start(
        redis_server,
        tmp_path_factory,
        HTTP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
    )
    yield api
    api.process.stop()


# --- header size ---------------------------------------------------------------------------------
def test_headers_over_the_limit_are_refused_complete_or_not(api: Api) -> None:
    """HTTP_MAX_HEADER_BYTES (16 KiB) bounds a complete header too: 40 KB sent at once is a 431."""
    for request in (
        get("/healthz", extra=f"X-Pad: {'x' * 40_000}\r\n"),  # complete
        get("/healthz", extra=f"X-Pad: {'x' * 20_000}")[:-2],  # still incomplete at 20 KB
        get("/healthz", extra="".join(f"X-H{index}: {'y' * 90}\r\n" for index in range(200))),  # many
    ):
        with connect(api.port) as sock:
            sock.sendall(request)
            reply = read_reply(sock)
            assert reply is not None and reply.status == 431, reply
            assert reply.error_code() == "header_too_large" and reply.headers["connection"] == "close"
            assert closed_by_server(sock, 5)
    with connect(api.port) as sock:  # just within the limit: served, and the connection kept
        sock.sendall(get("/healthz", extra=f"X-Pad: {'x' * 15_000}\r\n"))
        assert read_reply(sock).status == 200
        sock.sendall(get("/healthz"))
        assert read_reply(sock).status == 200


# --- request smuggling ---------------------------------------------------------------------------
SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n"
ZERO_CHUNK = b"0\r\n\r\n"


def framed(*headers: str, body: bytes = ZERO_CHUNK + SMUGGLED) -> bytes:
    return (
        b"POST /healthz HTTP/1.1\r\nHost: test\r\n"
        + "".join(f"{h}\r\n" for h in headers).encode()
        + b"\r\n"
        + body
    )


SMUGGLING_PAIRS = {
    "CL.TE": framed(f"Content-Length: {len(ZERO_CHUNK + SMUGGLED)}", "Transfer-Encoding: chunked"),
    "TE.CL": framed("Transfer-Encoding: chunked", f"Content-Length: {len(ZERO_CHUNK)}"),
    "TE.CL case": framed("transfer-encoding: CHUNKED", "content-length: 3"),
    "CL.TE zero": framed("Content-Length: 0", "Transfer-Encoding: chunked"),
    "TE list": framed("Transfer-Encoding: gzip, chunked", "Content-Length: 5"),
    "TE space before colon": framed("Transfer-Encoding : chunked", "Content-Length: 5"),
    "two Content-Lengths": framed("Content-Length: 5", f"Content-Length: {len(ZERO_CHUNK + SMUGGLED)}"),
    "Content-Length list": framed("Content-Length: 5, 47"),
    "Content-Length sign": framed("Content-Length: +5"),
    "TE folded": framed("Transfer-Encoding:", " chunked", "Content-Length: 5"),
    "TE twice": framed("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
    "TE not chunked": framed("Transfer-Encoding: identity"),
}


@pytest.mark.parametrize("name", list(SMUGGLING_PAIRS))
def test_ambiguous_framing_is_refused_and_the_connection_closed(api: Api, name: str) -> None:
    """Never a reply to the request hidden in the body: the connection closes after the refusal."""
    with connect(api.port) as sock:
        sock.sendall(SMUGGLING_PAIRS[name])
        reply = read_reply(sock)
        assert reply is not None and reply.status in (400, 501), reply
        assert reply.error_code() in {"ambiguous_framing", "malformed_request", "not_implemented"}
        assert reply.headers["connection"] == "close"
        assert closed_by_server(sock, 5)


def test_content_length_with_transfer_encoding_is_a_400_naming_both(api: Api) -> None:
    with connect(api.port) as sock:
        sock.sendall(SMUGGLING_PAIRS["CL.TE"])
        reply = read_reply(sock)
        assert reply.status == 400 and reply.error_code() == "ambiguous_framing"
        assert b"Content-Length and Transfer-Encoding" in reply.body


def test_a_well_framed_pipelined_pair_gets_two_replies(api: Api) -> None:
    """The control: the smuggled request above would have been answered on this connection."""
    with connect(api.port) as sock:
        sock.sendall(framed("Transfer-Encoding: chunked", body=ZERO_CHUNK) + SMUGGLED)
        buffered = bytearray()
        assert read_reply(sock, buffered).status == 405
        assert read_reply(sock, buffered).status == 200


# --- slow clients --------------------------------------------------------------------------------
def trickle(sock, data: bytes, interval_s: float, until: float) -> None:
    """Send `data` a byte at a time until it is sent or `until` (monotonic) passes."""
    for byte in data:
        if time.monotonic() >= until:
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # closed by the server
            return
        time.sleep(interval_s)


def test_a_header_sent_a_byte_at_a_time_gets_408_at_the_header_timeout(api: Api) -> None:
    with connect(api.port) as sock:
        started = time.monotonic()
        trickle(sock, get("/healthz", extra="X-Slow: " + "z" * 100 + "\r\n"), 0.1, started + 4)
        reply = read_reply(sock)
        elapsed = time.monotonic() - started
        assert reply is not None and reply.status == 408 and reply.error_code() == "header_timeout"
        assert HEADER_TIMEOUT_S - 0.2 < elapsed < HEADER_TIMEOUT_S + SLACK_S, elapsed
        assert closed_by_server(sock, 2)


def test_a_silent_connection_is_closed_at_the_header_timeout(api: Api) -> None:
    with connect(api.port) as sock:
        started = time.monotonic()
        assert closed_by_server(sock, HEADER_TIMEOUT_S + SLACK_S)
        assert time.monotonic() - started > HEADER_TIMEOUT_S - 0.2


def test_the_header_timeout_starts_again_for_the_next_request_on_a_kept_connection(api: Api) -> None:
    with connect(api.port) as sock:
        sock.sendall(get("/healthz"))
        assert read_reply(sock).status == 200
        time.sleep(1.0)  # idle within HTTP_KEEP_ALIVE_S
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: te")
        reply = read_reply(sock)
        assert reply is not None and reply.status == 408
        assert HEADER_TIMEOUT_S - 0.2 < time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S


def test_a_body_sent_a_byte_at_a_time_is_cut_at_the_body_timeout(api: Api) -> None:
    """/healthz answers without reading the body; the rest of it is read and discarded, but only
    for BODY_TIMEOUT_S: a byte every 0.1 s no longer keeps the connection open for ever."""
    with connect(api.port) as sock:
        sock.sendall(get("/healthz", extra="Content-Length: 1000\r\n"))
        started = time.monotonic()
        assert read_reply(sock).status == 200
        trickle(sock, b"a" * 1000, 0.1, started + BODY_TIMEOUT_S + SLACK_S)
        assert closed_by_server(sock, 0.5)
        assert time.monotonic() - started < BODY_TIMEOUT_S + SLACK_S + 0.6


def test_a_generation_body_sent_slowly_is_a_408(api: Api) -> None:
    with connect(api.port) as sock:
        sock.sendall(
            b"POST /jobs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500\r\n\r\n"
        )
        started = time.monotonic()
        trickle(sock, b'{"prompt": "' + b"a" * 480, 0.1, started + BODY_TIMEOUT_S + SLACK_S)
        reply = read_reply(sock)
        assert reply is not None and reply.status == 408 and reply.error_code() == "body_timeout"
        assert time.monotonic() - started < BODY_TIMEOUT_S + SLACK_S + 0.6
        assert closed_by_server(sock, 2)


# --- floods --------------------------------------------------------------------------------------
def latencies(port: int, path: str, count: int) -> list[float]:
    """`count` GETs, each on a new connection (a prober's view: connect, send, read the reply);
    every one must be a 200."""
    found = []
    for _ in range(count):
        started = time.perf_counter()
        with connect(port) as sock:
            sock.sendall(get(path))
            reply = read_reply(sock)
        found.append(time.perf_counter() - started)
        assert reply is not None and reply.status == 200, (port, path, reply)
    return found


def summary(values: list[float]) -> str:
    ms = sorted(value * 1000 for value in values)
    return f"p50 {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms over {len(ms)}"


def half_headers(port: int, count: int) -> list:
    flood = []
    for _ in range(count):
        sock = connect(port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        flood.append(sock)
    return flood


def test_a_thousand_half_sent_headers_starve_neither_listener_and_are_timed_out(
    redis_server, tmp_path_factory
) -> None:
    """Before: uvicorn counted the 1000 connections against limit_concurrency (1000), so every
    /healthz was a 503, and nothing ever closed them."""
    header_timeout_s = 8.0
    api = start(redis_server, tmp_path_factory, HTTP_HEADER_TIMEOUT_S=str(header_timeout_s))
    flood = []
    try:
        quiet = latencies(api.port, "/healthz", 20) + latencies(api.health_port, "/healthz", 20)
        started = time.monotonic()
        flood = half_headers(api.port, 1000)
        opened_s = time.monotonic() - started
        time.sleep(1.0)  # every one accepted and read by the server: held, not in its backlog
        main = latencies(api.port, "/healthz", 20)
        health = latencies(api.health_port, "/healthz", 20)
        ready = latencies(api.health_port, "/readyz", 5)
        probed_s = time.monotonic() - started
        print(
            f"\n/healthz before the flood: {summary(quiet)}; with 1000 half-sent headers open "
            f"(opened in {opened_s:.2f} s): PORT {summary(main)}, HEALTH_PORT {summary(health)}, "
            f"/readyz {summary(ready)}"
        )
        assert probed_s < header_timeout_s, "the probes ran after the flood was timed out: inconclusive"
        assert max(main + health) < 1.0
        # Every flood connection is answered 408 and closed once its header timeout passes.
        timed_out = 0
        for sock in flood:
            remaining = started + header_timeout_s + opened_s + SLACK_S - time.monotonic()
            sock.settimeout(max(remaining, 0.1))
            reply = read_reply(sock)
            timed_out += reply is not None and reply.status == 408
            assert closed_by_server(sock, 1)
        assert timed_out == len(flood)
        assert time.monotonic() - started > header_timeout_s - 0.2
    finally:
        for sock in flood:
            sock.close()
        api.process.stop()


def test_past_the_connection_cap_the_oldest_waiting_connection_makes_room(
    redis_server, tmp_path_factory
) -> None:
    """HTTP_MAX_CONNECTIONS=200 against 600 half-sent headers: the oldest are closed as new ones
    come, the newest 200 stay, and a prober's new connection is still served."""
    api = start(redis_server, tmp_path_factory, HTTP_MAX_CONNECTIONS="200")
    flood = []
    try:
        flood = half_headers(api.port, 600)
        time.sleep(1.0)
        main = latencies(api.port, "/healthz", 10)
        print(f"\n/healthz with 600 half-sent headers against HTTP_MAX_CONNECTIONS=200: {summary(main)}")
        closed = sum(closed_by_server(sock, 0.05) for sock in flood[:380])
        assert closed >= 370, closed  # evicted, oldest first (give or take the probes' timing)
        assert not any(closed_by_server(sock, 0.01) for sock in flood[-150:])
    finally:
        for sock in flood:
            sock.close()
        api.process.stop()


def test_past_the_request_limit_a_503_server_busy_and_the_probes_still_answer(
    redis_server, tmp_path_factory
) -> None:
    """HTTP_LIMIT_CONCURRENCY=2 bounds requests in progress (two bodies arriving slowly), not
    connections: a third request is a 503 server_busy; the health listener is not affected."""
    api = start(redis_server, tmp_path_factory, HTTP_LIMIT_CONCURRENCY="2", BODY_TIMEOUT_S="20")
    slow = []
    try:
        idle = [connect(api.port) for _ in range(5)]  # open, nothing sent: no request in progress
        for _ in range(2):
            sock = connect(api.port)
            sock.sendall(
                b"POST /jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 99\r\n\r\n{"
            )
            slow.append(sock)
        time.sleep(0.5)
        with connect(api.port) as sock:
            sock.sendall(get("/healthz"))
            reply = read_reply(sock)
            assert (
                reply.status == 503
                and reply.error_code() == "server_busy"
                and reply.headers["retry-after"] == "1"
            )
            assert closed_by_server(sock, 2)
        assert httpx.get(api.health_url + "/healthz", timeout=5).status_code == 200
        for sock in slow:
            sock.close()
        time.sleep(0.5)
        assert httpx.get(api.url + "/healthz", timeout=5).status_code == 200
        for sock in idle:
            sock.close()
    finally:
        for sock in slow:
            sock.close()
        api.process.stop()
