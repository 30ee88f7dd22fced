"""The one check of a generation's settings, shared by the pipeline, the runner and the API edge.

Torch-free, so the API validates with exactly the rules the pipeline applies. Anything that has the
attributes of `GenerationSettings` (a pipeline call's arguments, `realcustom.jobs.GenerationJob`, the
API's request) can be checked; `Limits` adds the service's own bounds on top of the model's rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Sizes must keep the mask (1/16) and the deepest attention layer (1/32) on whole pixels.
SIZE_MULTIPLE = 32


class SettingsError(ValueError):
    """A setting the model cannot run; `field` names it, the message says what to change, `code`
    is the API's error code for it (`invalid_request` unless a rule has its own)."""

    def __init__(self, field: str, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class GenerationSettings(Protocol):
    width: int
    height: int
    num_inference_steps: int
    mask_reused_step: int
    mask_scope: float
    guidance_scale: float
    num_images: int


@dataclass(frozen=True)
class Limits:
    """Bounds a deployment puts on requests (the model itself has none of these)."""

    min_side: int
    max_side: int
    max_steps: int
    max_num_images: int


def check_size(height: int, width: int, limits: Limits | None = None) -> None:
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise SettingsError(name, f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value}")
        if limits is not None and not limits.min_side <= value <= limits.max_side:
            raise SettingsError(name, f"{name} must be between {limits.min_side} and {limits.max_side}")


def check_schedule(num_inference_steps: int, mask_reused_step: int, limits: Limits | None = None) -> None:
    """Steps >= 1; the mask is frozen from step `mask_reused_step` (>= 1; at or past the last step
    it is recomputed at every step, which is valid)."""
    if num_inference_steps < 1:
        raise SettingsError("num_inference_steps", "num_inference_steps must be at least 1")
    if mask_reused_step < 1:
        raise SettingsError("mask_reused_step", "mask_reused_step must be at least 1")
    if limits is not None:
        for name, value in (
            ("num_inference_steps", num_inference_steps),
            ("mask_reused_step", mask_reused_step),
        ):
            if value > limits.max_steps:
                raise SettingsError(name, f"{name} must be at most {limits.max_steps}")


def check_mask_scope(mask_scope: float) -> None:
    if not 0 < mask_scope <= 1:
        raise SettingsError("mask_scope", f"mask_scope must be in (0, 1], got {mask_scope}")


def check_generation(*requests: GenerationSettings, limits: Limits | None = None) -> None:
    """Every rule on the numeric settings of one or more requests."""
    for request in requests:
        check_size(request.height, request.width, limits)
        check_schedule(request.num_inference_steps, request.mask_reused_step, limits)
        check_mask_scope(request.mask_scope)
        if request.guidance_scale < 0:
            raise SettingsError(
                "guidance_scale", f"guidance_scale must be >= 0, got {request.guidance_scale}"
            )
        if request.num_images < 1:
            raise SettingsError("num_images", "num_images must be at least 1")
        if limits is not None and request.num_images > limits.max_num_images:
            raise SettingsError("num_images", f"num_images must be at most {limits.max_num_images}")
