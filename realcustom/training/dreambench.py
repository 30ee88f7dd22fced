"""A tiny training manifest from DreamBench photos, with *synthesised* views.

The hard curriculum stage needs other views of each subject. The DreamBench fixture has one photo
per subject, so each photo is turned into several "views" by zooming, mirroring and rotating it.
These share background and lighting with the original, so they exercise the data path and the
stage mechanics but cannot teach real re-contextualisation: real training needs genuine
multi-view data (several photos of one subject in different scenes), as docs/TRAINING.md says.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from realcustom.training.config import DreamBenchViews
from realcustom.training.data import Record, load_rgb, write_manifest
from realcustom.training.references import random_crop_box

logger = logging.getLogger(__name__)

MANIFEST_NAME = "train.jsonl"
MAX_ROTATION_DEGREES = 15.0
VIEW_AREA = (0.45, 0.85)


def class_words(source: Path) -> dict[str, str]:
    """subject name -> class word, from the `subject_name,class` table of prompts_and_classes.txt."""
    lines = (source / "prompts_and_classes.txt").read_text().splitlines()
    start = lines.index("subject_name,class")
    table = []
    for line in lines[start:]:
        if not line.strip():
            break
        table.append(line)
    return {row["subject_name"]: row["class"] for row in csv.DictReader(table)}


def synthesise_view(photo: Image.Image, rng: np.random.Generator, max_size: int) -> Image.Image:
    """A zoomed, possibly mirrored, slightly rotated version of `photo` (a stand-in for a new view)."""
    box = random_crop_box(*photo.size, VIEW_AREA, (1.0, 1.0), rng)
    view = photo.crop(box)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
    view = view.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    return fit_within(view, max_size)


def fit_within(image: Image.Image, max_size: int) -> Image.Image:
    scale = max_size / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def build_dreambench_manifest(settings: DreamBenchViews, out_dir: Path, seed: int = 0) -> Path:
    """Write views and a manifest under `out_dir`; every view is a target, the others its references."""
    source = Path(settings.source)
    classes = class_words(source)
    photos = sorted(p for p in source.glob("*.jpg") if p.stem in classes)
    if not photos:
        raise ValueError(f"no DreamBench photos with a known class word in {source}")
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for subject_id, photo_path in enumerate(photos):
        photo = load_rgb(photo_path)
        rng = np.random.default_rng([seed, subject_id])
        views = [fit_within(photo, settings.max_size)]
        for _ in range(settings.views_per_subject - 1):
            views.append(synthesise_view(photo, rng, settings.max_size))
        paths = []
        for view_id, view in enumerate(views):
            path = image_dir / f"{photo_path.stem}_{view_id}.png"
            view.save(path)
            paths.append(path)
        word = classes[photo_path.stem]
        for view_id, path in enumerate(paths):
            others = tuple(p for i, p in enumerate(paths) if i != view_id)
            records.append(Record(path, f"a photo of a {word}", others, photo_path.stem))
    manifest = out_dir / MANIFEST_NAME
    write_manifest(manifest, records)
    logger.info("wrote %d records (%d subjects, synthesised views): %s", len(records), len(photos), manifest)
    return manifest
