"""Reference construction: a source photo -> the square reference image the projector sees.

Two fits:

* `squash`: the (optionally cropped) photo is resized to R x R, aspect not kept. This is what the
  released config's `NaiveResizeProcessor` does (resize_mode "resize", crop ratios 1.0) and what
  inference does to every reference, so the final stage uses it.
* `place`: the crop keeps its aspect, is scaled so its longer side is a random fraction of R and
  pasted at a random position on a plain canvas. Size and position of the subject in the reference
  then differ from the target's, which is what the curriculum uses to teach size/pose invariance.

All randomness comes from the numpy Generator passed in, so a sample is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

FITS = ("squash", "place")


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> None:
    if not low < bounds[0] <= bounds[1] <= high:
        raise ValueError(f"reference.{name} must satisfy {low} < min <= max <= {high}, got {bounds}")


@dataclass(frozen=True)
class ReferenceAugmentation:
    """How one reference is cut, flipped, scaled and placed."""

    fit: str = "squash"
    """`squash` (official resize to R x R) or `place` (keep aspect, random size and position)."""
    crop_area: tuple[float, float] = (1.0, 1.0)
    """Fraction of the source area kept by a random crop (1.0: no crop)."""
    crop_aspect: tuple[float, float] = (1.0, 1.0)
    """Width/height ratio of the crop relative to the source's, drawn log-uniformly."""
    subject_scale: tuple[float, float] = (1.0, 1.0)
    """`place` only: longer side of the pasted crop as a fraction of R."""
    flip_probability: float = 0.0
    """Probability of a horizontal mirror (a cheap pose change)."""
    background: tuple[int, int, int] = (255, 255, 255)
    """`place` only: canvas colour. Not black: black is the "no reference" image."""

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"reference.fit must be one of {FITS}, got {self.fit!r}")
        _check_range("crop_area", self.crop_area, 0.0, 1.0)
        _check_range("crop_aspect", self.crop_aspect, 0.0, math.inf)
        _check_range("subject_scale", self.subject_scale, 0.0, 1.0)
        if not 0 <= self.flip_probability <= 1:
            raise ValueError("reference.flip_probability must be in [0, 1]")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError("reference.background must be three values in 0..255")


@dataclass(frozen=True)
class Reference:
    """A built reference and where its content came from and went (left, top, right, bottom)."""

    image: Image.Image
    crop_box: tuple[int, int, int, int]
    """Region of the source photo that was kept."""
    paste_box: tuple[int, int, int, int]
    """Region of the R x R reference the crop covers (the whole canvas for `squash`)."""
    flipped: bool


def random_crop_box(
    width: int, height: int, area: tuple[float, float], aspect: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A crop of a random share of the area, aspect jitter and position, clipped to the image."""
    share = rng.uniform(*area)
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    crop_width = min(width, max(1, round(width * math.sqrt(share * ratio))))
    crop_height = min(height, max(1, round(height * math.sqrt(share / ratio))))
    left = int(rng.integers(0, width - crop_width + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    return left, top, left + crop_width, top + crop_height


def build_reference(
    source: Image.Image, size: int, augmentation: ReferenceAugmentation, rng: np.random.Generator
) -> Reference:
    """Cut, flip and fit `source` into a `size` x `size` RGB reference."""
    source = source.convert("RGB")
    crop_box = random_crop_box(*source.size, augmentation.crop_area, augmentation.crop_aspect, rng)
    crop = source.crop(crop_box)
    flipped = bool(rng.random() < augmentation.flip_probability)
    if flipped:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if augmentation.fit == "squash":
        squashed = crop.resize((size, size), Image.Resampling.BILINEAR)
        return Reference(squashed, crop_box, (0, 0, size, size), flipped)

    longer = max(1, round(size * rng.uniform(*augmentation.subject_scale)))
    scale = longer / max(crop.size)
    pasted_width = max(1, min(size, round(crop.width * scale)))
    pasted_height = max(1, min(size, round(crop.height * scale)))
    left = int(rng.integers(0, size - pasted_width + 1))
    top = int(rng.integers(0, size - pasted_height + 1))
    canvas = Image.new("RGB", (size, size), augmentation.background)
    canvas.paste(crop.resize((pasted_width, pasted_height), Image.Resampling.BILINEAR), (left, top))
    paste_box = (left, top, left + pasted_width, top + pasted_height)
    return Reference(canvas, crop_box, paste_box, flipped)
