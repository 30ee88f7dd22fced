"""Live previews of a running loop: x̂₀ latents -> RGB through one fixed linear map (no VAE decode).

The map is fitted once per model, at start-up, by least squares on what the model's own VAE
encoder makes of flat colour patches: each latent pixel of a patch should give the patch's colour.
That is exact for nothing and close enough for a thumbnail, and it costs one small VAE encode.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Patch colours: every combination of these levels per channel (64 colours), in [-1, 1].
LEVELS = (-1.0, -1 / 3, 1 / 3, 1.0)
PATCH = 32  # pixels per side of one colour patch (a few latent pixels after the VAE's downsampling)


@dataclass
class LatentPreview:
    weight: torch.Tensor  # [3, C]
    bias: torch.Tensor  # [3]
    max_side: int = 128

    @classmethod
    @torch.no_grad()
    def fit(cls, pipeline, max_side: int = 128) -> LatentPreview:
        vae = pipeline.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        patch = max(PATCH, 4 * factor)
        colours = list(itertools.product(LEVELS, repeat=3))
        side = int(np.ceil(np.sqrt(len(colours))))
        pixels = torch.zeros(1, 3, side * patch, side * patch)
        for index, colour in enumerate(colours):
            row, col = divmod(index, side)
            pixels[0, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = torch.tensor(
                colour
            ).view(3, 1, 1)
        parameter = next(vae.parameters())
        latents = vae.encode(pixels.to(parameter.device, parameter.dtype)).latent_dist.mean
        latents = latents.float().cpu() * vae.config.scaling_factor  # [1, C, h, w]
        target = F.avg_pool2d(pixels, factor)  # [1, 3, h, w]
        inputs = torch.cat([latents.flatten(2)[0].T, torch.ones(latents[0, 0].numel(), 1)], dim=1)
        solution = torch.linalg.lstsq(inputs, target.flatten(2)[0].T).solution  # [C + 1, 3]
        return cls(solution[:-1].T.contiguous(), solution[-1].contiguous(), max_side)

    def image(self, latents: torch.Tensor) -> Image.Image:
        """[C, h, w] scaled latents (as the loop holds x̂₀) -> an RGB thumbnail, long side at most
        `max_side` (small latents are enlarged with nearest neighbours, to stay legible)."""
        rgb = torch.einsum("oc,chw->ohw", self.weight, latents.float().cpu()) + self.bias.view(3, 1, 1)
        array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(array, mode="RGB")
        scale = self.max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.BILINEAR if scale < 1 else Image.Resampling.NEAREST)
