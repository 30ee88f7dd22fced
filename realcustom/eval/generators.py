"""Where the evaluated images come from: the pipeline in this process, or a running service.

Both draw the same images for the same seed (the service's runner seeds like the pipeline), so a
run can move between them. Only the in-process generator sees the per-step masks; the service
returns the final mask of each subject.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass, field

import httpx
from PIL import Image

from realcustom.pipeline import mask_to_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Settings shared by every prompt of a run."""

    size: int
    steps: int
    guidance_scale: float = 3.5
    mask_scope: float = 0.25
    mask_reused_step: int = 12


@dataclass
class Generated:
    """images[k]; masks[k][s]: final mask of subject s in image k; mask_steps[k][s]: one mask per
    recomputation step (empty when the generator cannot see them)."""

    images: list[Image.Image]
    masks: list[list[Image.Image]]
    mask_steps: list[list[list[Image.Image]]] = field(default_factory=list)


class PipelineGenerator:
    """Runs a RealCustomPipeline in this process."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def generate(
        self, prompt: str, subjects: list[tuple[Image.Image, str]], seed: int, count: int, sampling: Sampling
    ) -> Generated:
        output = self.pipeline(
            prompt,
            subjects,
            height=sampling.size,
            width=sampling.size,
            num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            mask_scope=sampling.mask_scope,
            mask_reused_step=sampling.mask_reused_step,
            num_images_per_prompt=count,
            seed=seed,
            return_masks=True,
        )
        # Steps after the last recomputation reuse its mask; the evolution shows the distinct ones.
        recomputed = output.masks[: min(sampling.mask_reused_step, sampling.steps)]
        size = output.images[0].size
        steps = [
            [[mask_to_image(step[k, s], size) for step in recomputed] for s in range(len(subjects))]
            for k in range(count)
        ]
        return Generated(list(output.images), [[row[-1] for row in image] for image in steps], steps)


class ServiceGenerator:
    """Sends each prompt to `POST /customize` of a running service."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self._encoded: dict[int, str] = {}

    def _encode(self, image: Image.Image) -> str:
        if id(image) not in self._encoded:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self._encoded[id(image)] = base64.b64encode(buffer.getvalue()).decode()
        return self._encoded[id(image)]

    def generate(
        self, prompt: str, subjects: list[tuple[Image.Image, str]], seed: int, count: int, sampling: Sampling
    ) -> Generated:
        body = {
            "prompt": prompt,
            "subjects": [{"image": self._encode(image), "target": target} for image, target in subjects],
            "width": sampling.size,
            "height": sampling.size,
            "num_inference_steps": sampling.steps,
            "guidance_scale": sampling.guidance_scale,
            "mask_scope": sampling.mask_scope,
            "mask_reused_step": sampling.mask_reused_step,
            "seed": seed,
            "num_images": count,
            "output_format": "png",
            "return_masks": True,
        }
        reply = self.client.post("/customize", json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"the service answered {reply.status_code}: {reply.text[:500]}")
        data = reply.json()
        images = [_decode(item) for item in data["images"]]
        masks = [_decode(item) for item in data["masks"]]
        per_image = len(subjects)
        return Generated(images, [masks[k * per_image : (k + 1) * per_image] for k in range(count)])

    def close(self) -> None:
        self.client.close()


def _decode(text: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return image.copy()
