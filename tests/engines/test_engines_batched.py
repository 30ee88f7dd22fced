"""The batched loop vs the official-style three-call loop, and the static-buffer (CUDA-graph) loop
vs the eager loop, all in fp32 on the tiny model."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from benchmarks.baseline_loop import three_call_denoise
from engines.backends import EagerBackend, select_backend
from engines.compiled import CompiledBackend
from engines.graph_loop import EagerCapture
from engines.runner import Runner, load_runner
from engines.static_loop import Bucket, GraphSettings
from realcustom.denoise import LoopSettings, denoise
from realcustom.job_inputs import job_conditioning
from realcustom.jobs import GenerationJob, SubjectInput


def _inputs(pipeline, jobs):
    runner = Runner(pipeline, EagerBackend(pipeline), "tiny")
    cond = job_conditioning(runner.pipeline, jobs)
    first = jobs[0]
    latents = pipeline.prepare_latents(
        [j.seed for j in jobs], [j.num_images for j in jobs], first.height, first.width
    )
    return cond, latents


def _close(a, b, atol=1e-5):
    """Equal up to fp32 rounding: `atol` relative to the largest latent (~50 after a few random-
    weight steps), masks (in [0, 1]) absolute."""
    scale = max(1.0, float(a.latents.abs().max()))
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=atol * scale)
    torch.testing.assert_close(a.masks, b.masks, rtol=0, atol=atol)


@pytest.mark.parametrize("jobs_name", ["single_jobs", "multi_jobs"])
@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_batched_loop_matches_three_call_loop(tiny_pipeline, request, jobs_name, scheduler):
    cond, latents = _inputs(tiny_pipeline, request.getfixturevalue(jobs_name))
    settings = LoopSettings(3, scheduler, ("max_norm",), 2)
    batched = denoise(tiny_pipeline.unet, cond, latents, settings)
    three = three_call_denoise(tiny_pipeline.unet, cond, latents, settings)
    _close(batched, three)
    assert batched.masks.shape[:3] == (3, cond.batch_size, cond.image_tokens.shape[1])


def test_batched_loop_matches_three_call_loop_with_projector_in_every_call(tiny_pipeline, single_jobs):
    """The baseline as benchmarked: the projector runs inside every image-conditioned call."""
    pipeline = tiny_pipeline
    cond, latents = _inputs(pipeline, single_jobs)
    encoder = pipeline.reference_encoder
    features = encoder(encoder.to_tensor([single_jobs[0].subjects[0].image]))
    black = encoder.black_features(1)
    batch = cond.batch_size
    calls = {"projector": 0}

    def tokens(source):
        def run():
            calls["projector"] += 1
            return pipeline.project(source.expand(batch)).unsqueeze(1)

        return run

    settings = LoopSettings(3, "dpm", ("max_norm",), 2)
    three = three_call_denoise(pipeline.unet, cond, latents, settings, tokens(features), tokens(black))
    _close(denoise(pipeline.unet, cond, latents, settings), three, atol=1e-4)
    assert calls["projector"] == 2 * settings.num_inference_steps


def _static_backend(pipeline, buckets, **kw):
    backend = CompiledBackend(pipeline, buckets=buckets, compile_backend=None, capture=EagerCapture(), **kw)
    backend.warmup()
    return backend


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_batched_static_loop_matches_eager(tiny_pipeline, multi_jobs, scheduler):
    cond, latents = _inputs(tiny_pipeline, multi_jobs)
    settings = LoopSettings(4, scheduler, ("max_norm",), 2)
    # Bucket larger than the loop: 3 samples padded to 4 rows, 2 subject slots to 3.
    backend = _static_backend(
        tiny_pipeline, [Bucket(4, 64, 64, 3)], graph_settings=[GraphSettings(scheduler)]
    )
    result = backend.denoise(tiny_pipeline, cond, latents, settings)
    _close(denoise(tiny_pipeline.unet, cond, latents, settings), result, atol=1e-6)
    assert backend.stats["graph_replays"] == 4 and backend.stats["graph_misses"] == 0
    assert backend.stats["graphs_captured"] == 2


def test_batched_static_loop_miss_runs_eagerly_and_is_counted(tiny_pipeline, single_jobs, caplog):
    cond, latents = _inputs(tiny_pipeline, single_jobs)
    settings = LoopSettings(3, "dpm", ("max_norm",), 1)
    backend = _static_backend(tiny_pipeline, [Bucket(1, 64, 64)])  # batch 2 does not fit
    result = backend.denoise(tiny_pipeline, cond, latents, settings)
    _close(denoise(tiny_pipeline.unet, cond, latents, settings), result, atol=1e-6)
    assert backend.stats["graph_misses"] == 3 and backend.stats["graph_replays"] == 0
    # Another program (mask mode) than the captured one: a miss too.
    other = LoopSettings(3, "dpm", ("min_max_norm",), 1)
    backend.denoise(tiny_pipeline, *_inputs(tiny_pipeline, single_jobs), other)
    assert backend.stats["graph_misses"] == 6
    # A diffusers scheduler cannot be captured: the whole loop runs eagerly.
    euler = LoopSettings(2, "diffusers-euler", ("max_norm",), 1)
    result = backend.denoise(tiny_pipeline, cond, latents, euler)
    _close(denoise(tiny_pipeline.unet, cond, latents, euler), result, atol=0)
    assert backend.stats["eager_loops"] == 1


@pytest.mark.slow
def test_batched_static_loop_traces_with_dynamo(tiny_pipeline, single_jobs):
    """torch.compile's graph capture (dynamo, backend "eager": no code generation) of both step kinds."""
    torch._dynamo.reset()
    cond, latents = _inputs(tiny_pipeline, single_jobs)
    # MASK_UPDATE steps only (a superset of MASK_REUSE's operations): one trace, half the time.
    settings = LoopSettings(2, "dpm", ("max_norm",), 2)
    backend = CompiledBackend(
        tiny_pipeline, buckets=[Bucket(2, 64, 64)], compile_backend="eager", capture=EagerCapture()
    )
    backend.warmup()
    result = backend.denoise(tiny_pipeline, cond, latents, settings)
    _close(denoise(tiny_pipeline.unet, cond, latents, settings), result, atol=1e-5)
    assert backend.stats["graph_replays"] == 2


def test_batched_runner_on_static_backend_gives_the_eager_images(tiny_pipeline, multi_jobs):
    eager = Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny").run(multi_jobs)
    backend = CompiledBackend(
        tiny_pipeline, buckets=[Bucket(4, 64, 64, 2)], compile_backend=None, capture=EagerCapture()
    )
    runner = Runner(tiny_pipeline, backend, "tiny")
    runner.warmup()  # captures the bucket first (backend.warmup), then one job end to end
    assert runner.stats["graphs_captured"] == 2
    fast = runner.run(multi_jobs)
    for a, b in zip(eager, fast, strict=True):
        for image_a, image_b in zip(a.images, b.images, strict=True):
            assert image_a.tobytes() == image_b.tobytes()


def test_batched_compiled_backend_falls_back_on_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="engines.backends"):
        runner = load_runner("tiny", "compiled", "cpu", buckets="1x64x64")
    assert runner.backend_name == "eager"
    assert runner.stats == {}
    assert any("'compiled' unavailable (no CUDA device)" in r.getMessage() for r in caplog.records)


def test_batched_tensorrt_backend_says_why_it_cannot_run(tiny_pipeline, caplog):
    with caplog.at_level(logging.WARNING, logger="engines.backends"):
        backend = select_backend("tensorrt", tiny_pipeline)
    assert backend.name == "eager"
    (record,) = [r for r in caplog.records if "tensorrt" in r.getMessage()]
    assert "not installed" in record.getMessage() or "no CUDA device" in record.getMessage()


def test_batched_mask_keeps_the_official_pixel_count_with_float64_scope(tiny_pipeline):
    """scope 0.35 on a 4x10 mask (64x160 image): the official int(0.35·40) = 14 pixels; a float32
    scope would keep 13. Checked through the pipeline and through a prepared static state."""
    red = Image.new("RGB", (64, 64), (200, 20, 20))
    out = tiny_pipeline(
        "a dog",
        [(red, "dog")],
        height=64,
        width=160,
        num_inference_steps=2,
        mask_reused_step=1,
        mask_scope=0.35,
        output_type="latent",
        return_masks=True,
    )
    assert out.masks.shape[-2:] == (4, 10)
    assert [int((mask > 0).sum()) for mask in out.masks[:, 0, 0]] == [14, 14]
    wide = GenerationJob(
        id="wide",
        prompt="a dog",
        subjects=(SubjectInput(red, "dog"),),
        width=160,
        height=64,
        num_inference_steps=2,
        mask_reused_step=1,
        mask_scope=0.35,
    )
    cond, latents = _inputs(tiny_pipeline, [wide])
    backend = _static_backend(tiny_pipeline, [Bucket(1, 64, 160)])
    result = backend.denoise(tiny_pipeline, cond, latents, LoopSettings(2, "dpm", ("max_norm",), 1))
    assert backend.stats["graph_replays"] == 2
    assert [int((mask > 0).sum()) for mask in result.masks[:, 0, 0]] == [14, 14]


def test_batched_runner_uses_the_token_indices_the_job_carries(tiny_pipeline):
    """The edge locates each target once and the job carries the indices: the runner's τ rows are
    exactly those indices (equal to locating them again when they agree)."""
    red = Image.new("RGB", (64, 64), (200, 20, 20))
    runner = Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny")

    def tau(indices: tuple[int, ...]) -> torch.Tensor:
        job = GenerationJob(
            id="t",
            prompt="a red dog on grass",
            subjects=(SubjectInput(red, "dog", indices),),
            width=64,
            height=64,
            num_inference_steps=2,
            mask_reused_step=1,
        )
        return job_conditioning(runner.pipeline, [job]).target_tokens[0, 0]

    located = tau(())  # no indices: located by the runner
    assert located.nonzero().flatten().tolist() == [3]
    assert torch.equal(tau((3,)), located)
    assert tau((2, 3)).nonzero().flatten().tolist() == [2, 3]  # the carried indices win


@pytest.mark.parametrize("backend_name", ["eager", "static"])
def test_batched_runner_reports_every_step(tiny_pipeline, single_jobs, backend_name):
    """The worker's liveness counts the steps the runner reports, whatever the backend."""
    backend = (
        EagerBackend(tiny_pipeline)
        if backend_name == "eager"
        else _static_backend(tiny_pipeline, [Bucket(2, 64, 64)])
    )
    runner = Runner(tiny_pipeline, backend, "tiny")
    steps = []
    runner.on_step = lambda: steps.append(len(steps))
    runner.run(single_jobs)
    assert len(steps) == single_jobs[0].num_inference_steps
