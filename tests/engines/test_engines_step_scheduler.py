"""The worker's step-level scheduler on the CPU: jobs prepared off the stepping thread join running
batches (made on demand for the eager backend) and come out as the images `Runner.run` gives."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engines.backends import EagerBackend
from engines.compiled import CompiledBackend
from engines.graph_loop import EagerCapture
from engines.planner import Boundary, FamilyShape, Planner, WaitingJob
from engines.runner import Runner
from engines.static_loop import Bucket
from engines.step_scheduler import StepScheduler
from realcustom.jobs import GenerationJob, SubjectInput
from realcustom.preview import LatentPreview
from realcustom.settings_check import SettingsError

RED = Image.new("RGB", (64, 64), (200, 20, 20))
GREEN = Image.new("RGB", (64, 64), (20, 200, 20))


def job(key, prompt, subjects, seed, steps, reuse, images=1, size=64, masks=False):
    return GenerationJob(
        id=key,
        prompt=prompt,
        subjects=tuple(SubjectInput(image, target) for image, target in subjects),
        width=size,
        height=size,
        num_inference_steps=steps,
        mask_reused_step=reuse,
        seed=seed,
        num_images=images,
        return_masks=masks,
    )


def drain(scheduler: StepScheduler, jobs: dict[str, GenerationJob]) -> dict:
    outputs = {}
    for _ in range(100):
        for done in scheduler.step():
            outputs[done.key] = scheduler.decode(done, jobs[done.key], 0.0)
        if not scheduler.rows_in_flight:
            return outputs
    raise AssertionError("the running batches did not drain")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_scheduler_serves_mixed_jobs_like_runner_run(tiny_pipeline):
    """Jobs of other sizes, subject counts, step counts and image counts go to their own families
    (bucket sizes 1, 2, 4 made on demand); one joins mid-flight; every output equals the job run
    alone by `Runner.run`, within the batching tolerance (one grey level on a few pixels)."""
    runner = Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny")
    scheduler = StepScheduler(runner, max_rows=4)
    jobs = {
        "a": job("a", "a dog on a sofa", [(RED, "dog")], seed=1, steps=5, reuse=3, masks=True),
        "b": job("b", "a dog and a cat", [(RED, "dog"), (GREEN, "cat")], seed=2, steps=3, reuse=1),
        "c": job("c", "a cat outside", [(GREEN, "cat")], seed=3, steps=2, reuse=1, images=2),
        "d": job("d", "a dog in the snow", [(RED, "dog")], seed=4, steps=3, reuse=2, size=96),
    }
    prepared = {key: scheduler.prepare(value) for key, value in jobs.items()}
    assert prepared["a"].family == prepared["c"].family != prepared["b"].family != prepared["d"].family
    for key in ("a", "b", "d"):
        assert scheduler.join(prepared[key])
    outputs = {done.key: scheduler.decode(done, jobs[done.key], 0.0) for done in scheduler.step()}
    assert scheduler.join(prepared["c"])  # mid-flight, beside a
    assert scheduler.rows_in_flight == 5 and sorted(scheduler.rows_by_batch()) == [1, 1, 4]
    outputs |= drain(scheduler, jobs)
    assert set(outputs) == set(jobs)
    for key, value in jobs.items():
        expected = runner.run([value])[0]
        assert len(outputs[key].images) == value.num_images
        for got, want in zip(outputs[key].images, expected.images, strict=True):
            difference = np.abs(pixels(got) - pixels(want))
            assert difference.max() <= 1 and (difference > 0).mean() < 0.01, key
    assert [mask.size for mask in outputs["a"].masks] == [(64, 64)]
    assert np.array_equal(pixels(outputs["a"].masks[0]), pixels(runner.run([jobs["a"]])[0].masks[0]))


def test_scheduler_cancel_progress_and_previews(tiny_pipeline):
    runner = Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny")
    scheduler = StepScheduler(runner, max_rows=2)
    jobs = {
        "a": job("a", "a dog on a sofa", [(RED, "dog")], seed=1, steps=4, reuse=2),
        "b": job("b", "a cat outside", [(GREEN, "cat")], seed=3, steps=4, reuse=2),
    }
    for value in jobs.values():
        assert scheduler.join(scheduler.prepare(value))
    scheduler.step()
    assert scheduler.progress("b") == (1, 4)
    image, masks = scheduler.preview("b")
    assert image.mode == "RGB" and max(image.size) <= 128 and [m.size for m in masks] == [image.size]
    assert scheduler.cancel("b") and scheduler.progress("b") is None and scheduler.rows_in_flight == 1
    outputs = drain(scheduler, jobs)
    assert set(outputs) == {"a"}


def test_scheduler_runs_what_no_family_holds_alone(tiny_pipeline):
    """More images than a running batch holds, or a host-stepped (diffusers) scheduler."""
    runner = Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny")
    scheduler = StepScheduler(runner, max_rows=2)
    big = job("big", "a dog", [(RED, "dog")], seed=1, steps=2, reuse=1, images=3)
    prepared = scheduler.prepare(big)
    assert prepared.request is None and prepared.family is None
    assert len(scheduler.run_alone(big).images) == 3


class LinearVAE(torch.nn.Module):
    """A VAE encoder that is exactly linear (latent = M·rgb + c per 8x8 cell): the fit must find it."""

    config = SimpleNamespace(block_out_channels=[8, 8, 8, 8], scaling_factor=0.5)

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(3, 4, 1)
        torch.nn.init.normal_(self.mix.weight, generator=torch.Generator().manual_seed(0))

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=self.mix(F.avg_pool2d(pixels, 8))))


@torch.no_grad()
def test_latent_preview_recovers_a_linear_decoder_and_bounds_the_thumbnail():
    vae = LinearVAE()
    preview = LatentPreview.fit(SimpleNamespace(vae=vae), max_side=32)
    colours = torch.tensor([[0.8, -0.6, -0.6], [-0.2, 0.5, 0.1], [0.9, 0.9, 0.9]]).view(3, 3, 1, 1)
    latents = vae.encode(colours.expand(3, 3, 16, 16)).latent_dist.mean * vae.config.scaling_factor
    predicted = torch.einsum("oc,bchw->bohw", preview.weight, latents) + preview.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(predicted, colours.expand_as(predicted), atol=1e-4, rtol=0)
    image = preview.image(latents[0])
    assert image.size == (32, 32)
    assert np.abs(np.subtract(image.getpixel((5, 5)), (229.5, 51, 51))).max() <= 1


def test_scheduler_checks_a_jobs_settings_itself(tiny_pipeline):
    """A worker never trusts its queue: the rules the API validated with are applied again."""
    scheduler = StepScheduler(Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny"), max_rows=2)
    bad = dataclasses.replace(
        job("x", "a dog", [(RED, "dog")], seed=1, steps=2, reuse=1), guidance_scale=-1.0
    )
    with pytest.raises(SettingsError, match="guidance_scale"):
        scheduler.prepare(bad)


def test_scheduler_families_on_demand_hold_exactly_max_rows(tiny_pipeline):
    scheduler = StepScheduler(Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny"), max_rows=2)
    two = job("two", "a dog", [(RED, "dog")], seed=1, steps=2, reuse=1, images=2)
    prepared = scheduler.prepare(two)
    assert prepared.family is not None and prepared.rows == 2 and prepared.request.rows == 2
    diffusers = dataclasses.replace(two, id="d", num_images=1, scheduler="diffusers-euler")
    assert scheduler.prepare(diffusers).family is None  # a host-stepped sampler runs alone
    assert len(scheduler.run_alone(diffusers).images) == 1


def test_scheduler_on_prepared_graphs_picks_the_fitting_family_with_fewest_slots(tiny_pipeline):
    """With a graph backend the families are its prepared buckets: a job goes to the bucket family
    that holds exactly its subjects and rows, the one with the fewest subject slots."""
    buckets = [Bucket(2, 64, 64, 1), Bucket(2, 64, 64, 2), Bucket(1, 64, 64, 3)]
    backend = CompiledBackend(tiny_pipeline, buckets=buckets, compile_backend=None, capture=EagerCapture())
    backend.warmup()
    scheduler = StepScheduler(Runner(tiny_pipeline, backend, "tiny"), max_rows=4)
    one = job("one", "a dog", [(RED, "dog")], seed=1, steps=2, reuse=1, images=2)
    two = job("two", "a dog and a cat", [(RED, "dog"), (GREEN, "cat")], seed=2, steps=2, reuse=1, images=2)
    assert scheduler.choose_family(one)[2] == 1
    assert scheduler.choose_family(two)[2] == 2
    assert scheduler.choose_family(dataclasses.replace(two, num_images=3)) is None  # no bucket of 3 rows
    assert scheduler.shapes([scheduler.choose_family(two)]) == {
        scheduler.choose_family(two): FamilyShape((2,), ((2,),))
    }
    outputs = {}
    for value in (one, two):
        assert scheduler.join(scheduler.prepare(value))
    outputs = drain(scheduler, {"one": one, "two": two})
    assert [len(outputs[key].images) for key in ("one", "two")] == [2, 2]


def test_scheduler_applies_the_planners_plan(tiny_pipeline):
    """The worker's path: the planner decides from `running()` and `shapes()`, `apply` carries it
    out; a job left out of every layout has left, a joining job is loaded where the plan says."""
    runner = Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny")
    scheduler = StepScheduler(runner, max_rows=4)
    jobs = {
        key: job(key, "a dog on a sofa", [(RED, "dog")], seed=seed, steps=4, reuse=2)
        for seed, key in enumerate("abc", start=1)
    }
    prepared = {key: scheduler.prepare(value) for key, value in jobs.items()}
    family = prepared["a"].family
    planner = Planner(max_wait=8)

    def boundary(step, waiting, leaving=frozenset()):
        running = tuple(scheduler.running())
        shapes = scheduler.shapes({family})
        return Boundary(step, running, waiting, shapes, leaving)

    waiting = tuple(WaitingJob(k, family, 1, 1.0, 0, owner=k) for k in ("a", "b"))
    plan = planner.plan(boundary(0, waiting))
    assert [join.key for join in plan.joins] == ["a", "b"]
    scheduler.apply(plan, prepared)
    assert scheduler.rows_by_batch() == [2] and scheduler.progress("b") == (0, 4)
    scheduler.step()
    plan = planner.plan(boundary(1, (WaitingJob("c", family, 1, 1.0, 1, owner="c"),), frozenset({"a"})))
    scheduler.apply(plan, prepared)
    assert plan.leave == ("a",) and scheduler.progress("a") is None
    # b (still updating its masks) keeps row 0; c joins after it.
    assert [row.key for row in scheduler.running()] == ["b", "c"] and scheduler.progress("c") == (0, 4)
    outputs = drain(scheduler, jobs)
    assert set(outputs) == {"b", "c"}
    expected = runner.run([jobs["c"]])[0].images[0]
    assert np.abs(pixels(outputs["c"].images[0]) - pixels(expected)).max() <= 1
