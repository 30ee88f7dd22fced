"""The DreamBench dataset as published (google/dreambooth, folder `dataset/`) and its cases.

Layout: one folder per subject holding its photos (`00.jpg`, `01.jpg`, ...) and
`prompts_and_classes.txt`, which lists `subject_name,class` and two prompt-template lists (objects,
live subjects) written as Python `'... {0} {1} ...'.format(unique_token, class_token)` lines.
RealCustom++ binds the subject to a real word, so the unique token `{0}` is dropped and the class
word `{1}` is the target phrase: "a backpack in the jungle".
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROMPTS_FILE = "prompts_and_classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Subjects whose class is one of these get the live-subject prompt list (DreamBench: dogs, cats).
LIVE_CLASSES = ("dog", "cat")
_TEMPLATE = re.compile(r"^\s*'([^']*)'\.format\(")
_CLASS_ROW = re.compile(r"^([A-Za-z0-9_]+),(.+)$")


@dataclass(frozen=True)
class Subject:
    """One DreamBench subject: its folder name, class word and photos (sorted, `00.jpg` first)."""

    name: str
    class_word: str
    photos: tuple[Path, ...]

    @property
    def live(self) -> bool:
        return self.class_word in LIVE_CLASSES

    @property
    def reference(self) -> Path:
        """The photo given to the model; every photo of the subject is a similarity target."""
        return self.photos[0]


@dataclass(frozen=True)
class Case:
    """What one prompt is generated with: one subject (single) or two (multi), and the prompt."""

    protocol: str  # "single" or "multi"
    subjects: tuple[Subject, ...]
    prompt_index: int
    prompt: str

    @property
    def id(self) -> str:
        names = "+".join(subject.name for subject in self.subjects)
        return f"{self.protocol}/{names}/p{self.prompt_index:02d}"

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(subject.class_word for subject in self.subjects)


@dataclass(frozen=True)
class DreamBench:
    subjects: tuple[Subject, ...]
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]

    def templates(self, subjects: tuple[Subject, ...]) -> tuple[str, ...]:
        """Live-subject prompts when any subject is live (they make sense for objects too)."""
        return self.live_templates if any(s.live for s in subjects) else self.object_templates


def parse_prompts_and_classes(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """-> (subject name -> class word, object templates, live-subject templates)."""
    classes: dict[str, str] = {}
    lists: list[list[str]] = []
    section = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in ("Classes", "Prompts"):
            section = stripped
        elif section == "Classes" and (row := _CLASS_ROW.match(stripped)) and row[1] != "subject_name":
            classes[row[1]] = row[2].strip()
        elif stripped.startswith("prompt_list"):
            lists.append([])
        elif lists and (template := _TEMPLATE.match(line)):
            lists[-1].append(template[1])
    if not classes or len(lists) != 2 or not all(lists):
        raise ValueError(
            f"{PROMPTS_FILE} does not have the published layout (a Classes table and two prompt_list "
            f"blocks, objects then live subjects); found {len(classes)} classes and {len(lists)} lists"
        )
    return classes, lists[0], lists[1]


def load_dreambench(directory: str | Path) -> DreamBench:
    """Read the dataset folder. Subjects of the class table without a folder of photos are left
    out with a warning, so a partial copy of the dataset can be evaluated."""
    root = Path(directory)
    prompts_path = root / PROMPTS_FILE
    if not prompts_path.is_file():
        raise FileNotFoundError(f"{prompts_path} not found: pass the DreamBench `dataset/` folder")
    classes, object_templates, live_templates = parse_prompts_and_classes(prompts_path.read_text())
    subjects, missing = [], []
    for name, class_word in classes.items():
        folder = root / name
        photos = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if photos:
            subjects.append(Subject(name, class_word, tuple(photos)))
        else:
            missing.append(name)
    if not subjects:
        raise FileNotFoundError(f"no subject folder with photos in {root}")
    if missing:
        logger.warning(
            "%d of %d DreamBench subjects have no photos in %s and are left out: %s",
            len(missing),
            len(classes),
            root,
            ", ".join(missing),
        )
    return DreamBench(tuple(subjects), tuple(object_templates), tuple(live_templates))


def single_prompt(template: str, class_word: str) -> str:
    """'a {0} {1} in the snow' -> 'a backpack in the snow' (unique token dropped)."""
    return " ".join(template.format("", class_word).split())


def pair_prompt(template: str, first: str, second: str) -> str:
    """'a red {0} {1}' -> 'a red backpack and a red can': the subject phrase is repeated per subject."""
    prefix, _, suffix = template.partition("{0} {1}")
    return " ".join(f"{prefix}{first} and {prefix}{second}{suffix}".split())


def subject_pairs(subjects: tuple[Subject, ...]) -> list[tuple[Subject, Subject]]:
    """Consecutive pairs in dataset order, skipping a partner with the same class word (the two
    subjects must be bound to different words of the prompt)."""
    unpaired = list(subjects)
    pairs = []
    while unpaired:
        first = unpaired.pop(0)
        partner = next((s for s in unpaired if s.class_word != first.class_word), None)
        if partner is not None:
            unpaired.remove(partner)
            pairs.append((first, partner))
    return pairs


def build_cases(
    bench: DreamBench, protocol: str, num_subjects: int | None, num_prompts: int | None
) -> list[Case]:
    """The cases of one protocol over the first `num_subjects` subjects and `num_prompts` prompts."""
    subjects = bench.subjects[:num_subjects]
    if protocol == "single":
        groups = [(subject,) for subject in subjects]
    elif protocol == "multi":
        groups = subject_pairs(subjects)
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    cases = []
    for group in groups:
        for index, template in enumerate(bench.templates(group)[:num_prompts]):
            if protocol == "single":
                prompt = single_prompt(template, group[0].class_word)
            else:
                prompt = pair_prompt(template, group[0].class_word, group[1].class_word)
            cases.append(Case(protocol, group, index, prompt))
    return cases
