"""The HTTP/1.1 protocol of the API's listeners: uvicorn's h11 protocol plus the limits it lacks.

* Header timeout: a request line and headers must arrive within `header_timeout_s` of the
  connection (or of the first byte after a keep-alive reply); past it 408 and the connection is
  closed (a connection that sent nothing is just closed). A header sent a byte at a time gets no
  more time than one sent at once.
* Body timeout: the body must arrive within `body_timeout_s`, counted while the server reads it
  (not while uvicorn's flow control has paused reading because the application is busy, e.g. a
  request waiting for an intake slot); past it 408 (when no reply has started) and the connection
  is closed. That bounds the rest of a body the server discards after an early reply too.
* Header size: request line + headers at most `max_header_bytes`, complete or not (h11 only bounds
  an incomplete one): 431 and the connection is closed.
* One framing: a request with both Content-Length and Transfer-Encoding is refused (400) and its
  connection closed, so that a proxy in front that frames by Content-Length cannot smuggle a
  second request in the body (RFC 9112 section 6.3 allows either; closing is the safe one).
* Connections: at most `max_connections`; a new one past it closes the oldest connection that has
  no request in progress (idle keep-alive, or still sending its headers), or itself when all have.
  `max_requests` bounds the requests in progress (uvicorn's limit_concurrency counted every open
  connection, so idle or half-sent connections made every request a 503): past it 503
  `server_busy`, the connection closed.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from service import metrics


@dataclass(frozen=True)
class EdgeLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_connections: int
    max_requests: int


class Refusal(h11.RemoteProtocolError):
    """A request this server refuses before the application sees it; the connection closes."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message, error_status_hint=status)
        self.code = code


# What the client did wrong, by h11's status hint for its own protocol errors.
H11_CODES = {400: "malformed_request", 431: "header_too_large", 501: "not_implemented"}
REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
REASONS |= {501: b"Not Implemented", 503: b"Service Unavailable"}


def error_response(status: int, code: str, message: str, retry_after_s: int | None = None) -> bytes:
    """A complete HTTP/1.1 reply in the API's error shape that closes the connection, for replies
    written outside a request cycle (h11 cannot send a response before a request)."""
    body = json.dumps({"error": {"code": code, "message": message, "field": None}}).encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, REASONS[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    if retry_after_s is not None:
        head.append(b"retry-after: %d" % retry_after_s)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def header_bytes(request: h11.Request) -> int:
    """Size of the request line and headers as sent, give or take optional whitespace."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers.raw_items()) + 2


class GuardedConnection(h11.Connection):
    """h11's server side, refusing what h11 lets through: a complete header over the size limit,
    and a request framed two ways. Tells the protocol when a request's header and body are in."""

    def __init__(self, protocol: GuardedProtocol, max_header_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._protocol = protocol
        self._max_header_bytes = max_header_bytes
        self.refusal: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                self._check(event)
        except h11.RemoteProtocolError as error:
            self.refusal = error
            raise
        if isinstance(event, h11.Request):
            self._protocol.header_received()
        elif isinstance(event, h11.EndOfMessage):
            self._protocol.body_received()
        return event

    def _check(self, request: h11.Request) -> None:
        size = header_bytes(request)
        if size > self._max_header_bytes:
            raise Refusal(
                f"the request line and headers are {size} bytes; the limit is {self._max_header_bytes}",
                431,
                "header_too_large",
            )
        names = {name for name, _value in request.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            message = "the request has both Content-Length and Transfer-Encoding; send one"
            raise Refusal(message, 400, "ambiguous_framing")


class ReadTimedFlow(FlowControl):
    """uvicorn's flow control, telling the protocol when reading stops and starts again."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol) -> None:
        super().__init__(transport)
        self._protocol = protocol

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._protocol.reading_paused()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self._protocol.reading_resumed()
        super().resume_reading()


def _waiting(server_state: Any) -> OrderedDict:
    """The server's connections with no request in progress, oldest first."""
    if not hasattr(server_state, "guarded_waiting"):
        server_state.guarded_waiting = OrderedDict()
    return server_state.guarded_waiting


class GuardedProtocol(H11Protocol):
    limits: EdgeLimits  # set by `protocol_class`

    def __init__(self, config: Any, server_state: Any, app_state: dict, _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = GuardedConnection(self, self.limits.max_header_bytes)
        self.limit_concurrency = None  # requests in progress are bounded by `_bounded_app` instead
        self._application = self.app
        self.app = self._bounded_app
        self._waiting = _waiting(server_state)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_pending = False
        self._body_left_s = 0.0
        self._body_since = 0.0

    # --- connections -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = ReadTimedFlow(transport, self)
        self._waiting[self] = None
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)
        if len(self.connections) > self.limits.max_connections:
            oldest = next(iter(self._waiting))
            metrics.HTTP_CONNECTIONS_CLOSED.labels("evicted").inc()
            oldest.transport.close()
            self._waiting.pop(oldest, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting.pop(self, None)
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            # The first bytes of the next request on a kept-alive connection.
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)
        super().data_received(data)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._waiting[self] = None  # until its next request's header (maybe pipelined: now)
        super().on_response_complete()

    # --- header ----------------------------------------------------------------------------------
    def header_received(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._waiting.pop(self, None)
        if self.conn.their_state is h11.SEND_BODY:
            self._body_pending = True
            self._body_left_s = self.limits.body_timeout_s
            if self.conn.they_are_waiting_for_100_continue:
                # No body comes before the application asks for it (uvicorn then sends 100
                # Continue and resumes reading): a request waiting for an intake slot is not late.
                self.flow.pause_reading()
            elif not self.flow.read_paused:
                self.reading_resumed()

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            metrics.HTTP_CONNECTIONS_CLOSED.labels("header_timeout").inc()
            message = f"the request headers took longer than {self.limits.header_timeout_s:g} s to arrive"
            self.transport.write(error_response(408, "header_timeout", message))
        else:  # nothing of a request arrived: just close, as for an idle keep-alive connection
            metrics.HTTP_CONNECTIONS_CLOSED.labels("silent").inc()
        self.transport.close()

    # --- body ------------------------------------------------------------------------------------
    def reading_paused(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
            self._body_left_s -= self.loop.time() - self._body_since

    def reading_resumed(self) -> None:
        if self._body_pending and self._body_timer is None:
            self._body_since = self.loop.time()
            self._body_timer = self.loop.call_later(max(self._body_left_s, 0.0), self._body_timeout)

    def body_received(self) -> None:
        self._body_pending = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        metrics.HTTP_CONNECTIONS_CLOSED.labels("body_timeout").inc()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            message = f"the request body took longer than {self.limits.body_timeout_s:g} s to arrive"
            self.transport.write(error_response(408, "body_timeout", message))
        self.transport.close()
        if cycle is not None:  # the application sees the client gone; its reply goes nowhere
            cycle.disconnected = True
            cycle.message_event.set()

    # --- refusals --------------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """h11 (or GuardedConnection) refused the request: its status and code, then close."""
        refusal = self.conn.refusal
        status = refusal.error_status_hint if refusal is not None else 400
        code = refusal.code if isinstance(refusal, Refusal) else H11_CODES.get(status, "malformed_request")
        message = str(refusal) if refusal is not None else msg
        metrics.HTTP_CONNECTIONS_CLOSED.labels(code).inc()
        self.transport.write(error_response(status if status in REASONS else 400, code, message))
        self.transport.close()

    async def _bounded_app(self, scope: Any, receive: Any, send: Any) -> None:
        if len(self.tasks) > self.limits.max_requests:  # this request's task is counted already
            metrics.REQUESTS_REJECTED.labels("server_busy").inc()
            message = "too many requests in progress; retry"
            body = json.dumps({"error": {"code": "server_busy", "message": message, "field": None}}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                (b"retry-after", b"1"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self._application(scope, receive, send)


def protocol_class(limits: EdgeLimits) -> type[GuardedProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})
