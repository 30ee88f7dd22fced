"""The two vision transformers of RealCustom++ (SigLIP-so400m and DINOv2-L/reg4), without timm.

timm imports torchvision, which this project cannot install, so the forward pass of timm's
`VisionTransformer` is reproduced here for the two configurations the official code uses. Module
and parameter names are timm's, so timm and open_clip checkpoint files load unchanged through
`load_timm_state_dict`, which applies the key conversions timm's `checkpoint_filter_fn` applies to
these two models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

logger = logging.getLogger(__name__)

# timm's LayerNorm default, used by every norm of both models.
LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class ViTConfig:
    """Shape of one timm `VisionTransformer` as RealCustom++ uses it."""

    timm_name: str
    """timm model whose checkpoints this configuration loads (tiny variants keep the name they shrink)."""
    image_size: int
    """Square input size in pixels; like timm, a remainder smaller than a patch is ignored."""
    patch_size: int
    embed_dim: int
    depth: int
    """Number of transformer blocks."""
    num_heads: int
    mlp_dim: int
    """Hidden width of each block's MLP."""
    class_token: bool
    register_tokens: int
    """DINOv2 register tokens; like the class token they get no position embedding."""
    layer_scale_init: float | None
    """Initial LayerScale value; None means the blocks have no LayerScale (no `ls*.gamma`)."""

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Class and register tokens placed before the patch tokens."""
        return int(self.class_token) + self.register_tokens


SIGLIP_SO400M_384 = ViTConfig(
    timm_name="vit_so400m_patch14_siglip_384",
    image_size=384,
    patch_size=14,
    embed_dim=1152,
    depth=27,
    num_heads=16,
    mlp_dim=4304,  # timm: int(1152 * 3.7362)
    class_token=False,
    register_tokens=0,
    layer_scale_init=None,
)

# Created by the official code with img_size=384: the 37x37 grid of the 518-pixel checkpoint is
# resampled to 27x27 at load time.
DINOV2_L_REG4_384 = ViTConfig(
    timm_name="vit_large_patch14_reg4_dinov2.lvd142m",
    image_size=384,
    patch_size=14,
    embed_dim=1024,
    depth=24,
    num_heads=16,
    mlp_dim=4096,
    class_token=True,
    register_tokens=4,
    layer_scale_init=1e-5,
)

# Tiny variants for tests and the `tiny` model: 56-pixel views give a 4x4 grid (16 tokens), and the
# two widths add up to the tiny projector's vision_dim of 64.
SIGLIP_TINY = ViTConfig(
    timm_name="vit_so400m_patch14_siglip_384",
    image_size=56,
    patch_size=14,
    embed_dim=32,
    depth=4,
    num_heads=2,
    mlp_dim=119,  # timm: int(32 * 3.7362), the so400m MLP ratio
    class_token=False,
    register_tokens=0,
    layer_scale_init=None,
)

DINOV2_TINY = ViTConfig(
    timm_name="vit_large_patch14_reg4_dinov2.lvd142m",
    image_size=56,
    patch_size=14,
    embed_dim=32,
    depth=4,
    num_heads=2,
    mlp_dim=128,
    class_token=True,
    register_tokens=4,
    layer_scale_init=1e-5,
)


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided convolution (timm `patch_embed.proj`)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.embed_dim, config.patch_size, stride=config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.proj(pixels)  # [B, D, g, g]
        return patches.flatten(2).transpose(1, 2)  # [B, g*g, D], row-major patch order


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        head_dim = dim // self.num_heads
        # [B, N, 3D] -> [3, B, heads, N, head_dim]
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).reshape(batch, length, dim)  # [B, N, D]
        return self.proj(attended)


class Mlp(nn.Module):
    """Two-layer MLP with exact (erf) GELU, timm's default activation for both models."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (DINOv2)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block, optionally with LayerScale on both residual branches."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, config.mlp_dim)
        if config.layer_scale_init is None:
            self.ls1: nn.Module = nn.Identity()
            self.ls2: nn.Module = nn.Identity()
        else:
            self.ls1 = LayerScale(dim, config.layer_scale_init)
            self.ls2 = LayerScale(dim, config.layer_scale_init)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.ls1(self.attn(self.norm1(tokens)))
        return tokens + self.ls2(self.mlp(self.norm2(tokens)))


class VisionTransformer(nn.Module):
    """timm's `VisionTransformer` forward up to the blocks, for feature extraction only.

    The position embedding covers the patch grid only and is added before the class and register
    tokens are prepended (timm `no_embed_class=True`, as for DINOv2 with registers; SigLIP has no
    prefix tokens, so the distinction does not arise there). The final norm and the pooling head
    are not built: RealCustom++ reads un-normalised intermediate block outputs.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, config.register_tokens, dim)) if config.register_tokens else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, dim))
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.depth)))
        self._init_embeddings()

    def _init_embeddings(self) -> None:
        # timm's initial values for the embeddings; only unloaded (tiny, test) models keep them.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus position embedding, prefixed by class/register tokens: [B, P+N, D]."""
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"expected {size}x{size} pixels, got {tuple(pixels.shape[-2:])}")
        tokens = self.patch_embed(pixels) + self.pos_embed
        batch = tokens.shape[0]
        prefix = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        return torch.cat([*prefix, tokens], dim=1)

    def block_outputs(self, pixels: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Outputs of the blocks at `indices` (0-based), in the order given, as [B, N, D] each.

        Equals timm `get_intermediate_layers(pixels, n=set(indices))`: no final norm, class and
        register tokens removed. Blocks after the deepest requested one are skipped.
        """
        wanted = [index if index >= 0 else self.config.depth + index for index in indices]
        if not wanted or not all(0 <= index < self.config.depth for index in wanted):
            raise ValueError(f"block indices {list(indices)} out of range for depth {self.config.depth}")
        tokens = self.embed(pixels)
        outputs: dict[int, torch.Tensor] = {}
        for index in range(max(wanted) + 1):
            tokens = self.blocks[index](tokens)
            if index in wanted:
                outputs[index] = tokens[:, self.config.num_prefix_tokens :]
        return [outputs[index] for index in wanted]


# Checkpoint entries with no counterpart here: final norm, pooling head and classifier.
_UNUSED_PREFIXES = ("norm.", "fc_norm.", "head.", "attn_pool.")
_OPEN_CLIP_PREFIXES = ("visual.trunk.", "module.visual.trunk.")


def _convert_original_dinov2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 layout -> timm's (timm `_convert_dinov2`).

    Meta's position embedding has an entry for the class token; timm's registers-model has none, so
    that entry is folded into the class token and registers are renamed.
    """
    converted = {key: value for key, value in state_dict.items() if key != "mask_token"}
    if "register_tokens" in converted:
        pos_embed = converted.pop("pos_embed")  # [1, 1+N, D]
        converted["reg_token"] = converted.pop("register_tokens")
        converted["cls_token"] = converted.pop("cls_token") + pos_embed[:, 0]
        converted["pos_embed"] = pos_embed[:, 1:]
    return converted


def resample_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resample a square patch position embedding [1, n*n, D] to [1, g*g, D] like timm.

    Bicubic with anti-aliasing and align_corners=False, computed in float32 (timm
    `resample_abs_pos_embed` with the defaults `checkpoint_filter_fn` uses).
    """
    old_grid = math.isqrt(pos_embed.shape[1])
    if old_grid * old_grid != pos_embed.shape[1]:
        raise ValueError(f"position embedding of {pos_embed.shape[1]} tokens is not a square grid")
    if old_grid == grid_size:
        return pos_embed
    dim = pos_embed.shape[-1]
    # [1, n*n, D] -> [1, D, n, n]
    grid = pos_embed.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", antialias=True)
    # [1, D, g, g] -> [1, g*g, D]
    resampled = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim)
    logger.info("Resampled position embedding from %dx%d to %dx%d", old_grid, old_grid, grid_size, grid_size)
    return resampled.to(pos_embed.dtype)


def convert_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ViTConfig
) -> dict[str, torch.Tensor]:
    """Bring a timm, open_clip or Meta DINOv2 state dict to this module's keys and grid.

    Mirrors timm `checkpoint_filter_fn` for these models: unwraps `model`/`state_dict` nesting,
    keeps open_clip's `visual.trunk.` entries without the prefix, converts Meta's DINOv2 layout,
    resamples the position embedding to `config`'s grid, and drops what this module does not build.
    """
    for wrapper in ("model", "state_dict"):
        nested = state_dict.get(wrapper)
        if isinstance(nested, Mapping):
            state_dict = nested
    entries = dict(state_dict)
    for prefix in _OPEN_CLIP_PREFIXES:
        if any(key.startswith(prefix) for key in entries):
            entries = {key[len(prefix) :]: value for key, value in entries.items() if key.startswith(prefix)}
            break
    if "mask_token" in entries:
        entries = _convert_original_dinov2(entries)
    entries = {key: value for key, value in entries.items() if not key.startswith(_UNUSED_PREFIXES)}
    if "pos_embed" in entries:
        entries["pos_embed"] = resample_pos_embed(entries["pos_embed"], config.grid_size)
    return entries


def load_timm_state_dict(
    model: VisionTransformer, checkpoint: str | Path | Mapping[str, torch.Tensor]
) -> None:
    """Load a timm/open_clip checkpoint (`.bin`, `.pth` or `.safetensors` path, or a state dict).

    Every parameter of `model` must be present; extra entries other than the final norm and the
    heads are rejected, so a checkpoint for another architecture fails loudly.
    """
    if isinstance(checkpoint, Mapping):
        state_dict = checkpoint
    elif str(checkpoint).endswith(".safetensors"):
        state_dict = load_file(str(checkpoint))
    else:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    entries = convert_timm_state_dict(state_dict, model.config)
    model.load_state_dict(entries, strict=True)
    logger.info("Loaded %d tensors into %s", len(entries), model.config.timm_name)
