"""What trains, how it starts, and that gradient checkpointing gives the same gradients."""

from __future__ import annotations

import pytest
import torch

from realcustom.loading import PROJECTOR_PREFIX, load_pipeline
from realcustom.models import SDXL, build_pipeline
from realcustom.training.model import (
    DenoisingLoss,
    freeze_all_but_added_weights,
    image_tokens_kept_for_backward,
    init_vision_from_text,
    place_for_training,
    trainable_parameters,
)


def test_only_the_projector_and_the_image_cross_attention_train():
    pipeline = load_pipeline("tiny")
    trainable = freeze_all_but_added_weights(pipeline)
    projector_names = {PROJECTOR_PREFIX + name for name, _ in pipeline.projector.named_parameters()}
    vision_names = set(pipeline.unet.vision_state_dict())
    assert set(trainable) == projector_names | vision_names
    assert len(vision_names) == 2 * pipeline.unet.num_layers
    requires_grad = {id(p) for p in pipeline.parameters() if p.requires_grad}
    assert requires_grad == {id(p) for p in trainable.values()}


@pytest.mark.parametrize("model", ["tiny", "tiny-sd15"])
def test_vision_init_from_text_copies_the_text_projections(model):
    pipeline = load_pipeline(model)
    init_vision_from_text(pipeline)
    for attn in pipeline.unet.cross_attention_layers:
        assert torch.equal(attn.to_k_vision.weight, attn.to_k.weight)
        assert torch.equal(attn.to_v_vision.weight, attn.to_v.weight)


def gradients(checkpointing: bool, reset_before_backward: bool = False) -> dict[str, torch.Tensor]:
    pipeline = load_pipeline("tiny")
    trainable = freeze_all_but_added_weights(pipeline)
    if checkpointing:
        pipeline.unet.unet.enable_gradient_checkpointing()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    reference = torch.rand(2, 3, 112, 112, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    latent_noise = torch.randn(2, 4, 8, 8, generator=generator)
    with image_tokens_kept_for_backward(pipeline):
        loss = DenoisingLoss(pipeline)(
            pixels, reference, ["a cat", "a red can"], noise, latent_noise, torch.tensor([10, 900])
        )
        if reset_before_backward:  # what UNet.generation would do on return
            pipeline.unet.attention_state.reset()
        loss.backward()
    assert pipeline.unet.attention_state.image_tokens is None  # cleared once backward is done
    return {name: p.grad.clone() for name, p in trainable.items()}


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = gradients(False), gradients(True)
    assert all(grad.abs().sum() > 0 for grad in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The recomputation needs the image tokens: clearing them before backward is caught by torch.
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        gradients(True, reset_before_backward=True)


@pytest.mark.parametrize("timestep", [0, 999])
@pytest.mark.parametrize("model", ["tiny", "tiny-sd15"])
def test_loss_is_the_epsilon_mse(model, timestep):
    pipeline = load_pipeline(model)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    reference = torch.rand(1, 3, 112, 112, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    latent_noise = torch.randn(1, 4, 8, 8, generator=generator)
    objective = DenoisingLoss(pipeline)
    with torch.no_grad():
        loss = objective(pixels, reference, ["a cat"], noise, latent_noise, torch.tensor([timestep]))
        # The same prediction through the inference entry point (ungated, masks=None).
        posterior = pipeline.vae.encode(pixels).latent_dist
        latents = (posterior.mean + posterior.std * latent_noise) * pipeline.vae.config.scaling_factor
        alpha_bar = objective.alphas_cumprod[timestep]
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        text = pipeline.encode_prompt(["a cat"])
        tokens = pipeline.project(pipeline.reference_encoder(reference))
        prediction = pipeline.unet.generation(
            noisy,
            torch.tensor([timestep]),
            text.tokens,
            text.pooled,
            pipeline.time_ids(1, 64, 64),
            image_tokens=tokens.unsqueeze(1),
        )
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prediction, noise))


def test_bf16_placement_rounds_only_the_frozen_encoders_and_unet():
    pipeline = load_pipeline("tiny")
    before = {name: p.detach().clone() for name, p in freeze_all_but_added_weights(pipeline).items()}
    vae_before = {name: p.detach().clone() for name, p in pipeline.vae.named_parameters()}
    place_for_training(pipeline, "cpu", "bf16")
    after = trainable_parameters(pipeline)
    assert all(
        after[name].dtype == torch.float32 and torch.equal(after[name], p) for name, p in before.items()
    )
    assert all(torch.equal(p, vae_before[name]) for name, p in pipeline.vae.named_parameters())
    assert pipeline.dtype == torch.bfloat16  # the frozen UNet weights
    assert next(pipeline.text_encoder.parameters()).dtype == torch.bfloat16
    assert pipeline.reference_encoder.siglip.pos_embed.dtype == torch.bfloat16


def test_full_size_sdxl_trains_exactly_the_157_released_tensors():
    """Built on the meta device (shapes only): the trainable set is the released checkpoint's."""
    with torch.device("meta"):
        pipeline = build_pipeline(SDXL)
    trainable = trainable_parameters(pipeline)
    assert len(trainable) == 157  # 140 to_k/v_vision + 17 projector tensors
    assert sum(1 for name in trainable if name.startswith(PROJECTOR_PREFIX)) == 17
    assert trainable["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k_vision.weight"].shape == (
        640,
        2048,
    )
