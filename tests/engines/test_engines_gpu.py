"""GPU-only checks of the compiled backend (deselected on CPU machines: `-m "not gpu"`).

Never run so far (no GPU was available when they were written); they are the first thing to run
on a GPU machine: `pytest -m gpu tests/engines`.
"""

from __future__ import annotations

import pytest
import torch

from engines.backends import EagerBackend
from engines.compiled import CompiledBackend
from engines.runner import Runner
from engines.static_loop import Bucket
from realcustom.denoise import LoopSettings, denoise
from realcustom.loading import load_pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_tiny():
    return load_pipeline("tiny", device="cuda", dtype=torch.float32)


@pytest.mark.parametrize("compile_backend", [None, "inductor"])
def test_batched_cuda_graph_loop_matches_eager_on_gpu(cuda_tiny, multi_jobs, compile_backend):
    pipeline = cuda_tiny
    cond = Runner(pipeline, EagerBackend(pipeline), "tiny").conditioning(multi_jobs)
    latents = pipeline.prepare_latents([1, 2], [1, 2], 64, 64)
    settings = LoopSettings(4, "dpm", ("max_norm",), 2)
    backend = CompiledBackend(pipeline, buckets=[Bucket(4, 64, 64, 2)], compile_backend=compile_backend)
    backend.warmup()
    assert backend.stats["graphs_captured"] == 2
    result = backend.denoise(pipeline, cond, latents, settings)
    reference = denoise(pipeline.unet, cond, latents, settings)
    scale = float(reference.latents.abs().max())
    torch.testing.assert_close(result.latents, reference.latents, rtol=0, atol=1e-3 * scale)
    assert ((result.masks > 0) == (reference.masks > 0)).float().mean() > 0.99
    assert backend.stats["graph_replays"] == 4 and backend.stats["graph_misses"] == 0
    # A second request through the same graphs (buffers refilled in place).
    again = backend.denoise(pipeline, cond, latents, settings)
    torch.testing.assert_close(again.latents, result.latents, rtol=0, atol=0)
