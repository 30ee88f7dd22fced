"""Loading a checkpoint directory in the official release layout, written here from the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from realcustom.loading import PROJECTOR_PREFIX, download_official_checkpoints, load_pipeline
from realcustom.pipeline import RealCustomPipeline


def save_official_layout(pipeline: RealCustomPipeline, root: Path, realcustom_format: str = "pth") -> None:
    """Write every component under the file names the official scripts read."""
    for index, (tokenizer, encoder) in enumerate(
        zip(pipeline.text_encoder.tokenizers, pipeline.text_encoder.encoders, strict=True), start=1
    ):
        directory = root / "sdxl" / f"clip-sdxl-{index}"
        encoder.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    (root / "sdxl" / "vae").mkdir(parents=True)
    (root / "sdxl" / "vae" / "sdxl.json").write_text(json.dumps(dict(pipeline.vae.config)))
    torch.save(pipeline.vae.state_dict(), root / "sdxl" / "vae" / "sdxl-vae.pth")

    unet_state = pipeline.unet.unet.state_dict()
    vision = pipeline.unet.vision_state_dict()
    (root / "sdxl" / "unet").mkdir(parents=True)
    torch.save(
        {k: v for k, v in unet_state.items() if k not in vision}, root / "sdxl" / "unet" / "sdxl-unet.bin"
    )
    added = {**vision, **{PROJECTOR_PREFIX + k: v for k, v in pipeline.projector.state_dict().items()}}
    (root / "realcustom").mkdir()
    if realcustom_format == "safetensors":
        save_file(
            {k: v.contiguous() for k, v in added.items()},
            root / "realcustom" / "RealCustom_highres.safetensors",
        )
    else:
        torch.save(added, root / "realcustom" / "RealCustom_highres.pth")

    # SigLIP as open_clip ships it (visual.trunk. prefix), DINOv2 as timm ships it.
    siglip_dir = root / "vit_so400m_patch14_siglip_384"
    siglip_dir.mkdir()
    siglip = {f"visual.trunk.{k}": v for k, v in pipeline.reference_encoder.siglip.state_dict().items()}
    torch.save(siglip, siglip_dir / "open_clip_pytorch_model.bin")
    dino_dir = root / "vit_large_patch14_reg4_dinov2.lvd142m"
    dino_dir.mkdir()
    torch.save(pipeline.reference_encoder.dino.state_dict(), dino_dir / "pytorch_model.bin")
    (root / "realcustom.json").write_text(json.dumps({"spec": "tiny"}))


def generate(pipeline: RealCustomPipeline, image: Image.Image) -> torch.Tensor:
    return pipeline(
        "a cat in the snow",
        [(image, "cat")],
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="latent",
    ).images


@pytest.mark.parametrize("realcustom_format", ["pth", "safetensors"])
def test_official_layout_round_trip(tmp_path: Path, dreambench_dir: Path, realcustom_format: str) -> None:
    original = load_pipeline("tiny", seed=0)
    save_official_layout(original, tmp_path / "ckpts", realcustom_format)
    # The hub snapshot lands the folder as ckpts/: the loader accepts its parent too.
    loaded = load_pipeline(str(tmp_path))
    image = Image.open(dreambench_dir / "cat.jpg")
    assert torch.equal(generate(loaded, image), generate(original, image))
    different = load_pipeline("tiny", seed=1)
    assert not torch.equal(generate(different, image), generate(original, image))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    save_official_layout(load_pipeline("tiny"), tmp_path)
    (tmp_path / "sdxl" / "unet" / "sdxl-unet.bin").unlink()
    with pytest.raises(FileNotFoundError, match="sdxl-unet"):
        load_pipeline(str(tmp_path))


def test_not_a_checkpoint_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a RealCustom checkpoint directory"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model"):
        load_pipeline("no-such-model")


def test_download_fails_clearly_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not download bytedance-research/RealCustom"):
        download_official_checkpoints(tmp_path)
