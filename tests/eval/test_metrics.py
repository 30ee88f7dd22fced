"""The metric functions on known cases, the preprocessing, the region crop and model loading."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realcustom.eval.metrics import NEUTRAL_GREY, cosine, image_image_score, region_image, text_image_score
from realcustom.eval.preprocess import CLIP_TRANSFORM, DINO_TRANSFORM
from realcustom.eval.scorers import load_scorers


def test_scores_match_a_hand_computed_cosine() -> None:
    text = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    images = torch.tensor([[4.0, 3.0, 0.0], [0.0, 0.0, 2.0], [6.0, 8.0, 0.0]])
    # cos = (3*4 + 4*3) / (5*5) = 0.96; orthogonal = 0; same direction, other norm = 1.
    assert text_image_score(text, images) == pytest.approx([96.0, 0.0, 100.0], abs=1e-4)

    references = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    generated = torch.tensor([[1.0, 1.0, 0.0], [3.0, 4.0, 0.0]])
    # Mean over the references: (1/√2 + 1/√2) / 2 and (3/5 + 4/5) / 2.
    expected = [100 / math.sqrt(2), 70.0]
    assert image_image_score(generated, references) == pytest.approx(expected, abs=1e-4)
    assert cosine(generated, references).shape == (2, 2)


def test_identical_images_score_one(tiny_metric_models, dreambench_dir: Path) -> None:
    photo = Image.open(dreambench_dir / "cat.jpg").convert("RGB")
    other = Image.open(dreambench_dir / "can.jpg").convert("RGB")
    for scorer in (tiny_metric_models.clip_b, tiny_metric_models.clip_l, tiny_metric_models.dino):
        same, different = image_image_score(scorer.embed_images([photo, other]), scorer.embed_images([photo]))
        assert same == pytest.approx(100.0, abs=1e-3)
        assert different < 100.0 - 1e-3


def test_clip_t_is_the_cosine_of_the_models_own_features(tiny_metric_models, dreambench_dir: Path) -> None:
    scorer = tiny_metric_models.clip_b
    photo = Image.open(dreambench_dir / "backpack.jpg")
    prompt = "a backpack in the jungle"
    ids = scorer.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = scorer.model.get_text_features(input_ids=ids).pooler_output[0].numpy()
        image = scorer.model.get_image_features(pixel_values=CLIP_TRANSFORM([photo])).pooler_output[0].numpy()
    by_hand = 100 * float(text @ image) / (np.linalg.norm(text) * np.linalg.norm(image))
    score = text_image_score(scorer.embed_texts([prompt]), scorer.embed_images([photo]))[0]
    assert score == pytest.approx(by_hand, abs=1e-3)


def test_preprocessing_resizes_crops_and_normalises() -> None:
    # 300x200 image: left third red, rest blue; the centre crop of the short-side resize is mixed.
    pixels = np.zeros((200, 300, 3), dtype=np.uint8)
    pixels[:, :100] = (255, 0, 0)
    pixels[:, 100:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    clip = CLIP_TRANSFORM([image])
    dino = DINO_TRANSFORM([image, image])
    assert clip.shape == (1, 3, 224, 224) and dino.shape == (2, 3, 224, 224)
    # Short side 224 -> 336x224; crop starts at x=56, inside the red third (which ends at x=112).
    red = (1.0 - CLIP_TRANSFORM.mean[0]) / CLIP_TRANSFORM.std[0]
    assert clip[0, 0, 112, 10].item() == pytest.approx(red, abs=1e-3)
    blue_column = clip[0, 2, 112, 200].item()
    assert blue_column == pytest.approx((1.0 - CLIP_TRANSFORM.mean[2]) / CLIP_TRANSFORM.std[2], abs=1e-3)
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    expected = [(128 / 255 - m) / s for m, s in zip(DINO_TRANSFORM.mean, DINO_TRANSFORM.std, strict=True)]
    assert DINO_TRANSFORM([grey])[0, :, 100, 100].tolist() == pytest.approx(expected, abs=1e-3)


def test_region_image_keeps_only_the_masked_cells() -> None:
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = 255  # two cells on the diagonal -> bounding box 32x32
    region = region_image(image, Image.fromarray(mask))
    assert region.size == (32, 32)
    assert region.getpixel((5, 5)) == (255, 0, 0)
    assert region.getpixel((20, 5)) == NEUTRAL_GREY  # inside the box, outside the mask
    assert region_image(image, Image.new("L", (4, 4), 0)).size == (64, 64)


def test_metric_models_load_from_local_directories(
    tiny_metric_models, tmp_path: Path, dreambench_dir
) -> None:
    tiny_metric_models.clip_b.model.save_pretrained(tmp_path / "clip-b")
    tiny_metric_models.clip_l.model.save_pretrained(tmp_path / "clip-l")
    tiny_metric_models.dino.model.save_pretrained(tmp_path / "dino")
    loaded = load_scorers(str(tmp_path / "clip-b"), str(tmp_path / "clip-l"), str(tmp_path / "dino"))
    photo = Image.open(dreambench_dir / "can.jpg")
    for original, copy in (
        (tiny_metric_models.clip_l, loaded.clip_l),
        (tiny_metric_models.dino, loaded.dino),
    ):
        torch.testing.assert_close(copy.embed_images([photo]), original.embed_images([photo]))
    torch.testing.assert_close(
        loaded.clip_b.embed_texts(["a can on the beach"]),
        tiny_metric_models.clip_b.embed_texts(["a can on the beach"]),
    )


def test_hub_models_fail_clearly_when_offline(dreambench_layout: Path, tmp_path: Path) -> None:
    empty_cache = tmp_path / "hf-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(empty_cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "realcustom.eval", "--dreambench", str(dreambench_layout)]
    command += ["--out", str(tmp_path / "out"), "--subjects", "1", "--prompts", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "could not load the DINO metric model 'facebook/dino-vits16'" in result.stderr
    assert "pass DIR with --dino" in result.stderr
