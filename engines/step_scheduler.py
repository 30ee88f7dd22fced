"""The worker's step-level scheduler: jobs are prepared off the stepping thread, join running
batches at step boundaries and leave them when their own loop ends.

One `RunningBatch` per family of graphs (size, subject slots, graph settings). With a backend that
captures graphs at warm-up (`compiled`, `tensorrt`) the families are its prepared buckets; a job
that fits none runs alone through `Runner.run` (the backend's own fallback). With `eager` the
families are made on demand: buckets of 1, 2, 4, ... up to `max_rows` rows, stepped eagerly
(`EagerCapture`) with the very step function the graphs capture.

Threads: `prepare` (text, reference encoding, projector, every layer's image K/V, noise) runs on
the preparation thread;
`join`, `step`, `cancel`, `snapshot` and `decode` run on the stepping thread, between steps.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from PIL import Image

from engines.compiled import EagerCapture, GraphLoop
from engines.jobs import GenerationJob, GenerationOutput
from engines.runner import Runner
from engines.static_loop import Bucket, GraphSettings
from engines.step_batching import Finished, RowRequest, RunningBatch
from realcustom.denoise import LoopSettings
from realcustom.pipeline import mask_to_image
from realcustom.preview import LatentPreview
from realcustom.settings_check import check_generation
from realcustom.step import LoopState

FamilyKey = tuple[int, int, int, GraphSettings]  # height, width, subject slots, settings


@dataclass
class Prepared:
    """A job ready to join: its loop inputs, or no request when it must run alone."""

    job: GenerationJob
    request: RowRequest | None
    family: FamilyKey | None
    prepare_s: float


def _family_sizes(max_rows: int) -> list[int]:
    sizes, rows = [], 1
    while rows < max_rows:
        sizes.append(rows)
        rows *= 2
    return [*sizes, max_rows]


class StepScheduler:
    """Running batches of one runner; `max_rows`: most rows (images) one running batch holds."""

    def __init__(self, runner: Runner, max_rows: int):
        self.runner = runner
        self.pipeline = runner.pipeline
        self.max_rows = max_rows
        graphs = getattr(runner.backend, "graphs", None)
        self.on_demand = graphs is None  # eager: families are prepared when first needed
        # Eager families also get steps whose guidance pass covers only the rows still updating masks.
        self.graphs: GraphLoop = graphs or GraphLoop(self.pipeline, EagerCapture(), partial_guidance=True)
        self.batches: dict[FamilyKey, RunningBatch] = {}
        self.previews = LatentPreview.fit(self.pipeline)

    # ---- preparation thread ---------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, job: GenerationJob) -> Prepared:
        """Conditioning and noise of one job (or nothing, when it has no family and runs alone)."""
        started = time.perf_counter()
        check_generation(job)
        family = self._family_key(job)
        request = None
        if family is not None:
            cond = self.runner.conditioning([job])
            latents = self.pipeline.prepare_latents([job.seed], [job.num_images], job.height, job.width)
            # The image K/V too, so that joining only copies rows.
            key_values = LoopState.image_key_values(self.pipeline.unet, cond, family[2])
            request = RowRequest(
                job.id, cond, latents, job.num_inference_steps, job.mask_reused_step, key_values
            )
        return Prepared(job, request, family, time.perf_counter() - started)

    def _family_key(self, job: GenerationJob) -> FamilyKey | None:
        settings = GraphSettings.of(
            LoopSettings(job.num_inference_steps, job.scheduler, job.mask_mode, job.mask_reused_step)
        )
        if not settings.capturable or job.num_images > self.max_rows:
            return None
        subjects = len(job.subjects)
        if self.on_demand:
            return job.height, job.width, subjects, settings
        slots = sorted(
            bucket.subjects
            for bucket, prepared in self.graphs.states
            if prepared == settings
            and (bucket.height, bucket.width) == (job.height, job.width)
            and bucket.subjects >= subjects
            and bucket.batch >= job.num_images
        )
        return (job.height, job.width, slots[0], settings) if slots else None

    # ---- stepping thread ------------------------------------------------------------------------

    def batch_for(self, family: FamilyKey) -> RunningBatch:
        batch = self.batches.get(family)
        if batch is None:
            height, width, subjects, settings = family
            if self.on_demand:
                buckets = [Bucket(rows, height, width, subjects) for rows in _family_sizes(self.max_rows)]
                self.graphs.prepare(buckets, [settings])
            else:
                buckets = [
                    bucket
                    for bucket, prepared in self.graphs.states
                    if prepared == settings and (bucket.height, bucket.width, bucket.subjects) == family[:3]
                ]
            batch = self.batches[family] = RunningBatch(self.graphs, buckets, settings)
        return batch

    @torch.no_grad()
    def join(self, prepared: Prepared) -> bool:
        return self.batch_for(prepared.family).join(prepared.request)

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """One step of every running batch that has rows."""
        finished: list[Finished] = []
        for batch in self.batches.values():
            if batch.slots:
                finished += batch.step()
        return finished

    def cancel(self, key: Hashable) -> bool:
        return any(batch.cancel(key) for batch in self.batches.values())

    def progress(self, key: Hashable) -> tuple[int, int] | None:
        for batch in self.batches.values():
            found = batch.progress(key)
            if found is not None:
                return found
        return None

    @property
    def rows_in_flight(self) -> int:
        return sum(batch.used for batch in self.batches.values())

    def rows_by_batch(self) -> list[int]:
        """Rows of every batch that stepped (what one scheduler step computes, batch by batch)."""
        return [batch.bucket.batch for batch in self.batches.values() if batch.slots]

    @torch.no_grad()
    def preview(self, key: Hashable) -> tuple[Image.Image, list[Image.Image]] | None:
        """A small preview of a running job's first image (x̂₀ through the linear latent map) and
        its subject masks at the preview's size."""
        for batch in self.batches.values():
            snapshot = batch.snapshot(key)
            if snapshot is not None:
                x0, masks = snapshot
                image = self.previews.image(x0[0])
                return image, [mask_to_image(mask, image.size) for mask in masks[0]]
        return None

    @torch.no_grad()
    def decode(self, finished: Finished, job: GenerationJob, inference_s: float) -> GenerationOutput:
        images = self.pipeline.decode(finished.latents)
        masks = None
        if job.return_masks:
            size = (job.width, job.height)
            masks = [mask_to_image(row[s], size) for row in finished.masks for s in range(len(job.subjects))]
        return GenerationOutput(images, masks, inference_s)

    def run_alone(self, job: GenerationJob) -> GenerationOutput:
        """A job no running batch can hold: its whole loop, now (the backend's fallback path)."""
        return self.runner.run([job])[0]
