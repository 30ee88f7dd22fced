"""LoRA adapters and fast mode through the whole service, on the tiny model with random adapters
written as kohya safetensors files in LORA_DIR.

* Redis, a separate API and worker process: jobs with different adapters and one without run in one
  running batch, each equal to the same request run alone; `GET /v1/loras` lists what the worker
  loaded; an operator loads an adapter at run time (`POST /v1/loras`) and the next job uses it with
  no new graph; refused requests and admin calls get their documented codes; unloading stops it.
* The all-in-one process (in-process queue and registry): a 4-step CFG-free preset runs end to end;
  its steps compute one generation pass of its rows and update masks at the preset's steps (the
  engine counters on /metrics).
"""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from service_processes import Api, WorkerProcess, wait_until
from test_service_faults import cat_body, wait_status
from test_step_level_service import assert_same_image, image_of

from realcustom.loading import load_pipeline
from realcustom.lora.bank import target_layers
from realcustom.presets import preset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN = {"Authorization": "Bearer lora-admin-key"}
LORA_ENV = {
    "LORA_SLOTS": "3",
    "LORA_MAX_RANK": "4",
    "LORA_MAX_PER_REQUEST": "2",
    "ADMIN_API_KEYS": "lora-admin-key",
}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """Random rank-4 adapters on every third transformer layer of the tiny UNet (kohya layout)."""
    directory = tmp_path_factory.mktemp("loras")
    unet = load_pipeline("tiny").unet.unet
    layers = dict(unet.named_modules())
    for seed, name in enumerate(("style-a", "style-b", "late"), start=1):
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for layer_name in target_layers(unet, "transformer")[::3]:
            layer = layers[layer_name]
            stem = "lora_unet_" + layer_name.replace(".", "_")
            down = torch.randn(4, layer.in_features, generator=generator) / layer.in_features**0.5
            state[f"{stem}.lora_down.weight"] = down
            state[f"{stem}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=generator) * float(
                layer.weight.abs().mean()
            )
            state[f"{stem}.alpha"] = torch.tensor(4.0)
        save_file(state, str(directory / f"{name}.safetensors"))
    return directory


def body(cat_b64: str, *loras: tuple[str, float], **params) -> dict:
    settings = {"width": 128, "height": 128, "num_inference_steps": 16, "mask_reused_step": 6, "seed": 7}
    adapters = [{"name": name, "scale": scale} for name, scale in loras]
    return cat_body(cat_b64, **settings, **params, loras=adapters)


def run(client: httpx.Client, request: dict) -> dict:
    accepted = client.post("/jobs", json=request)
    assert accepted.status_code == 202, accepted.text
    done = wait_status(client, accepted.json()["id"], {"done", "failed"}, 120)
    assert done["status"] == "done", done
    return done


def error(reply: httpx.Response) -> tuple[int, str]:
    return reply.status_code, reply.json()["error"]["code"]


def test_adapters_per_row_through_api_queue_and_worker(redis_server, cat_b64: str, lora_dir: Path, tmp_path):
    env = {
        "REDIS_URL": redis_server.url,
        "QUEUE_NAME": f"loras-{uuid.uuid4().hex[:8]}",
        "MAX_BATCH": "4",
        "HEARTBEAT_S": "0.5",
        "LORA_DIR": str(lora_dir),
        "LORA_ADAPTERS": "style-a,style-b",
        **LORA_ENV,
    }
    worker = WorkerProcess("lora-worker", env, tmp_path)
    api = Api("service.api", env, tmp_path)
    try:
        api.wait_ready_workers(1)
        with api.client() as client:
            listing = client.get("/v1/loras").json()
            assert (listing["enabled"], listing["slots"], listing["max_rank"], listing["workers"]) == (
                True,
                3,
                4,
                1,
            )
            adapters = {adapter["name"]: adapter for adapter in listing["adapters"]}
            assert {name: (a["status"], a["rank"]) for name, a in adapters.items()} == {
                "style-a": ("loaded", 4),
                "style-b": ("loaded", 4),
            }
            assert (
                adapters["style-a"]["modules"] == 52 and "attn1.to_q" in adapters["style-a"]["target_modules"]
            )
            assert adapters["style-a"]["workers"] == [{"worker": "lora-worker", "slot": 0}]

            # Three jobs at once: adapter a, adapter b at 0.7, none (same seed and prompt).
            requests = {
                "a": body(cat_b64, ("style-a", 1.0)),
                "b": body(cat_b64, ("style-b", 0.7)),
                "plain": body(cat_b64),
            }
            ids = {key: client.post("/jobs", json=value).json()["id"] for key, value in requests.items()}
            together = {
                key: wait_status(client, job_id, {"done", "failed"}, 120) for key, job_id in ids.items()
            }
            assert all(job["status"] == "done" for job in together.values()), together
            # They shared running batches: steps of 3 rows (a bucket of 4) ran.
            assert worker.metric('realcustom_step_seconds_count{rows="4"}') >= 1
            for key, request in requests.items():
                assert_same_image(image_of(together[key]), image_of(run(client, request)))
            plain = image_of(together["plain"])
            for key in ("a", "b"):  # the adapters change the image
                assert np.abs(image_of(together[key]) - plain).max() > 8, key

            # Refused at the edge, before the queue.
            cases = {
                "unknown_lora": body(cat_b64, ("nope", 1.0)),
                "too_many_loras": body(cat_b64, ("style-a", 1.0), ("style-b", 1.0), ("late", 1.0)),
                "invalid_lora": body(cat_b64, ("style-a", 9.0)),
                "unknown_preset": {**cat_body(cat_b64), "preset": "sdxl-turbo"},
            }
            for code, request in cases.items():
                assert error(client.post("/jobs", json=request)) == (422, code)

            # Loaded at run time by an operator: used by the next job, no graph made for it.
            captured = worker.metric('realcustom_engine_events_total{event="graphs_captured"}')
            assert error(client.post("/v1/loras", json={"name": "late"})) == (403, "admin_forbidden")
            loaded = client.post("/v1/loras", json={"name": "late"}, headers=ADMIN)
            assert loaded.status_code == 200, loaded.text
            assert (loaded.json()["status"], loaded.json()["workers"]) == (
                "loaded",
                [{"worker": "lora-worker", "slot": 2}],
            )
            late = image_of(run(client, body(cat_b64, ("late", 1.0))))
            assert np.abs(late - plain).max() > 8
            assert worker.metric('realcustom_engine_events_total{event="graphs_captured"}') == captured
            refusals = {
                (409, "lora_exists"): {"name": "late", "source": "style-b"},
                (422, "lora_source_not_allowed"): {
                    "name": "web",
                    "source": "https://example.com/x.safetensors",
                },
                (422, "lora_load_failed"): {"name": "missing"},
            }
            for expected, request in refusals.items():
                assert error(client.post("/v1/loras", json=request, headers=ADMIN)) == expected, request
            listed = {a["name"] for a in client.get("/v1/loras").json()["adapters"]}
            assert listed == {"style-a", "style-b", "late"}  # a failed load is not served

            # Unloaded: refused at once, its slot freed once the worker follows.
            gone = client.delete("/v1/loras/late", headers=ADMIN)
            assert (gone.status_code, gone.json()["status"]) == (200, "unloading")
            assert error(client.post("/jobs", json=body(cat_b64, ("late", 1.0)))) == (422, "unknown_lora")
            wait_until(
                lambda: (
                    {a["name"] for a in client.get("/v1/loras").json()["adapters"]} == {"style-a", "style-b"}
                ),
                10,
                "the worker to unload it",
            )
            assert error(client.delete("/v1/loras/late", headers=ADMIN)) == (404, "lora_not_found")

            # Multipart: one `lora` field per adapter, `name=scale`.
            form = {"prompt": "a cat in the snow", "subject_target": "cat", "width": "128", "height": "128"}
            form |= {"num_inference_steps": "16", "mask_reused_step": "6", "seed": "7", "lora": "style-a=1.0"}
            files = {"subject_image": ("cat.jpg", base64.b64decode(cat_b64), "image/jpeg")}
            reply = client.post("/customize", data=form, files=files)
            assert reply.status_code == 200, reply.text
            assert_same_image(image_of({"result": reply.json()}), image_of(together["a"]))
    finally:
        worker.stop()
        api.process.stop()
    assert "Traceback" not in worker.log()


def engine_events(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        match.group(1): float(match.group(2))
        for match in re.finditer(r'^realcustom_engine_events_total\{event="(\w+)"\} (\S+)$', text, re.M)
    }


def test_a_cfg_free_preset_runs_one_generation_pass_per_image(cat_b64: str, lora_dir: Path, tmp_path):
    """SDXL-Lightning 4 steps, guidance 0, 2 images, with an adapter an operator loaded in the
    all-in-one process: 4 steps of 2 generation rows (no unconditional half), masks computed at
    the 2 steps whose timestep is >= 540 (the guidance pass on 2 rows each), reused at the other 2."""
    env = {"LORA_DIR": str(lora_dir), "MAX_BATCH": "4", **LORA_ENV}
    api = Api("service", env, tmp_path)
    try:
        wait_until(lambda: httpx.get(api.url + "/readyz", timeout=5).status_code == 200, 120, "the worker")
        with api.client() as client:
            presets = {p["name"]: p for p in client.get("/v1/models").json()["presets"]}
            assert presets["sdxl-lightning-4step"]["guidance_scale"] == 0.0
            assert client.post("/v1/loras", json={"name": "style-a"}, headers=ADMIN).status_code == 200
            fast = {
                **cat_body(cat_b64, width=128, height=128, seed=3, num_images=2, return_masks=True),
                "preset": "sdxl-lightning-4step",
                "loras": [{"name": "style-a", "scale": 1.0}],
            }
            conflict = client.post("/customize", json={**fast, "num_inference_steps": 8})
            assert error(conflict) == (422, "invalid_request")
            assert conflict.json()["error"]["field"] == "num_inference_steps"
            before = engine_events(client)
            reply = client.post("/customize", json=fast)
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["images"]) == 2 and len(reply.json()["masks"]) == 2
            after = engine_events(client)
        lightning = preset("sdxl-lightning-4step")
        counted = {event: after.get(event, 0) - before.get(event, 0) for event in after}
        assert counted["steps_mask_update"] == lightning.mask_reused_step == 2
        assert counted["steps_mask_reuse"] == lightning.steps - lightning.mask_reused_step == 2
        assert counted["rows_generation"] == lightning.steps * 2  # B rows per step, not 2B
        assert counted["rows_guidance"] == lightning.mask_reused_step * 2
    finally:
        api.process.stop()
    assert "Traceback" not in api.process.log()
