"""The worker's step executor: jobs are prepared off the stepping thread, and each `StepPlan` of the
planner (engines/planner.py) is applied to the running batches, one per family of graphs.

One `RunningBatch` per family (size, subject slots, graph settings). With a backend that captures
graphs at warm-up (`compiled`, `tensorrt`: a `SteppedBackend`) the families are its prepared
buckets; a job that fits none runs alone through `Runner.run` (the backend's own fallback). With
`eager` the families are made on demand: buckets of 1, 2, 4, ... up to `max_rows` rows, stepped
eagerly (`EagerCapture`) with the very step function the graphs capture.

What the planner reads of the executor is plain data: `Prepared.family` and `Prepared.rows` of a
job, `running()` (every running job's rows, steps left and phase) and `shapes(families)` (what a
family can hold). Preparing a job is one call down into the method
(`realcustom.job_inputs.prepare_rows`), never back up.

A job's LoRA adapters (an adapter bank on the runner's UNet) are held from `prepare` until the
worker `release`s the prepared job (it finished, failed, was cancelled or went back to the queue),
so an adapter is never unloaded under rows that use it; `load_adapter`/`unload_adapter` write the
bank's slots on the stepping thread, between steps (captured graphs read the slots in place).

Threads: `prepare` runs on the preparation thread; `apply`, `step`, `cancel`, `snapshot`,
`decode` and the adapter loads run on the stepping thread, between steps; `release` anywhere.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

import torch
from PIL import Image

from engines.backends import step_graphs
from engines.graph_loop import EagerCapture, GraphLoop
from engines.planner import FamilyLayout, FamilyShape, JobShape, PreparedBucket, RunningRows, StepPlan
from engines.planner import choose_family as plan_family
from engines.runner import Runner
from engines.static_loop import Bucket, GraphSettings
from engines.step_batching import Finished, RowRequest, RunningBatch
from realcustom.denoise import LoopSettings
from realcustom.job_inputs import job_outputs, prepare_rows
from realcustom.jobs import GenerationJob, GenerationOutput
from realcustom.lora.adapter import LoRAAdapter
from realcustom.lora.bank import AdapterBank
from realcustom.pipeline import mask_to_image
from realcustom.preview import LatentPreview

FamilyKey = tuple[int, int, int, GraphSettings]  # height, width, subject slots, settings


@dataclass
class Prepared:
    """A job ready to join: its loop inputs, or no request when it must run alone."""

    job: GenerationJob
    request: RowRequest | None
    family: FamilyKey | None
    prepare_s: float
    holds_adapters: bool = False  # its adapters are acquired until `StepScheduler.release`

    @property
    def rows(self) -> int:
        return self.job.num_images

    @property
    def cfg(self) -> bool:
        """Its rows need the unconditional sample (guidance > 1)."""
        return self.job.guidance_scale > 1


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
        graphs = step_graphs(runner.backend)
        self.on_demand = graphs is None  # eager: families are prepared when first needed
        # Eager families also get steps whose guidance pass covers only the rows still updating
        # masks, and whose unconditional half covers only the rows with CFG.
        self.graphs: GraphLoop = graphs or GraphLoop(
            self.pipeline, EagerCapture(), partial_guidance=True, partial_uncond=True
        )
        self.batches: dict[FamilyKey, RunningBatch] = {}
        self.previews = LatentPreview.fit(self.pipeline)

    # ---- preparation thread ---------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, job: GenerationJob) -> Prepared:
        """Conditioning, noise and image K/V of one job (or nothing, when it runs alone); its
        adapters are held from here on (`release` when the job ends)."""
        started = time.perf_counter()
        family = self.choose_family(job)
        holds = self._acquire(job)
        request = None
        try:
            if family is not None:
                rows = prepare_rows(self.pipeline, job, subject_slots=family[2])
                request = RowRequest(
                    job.id,
                    rows.cond,
                    rows.latents,
                    job.num_inference_steps,
                    job.mask_reused_step,
                    rows.key_values,
                    job.timesteps,
                    job.eta,
                    cfg=job.guidance_scale > 1,
                )
        except BaseException:
            if holds:
                self.adapters.release(job.loras)
            raise
        return Prepared(job, request, family, time.perf_counter() - started, holds)

    # ---- adapters ---------------------------------------------------------------------------------

    @property
    def adapters(self) -> AdapterBank | None:
        """The adapter bank of the runner's UNet (None: this model serves no adapters)."""
        return self.pipeline.unet.adapters

    def _acquire(self, job: GenerationJob) -> bool:
        if not job.loras:
            return False
        if self.adapters is None:
            raise ValueError("the job names LoRA adapters but this worker serves none (no adapter bank)")
        self.adapters.acquire(job.loras)
        return True

    def release(self, prepared: Prepared) -> None:
        """The job ended (any way): its adapters may be unloaded again. Idempotent."""
        if prepared.holds_adapters:
            prepared.holds_adapters = False
            self.adapters.release(prepared.job.loras)

    def load_adapter(self, adapter: LoRAAdapter) -> int:
        """Stepping thread, between steps: `adapter` into a free slot of the bank (no recapture)."""
        return self.adapters.load(adapter)

    def unload_adapter(self, name: str) -> None:
        """Stepping thread, between steps: free the slot of an adapter no request holds."""
        self.adapters.unload(name)

    def choose_family(self, job: GenerationJob) -> FamilyKey | None:
        settings = GraphSettings.of(
            LoopSettings(job.num_inference_steps, job.scheduler, job.mask_mode, job.mask_reused_step)
        )
        shape = JobShape(
            job.height, job.width, len(job.subjects), job.num_images, settings, settings.capturable
        )
        prepared = None
        if not self.on_demand:
            prepared = [
                PreparedBucket(b.batch, b.height, b.width, b.subjects, s) for b, s in self.graphs.states
            ]
        return plan_family(shape, self.max_rows, prepared)

    # ---- what the planner reads ------------------------------------------------------------------

    def running(self) -> list[RunningRows]:
        """Every running job's rows, family by family in row order (owner and priority are the
        caller's to fill in)."""
        return [
            RunningRows(key, family, rows, steps_left, updating, cfg=cfg)
            for family, batch in self.batches.items()
            for key, rows, steps_left, updating, cfg in batch.rows()
        ]

    def shapes(self, families: Iterable[FamilyKey]) -> dict[FamilyKey, FamilyShape]:
        """What each family can hold, without making the ones that do not run yet."""
        shapes = {}
        for family in families:
            batch = self.batches.get(family)
            if batch is not None:
                shapes[family] = batch.shape
            else:
                sizes = (
                    _family_sizes(self.max_rows)
                    if self.on_demand
                    else [bucket.batch for bucket in self._prepared_buckets(family)]
                )
                shapes[family] = FamilyShape.of(
                    sizes, self.graphs.partial_guidance, self.graphs.partial_uncond
                )
        return shapes

    def _prepared_buckets(self, family: FamilyKey) -> list[Bucket]:
        height, width, subjects, settings = family
        return [
            bucket
            for bucket, prepared in self.graphs.states
            if prepared == settings
            and (bucket.height, bucket.width, bucket.subjects) == (height, width, subjects)
        ]

    # ---- stepping thread ------------------------------------------------------------------------

    def batch_for(self, family: FamilyKey) -> RunningBatch:
        batch = self.batches.get(family)
        if batch is None:
            height, width, subjects, settings = family
            if self.on_demand:
                buckets = [Bucket(rows, height, width, subjects) for rows in _family_sizes(self.max_rows)]
                self.graphs.prepare(buckets, [settings])
            else:
                buckets = self._prepared_buckets(family)
            batch = self.batches[family] = RunningBatch(self.graphs, buckets, settings)
        return batch

    @torch.no_grad()
    def apply(self, plan: StepPlan, joining: Mapping[Hashable, Prepared]) -> None:
        """Carry out a plan's leaves and layouts (its `alone` jobs are the caller's: `run_alone`).
        A family the plan gives no layout keeps no rows."""
        for join in plan.joins:
            if joining[join.key].family != join.family:
                raise ValueError(f"the plan puts {join.key!r} in another family than it was prepared for")
        requests = {join.key: joining[join.key].request for join in plan.joins}
        for family, layout in plan.layouts.items():
            batch = self.batch_for(family)
            batch.apply(layout, {key: requests[key] for key in layout.keys if key in requests})
        for family, batch in self.batches.items():
            if family not in plan.layouts and batch.slots:
                batch.apply(FamilyLayout(batch.buckets[0].batch, (), None))

    @torch.no_grad()
    def join(self, prepared: Prepared) -> bool:
        """Join one job now, by the planner's layout rule (callers without a planner)."""
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
    def stats(self) -> dict[str, int]:
        """Monotonic counters of the runner's backend and of the running batches' steps
        (`graph_replays`, `steps_mask_update`, `steps_mask_reuse`, `rows_guidance`,
        `rows_generation`: UNet rows each pass computed)."""
        return dict(self.graphs.stats) if self.on_demand else self.runner.stats

    @property
    def rows_in_flight(self) -> int:
        return sum(batch.used for batch in self.batches.values())

    def rows_by_batch(self) -> list[int]:
        """Rows of every batch that steps (what one scheduler step computes, batch by batch)."""
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
        """A finished job's images (and masks when asked); `inference_s` so far, decoding added."""
        started = time.perf_counter() - inference_s
        return job_outputs(self.pipeline, [job], finished.latents, finished.masks, started)[0]

    def run_alone(self, job: GenerationJob) -> GenerationOutput:
        """A job no running batch can hold: its whole loop, now (the backend's fallback path)."""
        return self.runner.run([job])[0]
