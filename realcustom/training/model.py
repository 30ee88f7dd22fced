"""What trains and how the loss is computed.

Trainable: the projector and every attn2 layer's `to_k_vision`/`to_v_vision` (the 157 tensors of
the released SDXL checkpoint); all other weights are frozen. The loss is the backbone's standard
ε-prediction MSE at a uniformly drawn timestep of the training schedule, with the reference
tokens injected ungated (masks are an inference-time device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from realcustom.loading import PROJECTOR_PREFIX
from realcustom.pipeline import RealCustomPipeline
from realcustom.schedulers import NoiseSchedule
from realcustom.unet import VISION_KEY_SUFFIXES


def trainable_parameters(pipeline: RealCustomPipeline) -> dict[str, nn.Parameter]:
    """The trainable parameters under their official checkpoint key names."""
    vision = {
        name: parameter
        for name, parameter in pipeline.unet.unet.named_parameters()
        if name.endswith(VISION_KEY_SUFFIXES)
    }
    projector = {PROJECTOR_PREFIX + name: param for name, param in pipeline.projector.named_parameters()}
    if len(vision) != 2 * pipeline.unet.num_layers:
        raise ValueError(f"expected 2 vision weights per attn2 layer, found {len(vision)}")
    return {**vision, **projector}


def freeze_all_but_added_weights(pipeline: RealCustomPipeline) -> dict[str, nn.Parameter]:
    """requires_grad only on the added weights; returns them (official names)."""
    pipeline.requires_grad_(False)
    trainable = trainable_parameters(pipeline)
    for parameter in trainable.values():
        parameter.requires_grad_(True)
    return trainable


WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def place_for_training(
    pipeline: RealCustomPipeline, device: torch.device | str, mixed_precision: str
) -> None:
    """Move to `device`; frozen encoder and UNet weights in the compute dtype; the VAE and the
    trainable weights stay float32 (the SDXL VAE overflows in fp16; AdamW needs float32 master
    weights) and are never rounded through the compute dtype on the way."""
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    pipeline.to(device)
    pipeline.text_encoder.to(weight_dtype)
    pipeline.reference_encoder.to(weight_dtype)
    trainable = {id(parameter) for parameter in trainable_parameters(pipeline).values()}
    for parameter in pipeline.unet.parameters():
        if id(parameter) not in trainable:
            parameter.data = parameter.data.to(weight_dtype)


@torch.no_grad()
def init_vision_from_text(pipeline: RealCustomPipeline) -> None:
    """Copy each attn2's text to_k/to_v into to_k_vision/to_v_vision (IP-Adapter's initialisation).

    The image branch then starts as a second text-like attention over the image tokens, instead of
    adding random projections to every layer of a pretrained backbone.
    """
    for attn in pipeline.unet.cross_attention_layers:
        if attn.to_k.weight.shape != attn.to_k_vision.weight.shape:
            raise ValueError(
                "vision_init from_text needs image tokens of the text width: "
                f"{tuple(attn.to_k_vision.weight.shape)} vs {tuple(attn.to_k.weight.shape)}"
            )
        attn.to_k_vision.weight.copy_(attn.to_k.weight)
        attn.to_v_vision.weight.copy_(attn.to_v.weight)


@contextlib.contextmanager
def image_tokens_kept_for_backward(pipeline: RealCustomPipeline) -> Iterator[None]:
    """Keep the attention state set by `DenoisingLoss.forward` until the backward pass is done.

    With gradient checkpointing the attn2 layers run again during backward and must see the same
    image tokens, so the state cannot be cleared when forward returns (as `generation` does).
    """
    try:
        yield
    finally:
        pipeline.unet.attention_state.reset()


class DenoisingLoss(nn.Module):
    """ε-prediction MSE of the RealCustom UNet given a target image, its caption and a reference."""

    def __init__(self, pipeline: RealCustomPipeline, schedule: NoiseSchedule | None = None):
        super().__init__()
        self.pipeline = pipeline
        self.schedule = schedule or NoiseSchedule()
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def forward(
        self,
        pixels: torch.Tensor,
        reference: torch.Tensor,
        captions: list[str],
        noise: torch.Tensor,
        latent_noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """pixels [B,3,H,W] in [-1,1]; reference [B,3,R,R] in [0,1]; noise and latent_noise
        [B,4,H/8,W/8] (the diffusion noise and the VAE posterior draw); timesteps [B] int64."""
        pipeline = self.pipeline
        device = self.alphas_cumprod.device
        with torch.no_grad():
            vae = pipeline.vae
            posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
            latents = (posterior.mean + posterior.std * latent_noise.to(device, vae.dtype)).float()
            latents = latents * vae.config.scaling_factor
            text = pipeline.encode_prompt(captions)
            features = pipeline.reference_encoder(reference)

        projector_dtype = next(pipeline.projector.parameters()).dtype

        def cast(tokens: torch.Tensor | None) -> torch.Tensor | None:
            return None if tokens is None else tokens.to(device, projector_dtype)

        tokens = pipeline.projector(
            cast(features.global_tokens), cast(features.local_tokens), cast(features.shallow_tokens)
        )  # [B, T, C]

        timesteps = timesteps.to(device)
        noise = noise.to(device, torch.float32)
        signal = self.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        noise_level = (1 - self.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
        noisy = signal * latents + noise_level * noise

        unet = pipeline.unet
        state = unet.attention_state
        state.reset()
        state.image_tokens = tokens.unsqueeze(1)  # one subject: [B, 1, T, C]
        state.latent_size = tuple(noisy.shape[-2:])
        height, width = pixels.shape[-2:]
        added = (
            {"text_embeds": text.pooled, "time_ids": pipeline.time_ids(len(captions), height, width)}
            if unet.is_sdxl
            else None
        )
        prediction = unet.unet(
            noisy.to(pipeline.dtype), timesteps, encoder_hidden_states=text.tokens, added_cond_kwargs=added
        ).sample
        return F.mse_loss(prediction.float(), noise)
