"""Engines test set-up: small batches of jobs on the tiny model (fp32, CPU, 64 px, few steps)."""

from __future__ import annotations

import pytest
from PIL import Image

from realcustom.jobs import GenerationJob, SubjectInput

RED = Image.new("RGB", (64, 64), (200, 20, 20))
GREEN = Image.new("RGB", (64, 64), (20, 200, 20))


def job(prompt: str, subjects, seed: int = 0, num_images: int = 1, steps: int = 3, reuse: int = 2, **kw):
    return GenerationJob(
        id=f"job-{seed}",
        prompt=prompt,
        subjects=tuple(SubjectInput(image, target) for image, target in subjects),
        width=kw.pop("width", 64),
        height=kw.pop("height", 64),
        num_inference_steps=steps,
        mask_reused_step=reuse,
        seed=seed,
        num_images=num_images,
        **kw,
    )


@pytest.fixture(scope="session")
def single_jobs():
    return [job("a photo of a dog on a sofa", [(RED, "dog")], seed=1, num_images=2)]


@pytest.fixture(scope="session")
def multi_jobs():
    """Two jobs batched: one with two subjects, one with one (padded to two slots), 3 samples."""
    return [
        job("a dog and a cat in a garden", [(RED, "dog"), (GREEN, "cat")], seed=1),
        job("a cat on a sofa", [(GREEN, "cat")], seed=2, num_images=2),
    ]
