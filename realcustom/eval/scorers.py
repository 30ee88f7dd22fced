"""The metric models: CLIP ViT-B/32 and ViT-L/14 (text and image embeddings), DINO ViT-S/16.

Loaded through `transformers` (`CLIPModel`, `ViTModel`) from a local directory or the hub, because
open-clip and timm import torchvision, which this project does not depend on. `tiny_scorers`
builds random-weight stand-ins of the same classes for tests and CPU smoke runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase, ViTConfig, ViTModel

from realcustom.eval.preprocess import CLIP_TRANSFORM, DINO_TRANSFORM, ImageTransform
from realcustom.tokenizer import CLIP_CONTEXT_LENGTH, load_clip_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_CLIP_B = "openai/clip-vit-base-patch32"
DEFAULT_CLIP_L = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"


class ClipScorer:
    """Unit-norm CLIP embeddings of prompts and images."""

    def __init__(
        self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, transform: ImageTransform = CLIP_TRANSFORM
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.transform = transform

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=CLIP_CONTEXT_LENGTH, return_tensors="pt"
        )
        output = self.model.get_text_features(input_ids=tokens.input_ids.to(self.model.device))
        return F.normalize(output.pooler_output.float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.transform(images).to(self.model.device, self.model.dtype)
        output = self.model.get_image_features(pixel_values=pixels)
        return F.normalize(output.pooler_output.float(), dim=-1)


class DinoScorer:
    """Unit-norm DINO embeddings: the CLS token of the last layer (the DreamBooth DINO metric)."""

    def __init__(self, model: ViTModel, transform: ImageTransform = DINO_TRANSFORM) -> None:
        self.model = model.eval()
        self.transform = transform

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.transform(images).to(self.model.device, self.model.dtype)
        cls = self.model(pixel_values=pixels).last_hidden_state[:, 0]
        return F.normalize(cls.float(), dim=-1)


@dataclass
class Scorers:
    clip_b: ClipScorer
    clip_l: ClipScorer
    dino: DinoScorer
    description: dict[str, str]


def _from_pretrained(kind: str, loader, name: str, option: str):
    try:
        return loader(name)
    except Exception as error:  # missing files, offline hub and bad repos all end in the same advice
        raise RuntimeError(
            f"could not load the {kind} metric model {name!r} from a local directory or the hub "
            f"({type(error).__name__}: {error}). Without network access, download it elsewhere "
            f"(`hf download {name} --local-dir DIR`) and pass DIR with {option}."
        ) from error


def load_clip(name: str, option: str, device: str) -> ClipScorer:
    model = _from_pretrained("CLIP", CLIPModel.from_pretrained, name, option)
    # A directory's own tokenizer files win; otherwise the offline-built tokenizer, whose ids are
    # those of openai's CLIP tokenizer (from_pretrained on a directory without them would not fail,
    # it would build an empty vocabulary).
    directory = Path(name)
    has_tokenizer = any((directory / file).is_file() for file in ("vocab.json", "tokenizer.json"))
    tokenizer = load_clip_tokenizer(directory if has_tokenizer else None)
    return ClipScorer(model.to(device), tokenizer)


def load_scorers(
    clip_b: str = DEFAULT_CLIP_B, clip_l: str = DEFAULT_CLIP_L, dino: str = DEFAULT_DINO, device: str = "cpu"
) -> Scorers:
    """The real metric models, each from a local directory or a hub id."""
    dino_model = _from_pretrained(
        "DINO", lambda name: ViTModel.from_pretrained(name, add_pooling_layer=False), dino, "--dino"
    )
    scorers = Scorers(
        load_clip(clip_b, "--clip-b", device),
        load_clip(clip_l, "--clip-l", device),
        DinoScorer(dino_model.to(device)),
        {"clip_b": clip_b, "clip_l": clip_l, "dino": dino},
    )
    logger.info("metric models: %s", scorers.description)
    return scorers


def tiny_clip_config(patch_size: int) -> CLIPConfig:
    """A 2-layer CLIP with the real vocabulary and context length, so real tokenised prompts fit."""
    tokenizer = load_clip_tokenizer()
    return CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": CLIP_CONTEXT_LENGTH,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": patch_size,
        },
        projection_dim=16,
    )


def tiny_dino_config() -> ViTConfig:
    return ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=16,
    )


def tiny_scorers(seed: int = 0) -> Scorers:
    """Random-weight stand-ins (fixed seed) with the real architectures' classes and preprocessing.
    Their scores only check the plumbing; they say nothing about image quality."""
    torch.manual_seed(seed)
    clip_b = CLIPModel(tiny_clip_config(patch_size=32))
    clip_l = CLIPModel(tiny_clip_config(patch_size=14))
    dino = ViTModel(tiny_dino_config(), add_pooling_layer=False)
    tokenizer = load_clip_tokenizer()
    logger.warning("metric models: TINY random-weight stand-ins (scores are meaningless)")
    return Scorers(
        ClipScorer(clip_b, tokenizer),
        ClipScorer(clip_l, tokenizer),
        DinoScorer(dino),
        {"clip_b": "tiny (random)", "clip_l": "tiny (random)", "dino": "tiny (random)"},
    )
