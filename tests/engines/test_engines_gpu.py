"""GPU-only checks of the compiled backend (deselected on CPU machines: `-m "not gpu"`).

The device kit (tools/device_check.sh) runs them in two stages: `-m "gpu and not inductor"` first
(CUDA graphs over eager kernels, the runner), `-m "gpu and inductor"` last (inductor's kernels,
compiled cold). fp32 and bf16, on the tiny model; every CPU-executable part of the same code runs in
the CPU tests.
"""

from __future__ import annotations

import pytest
import torch

from engines.compiled import CompiledBackend
from engines.runner import Runner
from engines.static_loop import Bucket
from realcustom.denoise import LoopSettings, denoise
from realcustom.job_inputs import job_conditioning
from realcustom.loading import load_pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def cuda_tiny(request):
    return load_pipeline("tiny", device="cuda", dtype=request.param)


# Inductor compiles the tiny model cold once per dtype (minutes): its own late device-kit stage.
@pytest.mark.parametrize("compile_backend", [None, pytest.param("inductor", marks=pytest.mark.inductor)])
def test_gpu_cuda_graph_loop_matches_eager(cuda_tiny, multi_jobs, compile_backend):
    pipeline = cuda_tiny
    cond = job_conditioning(pipeline, multi_jobs)
    latents = pipeline.prepare_latents([1, 2], [1, 2], 64, 64)
    assert latents.dtype == torch.float32  # latents and sampler state stay fp32 with a bf16 UNet
    settings = LoopSettings(4, "dpm", ("max_norm",), 2)
    backend = CompiledBackend(pipeline, buckets=[Bucket(4, 64, 64, 2)], compile_backend=compile_backend)
    torch.cuda.reset_peak_memory_stats()
    backend.warmup()
    assert backend.stats["graphs_captured"] == 2
    (state,) = backend.graphs.states.values()
    assert state.latents.dtype == torch.float32 and state.latents.grad_fn is None
    result = backend.denoise(pipeline, cond, latents, settings)
    eager = denoise(pipeline.unet, cond, latents, settings)
    tolerance = 1e-3 if pipeline.dtype == torch.float32 else 5e-2
    scale = float(eager.latents.abs().max())
    torch.testing.assert_close(result.latents, eager.latents, rtol=0, atol=tolerance * scale)
    assert ((result.masks > 0) == (eager.masks > 0)).float().mean() > 0.95
    assert backend.stats["graph_replays"] == 4 and backend.stats["graph_misses"] == 0
    # A second request through the same graphs (buffers refilled in place): identical.
    again = backend.denoise(pipeline, cond, latents, settings)
    torch.testing.assert_close(again.latents, result.latents, rtol=0, atol=0)


def test_gpu_runner_images_on_compiled_backend(cuda_tiny, multi_jobs):
    pipeline = cuda_tiny
    backend = CompiledBackend(pipeline, buckets=[Bucket(4, 64, 64, 2)], compile_backend=None)
    runner = Runner(pipeline, backend, "tiny")
    runner.warmup()
    outputs = runner.run(multi_jobs)
    assert [len(o.images) for o in outputs] == [job.num_images for job in multi_jobs]
    assert runner.stats["graph_misses"] == 0
