"""The compiled backend's warm-up and capture path, executed on the CPU.

`WarmupCapture` runs exactly what `CudaGraphCapture` runs before recording a graph (reset, then
the compiled step called several times on the bucket's buffers, under no_grad); only the CUDA
graph recording itself needs a GPU. Both dynamo backends are exercised with fullgraph=True on a
small RealCustom UNet (every part the tiny model has: SDXL added conditioning, image
cross-attention under masks, target-word maps; fewer layers, so inductor compiles in seconds).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from capture_unet import load_capture_pipeline
from PIL import Image
from torch._dynamo.utils import counters

from engines.backends import EagerBackend
from engines.compiled import CompiledBackend
from engines.graph_loop import GraphLoop, WarmupCapture
from engines.runner import Runner
from engines.static_loop import Bucket, GraphSettings
from engines.step_batching import RowRequest, RunningBatch
from realcustom.denoise import LoopSettings, denoise
from realcustom.job_inputs import job_conditioning
from realcustom.jobs import GenerationJob, SubjectInput
from realcustom.step import LoopState


@pytest.fixture(scope="module")
def capture_pipeline():
    return load_capture_pipeline()


def _tensors(state: LoopState) -> dict[str, torch.Tensor]:
    found = {name: value for name, value in vars(state).items() if isinstance(value, torch.Tensor)}
    for layer, (key, value) in enumerate(state.image_kv):
        found[f"image_k_{layer}"], found[f"image_v_{layer}"] = key, value
    found.update({f"schedule.{name}": table for name, table in state.schedule.tables.items()})
    found["schedule.timesteps"] = state.schedule.timesteps
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("compile_backend", "scheduler"),
    # inductor's C++ code generation takes minutes on 2 cores: one sampler is enough for it.
    [("aot_eager", "dpm"), ("aot_eager", "ddim"), ("inductor", "dpm")],
)
def test_capture_compiles_each_step_kind_once_without_autograd(
    capture_pipeline, multi_jobs, compile_backend, scheduler
):
    pipeline = capture_pipeline
    torch._dynamo.reset()
    counters.clear()
    backend = CompiledBackend(
        pipeline,
        buckets=[Bucket(4, 64, 64, 2)],
        graph_settings=[GraphSettings(scheduler)],
        compile_backend=compile_backend,
        capture=WarmupCapture(warmup_runs=2),
    )
    backend.warmup()  # compiles both step kinds and calls each of them twice on the buffers
    assert backend.stats["graphs_captured"] == 2
    assert dict(counters["graph_break"]) == {}, counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2  # one graph per step kind, no recompile

    cond = job_conditioning(pipeline, multi_jobs)
    latents = pipeline.prepare_latents([1, 2], [1, 2], 64, 64)
    settings = LoopSettings(4, scheduler, ("max_norm",), 2)  # U, U, R, R: both kinds replayed
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = backend.denoise(pipeline, cond, latents, settings)
        again = backend.denoise(pipeline, cond, latents, settings)
    assert counters["stats"]["unique_graphs"] == 2
    assert backend.stats["graph_replays"] == 8 and backend.stats["graph_misses"] == 0

    (state,) = backend.graphs.states.values()
    for name, tensor in _tensors(state).items():
        assert tensor.grad_fn is None and not tensor.requires_grad, f"{name} carries autograd history"
    assert not any(p.requires_grad for p in pipeline.parameters())

    eager = denoise(pipeline.unet, cond, latents, settings)
    atol = 1e-6 if compile_backend == "aot_eager" else 1e-4  # inductor reassociates fp32 sums
    scale = max(1.0, float(eager.latents.abs().max()))
    torch.testing.assert_close(result.latents, eager.latents, rtol=0, atol=atol * scale)
    torch.testing.assert_close(result.masks, eager.masks, rtol=0, atol=atol)
    torch.testing.assert_close(again.latents, result.latents, rtol=0, atol=0)


@pytest.mark.slow
def test_step_level_batch_replays_compiled_partial_guidance_steps_without_recompiles(capture_pipeline):
    """The running batch's graphs (aot_eager, fullgraph) with partial guidance: one compiled graph
    per (bucket, kind, guidance rows) at warm-up, none afterwards while requests join, leave, move
    between buckets and run their guidance on a prefix; each equals its loop run alone."""
    pipeline = capture_pipeline
    torch._dynamo.reset()
    counters.clear()
    family = [Bucket(rows, 64, 64) for rows in (1, 2)]
    graphs = GraphLoop(
        pipeline, WarmupCapture(warmup_runs=1), compile_backend="aot_eager", partial_guidance=True
    )
    graphs.prepare(family, [GraphSettings()])
    assert graphs.stats["graphs_captured"] == 5  # bucket 1: U, R; bucket 2: U, R, U on row 0 only
    assert dict(counters["graph_break"]) == {}, counters["graph_break"]
    batch = RunningBatch(graphs, family, GraphSettings())
    runner = Runner(pipeline, EagerBackend(pipeline), "capture")
    image = Image.new("RGB", (64, 64), (200, 20, 20))

    def row(key: str, seed: int, steps: int, reuse: int) -> RowRequest:
        job = GenerationJob(
            key, "a dog on a sofa", (SubjectInput(image, "dog"),), 64, 64, steps, 3.5, 0.25, reuse, seed
        )
        cond = job_conditioning(runner.pipeline, [job])
        return RowRequest(key, cond, pipeline.prepare_latents([seed], [1], 64, 64), steps, reuse)

    first, second = row("first", 1, 5, 1), row("second", 2, 4, 3)
    finished = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert batch.join(first)
        batch.step()
        assert batch.join(second) and batch.bucket.batch == 2
        while batch.slots:
            finished.update({done.key: done for done in batch.step()})
    assert counters["stats"]["unique_graphs"] == 5
    for request in (first, second):
        settings = LoopSettings(request.num_steps, "dpm", ("max_norm",), request.mask_reused_step)
        eager = denoise(pipeline.unet, request.cond, request.latents, settings)
        scale = max(1.0, float(eager.latents.abs().max()))
        torch.testing.assert_close(finished[request.key].latents, eager.latents, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(finished[request.key].masks, eager.masks[-1], rtol=0, atol=1e-5)
