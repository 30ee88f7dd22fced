"""Image cross-attention runs on fused SDPA kernels (4-D inputs), not only on the math fallback."""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engines.compiled import CompiledBackend
from engines.graph_loop import EagerCapture
from engines.static_loop import Bucket
from realcustom.attention import subject_attention
from realcustom.denoise import LoopSettings, denoise
from realcustom.job_inputs import job_conditioning

FLASH = [SDPBackend.FLASH_ATTENTION]


def _explicit_subject_attention(query, key, value):
    """The previous formulation, written out: every subject's softmax(Q Kᵀ/√d) V, 5-D."""
    scores = query.unsqueeze(1) @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    out = scores.softmax(dim=-1) @ value  # [B, S, heads, N, d]
    return out.transpose(-3, -2).flatten(-2)


def test_fused_subject_attention_matches_the_math_within_1e5():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, 64, 16, generator=generator)  # [B, heads, N, d]
    key = torch.randn(3, 2, 4, 9, 16, generator=generator)  # [B, S, heads, T, d]
    value = torch.randn(3, 2, 4, 9, 16, generator=generator)
    with sdpa_kernel(FLASH):
        fused = subject_attention(query, key, value)
    assert fused.shape == (3, 2, 64, 64)
    torch.testing.assert_close(fused, _explicit_subject_attention(query, key, value), rtol=0, atol=1e-5)


def test_fused_tiny_pipeline_call_runs_on_flash_attention_only(tiny_pipeline, multi_jobs):
    image = multi_jobs[0].subjects[0].image

    def call():
        return tiny_pipeline(
            "a dog on a sofa",
            [(image, "dog")],
            height=64,
            width=64,
            num_inference_steps=2,
            mask_reused_step=1,
            output_type="latent",
        ).images

    with sdpa_kernel(FLASH):
        fused = call()
    eager = call()
    scale = float(eager.abs().max())
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5 * scale)


def test_fused_compiled_backend_loop_runs_on_flash_attention_only(tiny_pipeline, multi_jobs):
    cond = job_conditioning(tiny_pipeline, multi_jobs)
    latents = tiny_pipeline.prepare_latents([1, 2], [1, 2], 64, 64)
    settings = LoopSettings(3, "dpm", ("max_norm",), 2)
    backend = CompiledBackend(
        tiny_pipeline, buckets=[Bucket(4, 64, 64, 2)], compile_backend=None, capture=EagerCapture()
    )
    backend.warmup()
    with sdpa_kernel(FLASH):
        result = backend.denoise(tiny_pipeline, cond, latents, settings)
    assert backend.stats["graph_replays"] == 3
    eager = denoise(tiny_pipeline.unet, cond, latents, settings)
    scale = float(eager.latents.abs().max())
    torch.testing.assert_close(result.latents, eager.latents, rtol=0, atol=1e-5 * scale)
