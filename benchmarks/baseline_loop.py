"""The official-style three-call loop: the baseline every speed-up is measured against.

The official RealCustom++ code runs each step as three separate UNet calls of batch B (guidance,
conditional, unconditional), recomputes the projector inside every image-conditioned call, lets
every attention layer project the image tokens to K/V again in every call, and synchronises the
host with the GPU in its scheduler every step. `three_call_denoise` does exactly that with our
modules, so it computes the same numbers as `realcustom.denoise.denoise` (the batched loop) up to
floating-point reassociation, while paying every cost the batched loop removes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from realcustom.denoise import Conditioning, LoopResult, LoopSettings
from realcustom.masks import generate_masks
from realcustom.schedulers import make_scheduler
from realcustom.unet import RealCustomUNet

TokenSource = Callable[[], torch.Tensor]


def _host_step_index(timesteps_on_device: torch.Tensor, timestep: torch.Tensor) -> int:
    """The step-index lookup of diffusers-style schedulers: `(timesteps == t).nonzero().item()`,
    a device-to-host synchronisation every step, as the official scheduler has."""
    return int((timesteps_on_device == timestep.to(timesteps_on_device.device)).nonzero()[0].item())


@torch.no_grad()
def three_call_denoise(
    unet: RealCustomUNet,
    cond: Conditioning,
    latents: torch.Tensor,
    settings: LoopSettings,
    cond_tokens: TokenSource | None = None,
    negative_tokens: TokenSource | None = None,
) -> LoopResult:
    """Run the loop as the official code does (same arguments and result as `denoise`).

    cond_tokens / negative_tokens: callables returning [B, S, T, C] image tokens; the official code
    runs the projector inside each call, so benchmarks pass `lambda: projector(features)`. When
    omitted, the precomputed `cond.image_tokens` / `cond.negative_image_tokens` are used (the
    per-layer K/V are still recomputed in every call).
    """
    cond_tokens = cond_tokens or (lambda: cond.image_tokens)
    negative_tokens = negative_tokens or (lambda: cond.negative_image_tokens)
    scheduler = make_scheduler(settings.scheduler, settings.num_inference_steps)
    batch = cond.batch_size
    mask_size = (latents.shape[-2] // 2, latents.shape[-1] // 2)
    # Scheduler arithmetic in fp32 as in the batched loop; the UNet runs in the model's dtype.
    dtype = cond.prompt_embeds.dtype
    latents = latents.float() * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = cond.guidance_scale.to(latents).view(-1, 1, 1, 1)
    timesteps_on_device = scheduler.timesteps.to(latents.device)

    masks = None
    used_masks, x0 = [], latents
    for k, timestep in enumerate(scheduler.timesteps):
        model_input = (
            scheduler.scale_model_input(latents, k) if hasattr(scheduler, "scale_model_input") else latents
        ).to(dtype)
        t = timestep.to(latents.device).expand(batch)

        # Call 1: guidance (text only) -> masks; its ε is discarded.
        if k < settings.mask_reused_step or masks is None:
            _, maps, _ = unet.guidance(
                model_input, t, cond.prompt_embeds, cond.pooled, cond.time_ids, cond.target_tokens
            )
            masks, _ = generate_masks(maps, mask_size, settings.mask_mode, cond.mask_scope, settings.overlap)
        gate = masks.to(dtype)

        # Call 2: conditional, projector and image K/V recomputed inside the call.
        eps_cond = unet.generation(
            model_input, t, cond.prompt_embeds, cond.pooled, cond.time_ids, cond_tokens(), gate
        )
        # Call 3: unconditional (negative prompt, black-image tokens), same masks.
        eps_uncond = unet.generation(
            model_input,
            t,
            cond.negative_prompt_embeds,
            cond.negative_pooled,
            cond.time_ids,
            negative_tokens(),
            gate,
        )
        noise_pred = eps_uncond.float() + scale * (eps_cond.float() - eps_uncond.float())

        _host_step_index(timesteps_on_device, timestep)
        latents, x0 = scheduler.step(k, noise_pred, latents)
        used_masks.append(masks)

    return LoopResult(scheduler.final_latents(latents, x0), torch.stack(used_masks))
