"""A worker's HTTP endpoint: `/metrics` (Prometheus) and `/healthz` (progress-based liveness).

A TCP check on this port only proves that the server thread is alive. `/healthz` answers 503 when
the worker stopped making progress: its asyncio loop has not ticked for `WORKER_STALL_S` while
idle, or a batch made no progress for that long (the runner reports every denoising step, with
every backend, on the host once the step is issued; a hung GPU shows as the host blocking at the
loop's end, after which no step arrives). The worker abandons a batch past its
compute deadline by itself (service/worker/loop.py); the probe catches what that cannot: a stuck
event loop, or an abandon that never completed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from service import metrics

logger = logging.getLogger(__name__)


class Progress:
    """When the worker last showed progress, and how long the next sign of it may take."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._lock = threading.Lock()
        self._due = float("inf")  # loading the model is the startup probe's business
        self._last = time.monotonic()
        self.busy = False

    def beat(self, allowance_s: float | None = None) -> None:
        """Progress now; the next is due within `allowance_s` (default `stall_s`)."""
        now = time.monotonic()
        with self._lock:
            self._last = now
            self._due = now + (self.stall_s if allowance_s is None else allowance_s)

    def step(self) -> None:
        metrics.WORKER_STEPS.inc()
        self.beat()

    def state(self) -> dict:
        now = time.monotonic()
        with self._lock:
            alive = now <= self._due
            since = now - self._last
        return {"alive": alive, "busy": self.busy, "seconds_since_progress": round(since, 3)}


def serve_health(host: str, port: int, progress: Progress) -> None:
    """Start `/metrics` and `/healthz` on `host:port` in a daemon thread. A taken port (another
    worker on this host) falls back to a free one; no port at all only costs the endpoint."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif self.path.split("?")[0] == "/healthz":
                state = progress.state()
                self._reply(200 if state["alive"] else 503, "application/json", json.dumps(state).encode())
            else:
                self._reply(404, "text/plain", b"not found: /metrics or /healthz\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:  # probes every few seconds: not worth a log line
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as error:
        if port == 0:
            logger.error("worker metrics disabled: cannot listen on %s (%s)", host, error)
            return
        logger.warning(
            "worker metrics port %d on %s is taken (%s), maybe by another worker on this host: using a "
            "free port instead; give each worker its own WORKER_METRICS_PORT",
            port,
            host,
            error.strerror or error,
        )
        serve_health(host, 0, progress)
        return
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="worker-health", daemon=True).start()
    logger.info("worker metrics on http://%s:%d/metrics (liveness: /healthz)", host, server.server_port)
