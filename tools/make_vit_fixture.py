"""Write tests/fixtures/vit_timm_tiny.safetensors from REAL timm models (run outside the project venv).

The project cannot depend on timm (it imports torchvision), so `realcustom.vit` re-implements the two
ViTs; this script records what timm itself computes, for `tests/test_vit.py` to compare against.
Run it in a throwaway environment:

    python3.11 -m venv /tmp/timmref
    /tmp/timmref/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors
    HF_HUB_OFFLINE=1 /tmp/timmref/bin/python tools/make_vit_fixture.py

Tiny models are built with `timm.create_model` from the real model names, with only depth, width,
heads and image size overridden, so registers, LayerScale, `no_embed_class` and the activation are
timm's own. Their checkpoints are loaded back through timm's pretrained-file path (the official
code's path), which applies `checkpoint_filter_fn`: the open_clip prefix for SigLIP, position
embedding resampling from a 5x5 checkpoint grid to the 4x4 model grid for DINOv2, and Meta's
original DINOv2 layout.

It also records the official per-view preprocessing of `ShallowDeepPatchfySiglipDinoEncoder` for
`tests/test_reference.py`: einops polyphase split and align_corners=True global resize of a 112x112
reference, torchvision ToPILImage, and timm's eval transform with the official "resize-naive" Resize.

Fixture entries (float32 unless said): `input` [2,3,56,56]; `siglip.<key>` an open_clip checkpoint
(with text tower entries that must be ignored); `dino.<key>` a timm DINOv2 checkpoint on a 5x5 grid;
`dino_resampled_pos_embed` [1,16,32] the position embedding timm loaded from it;
`dino_meta.<key>` the entries that differ in Meta's layout of that same checkpoint;
`<model>_out.<block>` timm's `get_intermediate_layers` output of every block for
model in {siglip, dino, dino_meta}; `preprocess.reference` [1,3,112,112] (float16-exact values);
`preprocess.views` [5,3,56,56] uint8, the PIL images of the global view then the four local views;
`preprocess.siglip_global` / `preprocess.dino_global` [1,3,56,56] the transformed global view.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torchvision.transforms import Compose, Resize, ToPILImage

logger = logging.getLogger("make_vit_fixture")

SIGLIP_NAME = "vit_so400m_patch14_siglip_384"
DINO_NAME = "vit_large_patch14_reg4_dinov2.lvd142m"
# Must equal realcustom.vit.SIGLIP_TINY / DINOV2_TINY.
TINY_SHAPE = {"embed_dim": 32, "depth": 4, "num_heads": 2}
IMAGE_SIZE = 56
CHECKPOINT_IMAGE_SIZE = 70  # 5x5 grid, resampled to the 4x4 model grid on load


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Replace timm's init by values that make every parameter matter (LayerScale 1e-5 would not)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.25 * noise)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.ndim >= 2 and name not in ("pos_embed", "cls_token", "reg_token", "attn_pool.latent"):
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(0.5 * noise)


def load_via_timm(name: str, checkpoint: Path) -> torch.nn.Module:
    """Create the tiny model with timm's pretrained-file loading, as the official code does."""
    model = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(checkpoint)},
        num_classes=0,
        img_size=IMAGE_SIZE,
        **TINY_SHAPE,
    )
    return model.eval()


def all_block_outputs(model: torch.nn.Module, pixels: torch.Tensor, label: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outputs = model.get_intermediate_layers(pixels, n=set(range(len(model.blocks))))
    return {f"{label}_out.{index}": output.contiguous() for index, output in enumerate(outputs)}


def meta_layout(timm_entries: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The entries of Meta's DINOv2 layout that differ from timm's, for the same network."""
    class_position = 0.5 * torch.randn(1, TINY_SHAPE["embed_dim"], generator=generator)
    return {
        "cls_token": timm_entries["cls_token"] - class_position,
        "pos_embed": torch.cat([class_position[:, None], timm_entries["pos_embed"]], dim=1),
        "register_tokens": timm_entries["reg_token"],
        "mask_token": torch.zeros(1, TINY_SHAPE["embed_dim"]),
    }


def official_view_transform(name: str) -> Compose:
    """timm's eval transform with its first Resize replaced by Resize((V, V)), as the official code."""
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=IMAGE_SIZE, **TINY_SHAPE)
    data_config = timm.data.resolve_model_data_config(model)
    data_config["input_size"] = (3, IMAGE_SIZE, IMAGE_SIZE)
    default = timm.data.create_transform(**data_config, is_training=False)
    first = default.transforms[0]
    assert isinstance(first, Resize), default
    return Compose(
        [Resize((IMAGE_SIZE, IMAGE_SIZE), interpolation=first.interpolation), *default.transforms[1:]]
    )


def official_preprocessing(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The views the official encoder builds from a 2V x 2V reference, as PIL images and tensors."""
    reference = torch.rand(1, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE, generator=generator).half().float()
    local = rearrange(reference, "b c (h hp) (w wp) -> (b hp wp) c h w", hp=2, wp=2)
    global_view = F.interpolate(reference, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=True)
    images = [ToPILImage()(view) for view in torch.cat([global_view, local])]
    views = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])
    return {
        "preprocess.reference": reference.half(),
        "preprocess.views": views,
        "preprocess.siglip_global": official_view_transform(SIGLIP_NAME)(images[0])[None],
        "preprocess.dino_global": official_view_transform(DINO_NAME)(images[0])[None],
    }


def build_fixture(workdir: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(20241126)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    fixture = {"input": pixels}

    # SigLIP, stored as open_clip stores it: the timm trunk under visual.trunk. next to the text tower.
    siglip = timm.create_model(
        SIGLIP_NAME, pretrained=False, num_classes=0, img_size=IMAGE_SIZE, **TINY_SHAPE
    )
    randomize(siglip, generator)
    open_clip_entries = {f"visual.trunk.{key}": value for key, value in siglip.state_dict().items()}
    open_clip_entries["text.positional_embedding"] = torch.randn(4, 8, generator=generator)
    open_clip_entries["logit_scale"] = torch.ones(1)
    siglip_file = workdir / "open_clip_pytorch_model.bin"
    torch.save(open_clip_entries, siglip_file)
    fixture |= {f"siglip.{key}": value for key, value in open_clip_entries.items()}
    fixture |= all_block_outputs(load_via_timm(SIGLIP_NAME, siglip_file), pixels, "siglip")

    # DINOv2 trained on a larger grid than the model's, as the 518-pixel checkpoint used at 384.
    dino = timm.create_model(
        DINO_NAME, pretrained=False, num_classes=0, img_size=CHECKPOINT_IMAGE_SIZE, **TINY_SHAPE
    )
    randomize(dino, generator)
    dino_entries = dino.state_dict()
    dino_file = workdir / "pytorch_model.bin"
    torch.save(dino_entries, dino_file)
    fixture |= {f"dino.{key}": value for key, value in dino_entries.items()}
    dino_loaded = load_via_timm(DINO_NAME, dino_file)
    fixture["dino_resampled_pos_embed"] = dino_loaded.pos_embed
    fixture |= all_block_outputs(dino_loaded, pixels, "dino")

    # The same network in Meta's original layout, converted by timm's _convert_dinov2.
    meta_entries = meta_layout(dino_entries, generator)
    meta_checkpoint = {
        key: value
        for key, value in dino_entries.items()
        if key not in ("cls_token", "reg_token", "pos_embed")
    } | meta_entries
    meta_file = workdir / "dinov2_meta.pth"
    torch.save(meta_checkpoint, meta_file)
    fixture |= {f"dino_meta.{key}": value for key, value in meta_entries.items()}
    fixture |= all_block_outputs(load_via_timm(DINO_NAME, meta_file), pixels, "dino_meta")
    fixture = {key: value.detach().float().clone() for key, value in fixture.items()}
    return fixture | official_preprocessing(generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/vit_timm_tiny.safetensors"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as workdir:
        fixture = build_fixture(Path(workdir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "timm": timm.__version__,
        "torch": torch.__version__,
        "generator": "tools/make_vit_fixture.py",
    }
    save_file(fixture, str(args.out), metadata=metadata)
    logger.info("Wrote %d tensors to %s (%d bytes)", len(fixture), args.out, args.out.stat().st_size)


if __name__ == "__main__":
    main()
