"""Loading the golden fixture (tensors from the official code on tiny random weights)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from realcustom.loading import split_realcustom_state_dict
from realcustom.projector import ProjectorConfig
from realcustom.unet import RealCustomUNet

DEFAULT_GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden" / "realcustom_tiny_sdxl"
CASES = ("maxnorm", "minmax_per_channel", "threshold_binary", "ddim_maxnorm")

# Absolute tolerances from the fixture's README (§8), fp32 on the CPU.
ATOL = {"map": 1e-6, "mask": 1e-5, "eps": 2e-5, "noise_pred": 5e-5, "latent": 1e-3}


def golden_dir() -> Path:
    path = Path(os.environ.get("REALCUSTOM_GOLDEN_DIR", DEFAULT_GOLDEN_DIR))
    assert (path / "manifest.json").is_file(), (
        f"golden fixture not found at {path} (set REALCUSTOM_GOLDEN_DIR)"
    )
    return path


@dataclass
class GoldenModel:
    unet: RealCustomUNet
    projector: torch.nn.Module


@cache
def golden_model() -> GoldenModel:
    root = golden_dir()
    config = json.loads((root / "unet_config.json").read_text())
    config.pop("image_prompt_settings")
    projector_params = json.loads((root / "projector_config.json").read_text())["params"]
    projector_config = ProjectorConfig(
        projector_params["vision_dim"], projector_params["out_dim"], projector_params["dim_head"]
    )
    unet = RealCustomUNet(UNet2DConditionModel.from_config(config), projector_config.out_dim)
    vision, projector_weights = split_realcustom_state_dict(load_file(str(root / "weights.safetensors")))
    unet.unet.load_state_dict(vision, strict=True)
    projector = projector_config.build()
    projector.load_state_dict(projector_weights, strict=True)
    return GoldenModel(unet.eval(), projector.eval())


def load(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir() / f"{name}.safetensors"))


def metadata(name: str, key: str) -> dict:
    with safe_open(str(golden_dir() / f"{name}.safetensors"), "pt") as handle:
        return json.loads(handle.metadata()[key])
