"""Reference construction: output size, where the crop lands, flips, and the image-dropout rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from realcustom.training.config import ReferenceSource, StageConfig
from realcustom.training.data import Record, StageDataset
from realcustom.training.references import ReferenceAugmentation, build_reference, random_crop_box

RED, WHITE = (255, 0, 0), (255, 255, 255)


def solid(size: tuple[int, int], colour=RED) -> Image.Image:
    return Image.new("RGB", size, colour)


def half_and_half(size: tuple[int, int]) -> Image.Image:
    """Left half red, right half blue: shows whether a reference was mirrored."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    return image


@pytest.mark.parametrize("source_size", [(300, 200), (64, 512), (1000, 1000)])
@pytest.mark.parametrize("fit", ["squash", "place"])
def test_reference_is_always_square_rgb_of_the_requested_size(source_size, fit):
    augmentation = ReferenceAugmentation(fit=fit, crop_area=(0.3, 1.0), subject_scale=(0.2, 1.0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        reference = build_reference(solid(source_size), 112, augmentation, rng)
        assert reference.image.size == (112, 112)
        assert reference.image.mode == "RGB"


def test_crop_box_area_and_bounds_follow_the_configured_range():
    rng = np.random.default_rng(1)
    for _ in range(500):
        left, top, right, bottom = random_crop_box(400, 300, (0.25, 0.5), (1.0, 1.0), rng)
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        share = (right - left) * (bottom - top) / (400 * 300)
        assert 0.24 <= share <= 0.51


def test_no_augmentation_squash_is_the_plain_official_resize():
    source = half_and_half((200, 100))
    reference = build_reference(source, 112, ReferenceAugmentation(), np.random.default_rng(0))
    assert reference.crop_box == (0, 0, 200, 100)
    assert not reference.flipped
    expected = source.resize((112, 112), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(reference.image), np.asarray(expected))


def test_place_puts_the_subject_where_it_says_and_fills_the_rest_with_the_background():
    augmentation = ReferenceAugmentation(fit="place", subject_scale=(0.3, 0.7))
    rng = np.random.default_rng(2)
    positions, sizes = set(), set()
    for _ in range(40):
        reference = build_reference(solid((120, 80)), 112, augmentation, rng)
        pixels = np.asarray(reference.image)
        red = np.all(pixels == RED, axis=-1)
        rows, cols = np.nonzero(red)
        left, top, right, bottom = reference.paste_box
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (left, top, right, bottom)
        assert np.all(pixels[~red] == WHITE)
        longer = max(right - left, bottom - top)
        assert round(0.3 * 112) <= longer <= round(0.7 * 112)
        # Aspect kept: 120 x 80 stays 3:2 up to rounding.
        assert abs((right - left) / (bottom - top) - 1.5) < 0.1
        positions.add((left, top))
        sizes.add(longer)
    assert len(positions) > 30 and len(sizes) > 10  # position and scale really vary


def test_flip_probability_and_mirroring():
    source = half_and_half((100, 100))
    augmentation = ReferenceAugmentation(flip_probability=0.5)
    rng = np.random.default_rng(3)
    flips = 0
    for _ in range(400):
        reference = build_reference(source, 112, augmentation, rng)
        left_pixel = reference.image.getpixel((5, 50))
        assert left_pixel == ((0, 0, 255) if reference.flipped else RED)
        flips += reference.flipped
    assert 160 < flips < 240


@pytest.mark.parametrize(
    "bad",
    [
        {"fit": "stretch"},
        {"crop_area": (0.0, 1.0)},
        {"crop_area": (0.8, 0.5)},
        {"subject_scale": (0.5, 1.5)},
        {"flip_probability": 1.5},
        {"background": (0, 0, 300)},
    ],
)
def test_invalid_augmentations_are_refused(bad):
    with pytest.raises(ValueError):
        ReferenceAugmentation(**bad)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[Record]:
    folder = tmp_path_factory.mktemp("records")
    target, view = folder / "target.png", folder / "view.png"
    solid((96, 64), RED).save(target)
    solid((64, 96), (0, 255, 0)).save(view)
    return [Record(target, "a photo of a red box", (view,)), Record(target, "a red box alone")]


def stage(*sources: ReferenceSource, resolution: int = 64) -> StageConfig:
    return StageConfig(name="s", steps=1, resolution=resolution, sources=sources)


def test_dropout_rate_is_the_configured_one_and_dropped_references_are_black(records):
    dataset = StageDataset(records, stage(ReferenceSource("self")), 112, 0.1, seed=0)
    samples = [dataset[i] for i in range(1000)]
    dropped = [s for s in samples if s["dropped"]]
    # Binomial(1000, 0.1): sd ~ 9.5; +-4 sd.
    assert 62 <= len(dropped) <= 138
    assert all(torch.equal(s["reference"], torch.zeros(3, 112, 112)) for s in dropped)
    assert all(s["reference"].max() > 0 for s in samples if not s["dropped"])


def test_sample_shapes_ranges_and_determinism(records):
    dataset = StageDataset(records, stage(ReferenceSource("self"), resolution=96), 112, 0.0, seed=5)
    sample = dataset[7]
    assert sample["pixels"].shape == (3, 96, 96) and sample["reference"].shape == (3, 112, 112)
    assert sample["pixels"].min() >= -1 and sample["pixels"].max() <= 1
    assert sample["reference"].min() >= 0 and sample["reference"].max() <= 1
    again = StageDataset(records, stage(ReferenceSource("self"), resolution=96), 112, 0.0, seed=5)[7]
    assert torch.equal(sample["reference"], again["reference"]) and torch.equal(
        sample["pixels"], again["pixels"]
    )


def test_sources_follow_the_mix_and_multiview_uses_other_views(records):
    mix = stage(ReferenceSource("self", weight=1.0), ReferenceSource("multiview", weight=3.0))
    dataset = StageDataset(records, mix, 112, 0.0, seed=0)
    samples = [dataset[i] for i in range(800)]
    multiview = [s for s in samples if s["source"] == "multiview"]
    assert 540 < len(multiview) < 660  # 75 % of 800
    # Only the first record has another view (green); the target is red.
    assert all(s["caption"] == "a photo of a red box" for s in multiview)
    assert all(s["reference"][1].mean() > 0.99 and s["reference"][0].mean() < 0.01 for s in multiview)
    own = [s for s in samples if s["source"] == "self"]
    assert all(s["reference"][0].mean() > 0.99 for s in own)


def test_a_multiview_only_stage_needs_records_with_references(records):
    with pytest.raises(ValueError, match="no record can serve"):
        StageDataset(records[1:], stage(ReferenceSource("multiview")), 112, 0.0, seed=0)
