"""The RealCustom++ denoising loop (Adaptive Mask Guidance), run eagerly.

The step itself (guidance pass -> masks, generation pass, CFG, scheduler update) is defined once in
realcustom/step.py; this loop runs it on a state of the loop's exact shape. After the loop the
scheduler's x̂₀ of the last step is what gets decoded (the final sample for diffusers schedulers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from realcustom.step import (
    Conditioning,
    LoopState,
    MaskSettings,
    StepKind,
    TorchUNetCalls,
    denoise_step,
    make_schedule,
    step_kinds,
)
from realcustom.unet import RealCustomUNet


@dataclass(frozen=True)
class LoopSettings:
    """Settings shared by every sample of one loop."""

    num_inference_steps: int = 25
    scheduler: str = "dpm"
    mask_mode: Sequence[str] = ("max_norm",)
    mask_reused_step: int = 12
    overlap: str = "exclusive"
    # Sampler options (realcustom.schedulers.SCHEDULER_OPTIONS): LCM/TCD custom timesteps, TCD's eta.
    timesteps: tuple[int, ...] | None = None
    eta: float | None = None

    @property
    def schedule_options(self) -> dict:
        return {"timesteps": self.timesteps, "eta": self.eta}


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


@torch.no_grad()
def denoise(
    unet: RealCustomUNet,
    cond: Conditioning,
    latents: torch.Tensor,
    settings: LoopSettings,
    trace: LoopTrace | None = None,
    on_step: Callable[[], None] | None = None,
) -> LoopResult:
    """Run the loop from initial noise `latents` [B, 4, h, w]: `denoise_step` on a state of this
    loop's exact shape, every step run eagerly (what every faster loop is checked against). When
    every row is CFG-free (guidance scale <= 1) the generation pass leaves out the unconditional
    half."""
    batch, subjects = cond.batch_size, cond.image_tokens.shape[1]
    state = LoopState(
        unet,
        rows=batch,
        subjects=subjects,
        latent_shape=tuple(latents.shape[1:]),
        text_shape=tuple(cond.prompt_embeds.shape[1:]),
        pooled_dim=None if cond.pooled is None else cond.pooled.shape[-1],
        image_token_shape=tuple(cond.image_tokens.shape[2:]),
        device=latents.device,
        dtype=next(unet.parameters()).dtype,
    )
    schedule = make_schedule(
        settings.scheduler,
        batch,
        latents.device,
        settings.num_inference_steps,
        tuple(latents.shape[1:]),
        **settings.schedule_options,
    )
    state.load(unet, cond, latents, settings.mask_reused_step, schedule)
    calls = TorchUNetCalls(unet, trace.full_probability_layers if trace else frozenset())
    mask = MaskSettings(tuple(settings.mask_mode), settings.overlap)
    uncond_rows = 0 if bool((cond.guidance_scale <= 1).all()) else None

    used_masks = []
    for kind in step_kinds(settings.num_inference_steps, settings.mask_reused_step):
        record: dict[str, torch.Tensor] | None = None if trace is None else {}
        if record is not None:
            record["timestep"] = schedule.timestep(state)[0]
            record["mask_recomputed"] = torch.tensor(int(kind is StepKind.MASK_UPDATE))
        calls.record = record
        denoise_step(calls, state, kind, mask, record, uncond_rows=uncond_rows)
        used_masks.append(state.masks.clone())
        if record is not None:
            trace.steps.append(record)
        if on_step is not None:
            on_step()
    return LoopResult(schedule.final_latents(state).clone(), torch.stack(used_masks))
