"""A real HTTP webhook receiver for the tests: a threaded server on 127.0.0.1 that records every
request and can be stopped and started again on the same port (receiver down, then up)."""

from __future__ import annotations

import json
import ssl
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from service_processes import free_port, wait_until


class Receiver:
    """`tls`: (certificate, key) PEM files: the receiver speaks https."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.tls = tls
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:  # quiet test output
                return

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def deliveries(self, job_id: str) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return [(h, b) for h, b in self.requests if json.loads(b)["data"]["id"] == job_id]

    def distinct(self) -> Counter[str]:
        """Deliveries per `webhook-id`: the receiver's deduplication key."""
        with self._lock:
            return Counter(headers["webhook-id"] for headers, _body in self.requests)

    def wait_for(self, job_id: str, timeout_s: float = 60) -> tuple[dict[str, str], bytes]:
        return wait_until(
            lambda: next(iter(self.deliveries(job_id)), None), timeout_s, f"webhook of {job_id}"
        )
