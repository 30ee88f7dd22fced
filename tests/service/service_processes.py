"""Real processes for the service tests: redis-server (own port, AOF on), API, workers."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


class RedisServer:
    """A private redis-server with AOF (fsync always), restartable on the same port and data;
    `extra_args` (e.g. `--maxmemory 8mb`, `--appendonly no`) override the defaults."""

    def __init__(self, directory: Path, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; the service tests need it (apt install redis)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                try:
                    return bool(client.ping())
                except redis.AuthenticationError:  # up, and wants a password (--requirepass)
                    return True
            return False

        wait_until(answers, 10, "redis-server to answer")
        client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


class ServiceProcess:
    """`python -m <module>` with the given environment; logs go to a file for failure reports.
    `prefix`: a command that runs it (e.g. in a namespace of its own)."""

    def __init__(
        self,
        module: str,
        env: dict[str, str],
        log_path: Path,
        python_flags: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.module = module
        self.log_path = log_path
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "LOG_LEVEL": "INFO", **env}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*prefix, sys.executable, *python_flags, "-m", module],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 60) -> int:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._log.close()


def wait_http_ok(base_url: str, path: str, timeout_s: float, process: ServiceProcess) -> None:
    def ok() -> bool:
        if not process.alive():
            raise RuntimeError(f"{process.module} exited:\n{process.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(base_url + path, timeout=2).status_code == 200
        return False

    try:
        wait_until(ok, timeout_s, f"{base_url}{path}", interval_s=0.1)
    except TimeoutError as error:
        raise TimeoutError(f"{error}\n--- {process.module} log ---\n{process.log()[-3000:]}") from None


class Api:
    """A running `python -m service.api` (or `python -m service`) and its base URL."""

    def __init__(
        self,
        module: str,
        env: dict[str, str],
        log_dir: Path,
        python_flags: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The health listener (a free port unless the test names one).
        self.health_port = int(env.get("HEALTH_PORT") or free_port())
        while self.health_port == self.port:
            self.health_port = free_port()
        self.health_url = f"http://127.0.0.1:{self.health_port}"
        self.process = ServiceProcess(
            module,
            {**env, "PORT": str(self.port), "HEALTH_PORT": str(self.health_port)},
            log_dir / f"{module}-{self.port}.log",
            python_flags,
            prefix,
        )
        wait_http_ok(self.url, "/healthz", 60, self.process)

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def ready_workers(self) -> int:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/readyz", timeout=5).json()["detail"].get("ready_workers", 0)
        return 0

    def wait_ready_workers(self, count: int, timeout_s: float = 90) -> None:
        wait_until(lambda: self.ready_workers() >= count, timeout_s, f"{count} ready workers", interval_s=0.1)


class WorkerProcess(ServiceProcess):
    """A running `python -m service.worker`; its metrics port is a free one unless given."""

    def __init__(self, worker_id: str, env: dict[str, str], log_dir: Path, metrics_port: int = 0) -> None:
        self.worker_id = worker_id
        super().__init__(
            "service.worker",
            {**env, "WORKER_ID": worker_id, "WORKER_METRICS_PORT": str(metrics_port)},
            log_dir / f"worker-{worker_id}.log",
        )

    @property
    def metrics_url(self) -> str:
        """Where the worker says its metrics are (it logs the port it bound)."""
        match = wait_until(
            lambda: re.search(r"worker metrics on (http://\S+/metrics)", self.log()), 60, "the metrics port"
        )
        return match.group(1)

    def metric(self, name: str) -> float:
        """Sum of a metric's samples on this worker's endpoint (whose lines start with `name`)."""
        text = httpx.get(self.metrics_url, timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
