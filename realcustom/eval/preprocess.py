"""The metric models' image preprocessing, written with PIL/numpy/torch (no torchvision).

Both follow the reference implementations' evaluation transforms: resize the shortest side with
bicubic filtering, centre-crop, scale to [0, 1], normalise with the model's mean and std.
CLIP (openai): resize 224, crop 224. DINO (facebookresearch/dino eval): resize 256, crop 224.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ImageTransform:
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, 3, crop, crop] float32 pixels, normalised."""
        return torch.stack([self._one(image) for image in images])

    def _one(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        width, height = image.size
        # As torchvision's Resize(int): the short side becomes `resize`, the long one is truncated.
        if width <= height:
            size = (self.resize, int(self.resize * height / width))
        else:
            size = (int(self.resize * width / height), self.resize)
        image = image.resize(size, Image.Resampling.BICUBIC)
        left = round((size[0] - self.crop) / 2)
        top = round((size[1] - self.crop) / 2)
        image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std


CLIP_TRANSFORM = ImageTransform(
    224, 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
)
DINO_TRANSFORM = ImageTransform(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
