"""Fast-mode presets: each is a runnable setting of a table sampler whose mask schedule follows the
official noise-level split; a 4-step CFG-free preset runs one generation pass of B rows per step
and computes masks exactly at the steps it says."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from realcustom.denoise import LoopTrace
from realcustom.presets import PRESETS, mask_reused_step_at, preset
from realcustom.schedulers import TABLE_SCHEDULERS, NoiseSchedule, make_scheduler


def test_the_mask_rule_reproduces_the_official_default_and_scales_to_few_steps():
    trailing = NoiseSchedule().trailing_timesteps
    assert mask_reused_step_at(trailing(25).tolist()) == 12  # the official default
    assert mask_reused_step_at(trailing(4).tolist()) == 2  # 999, 749 | 499, 249
    assert mask_reused_step_at(trailing(8).tolist()) == 4
    assert mask_reused_step_at(trailing(1).tolist()) == 1
    assert mask_reused_step_at([499, 249]) == 1  # step 0 always computes masks


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_is_a_table_sampler_setting_with_the_rule_applied(name):
    chosen = preset(name)
    assert chosen.scheduler in TABLE_SCHEDULERS  # per-row device tables: graph-capturable
    scheduler = make_scheduler(chosen.scheduler, chosen.steps, timesteps=chosen.timesteps, eta=chosen.eta)
    assert len(scheduler.timesteps) == chosen.steps
    assert chosen.mask_reused_step == mask_reused_step_at(scheduler.timesteps.tolist())
    assert chosen.guidance_scale <= 1  # every published setting of these adapters is CFG-free
    assert chosen.settings()["num_inference_steps"] == chosen.steps


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'turbo'; choose from"):
        preset("turbo")


@pytest.mark.parametrize("name", ["sdxl-lightning-4step", "dmd2-4step", "tcd-4step"])
def test_a_four_step_preset_costs_one_pass_of_b_rows_and_updates_masks_where_it_says(tiny_pipeline, name):
    chosen = preset(name)
    unet = tiny_pipeline.unet.unet
    batches: list[int] = []
    hook = unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    trace = LoopTrace()
    try:
        output = tiny_pipeline(
            "a photo of a dog on a sofa",
            [(Image.new("RGB", (64, 64), (200, 20, 20)), "dog")],
            height=64,
            width=64,
            num_images_per_prompt=2,
            return_masks=True,
            output_type="latent",
            trace=trace,
            **chosen.settings(),
        )
    finally:
        hook.remove()
    # Two images (B = 2): update steps run guidance (B) + generation (B); reuse steps generation only.
    assert batches == [2, 2, 2, 2, 2, 2]
    recomputed = [int(step["mask_recomputed"]) for step in trace.steps]
    assert recomputed == [1, 1, 0, 0] == [int(k < chosen.mask_reused_step) for k in range(4)]
    masks = output.masks  # [steps, B, S, h, w]
    assert not torch.equal(masks[1], masks[0])  # recomputed at step 1
    assert torch.equal(masks[2], masks[1]) and torch.equal(masks[3], masks[1])  # then reused
    assert torch.isfinite(output.images).all()
