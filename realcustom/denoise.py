"""The RealCustom++ denoising loop (Adaptive Mask Guidance), written out step by step.

Per step k:
1. if k < mask_reused_step: guidance pass (text only, target-word maps recorded) -> masks;
   otherwise the last masks are reused;
2. generation pass: the conditional (prompt + reference tokens) and unconditional (negative
   prompt + black-image tokens) samples as one batch, both gated by the same masks;
3. classifier-free guidance ε = ε_u + w(ε_c − ε_u);
4. scheduler step. After the loop the scheduler's x̂₀ of the last step is what gets decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from realcustom.masks import generate_masks
from realcustom.schedulers import make_scheduler
from realcustom.unet import RealCustomUNet


@dataclass
class Conditioning:
    """Everything the loop needs per sample: B samples, S subject slots (zero rows pad unused slots)."""

    prompt_embeds: torch.Tensor  # [B, 77, D]
    negative_prompt_embeds: torch.Tensor  # [B, 77, D]
    pooled: torch.Tensor | None  # [B, P] (SDXL)
    negative_pooled: torch.Tensor | None  # [B, P] (SDXL)
    time_ids: torch.Tensor | None  # [B, 6] (SDXL)
    image_tokens: torch.Tensor  # [B, S, T, C]
    negative_image_tokens: torch.Tensor  # [B, S, T, C]
    target_tokens: torch.Tensor  # [B, S, 77]
    guidance_scale: torch.Tensor  # [B]
    mask_scope: torch.Tensor  # [B]

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]


@dataclass(frozen=True)
class LoopSettings:
    """Settings shared by every sample of one loop."""

    num_inference_steps: int = 25
    scheduler: str = "dpm"
    mask_mode: Sequence[str] = ("max_norm",)
    mask_reused_step: int = 12
    overlap: str = "exclusive"


@dataclass
class LoopResult:
    latents: torch.Tensor  # [B, 4, h, w], what the VAE decodes
    masks: torch.Tensor  # [steps, B, S, h/2, w/2], the masks used at each step


@dataclass
class LoopTrace:
    """Per-step intermediates, collected only when asked for (parity tests, debugging)."""

    full_probability_layers: frozenset[int] = frozenset()
    steps: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def stacked(self, name: str) -> torch.Tensor:
        return torch.stack([step[name] for step in self.steps if name in step])


def _expand_time(timestep: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    return timestep.to(device).expand(batch)


def _cat(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    return None if first is None else torch.cat([first, second])


@torch.no_grad()
def denoise(
    unet: RealCustomUNet,
    cond: Conditioning,
    latents: torch.Tensor,
    settings: LoopSettings,
    trace: LoopTrace | None = None,
) -> LoopResult:
    """Run the loop from initial noise `latents` [B, 4, h, w]."""
    scheduler = make_scheduler(settings.scheduler, settings.num_inference_steps)
    batch = cond.batch_size
    mask_size = (latents.shape[-2] // 2, latents.shape[-1] // 2)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = cond.guidance_scale.to(latents).view(-1, 1, 1, 1)

    # Per request, once: both samples' text and every layer's image K/V for the batched pass.
    text = torch.cat([cond.prompt_embeds, cond.negative_prompt_embeds])
    pooled = _cat(cond.pooled, cond.negative_pooled)
    time_ids = _cat(cond.time_ids, cond.time_ids)
    image_kv = unet.image_key_values(torch.cat([cond.image_tokens, cond.negative_image_tokens]))

    masks = None
    used_masks, x0 = [], latents
    for k, timestep in enumerate(scheduler.timesteps):
        record: dict[str, torch.Tensor] = {}
        model_input = (
            scheduler.scale_model_input(latents, k) if hasattr(scheduler, "scale_model_input") else latents
        )

        # 1. Guidance branch: text only, target-word attention -> masks (frozen from mask_reused_step on).
        recompute = k < settings.mask_reused_step or masks is None
        if recompute:
            eps_guidance, maps, probs = unet.guidance(
                model_input,
                _expand_time(timestep, batch, latents.device),
                cond.prompt_embeds,
                cond.pooled,
                cond.time_ids,
                cond.target_tokens,
                trace.full_probability_layers if trace else frozenset(),
            )
            masks, score = generate_masks(
                maps, mask_size, settings.mask_mode, cond.mask_scope, settings.overlap
            )
            if trace is not None:
                record.update(eps_guidance=eps_guidance, mask_score=score)
                record.update({f"map_L{i:02d}": layer_map for i, layer_map in enumerate(maps)})
                record.update({f"probs_L{i:02d}": layer_probs for i, layer_probs in probs.items()})

        # 2. Generation branch: conditional and unconditional samples in one batch, same masks.
        eps = unet.generation(
            torch.cat([model_input, model_input]),
            _expand_time(timestep, 2 * batch, latents.device),
            text,
            pooled,
            time_ids,
            masks=torch.cat([masks, masks]).to(latents.dtype),
            image_key_values=image_kv,
        )
        eps_cond, eps_uncond = eps.chunk(2)

        # 3. Classifier-free guidance.
        noise_pred = eps_uncond + scale * (eps_cond - eps_uncond)

        # 4. Scheduler step.
        latents, x0 = scheduler.step(k, noise_pred, latents)
        used_masks.append(masks)
        if trace is not None:
            record.update(mask=masks, eps_cond=eps_cond, eps_uncond=eps_uncond, noise_pred=noise_pred)
            record.update(
                latents=latents, x0=x0, timestep=timestep, mask_recomputed=torch.tensor(int(recompute))
            )
            trace.steps.append(record)

    return LoopResult(scheduler.final_latents(latents, x0), torch.stack(used_masks))
