"""The tiny pipeline with one attention resolution fewer (4 attn2 layers instead of 14), for the
tests that compile and capture steps: every part the tiny model has, and inductor compiles it in
seconds."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from realcustom.loading import load_pipeline
from realcustom.models import TINY_UNET
from realcustom.pipeline import RealCustomPipeline
from realcustom.unet import RealCustomUNet

CAPTURE_UNET = {
    **TINY_UNET,
    "attention_head_dim": [2, 4],
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1],
}


def load_capture_pipeline() -> RealCustomPipeline:
    """The tiny pipeline with the smaller UNet (weights from seed 0), no gradients."""
    pipeline = load_pipeline("tiny")
    image_token_dim = pipeline.unet.cross_attention_layers[0].to_k_vision.in_features
    torch.manual_seed(0)
    pipeline.unet = RealCustomUNet(UNet2DConditionModel(**CAPTURE_UNET), image_token_dim).eval()
    return pipeline.requires_grad_(False)
