"""Per-row LoRA, fast-mode presets and CFG-free rows in the worker's executor (`StepScheduler`) on
the tiny model: jobs with different adapters (or none), CFG or not, few-step samplers or not, share
running batches and each equals the job run alone; a CFG-free step computes one generation pass of
its rows (the step counters); an adapter loaded after capture is used with no recapture."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from test_engines_step_scheduler import drain
from torch import nn

from engines.backends import EagerBackend
from engines.compiled import CompiledBackend
from engines.graph_loop import EagerCapture
from engines.runner import Runner
from engines.static_loop import Bucket, GraphSettings
from engines.step_scheduler import StepScheduler
from realcustom.jobs import GenerationJob, SubjectInput
from realcustom.loading import load_pipeline
from realcustom.lora.adapter import LoRAAdapter, LoRAModule
from realcustom.lora.bank import BankLayout, target_layers
from realcustom.lora.requests import LoRAChoice
from realcustom.presets import preset
from realcustom.settings_check import SettingsError

RED = Image.new("RGB", (64, 64), (200, 20, 20))


def random_adapter(unet, name: str, seed: int, rank: int = 4) -> LoRAAdapter:
    """A random adapter on every third transformer layer, strong enough to change the image."""
    generator = torch.Generator().manual_seed(seed)
    layers = dict(unet.unet.named_modules())
    modules = {}
    for layer_name in target_layers(unet.unet, "transformer")[::3]:
        layer = layers[layer_name]
        assert isinstance(layer, nn.Linear)
        weight_scale = float(layer.weight.abs().mean())
        down = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5
        up = torch.randn(layer.out_features, rank, generator=generator) * weight_scale
        modules[layer_name] = LoRAModule(down, up, 1.0)
    return LoRAAdapter(name, modules)


def job(key: str, seed: int, loras=(), fast: str | None = None, images: int = 1, **settings) -> GenerationJob:
    options = {"num_inference_steps": 3, "mask_reused_step": 2}
    if fast is not None:
        options = preset(fast).settings()
    options |= settings
    return GenerationJob(
        id=key,
        prompt="a dog on a sofa",
        subjects=(SubjectInput(RED, "dog"),),
        width=64,
        height=64,
        seed=seed,
        num_images=images,
        loras=tuple(loras),
        **options,
    )


def assert_same_images(got, want, key: str) -> None:
    for a, b in zip(got.images, want.images, strict=True):
        difference = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, key


@pytest.fixture(scope="module")
def banked():
    """A tiny pipeline of its own with an adapter bank (two slots of rank 4, two per row) and two
    adapters loaded; the session's tiny pipeline stays without a bank."""
    pipeline = load_pipeline("tiny")
    BankLayout(targets="transformer", slots=3, rank=4, per_row=2).install(pipeline.unet)
    bank = pipeline.unet.adapters
    bank.load(random_adapter(pipeline.unet, "a", seed=1))
    bank.load(random_adapter(pipeline.unet, "b", seed=2))
    return pipeline


def test_jobs_with_other_adapters_presets_and_cfg_share_batches_and_equal_their_solo_runs(banked):
    """Adapter a, adapter b at 0.7, none; and two CFG-free 4-step DMD2 jobs (LCM with custom
    timesteps and per-step noise from the seed), one with adapter a: each equals `Runner.run` of the
    job alone. Adapters are held from preparation until release."""
    runner = Runner(banked, EagerBackend(banked), "tiny")
    scheduler = StepScheduler(runner, max_rows=4)
    bank = scheduler.adapters
    jobs = {
        "a": job("a", 1, [LoRAChoice("a")]),
        "b": job("b", 2, [LoRAChoice("b", 0.7)]),
        "plain": job("plain", 3),
        "fast-a": job("fast-a", 4, [LoRAChoice("a", 0.8)], fast="dmd2-4step"),
        "fast": job("fast", 5, fast="dmd2-4step"),
    }
    prepared = {key: scheduler.prepare(value) for key, value in jobs.items()}
    assert bank.holds == {"a": 2, "b": 1}
    assert prepared["a"].family == prepared["plain"].family != prepared["fast"].family
    assert not prepared["fast"].cfg and not prepared["fast"].request.cfg and prepared["a"].request.cfg
    for key in ("a", "b", "fast-a"):
        assert scheduler.join(prepared[key])
    outputs = {done.key: scheduler.decode(done, jobs[done.key], 0.0) for done in scheduler.step()}
    for key in ("plain", "fast"):  # mid-flight
        assert scheduler.join(prepared[key])
    outputs |= drain(scheduler, jobs)
    for key, value in jobs.items():
        assert_same_images(outputs[key], runner.run([value])[0], key)
    # The adapters change the image: the job without them differs from the one with a.
    assert (
        np.abs(np.asarray(outputs["a"].images[0], int) - np.asarray(outputs["plain"].images[0], int)).max()
        > 8
    )
    for value in prepared.values():
        scheduler.release(value)
        scheduler.release(value)  # idempotent
    assert not bank.holds


def test_a_held_adapter_cannot_be_unloaded_and_a_failed_preparation_holds_nothing(banked):
    scheduler = StepScheduler(Runner(banked, EagerBackend(banked), "tiny"), max_rows=2)
    held = scheduler.prepare(job("held", 1, [LoRAChoice("b")]))
    with pytest.raises(ValueError, match="used by 1 running request"):
        scheduler.unload_adapter("b")
    bad = dataclasses.replace(job("bad", 2, [LoRAChoice("b")]), guidance_scale=-1.0)
    with pytest.raises(SettingsError, match="guidance_scale"):
        scheduler.prepare(bad)
    with pytest.raises(SettingsError, match="unknown adapter 'zzz'"):
        scheduler.prepare(job("unknown", 3, [LoRAChoice("zzz")]))
    assert scheduler.adapters.holds == {"b": 1}
    scheduler.release(held)
    assert not scheduler.adapters.holds


def test_a_cfg_free_preset_step_is_one_generation_pass_of_its_rows(tiny_pipeline):
    """SDXL-Lightning 4 steps (trailing Euler, guidance 0, masks updated at the 2 steps whose
    timestep is >= 540): 2 images step 2 rows per generation pass (no unconditional half), the
    guidance pass runs at steps 0 and 1 only. The same job with CFG computes 4 rows per pass; a CFG
    job and a CFG-free job together 2 + 1 (the CFG row first)."""
    lightning = preset("sdxl-lightning-4step")
    assert (lightning.steps, lightning.guidance_scale, lightning.mask_reused_step) == (4, 0.0, 2)

    def run(*values: GenerationJob) -> dict[str, int]:
        runner = Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny")
        scheduler = StepScheduler(runner, max_rows=4)
        jobs = {value.id: value for value in values}
        for value in values:
            assert scheduler.join(scheduler.prepare(value))
        outputs = drain(scheduler, jobs)
        for key, value in jobs.items():
            assert_same_images(outputs[key], runner.run([value])[0], key)
        return scheduler.stats

    free = run(job("free", 1, fast="sdxl-lightning-4step", images=2))
    assert (free["steps_mask_update"], free["steps_mask_reuse"]) == (2, 2)
    assert free["rows_generation"] == 4 * 2 and free["rows_guidance"] == 2 * 2
    guided = run(job("guided", 1, fast="sdxl-lightning-4step", images=2, guidance_scale=3.5))
    assert guided["rows_generation"] == 4 * (2 + 2) and guided["rows_guidance"] == 2 * 2
    mixed = run(
        job("free", 2, fast="sdxl-lightning-4step"),
        job("guided", 3, fast="sdxl-lightning-4step", guidance_scale=3.5),
    )
    assert mixed["rows_generation"] == 4 * (2 + 1)


def test_an_adapter_loaded_after_capture_is_used_without_recapture():
    """Prepared buckets captured at warm-up (the compiled backend's path, eager kernels on the CPU);
    an adapter loaded afterwards into a free slot serves the next job: no graph is captured again,
    and the image equals the eager loop with that adapter."""
    pipeline = load_pipeline("tiny")
    BankLayout(targets="transformer", slots=2, rank=4, per_row=1).install(pipeline.unet)
    buckets = [Bucket(1, 64, 64), Bucket(2, 64, 64)]
    backend = CompiledBackend(
        pipeline,
        buckets=buckets,
        graph_settings=[GraphSettings()],
        compile_backend=None,
        capture=EagerCapture(),
    )
    backend.warmup()
    scheduler = StepScheduler(Runner(pipeline, backend, "tiny"), max_rows=2)
    captured = scheduler.stats["graphs_captured"]
    scheduler.load_adapter(random_adapter(pipeline.unet, "late", seed=9))
    late = job("late", 1, [LoRAChoice("late", 0.9)])
    plain = job("plain", 2)
    for value in (late, plain):
        assert scheduler.join(scheduler.prepare(value))
    outputs = drain(scheduler, {"late": late, "plain": plain})
    assert scheduler.stats["graphs_captured"] == captured and scheduler.stats["graph_replays"] == 3
    eager = Runner(pipeline, EagerBackend(pipeline), "tiny")
    assert_same_images(outputs["late"], eager.run([late])[0], "late")
    assert_same_images(outputs["plain"], eager.run([plain])[0], "plain")


def test_the_compiled_backend_with_unconditional_prefixes_steps_cfg_free_rows_in_b_row_passes(tiny_pipeline):
    """Prepared buckets of the fast-mode sampler with unconditional prefixes captured (the
    compiled backend's path, eager kernels on the CPU): a CFG-free 2-image job computes 2
    generation rows per step; without the prefixes, 4."""

    def rows_generation(partial_uncond: bool) -> tuple[int, int]:
        backend = CompiledBackend(
            tiny_pipeline,
            buckets=[Bucket(2, 64, 64)],
            graph_settings=[GraphSettings("euler")],
            compile_backend=None,
            capture=EagerCapture(),
            partial_uncond=partial_uncond,
        )
        backend.warmup()
        scheduler = StepScheduler(Runner(tiny_pipeline, backend, "tiny"), max_rows=2)
        fast = job("fast", 1, fast="sdxl-lightning-4step", images=2)
        prepared = scheduler.prepare(fast)
        assert prepared.family is not None  # a prepared family, not run alone
        assert scheduler.join(prepared)
        outputs = drain(scheduler, {"fast": fast})
        eager = Runner(tiny_pipeline, EagerBackend(tiny_pipeline), "tiny")
        assert_same_images(outputs["fast"], eager.run([fast])[0], "fast")
        return scheduler.stats["rows_generation"], scheduler.stats["graphs_captured"]

    assert rows_generation(True) == (4 * 2, 2 * 3)  # 2 kinds x (every row, 0 or 1 rows unconditional)
    assert rows_generation(False) == (4 * 4, 2)
