"""The on-disk training format and the loader that turns records into training samples.

Format: a JSONL manifest, one record per line:

    {"image": "images/cat_0.jpg", "caption": "a photo of a cat on a sofa",
     "references": ["images/cat_1.jpg", "images/cat_2.jpg"], "subject": "cat"}

* `image` (required): the target photo; `caption` (required): its plain text, all real words, no
  placeholder token (the model learns to align the reference with the caption's words).
* `references` (optional): other photos of the same subject(s) — other views, poses, backgrounds.
  Records without them serve only the `self` (reconstruction-like) source.
* `subject` (optional): a label, used only in logs and data statistics.

Paths are relative to the manifest's folder (absolute paths are kept).

Sampling is stateless: sample `index` of a stage is a pure function of (run seed, stage, index),
drawn with replacement from the stage's data mix. The trainer numbers samples by global step, so a
resumed run sees exactly the samples the uninterrupted run would have seen, and how a step's
samples are split over devices and micro-batches does not change which samples they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from realcustom.reference import image_to_tensor
from realcustom.training.config import StageConfig
from realcustom.training.references import build_reference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One manifest line with absolute paths."""

    image: Path
    caption: str
    references: tuple[Path, ...] = ()
    subject: str | None = None


def read_manifest(path: str | Path) -> list[Record]:
    """Parse and check a JSONL manifest; every referenced file must exist."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            record = Record(
                image=path.parent / raw["image"],
                caption=str(raw["caption"]),
                references=tuple(path.parent / item for item in raw.get("references", [])),
                subject=raw.get("subject"),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: bad record ({error}); format: training/data.py") from error
        missing = [p for p in (record.image, *record.references) if not p.is_file()]
        if missing:
            raise ValueError(f"{path}:{number}: missing file(s) {[str(p) for p in missing]}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def write_manifest(path: Path, records: list[Record]) -> None:
    """Write records as JSONL with paths relative to the manifest's folder."""
    lines = []
    for record in records:
        raw: dict = {"image": str(record.image.relative_to(path.parent)), "caption": record.caption}
        if record.references:
            raw["references"] = [str(p.relative_to(path.parent)) for p in record.references]
        if record.subject is not None:
            raw["subject"] = record.subject
        lines.append(json.dumps(raw))
    path.write_text("\n".join(lines) + "\n")


def sample_rng(seed: int, *index: int) -> np.random.Generator:
    """The generator of one sample (or one step): independent streams per index tuple."""
    return np.random.default_rng([seed, *index])


def torch_seed(seed: int, *index: int) -> int:
    """A torch seed derived like `sample_rng`, for noise and timesteps."""
    return int(np.random.SeedSequence([seed, *index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def random_square_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Resize the shorter side to `size`, then a random square crop of `size` x `size`."""
    scale = size / min(image.size)
    resized = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = int(rng.integers(0, resized.width - size + 1))
    top = int(rng.integers(0, resized.height - size + 1))
    return resized.crop((left, top, left + size, top + size))


class StageDataset(Dataset):
    """Samples of one stage: target pixels, caption, reference pixels (or the black image).

    Item `index` -> dict with `pixels` [3, res, res] in [-1, 1], `reference` [3, R, R] in [0, 1]
    (all zeros when dropped), `caption`, `dropped` (bool), `source` (kind of reference), `index`.
    """

    def __init__(
        self,
        records: list[Record],
        stage: StageConfig,
        reference_size: int,
        image_dropout: float,
        seed: int,
        stage_index: int = 0,
    ):
        self.records = records
        self.stage = stage
        self.reference_size = reference_size
        self.image_dropout = image_dropout
        self.seed = seed
        self.stage_index = stage_index
        # Per source: the records it can draw from (multiview needs other views).
        self.eligible = [
            [i for i, record in enumerate(records) if source.kind == "self" or record.references]
            for source in stage.sources
        ]
        empty = [source.kind for source, ids in zip(stage.sources, self.eligible, strict=True) if not ids]
        if empty:
            raise ValueError(f"stage {stage.name!r}: no record can serve source(s) {empty} (no references)")
        weights = np.array([source.weight for source in stage.sources], dtype=np.float64)
        self.source_probabilities = weights / weights.sum()

    def __getitem__(self, index: int) -> dict:
        rng = sample_rng(self.seed, self.stage_index, index)
        source_id = int(rng.choice(len(self.stage.sources), p=self.source_probabilities))
        source = self.stage.sources[source_id]
        record = self.records[int(rng.choice(self.eligible[source_id]))]
        target = load_rgb(record.image)
        pixels = image_to_tensor(random_square_crop(target, self.stage.resolution, rng)) * 2 - 1
        dropped = bool(rng.random() < self.image_dropout)
        if dropped:
            # The black image: exactly the negative reference used for CFG at inference.
            reference = torch.zeros(3, self.reference_size, self.reference_size)
        else:
            if source.kind == "self":
                view = target
            else:
                view = load_rgb(record.references[rng.integers(len(record.references))])
            built = build_reference(view, self.reference_size, source.reference, rng)
            reference = image_to_tensor(built.image)
        return {
            "pixels": pixels,
            "reference": reference,
            "caption": record.caption,
            "dropped": dropped,
            "source": source.kind,
            "index": index,
        }


def collate(samples: list[dict]) -> dict:
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "reference": torch.stack([s["reference"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "dropped": torch.tensor([s["dropped"] for s in samples]),
        "sources": [s["source"] for s in samples],
        "indices": [s["index"] for s in samples],
    }


@dataclass(frozen=True)
class SampleNumbering:
    """Global sample indices: every (step, micro-step, process, slot) gets its own index."""

    batch_size: int
    accumulation: int
    num_processes: int
    process_index: int

    def indices(self, step: int, micro: int) -> list[int]:
        micro_batch = step * self.accumulation + micro
        first = (micro_batch * self.num_processes + self.process_index) * self.batch_size
        return list(range(first, first + self.batch_size))

    def batches(self, first_step: int, end_step: int) -> Iterator[list[int]]:
        """Batch indices for steps [first_step, end_step), micro-steps in order: a batch_sampler."""
        for step in range(first_step, end_step):
            for micro in range(self.accumulation):
                yield self.indices(step, micro)
