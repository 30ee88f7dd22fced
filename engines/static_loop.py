"""Shapes and keys of the captured loop: buckets, the settings that select a graph, graph keys.

The step every graph runs is `realcustom.step.denoise_step` over a `LoopState` (every tensor a
step reads or writes, allocated once per bucket and refilled per request). A graph is selected by
(step kind, bucket, `GraphSettings`): the bucket fixes every shape (rows, subjects, height,
width); `GraphSettings` holds the loop settings that change the captured operations (scheduler
family, mask mode, overlap policy). Step counts, `mask_reused_step`, guidance scales and mask
scopes are data in the state, so they never enter a key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from realcustom.denoise import LoopSettings
from realcustom.pipeline import RealCustomPipeline
from realcustom.schedulers import TABLE_SCHEDULERS
from realcustom.step import MAX_STEPS, LoopState, MaskSettings, RowSchedule, StepKind


@dataclass(frozen=True, order=True)
class Bucket:
    """A shape the backend prepares at warm-up: up to `batch` samples, up to `subjects` subjects."""

    batch: int
    height: int
    width: int
    subjects: int = 1

    def fits(self, batch: int, subjects: int, height: int, width: int) -> bool:
        return (
            (height, width) == (self.height, self.width) and batch <= self.batch and subjects <= self.subjects
        )

    def __str__(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}" + (f"s{self.subjects}" if self.subjects > 1 else "")


_BUCKET = re.compile(r"^(\d+)x(\d+)x(\d+)(?:s(\d+))?$")


def parse_buckets(text: str | Sequence[str]) -> list[Bucket]:
    """ "1x1024x1024,4x1024x1024s2" -> buckets (BATCHxHEIGHTxWIDTH, optional sSUBJECTS), sorted."""
    items = text.split(",") if isinstance(text, str) else list(text)
    buckets = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        match = _BUCKET.match(item)
        if not match:
            raise ValueError(f"bad bucket {item!r}: use BATCHxHEIGHTxWIDTH[sSUBJECTS], e.g. 4x1024x1024")
        batch, height, width, subjects = match.groups()
        bucket = Bucket(int(batch), int(height), int(width), int(subjects or 1))
        if min(bucket.batch, bucket.subjects) < 1 or bucket.height % 32 or bucket.width % 32:
            raise ValueError(f"bad bucket {item!r}: batch, subjects >= 1; sizes multiples of 32")
        buckets.append(bucket)
    return sorted(set(buckets))


def pick_bucket(
    buckets: Sequence[Bucket], batch: int, subjects: int, height: int, width: int
) -> Bucket | None:
    """The smallest configured bucket that holds this loop (padding rows and subject slots), or None."""
    fitting = [b for b in buckets if b.fits(batch, subjects, height, width)]
    return min(fitting, key=lambda b: (b.batch * b.subjects, b.batch)) if fitting else None


@dataclass(frozen=True)
class GraphSettings:
    """The loop settings that change which operations a step runs (part of every graph key)."""

    scheduler: str = "dpm"
    mask_mode: tuple[str, ...] = ("max_norm",)
    overlap: str = "exclusive"

    @classmethod
    def of(cls, settings: LoopSettings) -> GraphSettings:
        return cls(settings.scheduler, tuple(settings.mask_mode), settings.overlap)

    @property
    def capturable(self) -> bool:
        """Device-table samplers only (a diffusers scheduler steps on the host)."""
        return self.scheduler in TABLE_SCHEDULERS

    @property
    def mask(self) -> MaskSettings:
        return MaskSettings(self.mask_mode, self.overlap)


@dataclass(frozen=True)
class GraphKey:
    kind: str
    batch: int
    subjects: int
    height: int
    width: int
    settings: GraphSettings = GraphSettings()
    guidance_rows: int = 0  # MASK_UPDATE steps whose guidance pass runs on the first rows only; 0 = all
    # Opt-in (GraphLoop(partial_uncond=True)): the generation pass's unconditional half covers the
    # first rows only (rows with CFG first; the others are CFG-free); None = every row.
    uncond_rows: int | None = None

    @classmethod
    def of(
        cls,
        kind: StepKind,
        bucket: Bucket,
        settings: GraphSettings,
        guidance_rows: int = 0,
        uncond_rows: int | None = None,
    ) -> GraphKey:
        return cls(
            kind.value,
            bucket.batch,
            bucket.subjects,
            bucket.height,
            bucket.width,
            settings,
            guidance_rows,
            uncond_rows,
        )


def bucket_state(
    pipeline: RealCustomPipeline, bucket: Bucket, settings: GraphSettings, dtype: torch.dtype | None = None
) -> LoopState:
    """A state holding a bucket's shape, with device schedule tables of capacity MAX_STEPS
    (`dtype`: of the conditioning buffers; the model's by default)."""
    _, latent_height, _ = pipeline.latent_shape(bucket.height, bucket.width)
    state = LoopState.for_model(
        pipeline.unet,
        tuple(pipeline.black_image_tokens().shape[1:]),
        bucket.batch,
        bucket.subjects,
        bucket.height,
        bucket.width,
        bucket.height // latent_height,
        dtype,
    )
    latent_shape = tuple(state.latents.shape[1:])
    state.schedule = RowSchedule(settings.scheduler, bucket.batch, pipeline.device, MAX_STEPS, latent_shape)
    return state
