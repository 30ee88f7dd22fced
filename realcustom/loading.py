"""Load a pipeline by name or from a checkpoint directory in the official layout.

The official release (hub repo `bytedance-research/RealCustom`, folder `ckpts/`) is laid out as:

    sdxl/clip-sdxl-1/                       CLIP ViT-L text encoder + tokenizer (hub format)
    sdxl/clip-sdxl-2/                       OpenCLIP bigG text encoder + tokenizer (hub format)
    sdxl/vae/sdxl.json, sdxl/vae/sdxl-vae.pth
    sdxl/unet/sdxl-unet.bin                 base SDXL UNet, diffusers key names
    realcustom/RealCustom_highres.pth       to_k_vision/to_v_vision + projector weights
    vit_so400m_patch14_siglip_384/open_clip_pytorch_model.bin
    vit_large_patch14_reg4_dinov2.lvd142m/pytorch_model.bin

Any weight file may also be a `.safetensors` file of the same stem. An optional `realcustom.json`
at the root overrides the architecture (`"spec"`: sdxl | sd15 | tiny, plus `"unet"` and
`"projector"` config overrides), which is how SD-1.5 weights we train, and the tests' tiny
checkpoints, are described.

A training checkpoint (realcustom/training) holds only the added weights,
`realcustom/RealCustom_highres.safetensors`, plus a `realcustom.json` whose `"base_model"` names the
model they go on top of (`tiny`, `sdxl-random` or a directory in the layout above, with `"seed"`
for random bases); `load_pipeline` loads such a directory as base + `apply_realcustom_weights`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

from realcustom.models import SPECS, TINY, TINY_SD15, ModelSpec, build_pipeline
from realcustom.pipeline import RealCustomPipeline
from realcustom.reference import ReferenceEncoder
from realcustom.text import TextEncoder
from realcustom.tokenizer import load_clip_tokenizer
from realcustom.unet import RealCustomUNet

logger = logging.getLogger(__name__)

HUB_REPO = "bytedance-research/RealCustom"
PROJECTOR_PREFIX = "encoder_hidden_states_vision_projection."
LAYOUT = {
    "text_encoders": ("sdxl/clip-sdxl-1", "sdxl/clip-sdxl-2"),
    "vae_config": "sdxl/vae/sdxl.json",
    "vae": "sdxl/vae/sdxl-vae",
    "unet": "sdxl/unet/sdxl-unet",
    "realcustom": "realcustom/RealCustom_highres",
    "siglip": "vit_so400m_patch14_siglip_384/open_clip_pytorch_model",
    "dino": "vit_large_patch14_reg4_dinov2.lvd142m/pytorch_model",
}
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch pickle (weights only, never arbitrary objects)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def find_weights(root: Path, stem: str) -> Path:
    for suffix in _WEIGHT_SUFFIXES:
        candidate = root / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"missing checkpoint {root / stem}.{{safetensors,pth,bin}}")


def split_realcustom_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Official RealCustom weights -> (UNet to_k/v_vision weights, projector weights)."""
    projector = {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
    unet = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}
    return unet, projector


def checkpoint_root(path: Path) -> Path:
    """The directory holding the layout: `path`, or `path/ckpts` as the hub snapshot lands it."""
    for candidate in (path, path / "ckpts", path / "ckpts" / "ckpts"):
        if (candidate / "realcustom").is_dir() or (candidate / "sdxl").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{path} is not a RealCustom checkpoint directory (expected realcustom/RealCustom_highres.pth "
        "and the sdxl/ folder inside it; see realcustom/loading.py for the layout)"
    )


def _spec_for(root: Path) -> ModelSpec:
    overrides_path = root / "realcustom.json"
    if not overrides_path.is_file():
        return SPECS["sdxl"]
    overrides = json.loads(overrides_path.read_text())
    spec = SPECS[overrides.get("spec", "sdxl")]
    return dataclasses.replace(
        spec,
        unet={**spec.unet, **overrides.get("unet", {})},
        projector=dataclasses.replace(spec.projector, **overrides.get("projector", {})),
        default_size=overrides.get("default_size", spec.default_size),
    )


def load_from_directory(path: str | Path, backbone_only: bool = False) -> RealCustomPipeline:
    """Build the spec's architecture and load every component from the official layout.

    `backbone_only`: the RealCustom weights file may be absent (a backbone to train them for);
    the added weights then keep their fresh initialisation.
    """
    root = checkpoint_root(Path(path))
    spec = _spec_for(root)
    text_dirs = [root / name for name in LAYOUT["text_encoders"][: len(spec.text_encoders)]]
    text_encoder = TextEncoder(
        [load_clip_tokenizer(directory) for directory in text_dirs],
        [CLIPTextModel.from_pretrained(str(directory)) for directory in text_dirs],
    )
    reference_encoder = ReferenceEncoder(spec.vision)
    reference_encoder.load_pretrained(
        find_weights(root, LAYOUT["siglip"]), find_weights(root, LAYOUT["dino"])
    )

    unet = RealCustomUNet(UNet2DConditionModel.from_config(spec.unet), spec.projector.out_dim)
    projector = spec.projector.build()
    added_files = [root / f"{LAYOUT['realcustom']}{suffix}" for suffix in _WEIGHT_SUFFIXES]
    if backbone_only and not any(candidate.is_file() for candidate in added_files):
        logger.info("no RealCustom weights in %s: added weights keep their initialisation", root)
        added = {
            **unet.vision_state_dict(),
            **{PROJECTOR_PREFIX + k: v for k, v in projector.state_dict().items()},
        }
    else:
        added = load_weights(find_weights(root, LAYOUT["realcustom"]))
    vision_weights, projector_weights = split_realcustom_state_dict(added)
    # Base and added weights are disjoint key sets; together they must cover the UNet exactly.
    unet.unet.load_state_dict(
        {**load_weights(find_weights(root, LAYOUT["unet"])), **vision_weights}, strict=True
    )
    projector.load_state_dict(projector_weights, strict=True)

    vae = AutoencoderKL.from_config(json.loads((root / LAYOUT["vae_config"]).read_text()))
    vae.load_state_dict(load_weights(find_weights(root, LAYOUT["vae"])), strict=True)
    logger.info("loaded RealCustom++ (%s) from %s", spec.name, root)
    return RealCustomPipeline(
        text_encoder, reference_encoder, projector, unet, vae, spec.name, spec.default_size
    )


def trained_weights_base(path: Path) -> dict | None:
    """The `realcustom.json` of a training checkpoint (added weights only), or None."""
    config = path / "realcustom.json"
    if not config.is_file():
        return None
    description = json.loads(config.read_text())
    return description if "base_model" in description else None


def apply_realcustom_weights(pipeline: RealCustomPipeline, path: str | Path) -> RealCustomPipeline:
    """Put RealCustom weights (official key names) into `pipeline`, in place.

    `path` is a weights file (.safetensors/.pth) or a directory holding
    `realcustom/RealCustom_highres.*`. The file must hold exactly the added weights: every
    to_k_vision/to_v_vision of the UNet and the whole projector.
    """
    path = Path(path)
    weights_file = find_weights(path, LAYOUT["realcustom"]) if path.is_dir() else path
    vision_weights, projector_weights = split_realcustom_state_dict(load_weights(weights_file))
    expected = set(pipeline.unet.vision_state_dict())
    if set(vision_weights) != expected:
        missing, unexpected = sorted(expected - set(vision_weights)), sorted(set(vision_weights) - expected)
        raise ValueError(
            f"{weights_file}: vision weights do not match the UNet (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    # The base UNet weights stay as they are; the key check above stands in for strict loading.
    pipeline.unet.unet.load_state_dict(vision_weights, strict=False)
    pipeline.projector.load_state_dict(projector_weights, strict=True)
    pipeline._cache.clear()  # cached black-image tokens came from the old projector
    logger.info("applied RealCustom weights from %s", weights_file)
    return pipeline


def download_official_checkpoints(local_dir: str | Path) -> Path:
    """Fetch the released checkpoints from the hub; a clear error when that is impossible."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(HUB_REPO, local_dir=str(local_dir), allow_patterns=["ckpts/**"])
    except Exception as error:  # any hub or network failure ends in the same advice
        raise RuntimeError(
            f"could not download {HUB_REPO} ({type(error).__name__}: {error}). Without network access, copy "
            f"the release's ckpts/ folder to {local_dir} by hand and pass that directory as the model."
        ) from error
    return checkpoint_root(Path(local_dir))


def load_pipeline(
    model: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> RealCustomPipeline:
    """`tiny` / `tiny-sd15` (toy models), `sdxl-random` / `sd15-random` (full size, random weights,
    for benchmarks), a checkpoint directory in the official layout, or a training checkpoint
    directory (base model + added weights, see `apply_realcustom_weights`)."""
    if model in (TINY.name, TINY_SD15.name):
        pipeline = build_pipeline(SPECS[model], seed)
        logger.info(
            "using the %s model: random weights from seed %d (no real weights configured)", model, seed
        )
    elif model.endswith("-random") and model.removesuffix("-random") in SPECS:
        pipeline = build_pipeline(SPECS[model.removesuffix("-random")], seed)
    elif Path(model).is_dir() and (trained := trained_weights_base(Path(model))) is not None:
        base = trained["base_model"]
        if Path(base).is_dir():
            pipeline = load_from_directory(base, backbone_only=True)
        else:
            pipeline = load_pipeline(base, seed=trained.get("seed", seed))
        apply_realcustom_weights(pipeline, model)
    elif Path(model).is_dir():
        pipeline = load_from_directory(model)
    else:
        raise ValueError(
            f"unknown model {model!r}: use 'tiny', 'tiny-sd15', 'sdxl-random', 'sd15-random' "
            "or a checkpoint directory"
        )
    # Inference only: frozen parameters keep autograd out of every loop, warm-up and capture
    # (training unfreezes what it trains, realcustom.training.model).
    return pipeline.to(device=device, dtype=dtype).requires_grad_(False)
