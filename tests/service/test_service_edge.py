"""The API at the edge, as a real uvicorn process on a private Redis (no worker needed: bad input
never reaches the queue). Table-driven bad input: every case is a 4xx that names what to change,
never a 5xx. Also: accepted conversions, auth, rate limit, docs, and that the API never imports
torch."""

from __future__ import annotations

import base64
import io
import re
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from service_processes import Api

from realcustom.decoding import decode_reference

pytestmark = pytest.mark.integration

MAX_BODY = 3_000_000
MAX_IMAGE = 400_000


def start_api(redis_url: str, log_dir: Path, extra_env: dict[str, str] | None = None, python_flags=()) -> Api:
    env = {
        "REDIS_URL": redis_url,
        "QUEUE_NAME": f"edge-{uuid.uuid4().hex[:8]}",
        "MAX_BODY_BYTES": str(MAX_BODY),
        "MAX_IMAGE_BYTES": str(MAX_IMAGE),
        "MAX_SIDE": "512",
        "MAX_STEPS": "50",
        "QUEUE_MAX_DEPTH": "1000",
        **(extra_env or {}),
    }
    return Api("service.api", env, log_dir, python_flags)


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory) -> Iterator[Api]:
    api = start_api(redis_server.url, tmp_path_factory.mktemp("edge"))
    yield api
    api.process.stop()


# --- images ------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def small_png() -> bytes:
    return encode(Image.new("RGB", (64, 64), (200, 30, 30)))


def png_claiming_size(width: int, height: int) -> bytes:
    """A real small PNG whose header claims a huge size: a decompression bomb's signature."""
    data = bytearray(small_png())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def body(image: str | None = None, **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "prompt": "a cat in the snow",
        "subjects": [{"image": b64(small_png()) if image is None else image, "target": "cat"}],
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "mask_reused_step": 1,
    }
    payload.update(overrides)
    return payload


@dataclass
class Case:
    name: str
    status: int
    message: str  # a fragment the reply's message must contain
    json: Any = None
    content: bytes | Iterator[bytes] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/jobs"


def bad_input_cases(cat_jpeg: bytes) -> list[Case]:
    long_prompt = "a cat " + " ".join(["in the very snowy mountains"] * 20)
    return [
        Case(
            "body too large (Content-Length)",
            413,
            "larger than",
            content=b"x" * (MAX_BODY + 1),
            headers={"content-type": "application/json"},
        ),
        Case(
            "body too large (chunked, no Content-Length)",
            413,
            "larger than",
            content=iter([b"x" * 1_000_000] * 4),
            headers={"content-type": "application/json"},
        ),
        Case("image over the byte limit", 413, "limit is", json=body(b64(noise_png(400)))),
        Case("undecodable image", 422, "not a PNG, JPEG or WebP", json=body(b64(b"definitely not an image"))),
        Case("invalid base64", 422, "not valid base64", json=body("@@@not base64@@@")),
        Case("truncated JPEG", 422, "truncated", json=body(b64(cat_jpeg[: len(cat_jpeg) // 2]))),
        Case(
            "decompression bomb", 422, "send a smaller image", json=body(b64(png_claiming_size(30000, 30000)))
        ),
        Case(
            "image over the pixel limit",
            422,
            "more than the 25000000",
            json=body(b64(png_claiming_size(10000, 10000))),
        ),
        Case("image too small", 422, "at least", json=body(b64(encode(Image.new("RGB", (8, 8)))))),
        Case(
            "GIF is not accepted",
            422,
            "PNG, JPEG or WebP",
            json=body(b64(encode(Image.new("RGB", (64, 64)), "GIF"))),
        ),
        Case("empty image", 422, "empty", json=body("")),
        Case(
            "target not in the prompt",
            422,
            "does not occur",
            json=body(subjects=[{"image": b64(small_png()), "target": "dog"}]),
        ),
        Case(
            "target only inside a word",
            422,
            "whole words",
            json=body(prompt="a hotdog", subjects=[{"image": b64(small_png()), "target": "dog"}]),
        ),
        Case("prompt too long for the text encoder", 422, "at most 75", json=body(prompt=long_prompt)),
        Case("width not a multiple of 32", 422, "multiple of 32", json=body(width=100)),
        Case("height over max side", 422, "between 64 and 512", json=body(height=1024)),
        Case("width under min side", 422, "between 64 and 512", json=body(width=32)),
        Case("zero steps", 422, "num_inference_steps", json=body(num_inference_steps=0)),
        Case("too many steps", 422, "at most 50", json=body(num_inference_steps=51, mask_reused_step=1)),
        Case(
            "mask_reused_step out of range",
            422,
            "mask_reused_step must be at most 50",
            json=body(mask_reused_step=51),
        ),
        Case("negative mask_reused_step", 422, "mask_reused_step", json=body(mask_reused_step=-1)),
        Case("negative guidance", 422, "guidance_scale", json=body(guidance_scale=-1)),
        Case("mask_scope above 1", 422, "mask_scope", json=body(mask_scope=1.5)),
        Case("negative seed", 422, "seed", json=body(seed=-1)),
        Case("seed too large", 422, "seed", json=body(seed=2**64)),
        Case("too many images", 422, "num_images", json=body(num_images=50)),
        Case("unknown output format", 422, "output_format", json=body(output_format="bmp")),
        Case("unknown field", 422, "unknown field `strength`", json=body(strength=0.5)),
        Case(
            "unknown subject field",
            422,
            "unknown field `subjects.0.weight`",
            json=body(subjects=[{"image": b64(small_png()), "target": "cat", "weight": 1}]),
        ),
        Case("missing prompt", 422, "`prompt`", json={k: v for k, v in body().items() if k != "prompt"}),
        Case("no subjects", 422, "subjects", json=body(subjects=[])),
        Case(
            "too many subjects",
            422,
            "at most 4 subjects",
            json=body(subjects=[{"image": b64(small_png()), "target": "cat"}] * 5),
        ),
        Case("wrong type", 422, "width", json=body(width="wide")),
        Case(
            "NaN",
            400,
            "not valid JSON",
            content=b'{"prompt": "a cat", "guidance_scale": NaN}',
            headers={"content-type": "application/json"},
        ),
        Case(
            "invalid JSON",
            400,
            "not valid JSON",
            content=b'{"prompt": ',
            headers={"content-type": "application/json"},
        ),
        Case("JSON array", 422, "valid dictionary", json=[1, 2]),
        Case(
            "unsupported content type",
            415,
            "application/json",
            content=b"prompt=cat",
            headers={"content-type": "text/plain"},
        ),
        Case(
            "multipart: targets do not match files",
            422,
            "one `subject_target` per",
            files=[("subject_image", ("cat.png", small_png(), "image/png"))],
            data={"prompt": "a cat"},
        ),
        Case(
            "multipart: undecodable file",
            422,
            "not a PNG, JPEG or WebP",
            files=[("subject_image", ("x.png", b"garbage", "image/png"))],
            data={"prompt": "a cat", "subject_target": "cat", "width": "64", "height": "64"},
        ),
        Case(
            "multipart: unknown field",
            422,
            "unknown field `style`",
            files=[("subject_image", ("cat.png", small_png(), "image/png"))],
            data={"prompt": "a cat", "subject_target": "cat", "style": "oil"},
        ),
        Case(
            "raw image of several images",
            406,
            "num_images",
            json=body(num_images=2),
            headers={"accept": "image/png"},
            path="/customize",
        ),
        Case(
            "raw PNG but JPEG output",
            406,
            "output_format",
            json=body(output_format="jpeg"),
            headers={"accept": "image/png"},
            path="/customize",
        ),
    ]


def test_every_bad_input_gets_a_4xx_that_says_what_to_change(api: Api, dreambench_dir: Path) -> None:
    cases = bad_input_cases((dreambench_dir / "cat.jpg").read_bytes())
    failures = []
    with api.client() as client:
        for case in cases:
            reply = client.post(
                case.path,
                json=case.json,
                content=case.content,
                files=case.files,
                data=case.data,
                headers=case.headers,
            )
            error = (
                reply.json().get("error", {})
                if reply.headers.get("content-type") == "application/json"
                else {}
            )
            if reply.status_code != case.status or case.message not in error.get("message", ""):
                failures.append(f"{case.name}: {reply.status_code} {reply.text[:300]}")
        assert client.get("/jobs/no-such-job").status_code == 404
        assert client.delete("/jobs/no-such-job").status_code == 404
        text = client.get("/metrics").text
    assert not failures, "\n".join(failures)
    for reason in ("invalid_image", "target_not_in_prompt", "prompt_too_long", "body_too_large"):
        assert f'realcustom_requests_rejected_total{{reason="{reason}"}}' in text
    assert "Traceback" not in api.process.log()


def test_convertible_images_are_accepted(api: Api) -> None:
    """RGBA, LA, P, CMYK, 16-bit and grayscale uploads, WebP and EXIF-rotated JPEGs are accepted
    (and converted to upright RGB the same way on both sides)."""
    gray16 = Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    uploads = {
        "RGBA": encode(Image.new("RGBA", (64, 64), (255, 0, 0, 0))),
        "LA": encode(Image.new("LA", (64, 64), (10, 128))),
        "P": encode(Image.new("RGB", (64, 64), (0, 0, 255)).convert("P")),
        "CMYK": encode(Image.new("CMYK", (64, 64), (0, 255, 0, 0)), "JPEG"),
        "I;16": encode(gray16),
        "L": encode(Image.new("L", (64, 64), 77)),
        "WebP": encode(Image.new("RGB", (64, 64), (1, 2, 3)), "WEBP"),
        "EXIF": encode(Image.new("RGB", (96, 64), (9, 9, 9)), "JPEG", exif=exif),
    }
    with api.client() as client:
        for name, data in uploads.items():
            reply = client.post("/jobs", json=body(b64(data)))
            assert reply.status_code == 202, f"{name}: {reply.text}"
            assert client.delete(f"/jobs/{reply.json()['id']}").json()["status"] == "cancelled"
        multipart = client.post(
            "/jobs",
            files=[("subject_image", ("cat.png", small_png(), "image/png"))],
            data={
                "prompt": "a cat in the snow",
                "subject_target": "cat",
                "width": "64",
                "height": "64",
                "num_inference_steps": "2",
                "mask_reused_step": "1",
                "return_masks": "true",
            },
        )
        assert multipart.status_code == 202, multipart.text
    decoded = {name: decode_reference(data, max_pixels=10**7, min_side=16) for name, data in uploads.items()}
    assert all(image.mode == "RGB" for image in decoded.values())
    assert decoded["EXIF"].size == (64, 96)  # rotated upright
    assert decoded["RGBA"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert decoded["I;16"].getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256, not clipped


def test_docs_describe_both_body_types_with_examples(api: Api) -> None:
    with api.client() as client:
        schema = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    content = schema["paths"]["/customize"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert schema["components"]["schemas"]["CustomizeRequest"]["examples"]
    assert "subject_image" in content["multipart/form-data"]["schema"]["properties"]
    assert {"/jobs", "/jobs/{job_id}", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])


def test_api_keys_and_rate_limit(redis_server, tmp_path: Path) -> None:
    api = start_api(
        redis_server.url, tmp_path, {"API_KEYS": "key-one, key-two, key-three", "RATE_LIMIT_PER_MINUTE": "3"}
    )
    try:
        with api.client() as client:
            assert client.post("/jobs", json=body()).status_code == 401
            assert (
                client.post("/jobs", json=body(), headers={"Authorization": "Bearer wrong"}).status_code
                == 401
            )
            assert client.get("/healthz").status_code == 200  # probes need no key
            key_one = {"Authorization": "Bearer key-one"}
            # Invalid bodies still count against the limit: the limit applies before validation.
            statuses = [
                client.post("/jobs", json=body(width=1), headers=key_one).status_code for _ in range(4)
            ]
            assert statuses == [422, 422, 422, 429]
            limited = client.post("/jobs", json=body(), headers=key_one)
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
            other_key = client.post("/jobs", json=body(), headers={"Authorization": "Bearer key-two"})
            assert other_key.status_code == 202, other_key.text
            # Idempotency keys are per caller: the same key from another caller is another job.
            same_key = {"Authorization": "Bearer key-two", "Idempotency-Key": "k"}
            first = client.post("/jobs", json=body(), headers=same_key).json()["id"]
            assert client.post("/jobs", json=body(), headers=same_key).json()["id"] == first
            third = {"Authorization": "Bearer key-three", "Idempotency-Key": "k"}
            assert client.post("/jobs", json=body(), headers=third).json()["id"] != first
        assert "API keys required (3 configured)" in api.process.log()
    finally:
        api.process.stop()


def test_the_api_process_never_imports_torch(redis_server, tmp_path: Path) -> None:
    """Start the real API under `-X importtime`, exercise validation and enqueueing, and read the
    list of every module the process imported."""
    api = start_api(redis_server.url, tmp_path, python_flags=("-X", "importtime"))
    with api.client() as client:
        assert client.post("/jobs", json=body()).status_code == 202
        assert client.post("/jobs", json=body(width=1)).status_code == 422
        assert client.get("/metrics").status_code == 200
    api.process.stop()
    imported = re.findall(r"^import time:.*\|\s+(\S+)$", api.process.log(), flags=re.MULTILINE)
    assert "fastapi" in imported and "service.api.app" in imported
    assert not [name for name in imported if name == "torch" or name.startswith("torch.")]
    assert "no API_KEYS configured: the API is open" in api.process.log()
