"""The method's request type: one customisation job in, images out (what engines and the service
hand down; `realcustom.job_inputs` turns it into loop inputs).

Torch-free, so the API process can build and validate jobs without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from realcustom.lora.requests import LoRAChoice

if TYPE_CHECKING:  # torch-free at run time: the API imports this module
    import torch


@dataclass(frozen=True)
class SubjectInput:
    """One reference photo (already decoded, EXIF-rotated, RGB) and its target phrase."""

    image: Image.Image
    target: str
    token_indices: tuple[int, ...] = ()
    """Tokens of `target` in the prompt (BOS = 0) when located already (the service's edge does)."""
    tokens: torch.Tensor | None = None
    """Projected reference tokens [T, C] computed before (a subject cache): the encoders are skipped."""
    on_encoded: Callable[[torch.Tensor, float], None] | None = None
    """Called with the tokens and the seconds their encoding took when they were computed here."""


@dataclass(frozen=True)
class GenerationJob:
    """One customisation request, validated at the edge."""

    id: str
    prompt: str
    subjects: tuple[SubjectInput, ...]
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 25
    guidance_scale: float = 3.5
    mask_scope: float = 0.25
    mask_reused_step: int = 12
    seed: int = 0
    num_images: int = 1
    return_masks: bool = False
    mask_mode: tuple[str, ...] = ("max_norm",)
    scheduler: str = "dpm"
    negative_prompt: str | None = None
    # The sampler's options (realcustom.schedulers.SCHEDULER_OPTIONS): custom timesteps, TCD's eta.
    timesteps: tuple[int, ...] | None = None
    eta: float | None = None
    # Per-row LoRA adapters (the runner's UNet must have an adapter bank that holds them).
    loras: tuple[LoRAChoice, ...] = ()

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one denoising loop (same shapes and step schedule)."""
        return (
            self.width,
            self.height,
            self.num_inference_steps,
            self.mask_reused_step,
            self.mask_mode,
            self.scheduler,
            self.negative_prompt,
            self.timesteps,
            self.eta,
        )


@dataclass
class GenerationOutput:
    """images: `num_images` results; masks: when asked, the final mask of every subject of every
    image, image-major (image 0 subject 0, image 0 subject 1, ...), at the image size."""

    images: list[Image.Image]
    masks: list[Image.Image] | None = None
    inference_seconds: float = 0.0
