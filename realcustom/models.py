"""Model specifications (SDXL, SD-1.5, tiny) and building a pipeline with random weights.

The full-size specs hold the stock diffusers/transformers configurations of the released
backbones, so real checkpoints load into them and benchmarks can build them with random weights
(the work per image does not depend on the values). `tiny` keeps the SDXL architecture at toy
widths: the CLI, the service and the tests run it on a CPU in well under a second per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from realcustom.pipeline import RealCustomPipeline
from realcustom.projector import ProjectorConfig
from realcustom.reference import (
    RELEASED_REFERENCE_ENCODER,
    TINY_REFERENCE_ENCODER,
    ReferenceEncoder,
    ReferenceEncoderConfig,
)
from realcustom.text import TextEncoder
from realcustom.tokenizer import EOS_TOKEN, build_clip_tokenizer
from realcustom.unet import RealCustomUNet

RELEASED_PROJECTOR = ProjectorConfig(vision_dim=2176, out_dim=2048, dim_head=64)

SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# The tiny UNet is the golden fixture's SDXL-shaped configuration (two attention resolutions,
# at least two attn2 layers in the first cross-attention block, as the official code needs).
TINY_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 4, 4],
    "block_out_channels": [16, 32, 32],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 64,
    "sample_size": 16,
    "transformer_layers_per_block": [1, 2, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

_VAE_BLOCKS = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
SDXL_VAE = {
    **_VAE_BLOCKS,
    "block_out_channels": [128, 256, 512, 512],
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
SD15_VAE = {**SDXL_VAE, "sample_size": 512, "scaling_factor": 0.18215}
TINY_VAE = {
    **_VAE_BLOCKS,
    "block_out_channels": [8, 8, 16, 16],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.13025,
}

CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIGG_TEXT = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "pad_token_id": 1,
}
TINY_TEXT = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "hidden_act": "quick_gelu",
    "projection_dim": 16,
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one RealCustom++ model's architecture."""

    name: str
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]
    vision: ReferenceEncoderConfig = RELEASED_REFERENCE_ENCODER
    projector: ProjectorConfig = RELEASED_PROJECTOR
    default_size: int = 1024

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2


SDXL = ModelSpec("sdxl", SDXL_UNET, SDXL_VAE, (CLIP_L_TEXT, CLIP_BIGG_TEXT))
SD15 = ModelSpec(
    "sd15",
    SD15_UNET,
    SD15_VAE,
    (CLIP_L_TEXT,),
    projector=ProjectorConfig(vision_dim=2176, out_dim=768, dim_head=64),
    default_size=512,
)
TINY = ModelSpec(
    "tiny",
    TINY_UNET,
    TINY_VAE,
    (TINY_TEXT, TINY_TEXT),
    vision=TINY_REFERENCE_ENCODER,
    projector=ProjectorConfig(vision_dim=64, out_dim=32, dim_head=16),
    default_size=128,
)
# SD-1.5-shaped toy: one text encoder, no added embeddings, attention at full latent resolution
# (so masks are upsampled into the first layers, unlike SDXL).
TINY_SD15 = ModelSpec(
    "tiny-sd15",
    {
        "act_fn": "silu",
        "attention_head_dim": [2, 2, 4],
        "block_out_channels": [16, 32, 32],
        "cross_attention_dim": 16,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "in_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": 16,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    {**TINY_VAE, "scaling_factor": 0.18215},
    (TINY_TEXT,),
    vision=TINY_REFERENCE_ENCODER,
    projector=ProjectorConfig(vision_dim=64, out_dim=16, dim_head=16),
    default_size=128,
)
SPECS = {spec.name: spec for spec in (SDXL, SD15, TINY, TINY_SD15)}


def build_text_encoder(spec: ModelSpec) -> TextEncoder:
    # SDXL's second (OpenCLIP bigG) tokenizer pads with "!" instead of the end token.
    pads = [EOS_TOKEN, "!"][: len(spec.text_encoders)]
    tokenizers = [build_clip_tokenizer(pad) for pad in pads]
    encoders = [
        CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config))
        for config in spec.text_encoders
    ]
    return TextEncoder(tokenizers, encoders)


def build_pipeline(spec: ModelSpec, seed: int = 0) -> RealCustomPipeline:
    """The architecture of `spec` with random weights drawn from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = build_text_encoder(spec)
        reference_encoder = ReferenceEncoder(spec.vision)
        projector = spec.projector.build()
        unet = RealCustomUNet(UNet2DConditionModel.from_config(spec.unet), spec.projector.out_dim)
        vae = AutoencoderKL.from_config(spec.vae)
    return RealCustomPipeline(
        text_encoder, reference_encoder, projector, unet, vae, spec.name, spec.default_size
    )
