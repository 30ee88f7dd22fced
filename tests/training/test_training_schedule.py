"""The curriculum schedule, sample numbering across devices, and config validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from realcustom.training.config import ReferenceSource, StageConfig, load_config
from realcustom.training.curriculum import Curriculum
from realcustom.training.data import SampleNumbering

PROJECT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((PROJECT / "configs" / "train").glob("*.yaml"))


def stages(*lengths: int) -> tuple[StageConfig, ...]:
    return tuple(
        StageConfig(name=f"s{i}", steps=n, resolution=64, sources=(ReferenceSource("self"),))
        for i, n in enumerate(lengths)
    )


def test_stage_boundaries():
    curriculum = Curriculum(stages(3, 5, 2))
    assert curriculum.total_steps == 10
    names = [curriculum.stage_at(step).stage.name for step in range(10)]
    assert names == ["s0"] * 3 + ["s1"] * 5 + ["s2"] * 2
    assert [(s.start, s.end) for s in curriculum.spans] == [(0, 3), (3, 8), (8, 10)]
    for step in (-1, 10):
        with pytest.raises(ValueError):
            curriculum.stage_at(step)


def test_remaining_stages_after_a_resume():
    curriculum = Curriculum(stages(3, 5, 2))
    assert [(s.stage.name, first) for s, first in curriculum.remaining(0)] == [
        ("s0", 0),
        ("s1", 3),
        ("s2", 8),
    ]
    assert [(s.stage.name, first) for s, first in curriculum.remaining(3)] == [("s1", 3), ("s2", 8)]
    assert [(s.stage.name, first) for s, first in curriculum.remaining(6)] == [("s1", 6), ("s2", 8)]
    assert curriculum.remaining(10) == []
    with pytest.raises(ValueError):
        curriculum.remaining(11)


def test_sample_numbering_gives_every_device_and_micro_step_its_own_samples():
    seen = []
    for rank in range(3):
        numbering = SampleNumbering(batch_size=2, accumulation=2, num_processes=3, process_index=rank)
        seen += [i for batch in numbering.batches(4, 6) for i in batch]
    # Steps 4 and 5, 2 micro-steps, 3 devices, 2 samples: 24 distinct indices, contiguous.
    assert sorted(seen) == list(range(4 * 12, 6 * 12))
    resumed = SampleNumbering(2, 2, 3, 1)
    assert list(resumed.batches(5, 6)) == list(SampleNumbering(2, 2, 3, 1).batches(4, 6))[2:]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    config = load_config(path)
    assert Curriculum(config.stages).total_steps > 0
    kinds = [source.kind for source in config.stages[0].sources]
    assert kinds == ["self"], "every curriculum starts with reconstruction-like pairs"
    assert any(source.kind == "multiview" for source in config.stages[-1].sources)


def test_config_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "run.yaml"
    path.write_text(
        "data: {manifest: ../data/train.jsonl}\n"
        "training: {learning_rate: 1e-4}\n"
        "stages: [{name: a, steps: 2, resolution: 64, sources: [{kind: self}]}]\n"
    )
    config = load_config(path)
    assert config.data.manifest == str(tmp_path / "data" / "train.jsonl")
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert config.model.base == "tiny"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: []\ndata: {manifest: a}", "at least one stage"),
        ("stages: [{name: a, steps: 1, resolution: 64, sources: [{kind: self}]}]", "data"),
        (
            "data: {manifest: a}\nstages: [{name: a, steps: 1, resolution: 60, sources: [{kind: self}]}]",
            "multiple of 32",
        ),
        (
            "data: {manifest: a}\nstages: [{name: a, steps: 1, resolution: 64, sources: [{kind: crop}]}]",
            "source kind",
        ),
        (
            "data: {manifest: a}\nstages: [{name: a, steps: 1, resolution: 64, sources: [{kind: self}],"
            " lr: 1}]",
            r"unknown key\(s\) \['lr'\]",
        ),
        (
            "data: {manifest: a}\ntraining: {image_dropout: 1.0}\n"
            "stages: [{name: a, steps: 1, resolution: 64, sources: [{kind: self}]}]",
            "image_dropout",
        ),
        (
            "data: {manifest: a}\nstages: [{name: a, steps: 1, resolution: 64,"
            " sources: [{kind: self, reference: {subject_scale: [0.5, 2]}}]}]",
            "subject_scale",
        ),
    ],
)
def test_bad_configs_fail_with_a_pointed_message(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)
