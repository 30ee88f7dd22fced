"""A slow name server against the intake, for real: the API process (uvicorn, Redis queue) runs in
a mount namespace whose /etc/resolv.conf names a local DNS server (tests/service/dns_stub.py) that
answers `slow.test` only after 30 s. The system resolver really waits on it; the intake must not."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from dns_stub import DnsStub, namespace_problem, resolver_namespace_command
from service_processes import Api, wait_until
from test_service_faults import cat_body

pytestmark = pytest.mark.integration

# Documentation addresses would be refused as non-public: these are public (never contacted).
PUBLIC = "93.184.215.14"


@pytest.fixture
def dns() -> Iterator[DnsStub]:
    problem = namespace_problem()
    if problem is not None:
        pytest.skip(f"a private resolver for the API process {problem}")
    stub = DnsStub({"fast.test": PUBLIC, "slow.test": PUBLIC}, slow={"slow.test"}, delay_s=30)
    stub.start()
    yield stub
    stub.stop()


def post_job(api: Api, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    reply = httpx.post(api.url + "/jobs", json=body, timeout=60)
    return reply, time.monotonic() - started


def test_a_slow_name_server_holds_neither_the_intake_nor_other_webhooks(
    dns: DnsStub, redis_server, cat_b64: str, tmp_path: Path
) -> None:
    """Two intake slots, two requests whose webhook host resolves in 30 s: they wait for their
    resolution (5 s, then 422) outside the slots, so requests without a webhook and with a fast
    one are accepted at once meanwhile; a third slow one finds the waiting room full (503)."""
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"dns-{uuid.uuid4().hex[:8]}",
        "WEBHOOK_SECRET": "resolver-test-secret-" + "s" * 32,
        "INTAKE_CONCURRENCY": "2",
    }
    prefix = tuple(resolver_namespace_command(dns.resolv_conf(tmp_path), []))
    api = Api("service.api", env, tmp_path, prefix=prefix)
    try:
        slow = cat_body(cat_b64, webhook_url="https://slow.test/hook")
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post_job, api, slow) for _ in range(2)]
            wait_until(lambda: dns.queries.count("slow.test") >= 4, 10, "both slow lookups (A and AAAA)")
            time.sleep(0.5)  # their references decoded: both now wait outside the slots
            plain, plain_s = post_job(api, cat_body(cat_b64))
            fast, fast_s = post_job(api, cat_body(cat_b64, webhook_url="https://fast.test/hook"))
            busy, busy_s = post_job(api, slow)
            health_s = time.monotonic()
            assert httpx.get(api.url + "/healthz", timeout=5).status_code == 200
            health_s = time.monotonic() - health_s
            refused = [future.result() for future in waiting]
        assert plain.status_code == 202 and plain_s < 2.5, (plain.text, plain_s)
        assert fast.status_code == 202 and fast_s < 2.5, (fast.text, fast_s)
        assert busy.status_code == 503 and busy_s < 2.5, (busy.text, busy_s)
        assert busy.json()["error"]["code"] == "webhook_checks_busy" and busy.headers["retry-after"] == "1"
        assert health_s < 1.0, health_s
        for reply, elapsed in refused:
            assert reply.status_code == 422, reply.text
            error = reply.json()["error"]
            assert error["code"] == "invalid_webhook_url" and "did not resolve within 5 s" in error["message"]
            assert 4.5 < elapsed < 10, elapsed
        # The slots were free all along: both quick requests were answered while the slow ones waited.
        assert max(plain_s, fast_s) < min(elapsed for _reply, elapsed in refused)
    finally:
        api.process.stop()
