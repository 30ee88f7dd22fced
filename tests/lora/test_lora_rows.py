"""Per-row LoRA in the denoising step, on the tiny model with random adapters.

* one adapter (or two, weighted) on a row equals diffusers' own `load_lora_weights` + `fuse_lora`
  of the same file(s), through the whole loop: guidance pass (masks) and both CFG halves;
* rows with different adapters, and a row with none, in one batch each equal their solo runs;
* scale 0 is exactly the base model.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from lora_helpers import (
    TARGETS,
    diffusers_fused,
    diffusers_fused_many,
    random_lora,
    save_kohya,
    save_peft,
    tiny_conditioning,
)

from realcustom.denoise import LoopSettings, denoise
from realcustom.lora.bank import AdapterBank
from realcustom.lora.files import load_adapter
from realcustom.lora.requests import LoRAChoice
from realcustom.models import SPECS, build_pipeline

SIZE, PROMPT = 64, "a photo of a dog on a sofa"
SETTINGS = LoopSettings(3, "dpm", ("max_norm",), 2)  # U, U, R: both step kinds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline with an adapter bank, two adapter files, and the untouched base UNet."""
    pipeline = build_pipeline(SPECS["tiny"]).requires_grad_(False)
    base = copy.deepcopy(pipeline.unet)
    folder = tmp_path_factory.mktemp("loras")
    (folder / "a").mkdir()
    files = {
        "a": save_peft(folder / "a", random_lora(base, seed=11, rank=4), alpha=8),
        "b": save_kohya(folder / "b.safetensors", random_lora(base, seed=12, rank=8), 4, base, sgm=True),
    }
    bank = AdapterBank(pipeline.unet, targets="all", slots=3, rank=8, per_row=2)
    for name, path in files.items():
        bank.load(load_adapter(path, pipeline.unet.unet, name=name))
    return pipeline, base, bank, files


def run(unet, cond, seeds, pipeline):
    latents = pipeline.prepare_latents(seeds, [1] * len(seeds), SIZE, SIZE)
    return denoise(unet, cond, latents, SETTINGS)


def with_loras(pipeline, bank, rows_choices, guidance=3.5):
    cond = tiny_conditioning(pipeline, PROMPT, "dog", guidance, len(rows_choices))
    index, scale = bank.rows(rows_choices)
    return dataclasses.replace(cond, lora_index=index, lora_scale=scale)


def assert_same(result, expected, atol=2e-5):
    scale = max(1.0, float(expected.latents.abs().max()))
    torch.testing.assert_close(result.latents, expected.latents, rtol=0, atol=atol * scale)
    torch.testing.assert_close(result.masks, expected.masks, rtol=0, atol=1e-5)


ROWS = {
    "a": [LoRAChoice("a", 0.8)],
    "b": [LoRAChoice("b", 1.0)],
    "a+b": [LoRAChoice("a", 0.8), LoRAChoice("b", -0.5)],
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_a_row_with_adapters_equals_diffusers_fused_weights(world, row):
    pipeline, base, bank, files = world
    choices = ROWS[row]
    ours = run(pipeline.unet, with_loras(pipeline, bank, [choices]), [3], pipeline)
    if len(choices) == 1:
        fused = diffusers_fused(base, files[choices[0].name], choices[0].scale)
    else:
        fused = diffusers_fused_many(base, [(files[c.name], c.scale) for c in choices])
    cond = tiny_conditioning(pipeline, PROMPT, "dog", 3.5, 1)
    reference = run(fused, cond, [3], pipeline)
    plain = run(base, cond, [3], pipeline)
    assert float((reference.latents - plain.latents).abs().max()) > 0.05, "the adapter must matter"
    assert_same(ours, reference)


def test_rows_with_different_adapters_in_one_batch_each_equal_their_solo_runs(world):
    pipeline, base, bank, _ = world
    rows = [ROWS["a"], [], ROWS["b"], ROWS["a+b"]]
    seeds = [3, 4, 5, 6]
    batched = run(pipeline.unet, with_loras(pipeline, bank, rows), seeds, pipeline)
    for i, (choices, seed) in enumerate(zip(rows, seeds, strict=True)):
        alone = run(pipeline.unet, with_loras(pipeline, bank, [choices]), [seed], pipeline)
        row = dataclasses.replace(
            alone, latents=batched.latents[i : i + 1], masks=batched.masks[:, i : i + 1]
        )
        assert_same(row, alone)
    # The row without adapters is the base model.
    cond = tiny_conditioning(pipeline, PROMPT, "dog", 3.5, 1)
    assert_same(
        dataclasses.replace(batched, latents=batched.latents[1:2], masks=batched.masks[:, 1:2]),
        run(base, cond, [4], pipeline),
    )


def test_scale_zero_is_exactly_the_base_model(world):
    pipeline, base, bank, _ = world
    ours = run(
        pipeline.unet,
        with_loras(pipeline, bank, [[LoRAChoice("a", 0.0), LoRAChoice("b", 0.0)]]),
        [3],
        pipeline,
    )
    cond = tiny_conditioning(pipeline, PROMPT, "dog", 3.5, 1)
    for expected in (run(base, cond, [3], pipeline), run(pipeline.unet, cond, [3], pipeline)):
        torch.testing.assert_close(ours.latents, expected.latents, rtol=0, atol=0)
        torch.testing.assert_close(ours.masks, expected.masks, rtol=0, atol=0)


def test_cfg_free_rows_with_adapters_skip_the_unconditional_pass(world):
    """A CFG-free row (guidance <= 1) takes ε_c: equal with or without the unconditional half."""
    pipeline, base, bank, files = world
    cond = with_loras(pipeline, bank, [ROWS["b"], ROWS["a"]], guidance=1.0)
    fast = run(pipeline.unet, cond, [3, 4], pipeline)
    # Mixed with a CFG row, the CFG-free rows come from the full pass.
    mixed = with_loras(pipeline, bank, [ROWS["b"], ROWS["a"], ROWS["a"]], guidance=1.0)
    mixed.guidance_scale[2] = 3.5
    full = run(pipeline.unet, mixed, [3, 4, 5], pipeline)
    scale = max(1.0, float(fast.latents.abs().max()))
    torch.testing.assert_close(full.latents[:2], fast.latents, rtol=0, atol=2e-5 * scale)
    fused = diffusers_fused(base, files["b"], 1.0)
    reference = run(fused, tiny_conditioning(pipeline, PROMPT, "dog", 1.0, 1), [3], pipeline)
    torch.testing.assert_close(fast.latents[:1], reference.latents, rtol=0, atol=2e-5 * scale)


def test_bank_refuses_what_it_cannot_serve(world, tmp_path):
    pipeline, base, bank, files = world
    from realcustom.lora.adapter import LoRAError
    from realcustom.settings_check import SettingsError

    with pytest.raises(SettingsError, match="unknown adapter 'c'"):
        bank.rows([[LoRAChoice("c")]])
    with pytest.raises(SettingsError, match="at most 2 adapters"):
        bank.rows([[LoRAChoice("a"), LoRAChoice("b"), LoRAChoice("a")]])
    with pytest.raises(SettingsError, match="scale must be within"):
        bank.rows([[LoRAChoice("a", float("nan"))]])
    with pytest.raises(LoRAError, match="already loaded"):
        bank.load(load_adapter(files["a"], pipeline.unet.unet, name="a"))
    big = save_kohya(
        tmp_path / "big.safetensors",
        random_lora(base, seed=13, rank=16, targets=TARGETS[:1]),
        16,
        base,
        False,
    )
    with pytest.raises(LoRAError, match="rank 16, above the largest served rank 8"):
        bank.load(load_adapter(big, pipeline.unet.unet))
    narrow_unet = build_pipeline(SPECS["tiny"]).unet
    narrow = AdapterBank(narrow_unet, targets="attention", slots=1, rank=8)
    with pytest.raises(LoRAError, match="targets 11 layers this bank does not serve"):
        narrow.load(load_adapter(files["a"], narrow_unet.unet))
    with pytest.raises(ValueError, match="already has an adapter bank"):
        AdapterBank(narrow_unet)
    bank.acquire([LoRAChoice("a")])
    with pytest.raises(LoRAError, match="used by 1 running request"):
        bank.unload("a")
    bank.release([LoRAChoice("a")])
    assert [entry["name"] for entry in bank.describe()] == ["a", "b"]
