"""The work of one generation, in one number: what admission, cost caps and fair scheduling count.

Torch-free (the API prices requests without a model). A unit is one megapixel denoised for one
step with classifier-free guidance: the UNet passes of a step scale with the latent's pixels and
the rows (images) in flight. On top of that, per row and step:

* each subject beyond the first adds its own image cross-attention in every attn2 layer of the
  generation pass: +4.5 % of a forward for the two generation forwards of a step's three
  (docs/PERFORMANCE.md, "Image cross-attention"), so about 3 % of a step;
* a CFG-free row (guidance scale <= 1) has no unconditional sample: its generation pass is one
  forward instead of two. On SDXL 1024² (benchmarks/results/floor.md) a step does 0.59-0.60 of a
  CFG step's work at the official mask split (the guidance pass on about half the steps), at 25
  steps as at the 4-step presets;
* LoRA adapters are charged by rank: on SDXL's transformer layers (the default targets) a rank adds
  0.084 % of a pass (+5.4 % at rank 64, docs/PERFORMANCE.md "What per-row LoRA costs"). In an
  adapter bank every row computes the bank's padded ranks whether it names adapters or not; the
  price charges that work to the requests that use adapters, by the ranks they name, so fair shares
  and caps follow who asks for adapters.
"""

from __future__ import annotations

from typing import Protocol

# Work of one more subject's image attention, as a share of one step (docs/PERFORMANCE.md).
EXTRA_SUBJECT_SHARE = 0.03
# A CFG-free step's work, as a share of a step with CFG (SDXL floor: 10.3-10.5 / 17.4-17.5 TFLOP).
CFG_FREE_STEP_SHARE = 0.6
# Work one LoRA rank adds to a step (SDXL, transformer layers: +5.4 % at rank 64).
LORA_SHARE_PER_RANK = 0.054 / 64


class CostedSettings(Protocol):
    width: int
    height: int
    num_inference_steps: int
    num_images: int
    guidance_scale: float


def generation_cost(settings: CostedSettings, subjects: int, lora_rank: int = 0) -> float:
    """Megapixel-steps of `settings` with `subjects` references (>= 1) and adapters of `lora_rank`
    ranks in all, over all its images."""
    megapixels = settings.width * settings.height / 1e6
    per_row = 1 + EXTRA_SUBJECT_SHARE * max(subjects - 1, 0) + LORA_SHARE_PER_RANK * lora_rank
    if settings.guidance_scale <= 1:
        per_row *= CFG_FREE_STEP_SHARE
    return megapixels * settings.num_images * per_row * settings.num_inference_steps
