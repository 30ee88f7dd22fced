"""The reference-image side of RealCustom++: SigLIP + DINOv2 features at two scales.

Follows the official `ShallowDeepPatchfySiglipDinoEncoder` (and its `_v2` cross-layer variant): the
reference is squashed to R x R (R = 2V); a global view is the whole image resized to V x V, and four
"local" views are its polyphase sub-images (every second row and column at one parity each, not
crops). Every view goes through the official per-view preprocessing (float -> uint8 PIL image ->
float, then the encoder's normalisation), both encoders read one intermediate block, and their
features are concatenated on channels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from realcustom.vit import (
    DINOV2_L_REG4_384,
    DINOV2_TINY,
    SIGLIP_SO400M_384,
    SIGLIP_TINY,
    VisionTransformer,
    ViTConfig,
    load_timm_state_dict,
)

logger = logging.getLogger(__name__)

# Normalisation of the timm pretrained configs the official code reads.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LOCAL_VIEWS = 4  # polyphase split with factor 2 on each axis


@dataclass(frozen=True)
class ReferenceEncoderConfig:
    """Which encoders, which blocks and which sizes make the reference features."""

    siglip: ViTConfig
    dino: ViTConfig
    siglip_layer: int
    """0-based SigLIP block whose output is the deep feature (25 of 27 in the release)."""
    dino_layer: int
    """0-based DINOv2 block whose output is the deep feature (22 of 24 in the release)."""
    reference_size: int
    """R: the reference image is resized to R x R (aspect not kept); must be 2 * view_size."""
    view_size: int
    """V: input size of both encoders; the global view and each polyphase view are V x V."""
    siglip_shallow_layers: tuple[int, ...] = ()
    """Extra SigLIP blocks of the global view for the cross-layer projector ({7, 13, 19})."""
    dino_shallow_layers: tuple[int, ...] = ()
    """DINOv2 blocks paired one-to-one with `siglip_shallow_layers` ({4, 10, 16})."""

    def __post_init__(self) -> None:
        if self.reference_size != 2 * self.view_size:
            raise ValueError(f"reference_size {self.reference_size} must be 2 * view_size {self.view_size}")
        if not self.siglip.image_size == self.dino.image_size == self.view_size:
            raise ValueError("both encoders must take view_size inputs")
        if self.siglip.num_patches != self.dino.num_patches:
            raise ValueError("SigLIP and DINOv2 tokens must align one-to-one")
        if len(self.siglip_shallow_layers) != len(self.dino_shallow_layers):
            raise ValueError("shallow layers must come in SigLIP/DINOv2 pairs")

    @property
    def feature_dim(self) -> int:
        """C: channels of every token (SigLIP width + DINOv2 width)."""
        return self.siglip.embed_dim + self.dino.embed_dim

    @property
    def tokens_per_view(self) -> int:
        """T: tokens of one view."""
        return self.siglip.num_patches


RELEASED_REFERENCE_ENCODER = ReferenceEncoderConfig(
    siglip=SIGLIP_SO400M_384,
    dino=DINOV2_L_REG4_384,
    siglip_layer=25,
    dino_layer=22,
    reference_size=768,
    view_size=384,
)

CROSS_LAYER_REFERENCE_ENCODER = ReferenceEncoderConfig(
    siglip=SIGLIP_SO400M_384,
    dino=DINOV2_L_REG4_384,
    siglip_layer=25,
    dino_layer=22,
    reference_size=768,
    view_size=384,
    siglip_shallow_layers=(7, 13, 19),
    dino_shallow_layers=(4, 10, 16),
)

# Second-to-last block as in the release; T = 16 tokens, C = 64 channels.
TINY_REFERENCE_ENCODER = ReferenceEncoderConfig(
    siglip=SIGLIP_TINY,
    dino=DINOV2_TINY,
    siglip_layer=SIGLIP_TINY.depth - 2,
    dino_layer=DINOV2_TINY.depth - 2,
    reference_size=2 * SIGLIP_TINY.image_size,
    view_size=SIGLIP_TINY.image_size,
)


@dataclass
class VisionFeatures:
    """Reference features for the projector, in the encoders' dtype."""

    global_tokens: torch.Tensor
    """[B, T, C] deep features of the global view."""
    local_tokens: torch.Tensor
    """[B, 4T, C] deep features of the four polyphase views, interleaved as the official code does."""
    shallow_tokens: torch.Tensor | None = field(default=None)
    """[B, 3T, C] shallow features of the global view (cross-layer variant only), layer-major."""

    def expand(self, batch: int) -> VisionFeatures:
        """The same features for `batch` samples; a view of a batch-1 instance, not a copy."""
        return VisionFeatures(
            global_tokens=self.global_tokens.expand(batch, -1, -1),
            local_tokens=self.local_tokens.expand(batch, -1, -1),
            shallow_tokens=None if self.shallow_tokens is None else self.shallow_tokens.expand(batch, -1, -1),
        )


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """Any-mode PIL image -> [3, H, W] float32 in [0, 1], as `convert("RGB")` + torchvision ToTensor.

    Alpha is dropped, not composited, like the official scripts' `convert("RGB")`.
    """
    rgb = np.array(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)  # [3, H, W]


def polyphase_views(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, 2V, 2V] -> [4B, 3, V, V]: the four sub-images at each (row, column) parity.

    Official einops pattern "b c (h hp) (w wp) -> (b hp wp) c h w": view k = 2*hp + wp of sample b
    is pixels[b, :, hp::2, wp::2] and sits at row 4b + k.
    """
    batch, channels, height, width = pixels.shape
    # [B, 3, V, 2, V, 2] -> [B, 2 (hp), 2 (wp), 3, V, V] -> [4B, 3, V, V]
    split = pixels.reshape(batch, channels, height // 2, 2, width // 2, 2)
    return split.permute(0, 3, 5, 1, 2, 4).reshape(batch * LOCAL_VIEWS, channels, height // 2, width // 2)


def interleave_view_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[4B, T, C] per-view tokens -> [B, 4T, C] with token index 4t + k (official "(l hp wp)" order)."""
    views_batch, length, channels = tokens.shape
    # [B, 4, T, C] -> [B, T, 4, C] -> [B, 4T, C]
    per_sample = tokens.reshape(views_batch // LOCAL_VIEWS, LOCAL_VIEWS, length, channels)
    return per_sample.transpose(1, 2).reshape(views_batch // LOCAL_VIEWS, LOCAL_VIEWS * length, channels)


def truncate_to_uint8_levels(views: torch.Tensor) -> torch.Tensor:
    """The float -> PIL -> float round trip of each view: x*255 truncated to uint8, then /255.

    torchvision's ToPILImage truncates (it does not round); the V x V bicubic Resize that follows
    in the official transform is the identity at equal size (PIL returns a copy), so it is omitted.
    """
    return views.mul(255).to(torch.uint8).float().div(255)


def normalize(views: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """torchvision Normalize: subtract, then divide, per channel."""
    mean_tensor = torch.tensor(mean, dtype=views.dtype, device=views.device).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std, dtype=views.dtype, device=views.device).view(1, -1, 1, 1)
    return views.sub(mean_tensor).div(std_tensor)


class ReferenceEncoder(nn.Module):
    """SigLIP + DINOv2 cross-scale (and optionally cross-layer) reference feature extractor.

    Frozen in use: forward runs without autograd. Weights come from the official timm/open_clip
    files through `load_pretrained`; an unloaded encoder has timm-like random weights (tests, tiny).
    """

    def __init__(self, config: ReferenceEncoderConfig):
        super().__init__()
        self.config = config
        self.siglip = VisionTransformer(config.siglip)
        self.dino = VisionTransformer(config.dino)
        self.siglip_layer = config.siglip_layer
        self.dino_layer = config.dino_layer
        self.reference_size = config.reference_size
        self.view_size = config.view_size
        self._black_cache: dict[tuple[torch.device, torch.dtype], VisionFeatures] = {}

    def load_pretrained(self, siglip_checkpoint: str | Path, dino_checkpoint: str | Path) -> None:
        """Load the official encoder files (open_clip SigLIP `.bin`, timm DINOv2 `.bin`)."""
        load_timm_state_dict(self.siglip, siglip_checkpoint)
        load_timm_state_dict(self.dino, dino_checkpoint)
        self._black_cache.clear()

    def to_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any mode and size) -> [B, 3, R, R] float32 in [0, 1] on the CPU.

        Bilinear resize without anti-aliasing and with align_corners=False, aspect not kept, as the
        official scripts do.
        """
        size = (self.reference_size, self.reference_size)
        resized = [
            F.interpolate(image_to_tensor(image)[None], size=size, mode="bilinear", align_corners=False)
            for image in images
        ]
        return torch.cat(resized)  # [B, 3, R, R]

    def encode_images(self, images: Sequence[Image.Image]) -> VisionFeatures:
        """`forward(to_tensor(images))` on the encoders' device."""
        return self(self.to_tensor(images))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> VisionFeatures:
        """[B, 3, R, R] reference in [0, 1] -> `VisionFeatures` in the encoders' dtype."""
        expected = (3, self.reference_size, self.reference_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"expected pixels of shape [B, {', '.join(map(str, expected))}]")
        weight = self.siglip.pos_embed
        # The view preprocessing is float32, as the official `.to(torch.float)` before ToPILImage.
        pixels = pixels.to(device=weight.device, dtype=torch.float32)
        batch = pixels.shape[0]
        size = (self.view_size, self.view_size)
        global_view = F.interpolate(pixels, size=size, mode="bilinear", align_corners=True)
        views = truncate_to_uint8_levels(torch.cat([global_view, polyphase_views(pixels)]))  # [5B, 3, V, V]

        config = self.config
        siglip_outputs = self.siglip.block_outputs(
            normalize(views, SIGLIP_MEAN, SIGLIP_STD).to(weight.dtype),
            [*config.siglip_shallow_layers, config.siglip_layer],
        )
        dino_outputs = self.dino.block_outputs(
            normalize(views, IMAGENET_MEAN, IMAGENET_STD).to(weight.dtype),
            [*config.dino_shallow_layers, config.dino_layer],
        )
        # One [5B, T, C] tensor per requested layer pair, deep pair last.
        features = [torch.cat(pair, dim=-1) for pair in zip(siglip_outputs, dino_outputs, strict=True)]
        deep = features.pop()
        shallow = torch.cat([layer[:batch] for layer in features], dim=1) if features else None
        return VisionFeatures(
            global_tokens=deep[:batch],
            local_tokens=interleave_view_tokens(deep[batch:]),
            shallow_tokens=shallow,
        )

    def black_features(self, batch: int) -> VisionFeatures:
        """Features of an all-black reference (the CFG negative), computed once per device and dtype."""
        weight = self.siglip.pos_embed
        key = (weight.device, weight.dtype)
        if key not in self._black_cache:
            black = torch.zeros(1, 3, self.reference_size, self.reference_size, device=weight.device)
            self._black_cache[key] = self(black)
            logger.debug("Computed black-reference features for %s", key)
        return self._black_cache[key].expand(batch)
