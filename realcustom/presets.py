"""Fast-mode presets: the sampler, steps and guidance each family of distilled SDXL adapters was
trained for, and the mask-guidance schedule that goes with them. Torch-free data (the API selects a
preset by name with one field); the adapter itself is the operator's to load (realcustom/lora).

Mask guidance at few steps. The official default (25 trailing steps, `mask_reused_step` 12)
updates masks at timesteps 999 … 559 and reuses them from 519 on: masks follow the noisy half of
the trajectory, where the layout forms. Expressed as a noise level instead of a step index, that
split holds at any step count: a step updates masks while its timestep is at least
MASK_UPDATE_MIN_TIMESTEP (and step 0 always does). At 4 trailing steps (999, 749, 499, 249) the
masks are computed at 999 and 749 and reused at 499 and 249; at 8 steps, at the first four.

Quality note: these values are the adapter authors' published settings; whether RealCustom's mask
guidance keeps its subject fidelity on these adapters has not been measured here (no real
weights on this machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Masks are updated at steps whose timestep is at least this (the official 25-step split).
MASK_UPDATE_MIN_TIMESTEP = 540


def mask_reused_step_at(timesteps: Sequence[int], min_timestep: int = MASK_UPDATE_MIN_TIMESTEP) -> int:
    """The first step whose masks are reused: leading steps at or above `min_timestep` update
    them (at least step 0 does)."""
    updating = 0
    for timestep in timesteps:
        if timestep < min_timestep:
            break
        updating += 1
    return max(1, updating)


@dataclass(frozen=True)
class FastPreset:
    name: str
    family: str  # the adapter family it is for
    scheduler: str  # realcustom.schedulers name
    steps: int
    guidance_scale: float  # <= 1: CFG-free (one generation pass of B rows)
    mask_reused_step: int  # = mask_reused_step_at(the scheduler's timesteps) (tested)
    timesteps: tuple[int, ...] | None = None  # custom sampler timesteps (DMD2)
    eta: float | None = None  # TCD's stochasticity
    adapter: str = ""  # where its authors publish the adapter (hub id; fetched by operators)

    def settings(self) -> dict:
        """The generation settings it stands for (pipeline / job keyword arguments)."""
        return {
            "num_inference_steps": self.steps,
            "scheduler": self.scheduler,
            "guidance_scale": self.guidance_scale,
            "mask_reused_step": self.mask_reused_step,
            "timesteps": self.timesteps,
            "eta": self.eta,
        }


PRESETS = {
    preset.name: preset
    for preset in (
        FastPreset(
            "sdxl-lightning-2step", "SDXL-Lightning", "euler", 2, 0.0, 1,
            adapter="ByteDance/SDXL-Lightning/sdxl_lightning_2step_lora.safetensors",
        ),
        FastPreset(
            "sdxl-lightning-4step", "SDXL-Lightning", "euler", 4, 0.0, 2,
            adapter="ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors",
        ),
        FastPreset(
            "sdxl-lightning-8step", "SDXL-Lightning", "euler", 8, 0.0, 4,
            adapter="ByteDance/SDXL-Lightning/sdxl_lightning_8step_lora.safetensors",
        ),
        FastPreset(
            "hyper-sdxl-8step", "Hyper-SD", "ddim", 8, 0.0, 4,
            adapter="ByteDance/Hyper-SD/Hyper-SDXL-8steps-lora.safetensors",
        ),
        FastPreset(
            "dmd2-4step", "DMD2", "lcm", 4, 0.0, 2, timesteps=(999, 749, 499, 249),
            adapter="tianweiy/DMD2/dmd2_sdxl_4step_lora_fp16.safetensors",
        ),
        FastPreset("lcm-4step", "LCM-LoRA", "lcm", 4, 1.0, 2, adapter="latent-consistency/lcm-lora-sdxl"),
        FastPreset("tcd-4step", "TCD", "tcd", 4, 0.0, 2, eta=0.3, adapter="h1t/TCD-SDXL-LoRA"),
    )
}  # fmt: skip


def preset(name: str) -> FastPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
