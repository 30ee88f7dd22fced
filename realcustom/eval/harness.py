"""The evaluation loop: generate every case, score it, store it; resumable case by case.

Each case (one subject or pair, one prompt) lands in `OUT/samples/<protocol>/<subjects>/pNN/`:
its images, final masks, mask-evolution strips and `record.json` (written last, atomically). A
rerun with the same settings skips every case that has its `record.json`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from realcustom.eval.dreambench import Case, Subject
from realcustom.eval.generators import Generated, Sampling
from realcustom.eval.metrics import image_image_score, region_image, text_image_score
from realcustom.eval.scorers import Scorers

logger = logging.getLogger(__name__)

METRICS = ("CLIP-B-T", "CLIP-L-T", "CLIP-B-I", "CLIP-L-I", "DINO-I")
RUN_FILE = "run.json"
RECORD_FILE = "record.json"


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides the numbers; a resumed run must match the stored one."""

    dreambench: str
    model: str
    protocols: tuple[str, ...]
    num_subjects: int | None
    num_prompts: int | None
    images_per_prompt: int
    base_seed: int
    sampling: Sampling
    metric_models: dict[str, str]

    def to_json(self) -> dict:
        data = asdict(self)
        data["protocols"] = list(self.protocols)
        return data


def check_or_store_config(out: Path, config: RunConfig) -> None:
    path = out / RUN_FILE
    current = config.to_json()
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != current:
            changed = sorted(key for key in current if stored.get(key) != current[key])
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(changed)} differ); "
                "resume with the same options or choose another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, current)


def _write_json(path: Path, data: object) -> None:
    """Write then rename, so an interrupted run never leaves a half-written marker."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def case_dir(out: Path, case: Case) -> Path:
    return out / "samples" / case.id


def load_photo(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


class ReferenceEmbeddings:
    """Embeddings of each subject's real photos, computed once per subject."""

    def __init__(self, scorers: Scorers) -> None:
        self.scorers = scorers
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, subject: Subject) -> dict[str, torch.Tensor]:
        if subject.name not in self._cache:
            photos = [load_photo(path) for path in subject.photos]
            self._cache[subject.name] = {
                "CLIP-B-I": self.scorers.clip_b.embed_images(photos),
                "CLIP-L-I": self.scorers.clip_l.embed_images(photos),
                "DINO-I": self.scorers.dino.embed_images(photos),
            }
        return self._cache[subject.name]


def similarity_scores(
    scorers: Scorers, images: list[Image.Image], references: dict
) -> dict[str, list[float]]:
    return {
        "CLIP-B-I": image_image_score(scorers.clip_b.embed_images(images), references["CLIP-B-I"]),
        "CLIP-L-I": image_image_score(scorers.clip_l.embed_images(images), references["CLIP-L-I"]),
        "DINO-I": image_image_score(scorers.dino.embed_images(images), references["DINO-I"]),
    }


def score_case(
    case: Case, generated: Generated, scorers: Scorers, references: ReferenceEmbeddings
) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """-> (per-image scores of the case, per-subject per-image similarities).

    Single subject: similarity of the whole image. Several subjects: similarity of each subject's
    region (its mask) with that subject's photos; the case's score is the mean over subjects.
    """
    scores = {
        "CLIP-B-T": text_image_score(
            scorers.clip_b.embed_texts([case.prompt]), scorers.clip_b.embed_images(generated.images)
        ),
        "CLIP-L-T": text_image_score(
            scorers.clip_l.embed_texts([case.prompt]), scorers.clip_l.embed_images(generated.images)
        ),
    }
    per_subject = {}
    for s, subject in enumerate(case.subjects):
        if len(case.subjects) == 1:
            views = generated.images
        else:
            views = [
                region_image(image, masks[s])
                for image, masks in zip(generated.images, generated.masks, strict=True)
            ]
        per_subject[subject.name] = similarity_scores(scorers, views, references(subject))
    for metric in ("CLIP-B-I", "CLIP-L-I", "DINO-I"):
        columns = [per_subject[subject.name][metric] for subject in case.subjects]
        scores[metric] = [sum(values) / len(values) for values in zip(*columns, strict=True)]
    return scores, per_subject


def mask_strip(masks: list[Image.Image], height: int = 64, gap: int = 4) -> Image.Image:
    """Per-step masks side by side on a grey background (the gallery's mask evolution)."""
    thumbs = [mask.resize((height, height), Image.Resampling.NEAREST) for mask in masks]
    strip = Image.new("L", ((height + gap) * len(thumbs) - gap, height), 128)
    for index, thumb in enumerate(thumbs):
        strip.paste(thumb, (index * (height + gap), 0))
    return strip


def save_case(out: Path, case: Case, seed: int, generated: Generated, scores, per_subject) -> dict:
    directory = case_dir(out, case)
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "id": case.id,
        "protocol": case.protocol,
        "subjects": [subject.name for subject in case.subjects],
        "targets": list(case.targets),
        "prompt_index": case.prompt_index,
        "prompt": case.prompt,
        "seed": seed,
        "images": [],
        "masks": [],
        "mask_steps": [],
        "scores": scores,
        "subject_scores": per_subject,
    }
    for k, image in enumerate(generated.images):
        image.save(directory / f"image_{k}.png")
        record["images"].append(f"samples/{case.id}/image_{k}.png")
        names = []
        for s, mask in enumerate(generated.masks[k]):
            mask.save(directory / f"mask_{k}_{s}.png")
            names.append(f"samples/{case.id}/mask_{k}_{s}.png")
        record["masks"].append(names)
        strips = []
        for s, steps in enumerate(generated.mask_steps[k] if generated.mask_steps else []):
            mask_strip(steps).save(directory / f"steps_{k}_{s}.png")
            strips.append(f"samples/{case.id}/steps_{k}_{s}.png")
        record["mask_steps"].append(strips)
    _write_json(directory / RECORD_FILE, record)
    return record


def run_cases(
    out: Path,
    cases: list[Case],
    generator,
    scorers: Scorers,
    sampling: Sampling,
    images_per_prompt: int,
    base_seed: int,
) -> list[dict]:
    """Generate and score every case not done yet; return the records of all cases, in order."""
    references = ReferenceEmbeddings(scorers)
    photos: dict[str, Image.Image] = {}
    done = sum((case_dir(out, case) / RECORD_FILE).is_file() for case in cases)
    if done:
        logger.info("resuming: %d of %d cases already done", done, len(cases))
    records = []
    with tqdm(total=len(cases), initial=done, desc="cases", unit="case", dynamic_ncols=True) as progress:
        for case in cases:
            record_path = case_dir(out, case) / RECORD_FILE
            if record_path.is_file():
                records.append(json.loads(record_path.read_text()))
                continue
            # Fixed seeds: the same prompt index gets the same seed for every subject.
            seed = base_seed + case.prompt_index
            subjects = []
            for subject in case.subjects:
                if subject.name not in photos:
                    photos[subject.name] = load_photo(subject.reference)
                subjects.append((photos[subject.name], subject.class_word))
            generated = generator.generate(case.prompt, subjects, seed, images_per_prompt, sampling)
            scores, per_subject = score_case(case, generated, scorers, references)
            records.append(save_case(out, case, seed, generated, scores, per_subject))
            progress.update(1)
    return records
