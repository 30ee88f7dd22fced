"""Builds a folder in the published DreamBench layout from the shared fixture photos."""

from __future__ import annotations

import shutil
from pathlib import Path

# Two subjects: an object (object prompt list) and a live subject (live prompt list).
SUBJECTS = ("backpack", "cat")


def make_dreambench(source: Path, target: Path, subjects: dict[str, str] | None = None) -> Path:
    """`<subject>/00.jpg` per subject plus the unchanged prompt/class file.

    `subjects` maps a DreamBench subject name to the fixture photo it gets (default: its own)."""
    subjects = subjects or {name: name for name in SUBJECTS}
    for name, photo in subjects.items():
        (target / name).mkdir(parents=True)
        shutil.copy(source / f"{photo}.jpg", target / name / "00.jpg")
    shutil.copy(source / "prompts_and_classes.txt", target / "prompts_and_classes.txt")
    return target
