"""Subjects uploaded once and reused by id: the store on real Redis and in process, the worker's token
cache, and the service end to end (real uvicorn API, real Redis, a real worker on the tiny model)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from PIL import Image
from service_processes import Api, WorkerProcess

from service.queue.keys import QueueKeys
from service.queue.memory import InProcessQueue
from service.queue.protocol import QueueFullError, SubjectSpec
from service.settings import Settings
from service.subjects.ids import feature_key
from service.subjects.resolve import new_subject
from service.subjects.store import MemorySubjectStore, RedisSubjectStore, key_share_of
from service.worker.subject_cache import TokenCache

KEY, OTHER_KEY = "subjects-key", "subjects-other-key"
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "mask_reused_step": 1}


def photo(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def redis_settings(redis_server, **overrides) -> Settings:
    return Settings(redis_url=redis_server.url, queue_name=f"subj-{uuid.uuid4().hex[:8]}", **overrides)


# ---- ids and stores ----------------------------------------------------------------------------------


def test_ids_follow_the_image_the_owner_and_the_model_version() -> None:
    image = photo(1)
    first, again = new_subject(image, "owner-a", "v1"), new_subject(photo(1), "owner-a", "v1")
    assert first.id == again.id and first.key == again.key
    assert new_subject(image, "owner-a", "v2").id != first.id  # a model upgrade: a new id and key
    assert new_subject(image, "owner-a", "v2").key != first.key
    other_owner = new_subject(image, "owner-b", "v1")
    assert other_owner.id != first.id and other_owner.key == first.key  # tokens are shared, ids not
    assert new_subject(photo(2), "owner-a", "v1").id != first.id
    # The size is part of the key: the same bytes read as another shape are another image.
    rgb = image.tobytes()
    assert feature_key(rgb, 40, 30, "v1") != feature_key(rgb, 30, 40, "v1")


def test_redis_store_expiry_deletion_and_the_byte_budget(redis_server) -> None:
    async def scenario() -> None:
        settings = redis_settings(
            redis_server, subject_ttl_s=1, subject_max_bytes=6000, subject_key_share=1.0
        )
        store = RedisSubjectStore(settings)
        keys = QueueKeys(settings.queue_name)
        client = redis.Redis.from_url(redis_server.url)
        try:
            subject = await store.put(new_subject(photo(3), "owner", "v1"))
            assert subject.expires_at == pytest.approx(time.time() + 1, abs=0.5)
            held = int(client.get(keys.bytes))
            assert held == subject.size
            await store.put(new_subject(photo(3), "owner", "v1"))  # a refresh is not counted twice
            assert int(client.get(keys.bytes)) == held
            assert (await store.get(subject.id)).image == subject.image
            # Subjects take at most SUBJECT_MAX_BYTES of the queue's budget: jobs always keep room.
            with pytest.raises(QueueFullError, match="SUBJECT_MAX_BYTES"):
                await store.put(new_subject(photo(13), "owner", "v1"))
            assert store.put_tokens(subject.key, _stored(torch.ones(3, 2)))
            assert int(client.get(keys.bytes)) > held
            # Deleting drops the subject and its tokens, and returns their bytes.
            assert await store.delete(subject.id)
            assert await store.get(subject.id) is None and store.get_tokens(subject.key) is None
            assert int(client.get(keys.bytes)) == 0
            assert not await store.delete(subject.id)
            # Past the budget: 429; tokens are simply not shared.
            with pytest.raises(QueueFullError):
                await store.put(new_subject(photo(4, (800, 600)), "owner", "v1"))
            assert not store.put_tokens("big", _stored(torch.ones(2000, 2)))
            # Expiry: gone after the TTL, and its bytes are freed by the next write.
            subject = await store.put(new_subject(photo(5), "owner", "v1"))
            await asyncio.sleep(1.2)
            assert await store.get(subject.id) is None
            await store.put(new_subject(photo(6), "owner", "v1"))
            assert int(client.get(keys.bytes)) == new_subject(photo(6), "owner", "v1").size
        finally:
            await store.close()
            client.close()

    asyncio.run(scenario())


def test_memory_store_counts_in_the_in_process_queue() -> None:
    async def scenario() -> None:
        queue = InProcessQueue(max_depth=4, max_bytes=2**20, retry_after_s=1, result_ttl_s=60, worker_ttl_s=5)
        store = MemorySubjectStore(queue, ttl_s=0.5, budget=6000)
        subject = await store.put(new_subject(photo(7), "owner", "v1"))
        assert await queue.held_bytes() == subject.size
        assert store.put_tokens(subject.key, _stored(torch.ones(4, 4)))
        assert store.get_tokens(subject.key) is not None
        with pytest.raises(QueueFullError, match="SUBJECT_MAX_BYTES"):
            await store.put(new_subject(photo(8), "owner", "v1"))
        assert not store.put_tokens("big", _stored(torch.ones(2000, 2)))
        # Within the subjects' share, the queue's own budget still applies.
        full = MemorySubjectStore(InProcessQueue(4, 1000, 1, 60, 5), ttl_s=5, budget=6000)
        with pytest.raises(QueueFullError, match="limit of 1000"):
            await full.put(new_subject(photo(8), "owner", "v1"))
        assert await store.delete(subject.id)
        assert await queue.held_bytes() == 0 and store.get_tokens(subject.key) is None
        subject = await store.put(new_subject(photo(7), "owner", "v1"))
        await asyncio.sleep(0.6)
        assert await store.get(subject.id) is None and await queue.held_bytes() == 0

    asyncio.run(scenario())


@pytest.fixture(params=["memory", "redis"])
def open_store(request: pytest.FixtureRequest):
    """Factory of a fresh store of one backend with the given settings (closed by the test's loop)."""

    def factory(**overrides):
        if request.param == "redis":
            settings = redis_settings(request.getfixturevalue("redis_server"), **overrides)
            store = RedisSubjectStore(settings)
        else:
            settings = Settings(**overrides)
            queue = InProcessQueue(4, settings.queue_max_bytes, 1, 60, 5)
            store = MemorySubjectStore(
                queue, settings.subject_ttl_s, settings.subject_budget, key_share_of(settings)
            )
        return store

    return factory


SUBJECT_SIZE = new_subject(photo(0), "owner-a", "v1").size  # every 40x30 photo of these owners


def test_each_key_holds_at_most_its_share_of_the_subject_budget(open_store) -> None:
    async def scenario() -> None:
        store = open_store(subject_max_bytes=4 * SUBJECT_SIZE + 100, subject_key_share=0.5)
        for seed in (1, 2):
            await store.put(new_subject(photo(seed), "owner-a", "v1"))
        with pytest.raises(QueueFullError) as refused:
            await store.put(new_subject(photo(3), "owner-a", "v1"))
        assert refused.value.code == "key_subjects_full" and "share" in str(refused.value)
        await store.put(new_subject(photo(1), "owner-a", "v1"))  # a refresh needs no room
        for seed in (4, 5):  # another key finds room
            await store.put(new_subject(photo(seed), "owner-b", "v1"))
        with pytest.raises(QueueFullError) as refused:
            await store.put(new_subject(photo(6), "owner-c", "v1"))
        assert refused.value.code == "subjects_full"  # the whole budget, not one key's share
        await store.close()

    asyncio.run(scenario())


def test_tokens_give_way_to_subjects(open_store) -> None:
    async def scenario() -> None:
        store = open_store(subject_max_bytes=3 * SUBJECT_SIZE + 100, subject_key_share=0.5)
        first = await store.put(new_subject(photo(1), "owner-a", "v1"))
        tokens = _stored(torch.ones(SUBJECT_SIZE // 4, 1))  # about one subject's size in float32
        assert store.put_tokens(first.key, tokens)
        await store.put(new_subject(photo(2), "owner-b", "v1"))
        assert not store.put_tokens("more", tokens)  # tokens never push anything out
        # A subject within its key's share takes the room the cached tokens held.
        await store.put(new_subject(photo(3), "owner-c", "v1"))
        assert store.get_tokens(first.key) is None
        assert (await store.get(first.id)).image == first.image
        await store.close()

    asyncio.run(scenario())


def test_expired_subjects_and_tokens_free_their_memory_and_counters() -> None:
    async def scenario() -> None:
        queue = InProcessQueue(max_depth=4, max_bytes=2**20, retry_after_s=1, result_ttl_s=60, worker_ttl_s=5)
        store = MemorySubjectStore(queue, ttl_s=0.3, budget=2**19)
        subjects = [await store.put(new_subject(photo(seed), f"owner-{seed % 2}", "v1")) for seed in range(6)]
        assert store.put_tokens(subjects[0].key, _stored(torch.ones(8, 8)))
        assert queue.budget.owner_bytes("owner-0", ("subject",)) == 3 * SUBJECT_SIZE
        await asyncio.sleep(0.4)
        assert await store.get(subjects[0].id) is None  # any call purges what expired
        assert (store._subjects, store._tokens) == ({}, {})  # the images are gone, not only hidden
        assert await queue.held_bytes() == 0 and queue.budget.kind_bytes("subject", "tokens") == 0
        assert not queue.budget.holds_anything("owner-0")

    asyncio.run(scenario())


def test_redis_counters_follow_every_holding(redis_server) -> None:
    """Running counters (no walk over the subjects): totals, per owner and per tier, to the byte."""

    async def scenario() -> None:
        settings = redis_settings(redis_server, subject_ttl_s=1)
        store = RedisSubjectStore(settings)
        keys = QueueKeys(settings.queue_name)
        client = redis.Redis.from_url(redis_server.url)
        owner_key = keys.owner("owner-a")
        try:
            stored = [await store.put(new_subject(photo(seed), "owner-a", "v1", "pro")) for seed in (1, 2)]
            assert store.put_tokens(stored[0].key, _stored(torch.ones(4, 4)))
            tokens_size = int(client.hget(keys.totals, "tokens"))
            assert int(client.hget(owner_key, "subjects")) == 2 * SUBJECT_SIZE
            assert int(client.hget(keys.totals, "subject")) == 2 * SUBJECT_SIZE
            assert int(client.hget(keys.tiers, "pro:bytes")) == 2 * SUBJECT_SIZE
            assert int(client.get(keys.bytes)) == 2 * SUBJECT_SIZE + tokens_size
            assert await store.delete(stored[0].id)  # its tokens go with it
            assert int(client.get(keys.bytes)) == SUBJECT_SIZE
            assert int(client.hget(keys.totals, "tokens")) == 0
            await asyncio.sleep(1.2)
            await store.put(new_subject(photo(3), "owner-b", "v1"))  # purges what expired
            assert int(client.get(keys.bytes)) == SUBJECT_SIZE
            assert not client.exists(owner_key)  # an owner holding nothing is forgotten
            assert client.zcard(keys.held) == 1
        finally:
            await store.close()
            client.close()

    asyncio.run(scenario())


def _stored(tokens: torch.Tensor):
    from service.worker.subject_cache import to_stored

    return to_stored(tokens, 0.25)


def test_token_cache_shares_tokens_between_workers(redis_server) -> None:
    """Worker A encodes a stored subject and writes its tokens back; worker B reads them (no encoder)."""
    store = RedisSubjectStore(redis_settings(redis_server))
    subject = SubjectSpec.from_image(photo(9), "cat", [2], shared=True)
    first, second = TokenCache(2, store, "v1"), TokenCache(2, store, "v1")
    miss = first.inputs(subject)
    assert set(miss) == {"on_encoded"}
    tokens = torch.randn(5, 3).to(torch.bfloat16)
    miss["on_encoded"](tokens, 1.5)
    assert torch.equal(first.inputs(subject)["tokens"], tokens)  # its own LRU
    first._writer.shutdown(wait=True)
    shared = second.inputs(subject)["tokens"]
    assert shared.dtype == torch.bfloat16 and torch.equal(shared, tokens)
    # A worker of another model version keys the same photo elsewhere: it encodes (mid-upgrade too).
    assert set(TokenCache(2, store, "v2").inputs(subject)) == {"on_encoded"}
    # An inline photo is never written to the store, only remembered by the worker that encoded it.
    inline = SubjectSpec.from_image(photo(10), "cat", [2])
    first.inputs(inline)["on_encoded"](tokens, 1.0)
    first._writer.shutdown(wait=True)
    assert set(second.inputs(inline)) == {"on_encoded"}
    asyncio.run(store.close())


# ---- the service end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(redis_server, tmp_path_factory) -> Iterator[tuple[Api, WorkerProcess]]:
    log_dir: Path = tmp_path_factory.mktemp("subjects")
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"subjects-{uuid.uuid4().hex[:8]}",
        "HEARTBEAT_S": "0.5",
        "API_KEYS": f"{KEY},{OTHER_KEY}",
    }
    worker = WorkerProcess("subjects-worker", env, log_dir)
    api = Api("service.api", env, log_dir)
    try:
        api.wait_ready_workers(1)
        yield api, worker
    finally:
        worker.stop()
        api.process.stop()


def client(api: Api, key: str = KEY) -> httpx.Client:
    return api.client(Authorization=f"Bearer {key}")


def customize(http: httpx.Client, reference: dict, seed: int = 7) -> httpx.Response:
    body = {
        "prompt": "a cat in the snow",
        "subjects": [{**reference, "target": "cat"}],
        "seed": seed,
        **SMALL,
    }
    return http.post("/customize", json=body, headers={"Accept": "image/png"})


@pytest.mark.integration
def test_same_photo_gives_one_id_json_or_multipart(service, dreambench_dir) -> None:
    api, _worker = service
    data = (dreambench_dir / "cat.jpg").read_bytes()
    with client(api) as http:
        first = http.post("/subjects", json={"image": base64.b64encode(data).decode()})
        second = http.post("/subjects", files={"image": ("cat.jpg", data, "image/jpeg")})
        assert first.status_code == second.status_code == 201, first.text
        assert first.json()["id"] == second.json()["id"]
        assert second.json()["expires_at"] >= first.json()["expires_at"]
        decoded = Image.open(io.BytesIO(data))
        assert (first.json()["width"], first.json()["height"]) == decoded.size
        assert http.get(f"/subjects/{first.json()['id']}").json() == second.json()
        bad = http.post("/subjects", json={"image": base64.b64encode(b"not an image").decode()})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_image"


@pytest.mark.integration
def test_subject_id_gives_the_inline_image_and_skips_the_encoders(service) -> None:
    api, worker = service
    image = png(photo(11, (96, 80)))
    with client(api) as http:
        subject_id = http.post("/subjects", files={"image": ("p.png", image, "image/png")}).json()["id"]
        inline = customize(http, {"image": base64.b64encode(image).decode()})  # encoded: a miss
        hits = worker.metric('realcustom_subject_tokens_total{outcome="device_hit"}')
        saved = worker.metric("realcustom_encoder_seconds_saved_total")
        by_id = customize(http, {"subject_id": subject_id})
        assert inline.status_code == by_id.status_code == 200, by_id.text
        assert worker.metric('realcustom_subject_tokens_total{outcome="device_hit"}') == hits + 1
        assert worker.metric("realcustom_encoder_seconds_saved_total") > saved
        a = np.asarray(Image.open(io.BytesIO(inline.content)), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(by_id.content)), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
        # Multipart takes it in place of a file, in the subjects' order.
        form = {"prompt": "a cat in the snow", "seed": "7", **{k: str(v) for k, v in SMALL.items()}}
        form_reply = http.post(
            "/customize",
            data=form,
            files={"subject_id": (None, subject_id), "subject_target": (None, "cat")},  # multipart
            headers={"Accept": "image/png"},
        )
        assert form_reply.status_code == 200, form_reply.text
        c = np.asarray(Image.open(io.BytesIO(form_reply.content)), dtype=np.int16)
        assert np.abs(c - b).max() <= 1
        # /jobs takes it too.
        job = http.post(
            "/jobs",
            json={"prompt": "a cat", "subjects": [{"subject_id": subject_id, "target": "cat"}], **SMALL},
        )
        assert job.status_code == 202, job.text


@pytest.mark.integration
def test_foreign_unknown_and_deleted_ids_are_404(service) -> None:
    api, _worker = service
    image = png(photo(12))
    with client(api) as http, client(api, OTHER_KEY) as other:
        subject_id = http.post("/subjects", files={"image": ("p.png", image, "image/png")}).json()["id"]
        assert other.get(f"/subjects/{subject_id}").status_code == 404
        assert other.delete(f"/subjects/{subject_id}").status_code == 404
        foreign = customize(other, {"subject_id": subject_id})
        assert foreign.status_code == 404
        error = foreign.json()["error"]
        assert error["code"] == "subject_not_found" and error["field"] == "subjects[0].subject_id"
        assert "POST /subjects" in error["message"]
        # The other key uploading the same photo gets its own id.
        assert (
            other.post("/subjects", files={"image": ("p.png", image, "image/png")}).json()["id"] != subject_id
        )
        assert customize(http, {"subject_id": "0" * 32}).status_code == 404
        both = customize(http, {"subject_id": subject_id, "image": base64.b64encode(image).decode()})
        assert both.status_code == 422
        assert http.delete(f"/subjects/{subject_id}").status_code == 204
        assert http.get(f"/subjects/{subject_id}").status_code == 404
        assert http.delete(f"/subjects/{subject_id}").status_code == 404
        gone = http.post(
            "/jobs",
            json={"prompt": "a cat", "subjects": [{"subject_id": subject_id, "target": "cat"}], **SMALL},
        )
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "subject_not_found"


def test_subject_cache_bench_runs_on_the_tiny_model(redis_server, tmp_path) -> None:
    """Smoke test of benchmarks/subject_cache_bench.py (the full-size run is not part of the tests)."""
    from benchmarks.subject_cache_bench import main

    result = main(["--model", "tiny", "--redis-url", redis_server.url, "--out", str(tmp_path)])
    assert result["tokens_shape"] == [16, 32]
    assert result["device_hit_s"] < result["encode_project_s"]
    assert not list(tmp_path.iterdir())  # tiny runs write no results


@pytest.mark.integration
def test_a_model_version_change_gives_a_new_id(service, redis_server, tmp_path) -> None:
    api, _worker = service
    image = png(photo(14))
    with client(api) as http:
        current = http.post("/subjects", files={"image": ("p.png", image, "image/png")}).json()["id"]
    env = {"REDIS_URL": redis_server.url, "QUEUE_NAME": f"subjects-{uuid.uuid4().hex[:8]}", "API_KEYS": KEY}
    upgraded = Api("service.api", {**env, "MODEL_VERSION": "tiny-v2"}, tmp_path)
    try:
        with client(upgraded) as http:
            reply = http.post("/subjects", files={"image": ("p.png", image, "image/png")})
            assert reply.status_code == 201 and reply.json()["id"] != current
    finally:
        upgraded.process.stop()
