"""Precomputed reference tokens (a subject cache) replace the encoders in `Runner.conditioning`."""

from __future__ import annotations

import dataclasses

import torch
from conftest import GREEN, RED, job

from engines.backends import select_backend
from engines.runner import Runner
from realcustom.job_inputs import job_conditioning


def test_precomputed_tokens_skip_the_encoders_and_equal_encoding(tiny_pipeline, monkeypatch) -> None:
    runner = Runner(tiny_pipeline, select_backend("eager", tiny_pipeline), "tiny")
    jobs = [job("a dog and a cat in a garden", [(RED, "dog"), (GREEN, "cat")], seed=1)]
    encoded: list[tuple[torch.Tensor, float]] = []
    hooked = dataclasses.replace(jobs[0].subjects[0], on_encoded=lambda t, s: encoded.append((t, s)))
    reference = job_conditioning(
        runner.pipeline, [dataclasses.replace(jobs[0], subjects=(hooked, jobs[0].subjects[1]))]
    )
    assert len(encoded) == 1 and encoded[0][1] > 0  # called with the tokens and their seconds
    red_tokens = encoded[0][0]

    seen: list[int] = []
    original = tiny_pipeline.reference_tokens
    monkeypatch.setattr(
        tiny_pipeline, "reference_tokens", lambda images: seen.append(len(images)) or original(images)
    )
    cached = dataclasses.replace(jobs[0].subjects[0], tokens=red_tokens.cpu())
    mixed = job_conditioning(
        runner.pipeline, [dataclasses.replace(jobs[0], subjects=(cached, jobs[0].subjects[1]))]
    )
    assert seen == [1]  # only the photo without tokens went through the encoders
    assert torch.equal(mixed.image_tokens, reference.image_tokens)
    green = dataclasses.replace(jobs[0].subjects[1], tokens=reference.image_tokens[0, 1])
    job_conditioning(runner.pipeline, [dataclasses.replace(jobs[0], subjects=(cached, green))])
    assert seen == [1]  # every reference cached: no encoder call at all
