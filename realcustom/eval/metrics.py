"""The DreamBench metrics on unit-norm embeddings, in percent, and the subject-region crop.

CLIP-T: cosine between the prompt and a generated image. CLIP-I / DINO-I: cosine between a
generated image and the subject's real photos, averaged over the photos (DreamBooth protocol).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Outside a subject's region the pixels become this grey (CLIP's mean colour), so they carry
# as little content as possible into the region's embedding.
NEUTRAL_GREY = (122, 116, 104)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine [N, M] of the rows of a [N, D] and b [M, D] (any norm)."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T


def text_image_score(text: torch.Tensor, images: torch.Tensor) -> list[float]:
    """CLIP-T (%) of each generated image [N, D] with its prompt [1, D] or [D]."""
    return (100 * cosine(images, text.reshape(1, -1))[:, 0]).tolist()


def image_image_score(generated: torch.Tensor, references: torch.Tensor) -> list[float]:
    """CLIP-I / DINO-I (%) of each generated image [N, D]: mean cosine over the real photos [M, D]."""
    return (100 * cosine(generated, references).mean(dim=1)).tolist()


def region_image(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The subject's region of a generated image: pixels outside the (resized) mask set to neutral
    grey, cropped to the mask's bounding box. An empty mask keeps the whole image."""
    mask = mask.convert("L").resize(image.size, Image.Resampling.NEAREST)
    inside = np.asarray(mask) > 0
    if not inside.any():
        return image
    grey = Image.new("RGB", image.size, NEUTRAL_GREY)
    masked = Image.composite(image.convert("RGB"), grey, Image.fromarray(inside.astype(np.uint8) * 255))
    rows, cols = np.nonzero(inside)
    return masked.crop((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))
