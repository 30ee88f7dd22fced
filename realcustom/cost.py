"""The work of one generation, in one number: what admission, cost caps and fair scheduling count.

Torch-free (the API prices requests without a model). A unit is one megapixel denoised for one
step: the UNet passes of a step scale with the latent's pixels and the rows (images) in flight.
Each subject beyond the first adds its own image cross-attention in every attn2 layer of the
generation pass: +4.5 % of a forward for the two generation forwards of a step's three
(docs/PERFORMANCE.md, "Image cross-attention"), so about 3 % of a step.
"""

from __future__ import annotations

from typing import Protocol

# Work of one more subject's image attention, as a share of one step (docs/PERFORMANCE.md).
EXTRA_SUBJECT_SHARE = 0.03


class CostedSettings(Protocol):
    width: int
    height: int
    num_inference_steps: int
    num_images: int


def generation_cost(settings: CostedSettings, subjects: int) -> float:
    """Megapixel-steps of `settings` with `subjects` references (>= 1), over all its images."""
    megapixels = settings.width * settings.height / 1e6
    per_step = megapixels * settings.num_images * (1 + EXTRA_SUBJECT_SHARE * max(subjects - 1, 0))
    return per_step * settings.num_inference_steps
