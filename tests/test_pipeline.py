"""The whole method on the tiny model with real DreamBench photos."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from realcustom.models import TINY, build_pipeline
from realcustom.reference import TINY_REFERENCE_ENCODER

STEPS = 4


@pytest.fixture(scope="module")
def photos(dreambench_dir: Path) -> dict[str, Image.Image]:
    return {
        name: Image.open(dreambench_dir / f"{name}.jpg").convert("RGB") for name in ("cat", "can", "backpack")
    }


def run(pipeline, prompt, subjects, **kwargs):
    settings = {"height": 128, "width": 128, "num_inference_steps": STEPS, "mask_reused_step": 2}
    return pipeline(prompt, subjects, **{**settings, **kwargs})


def test_single_subject_image_and_masks(tiny_pipeline, photos) -> None:
    output = run(tiny_pipeline, "a cat in the snow", [(photos["cat"], "cat")], return_masks=True)
    (image,) = output.images
    assert image.size == (128, 128) and image.mode == "RGB"
    assert output.masks.shape == (STEPS, 1, 1, 8, 8)  # [steps, B, S, H/16, W/16]
    assert ((output.masks > 0).sum(dim=(-1, -2)) == 16).all(), "top 25% of 64 mask cells"
    # Frozen from mask_reused_step on: steps 2 and 3 reuse the mask of step 1.
    assert torch.equal(output.masks[2], output.masks[1]) and torch.equal(output.masks[3], output.masks[1])
    (mask_image,) = output.mask_images((128, 128))[0]
    assert mask_image.size == (128, 128) and mask_image.mode == "L"


def test_seed_reproduces_and_varies(tiny_pipeline, photos) -> None:
    subjects = [(photos["cat"], "cat")]
    first = run(tiny_pipeline, "a cat in the snow", subjects, seed=5, output_type="latent").images
    again = run(tiny_pipeline, "a cat in the snow", subjects, seed=5, output_type="latent").images
    other = run(tiny_pipeline, "a cat in the snow", subjects, seed=6, output_type="latent").images
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_reference_changes_the_result(tiny_pipeline, photos) -> None:
    with_cat = run(tiny_pipeline, "a cat in the snow", [(photos["cat"], "cat")], output_type="latent").images
    with_can = run(tiny_pipeline, "a cat in the snow", [(photos["can"], "cat")], output_type="latent").images
    assert not torch.allclose(with_cat, with_can)


def test_two_references_two_masks(tiny_pipeline, photos) -> None:
    output = run(
        tiny_pipeline,
        "a cat next to a backpack",
        [(photos["cat"], "cat"), (photos["backpack"], "backpack")],
        return_masks=True,
        num_images_per_prompt=2,
    )
    assert len(output.images) == 2
    assert output.masks.shape == (STEPS, 2, 2, 8, 8)
    overlap = (output.masks[:, :, 0] > 0) & (output.masks[:, :, 1] > 0)
    assert not overlap.any(), "the default overlap policy makes subject masks exclusive"
    summed = run(
        tiny_pipeline,
        "a cat next to a backpack",
        [(photos["cat"], "cat"), (photos["backpack"], "backpack")],
        return_masks=True,
        overlap="sum",
    )
    assert ((summed.masks[:, :, 0] > 0).sum(dim=(-1, -2)) == 16).all()


def test_one_reference_several_phrases(tiny_pipeline, photos) -> None:
    """One2many: the same photo bound to two phrases is encoded once and gives one mask per phrase."""
    photo = photos["cat"]
    calls = []
    encoder = tiny_pipeline.reference_encoder
    handle = encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        output = run(
            tiny_pipeline, "a cat and a dog on a sofa", [(photo, "cat"), (photo, "dog")], return_masks=True
        )
    finally:
        handle.remove()
    assert calls == [1], "the shared reference is encoded once"
    assert output.masks.shape[2] == 2


def test_bad_inputs_are_value_errors(tiny_pipeline, photos) -> None:
    cat = [(photos["cat"], "cat")]
    with pytest.raises(ValueError, match="multiple of 32"):
        run(tiny_pipeline, "a cat", cat, width=100)
    with pytest.raises(ValueError, match="does not occur"):
        run(tiny_pipeline, "a dog", cat)
    with pytest.raises(ValueError, match="at least one subject"):
        run(tiny_pipeline, "a cat", [])
    with pytest.raises(ValueError, match="mask_scope"):
        run(tiny_pipeline, "a cat", cat, mask_scope=1.5)
    with pytest.raises(ValueError, match="unknown scheduler"):
        run(tiny_pipeline, "a cat", cat, scheduler="euler-a")


@pytest.mark.parametrize("scheduler", ["ddim", "diffusers-dpm", "diffusers-euler"])
def test_other_schedulers_run(tiny_pipeline, photos, scheduler: str) -> None:
    output = run(
        tiny_pipeline,
        "a cat in the snow",
        [(photos["cat"], "cat")],
        scheduler=scheduler,
        output_type="latent",
    )
    assert torch.isfinite(output.images).all()


def test_cross_layer_projector_variant(photos) -> None:
    """The paper's CCP (detail branch added, shallow branch appended as extra tokens)."""
    vision = dataclasses.replace(
        TINY_REFERENCE_ENCODER, siglip_shallow_layers=(0, 1), dino_shallow_layers=(0, 1)
    )
    spec = dataclasses.replace(
        TINY, vision=vision, projector=dataclasses.replace(TINY.projector, cross_layer=True)
    )
    pipeline = build_pipeline(spec)
    tokens = pipeline.image_tokens([photos["can"]])
    assert tokens.shape == (1, 2 * 16, 32), "base+detail tokens then structural tokens"
    output = run(pipeline, "a can on the beach", [(photos["can"], "can")], output_type="latent")
    assert torch.isfinite(output.images).all()


def test_sd15_architecture(photos) -> None:
    from realcustom.loading import load_pipeline

    pipeline = load_pipeline("tiny-sd15")
    assert not pipeline.unet.is_sdxl and pipeline.time_ids(1, 128, 128) is None
    output = run(pipeline, "a can on the beach", [(photos["can"], "can")], return_masks=True)
    assert output.images[0].size == (128, 128) and output.masks.shape[-2:] == (8, 8)
