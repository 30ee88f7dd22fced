"""Webhooks without model processes: URL rules, the Redis outbox (scheduled by the queue's own
terminal-state scripts, leased claims), and the in-process queue's delivery loop against a real
local receiver, signatures checked with the `standardwebhooks` verifier."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from standardwebhooks import Webhook
from test_queue_contract import done_record, make_spec
from webhook_receiver import Receiver

from service.background import BackgroundTasks
from service.queue import create_queue
from service.queue.keys import QueueKeys
from service.queue.memory import InProcessQueue
from service.queue.protocol import JobState, WebhookTarget
from service.queue.redis_streams import RedisStreamsQueue
from service.settings import Settings
from service.webhooks.addresses import MAX_URL_LENGTH, WebhookUrlError, parse_target, resolve
from service.webhooks.dispatcher import delivering, payload
from service.webhooks.events import EVENTS
from service.webhooks.outbox import MemoryOutbox, RedisOutbox, create_outbox
from service.webhooks.sender import DeliveryError, post, tls_context
from service.webhooks.signing import signing_secret

SECRET = "test-server-secret-" + "x" * 32
FAST = {
    "webhook_secret": SECRET,
    "webhook_allow_hosts": ["127.0.0.1"],
    "webhook_backoff_s": 0.05,
    "webhook_backoff_max_s": 0.1,
    "webhook_poll_s": 0.05,
    "webhook_connect_timeout_s": 1.0,
    "webhook_timeout_s": 2.0,
}


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.start()
    yield server
    server.stop()


def with_webhook(url: str, events: tuple[str, ...] = EVENTS, owner: str = "owner-a"):
    return make_spec().model_copy(
        update={"webhook": WebhookTarget(url=url, events=list(events)), "owner": owner}
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com/hook", "scheme must be https"),
        ("ftp://example.com/hook", "scheme must be https"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https:///hook", "no host"),
        ("https://10.0.0.7/hook", "private"),
        ("https://169.254.169.254/latest", "private"),
        ("https://[::1]:8443/hook", "private"),
        ("https://[::ffff:192.168.1.1]/hook", "private"),
        ("https://224.0.0.1/hook", "private"),
        ("https://localhost/hook", "resolves to"),
    ],
)
def test_urls_refused(url: str, reason: str) -> None:
    with pytest.raises(WebhookUrlError, match=reason):
        run(resolve(parse_target(url, [])))


@pytest.mark.parametrize(
    "url",
    [
        "https://user@example.com/hook",  # a user and no password
        "https://:pw@example.com/hook",  # a password and no user
        "https://user:@example.com/hook",
    ],
)
def test_any_credentials_in_the_url_are_refused(url: str) -> None:
    with pytest.raises(WebhookUrlError, match="credentials"):
        parse_target(url, [])


@pytest.mark.parametrize(
    ("address", "form"),
    [
        ("2002:c0a8:101::1", "6to4 of 192.168.1.1"),
        ("2002:7f00:1::", "6to4 of 127.0.0.1"),
        ("2002:a9fe:a9fe::1", "6to4 of the metadata address 169.254.169.254"),
        ("2002:a00:1:1::1", "6to4 of 10.0.0.1"),
        ("2001:0:c0a8:101::1", "Teredo through server 192.168.1.1"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "Teredo of client 10.0.0.1"),
        ("fec0::1", "site-local"),
        ("feff:ffff::1", "site-local, the top of fec0::/10"),
        ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
        ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1"),
        ("64:ff9b:1::808:808", "local-use NAT64"),
        ("::a00:1", "IPv4-compatible 10.0.0.1"),
        ("::ffff:0:a00:1", "IPv4-translated 10.0.0.1"),
        ("::ffff:a9fe:a9fe", "IPv4-mapped 169.254.169.254"),
        ("2606:4700::5efe:a00:1", "ISATAP interface id of 10.0.0.1"),
        ("2606:4700::200:5efe:7f00:1", "ISATAP interface id of 127.0.0.1"),
    ],
)
def test_ipv6_forms_that_carry_a_private_ipv4_address_or_are_site_local_are_refused(
    address: str, form: str
) -> None:
    with pytest.raises(WebhookUrlError, match="private"):
        run(resolve(parse_target(f"https://[{address}]/hook", [])))


@pytest.mark.parametrize(
    "address", ["2606:4700::1111", "2606:4700::5efe:808:808", "::ffff:8.8.8.8", "2a00:1450:4001::200e"]
)
def test_public_ipv6_addresses_are_allowed(address: str) -> None:
    """The refusals above are about the address carried, not every address of the form."""
    destination = run(resolve(parse_target(f"https://[{address}]/hook", [])))
    assert list(map(str, destination.addresses)) == [str(ipaddress.ip_address(address))]


def test_the_allow_list_ignores_case() -> None:
    destination = run(resolve(parse_target("http://LocalHost:9/x", ["LOCALHOST"])))
    assert destination.target.allow_listed and destination.target.host == "localhost"
    with pytest.raises(WebhookUrlError, match="scheme must be https"):
        parse_target("http://LocalHost:9/x", ["127.0.0.1"])


def test_urls_are_at_most_2000_characters() -> None:
    base = "https://8.8.8.8/"
    longest = base + "a" * (MAX_URL_LENGTH - len(base))
    assert len(longest) == 2000 and parse_target(longest, []).path == "/" + "a" * (2000 - len(base))
    with pytest.raises(WebhookUrlError, match="longer than 2000 characters"):
        parse_target(longest + "a", [])


def test_a_host_name_the_resolver_cannot_encode_is_a_clear_refusal() -> None:
    """A label over 63 characters makes the IDNA codec raise UnicodeError, not OSError."""
    with pytest.raises(WebhookUrlError, match="does not resolve"):
        run(resolve(parse_target(f"https://{'a' * 70}.example.com/hook", [])))


def test_allow_listed_host_may_use_http_and_a_loopback_address() -> None:
    destination = run(resolve(parse_target("http://127.0.0.1:9/x?y=1", ["127.0.0.1"])))
    assert list(map(str, destination.addresses)) == ["127.0.0.1"] and destination.target.path == "/x?y=1"
    public = run(resolve(parse_target("https://8.8.8.8/hook", [])))
    assert list(map(str, public.addresses)) == ["8.8.8.8"] and public.target.host_header == "8.8.8.8"


def test_a_named_host_is_reached_at_its_checked_address_with_its_name_in_host(receiver: Receiver) -> None:
    """The connection goes to the address resolved and checked for this attempt; the receiver
    still sees the URL's host name (allow-listed `localhost`: ::1 and/or 127.0.0.1, the
    receiver listens on the latter)."""
    destination = run(resolve(parse_target(f"http://localhost:{receiver.port}/hook?a=1", ["localhost"])))
    assert {str(address) for address in destination.addresses} <= {"127.0.0.1", "::1"}
    body = json.dumps({"data": {"id": "job"}}).encode()
    run(post(destination, body, {"webhook-id": "msg_job"}, 1, 2, tls_context(None)))
    [(headers, received)] = receiver.requests
    assert headers["host"] == f"localhost:{receiver.port}" and received == body


@pytest.mark.parametrize("topology", ["redis_server", "redis_cluster"])
def test_terminal_scripts_schedule_the_webhook_and_claims_are_leased(topology, request) -> None:
    """Also on Redis Cluster: every key of a delivery is under the queue's hash tag."""
    server = request.getfixturevalue(topology)

    async def scenario() -> None:
        config = Settings(redis_url=server.url, queue_name=f"wh-{uuid.uuid4().hex[:8]}")
        queue, outbox = create_queue(config), RedisOutbox(config)
        assert isinstance(queue, RedisStreamsQueue)
        cancelled = with_webhook("https://8.8.8.8/hook")
        ignored = with_webhook("https://8.8.8.8/hook", events=("job.completed",))
        plain = make_spec()
        for spec in (cancelled, ignored, plain):
            await queue.submit(spec)
            await queue.cancel(spec.id)
        # Only the job that asked for job.cancelled has a delivery, written with its cancel.
        [delivery] = await outbox.claim(10, lease_s=30)
        assert (delivery.job_id, delivery.event, delivery.attempts) == (cancelled.id, "job.cancelled", 0)
        assert await outbox.claim(10, lease_s=30) == []  # leased: no other process gets it
        assert (await outbox.status(ignored.id), await outbox.status(plain.id)) == (None, None)

        assert await outbox.settle(delivery, "retry", 1, "HTTP 503", retry_in_s=0.0)
        assert not await outbox.settle(delivery, "delivered", 1, None, 0.0)  # that claim is over
        [again] = await outbox.claim(10, lease_s=0.05)
        assert again.attempts == 1
        await asyncio.sleep(0.1)  # the lease runs out (its claimer died): another claim takes it over
        [taken_over] = await outbox.claim(10, lease_s=30)
        assert not await outbox.settle(again, "delivered", 2, None, 0.0)
        assert await outbox.settle(taken_over, "delivered", 2, None, 0.0)
        status = await outbox.status(cancelled.id)
        assert (status.state, status.attempts, status.last_error) == ("delivered", 2, None)
        assert await outbox.claim(10, lease_s=30) == []
        await outbox.close()
        await queue.close()

    run(scenario())


def test_worker_and_dead_letter_terminal_states_schedule_their_events(redis_server) -> None:
    async def scenario() -> None:
        # One owner's three deliveries claimed at once: its cap of deliveries in flight allows them.
        config = Settings(
            redis_url=redis_server.url, queue_name=f"wh-{uuid.uuid4().hex[:8]}", webhook_concurrency_per_key=3
        )
        queue, outbox = create_queue(config), RedisOutbox(config)
        client = redis.Redis.from_url(redis_server.url)
        done, expired = with_webhook("https://8.8.8.8/a"), with_webhook("https://8.8.8.8/b")
        for spec in (done, expired):
            await queue.submit(spec)
        # A message this version cannot read, with a record asking for a webhook: dead-lettered.
        unreadable = with_webhook("https://8.8.8.8/c")
        keys = QueueKeys(config.queue_name)
        message = client.xadd(keys.stream, {"id": unreadable.id, "v": "0"})
        meta = unreadable.meta().model_dump_json()
        client.hset(keys.job(unreadable.id), mapping={"state": "queued", "meta": meta, "msg": message})

        taken = {job.spec.id: job for job in await queue.take("w1", 8, block_s=1.0)}
        assert set(taken) == {done.id, expired.id}
        for job in taken.values():
            assert await queue.start("w1", job)
        await queue.finish(taken[done.id], done_record(done))
        await queue.finish(taken[expired.id], expired.record(JobState.EXPIRED, "w1", "the deadline passed"))

        claimed = {delivery.job_id: delivery.event for delivery in await outbox.claim(10, lease_s=30)}
        assert claimed == {done.id: "job.completed", expired.id: "job.failed", unreadable.id: "job.failed"}
        event = json.loads(payload(await queue.get(expired.id), "job.failed", "https://api.example.com"))
        assert event["data"]["status"] == "expired" and event["data"]["error"] == "the deadline passed"
        completed = json.loads(payload(await queue.get(done.id), "job.completed", "https://api.example.com"))
        assert completed["data"]["images"] == [f"https://api.example.com/jobs/{done.id}/images/0"]
        client.close()
        await outbox.close()
        await queue.close()

    run(scenario())


def test_in_process_queue_sends_a_signed_cancelled_event(receiver: Receiver) -> None:
    async def scenario() -> None:
        config = Settings(**FAST)
        queue = create_queue(config)
        assert isinstance(queue, InProcessQueue)
        outbox = create_outbox(config, queue)
        spec = with_webhook(receiver.url)
        async with delivering(outbox, queue, config, BackgroundTasks()):
            await queue.submit(spec)
            await queue.cancel(spec.id)
            for _ in range(100):
                status = await outbox.status(spec.id)
                if status.state != "pending":
                    break
                await asyncio.sleep(0.05)
        assert (status.state, status.attempts) == ("delivered", 1)
        await queue.close()
        return spec

    spec = run(scenario())
    [(headers, body)] = receiver.deliveries(spec.id)
    event = Webhook(signing_secret(SECRET, "owner-a")).verify(body, headers)
    assert event["type"] == "job.cancelled" and event["data"]["status"] == JobState.CANCELLED
    assert event["timestamp"].endswith("Z") and event["data"]["url"] == f"/jobs/{spec.id}"
    assert headers["webhook-id"] == f"msg_{spec.id}"
    with pytest.raises(Exception, match="signature"):  # another key's secret does not verify it
        Webhook(signing_secret(SECRET, "owner-b")).verify(body, headers)


def test_the_address_is_checked_again_at_connect_time(receiver: Receiver) -> None:
    """A URL that passed at submission but resolves to a loopback address now is not contacted."""

    async def scenario():
        config = Settings(**(FAST | {"webhook_max_attempts": 2}))
        outbox = MemoryOutbox(ttl_s=60)
        queue = create_queue(config)
        spec = with_webhook(f"https://localhost:{receiver.port}/hook")
        await queue.submit(spec)
        await queue.cancel(spec.id)
        outbox.on_finished(await queue.get(spec.id))
        async with delivering(outbox, queue, config, BackgroundTasks()):
            for _ in range(100):
                status = await outbox.status(spec.id)
                if status.state != "pending":
                    break
                await asyncio.sleep(0.05)
        return status

    status = run(scenario())
    assert (status.state, status.attempts) == ("failed", 2)
    assert "resolves to" in status.last_error and "private, loopback" in status.last_error
    assert receiver.requests == []


def test_https_goes_to_the_checked_address_with_the_certificate_checked_against_the_name(
    tmp_path: Path,
) -> None:
    """The connection is pinned to an address, yet TLS sends the URL's name (SNI) and checks the
    receiver's certificate against it: a certificate for `localhost` passes for
    https://localhost (its CA trusted through WEBHOOK_CA_FILE), not for https://127.0.0.1, and
    not at all without its CA."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    receiver = Receiver(tls=(cert, key))
    receiver.start()
    try:
        allowed = ["localhost", "127.0.0.1"]
        by_name = run(resolve(parse_target(f"https://localhost:{receiver.port}/hook", allowed)))
        by_address = run(resolve(parse_target(f"https://127.0.0.1:{receiver.port}/hook", allowed)))
        body = json.dumps({"data": {"id": "tls"}}).encode()
        run(post(by_name, body, {"webhook-id": "msg_tls"}, 1, 2, tls_context(str(cert))))
        assert len(receiver.requests) == 1 and receiver.requests[0][0]["host"] == f"localhost:{receiver.port}"
        with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
            run(post(by_address, body, {"webhook-id": "msg_tls"}, 1, 2, tls_context(str(cert))))
        with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
            run(post(by_name, body, {"webhook-id": "msg_tls"}, 1, 2, tls_context(None)))
        assert len(receiver.requests) == 1
    finally:
        receiver.stop()


def test_a_burst_is_sent_as_fast_as_slots_free_not_one_batch_per_poll(receiver: Receiver) -> None:
    """40 webhooks due at once, 4 at a time, a 1 s poll: claims follow freed slots, so the
    burst takes far less than the 10 polls it would otherwise wait for."""

    async def scenario() -> float:
        config = Settings(**(FAST | {"webhook_concurrency": 4, "webhook_poll_s": 1.0}))
        queue = create_queue(config)
        outbox = create_outbox(config, queue)
        specs = [with_webhook(receiver.url) for _ in range(40)]
        for spec in specs:
            await queue.submit(spec)
            await queue.cancel(spec.id)
        started = time.monotonic()
        async with delivering(outbox, queue, config, BackgroundTasks()):
            while len(receiver.requests) < len(specs) and time.monotonic() - started < 20:
                await asyncio.sleep(0.02)
            return time.monotonic() - started

    elapsed_s = run(scenario())
    assert len(receiver.distinct()) == 40 and len(receiver.requests) == 40
    assert elapsed_s < 3.0, elapsed_s


@pytest.mark.parametrize("backend", ["memory", "redis_server", "redis_cluster"])
def test_a_key_at_its_cap_of_deliveries_in_flight_delays_only_its_own(backend, request) -> None:
    """Claims follow due order, but one key holds at most WEBHOOK_CONCURRENCY_PER_KEY leases: its
    other due deliveries are set aside (not in front of another key's) until a lease ends."""

    async def scenario() -> None:
        values = {"webhook_concurrency_per_key": 2, "queue_name": f"wh-{uuid.uuid4().hex[:8]}"}
        if backend != "memory":
            values["redis_url"] = request.getfixturevalue(backend).url
        config = Settings(**values)
        queue = create_queue(config)
        outbox = create_outbox(config, queue)
        stuck = [with_webhook("https://8.8.8.8/never", owner="owner-a") for _ in range(6)]
        other = with_webhook("https://8.8.8.8/fine", owner="owner-b")
        for spec in [*stuck, other]:  # the other key's delivery falls due last
            await queue.submit(spec)
            await queue.cancel(spec.id)
        first = await outbox.claim(4, lease_s=30)
        assert [delivery.job_id for delivery in first] == [stuck[0].id, stuck[1].id, other.id]
        assert await outbox.claim(4, lease_s=30) == []  # owner-a at its cap: nothing more of it
        assert await outbox.settle(first[0], "retry", 1, "timed out", retry_in_s=60.0)
        [next_one] = await outbox.claim(4, lease_s=30)  # a slot of owner-a freed: its next in due order
        assert next_one.job_id == stuck[2].id
        await outbox.close()
        await queue.close()

    run(scenario())
