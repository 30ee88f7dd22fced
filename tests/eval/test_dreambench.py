"""Parsing the published prompts_and_classes.txt and building the single/multi cases."""

from __future__ import annotations

from pathlib import Path

import pytest
from dreambench_layout import make_dreambench

from realcustom.eval.dreambench import (
    build_cases,
    load_dreambench,
    pair_prompt,
    parse_prompts_and_classes,
    single_prompt,
)


def test_parses_the_published_file(dreambench_dir: Path) -> None:
    classes, objects, live = parse_prompts_and_classes(
        (dreambench_dir / "prompts_and_classes.txt").read_text()
    )
    assert len(classes) == 30
    assert classes["berry_bowl"] == "bowl"
    assert classes["bear_plushie"] == "stuffed animal"
    assert len(objects) == 25 and len(live) == 25
    assert objects[0] == "a {0} {1} in the jungle"
    assert objects[10] == "a {0} {1} with a wheat field in the background"
    assert live[10] == "a {0} {1} wearing a red hat"
    assert objects[-1] == live[-1] == "a cube shaped {0} {1}"


def test_rejects_a_file_without_the_layout() -> None:
    with pytest.raises(ValueError, match="published layout"):
        parse_prompts_and_classes("Classes\n\nsubject_name,class\ncat,cat\n")


def test_prompts_drop_the_unique_token() -> None:
    assert single_prompt("a {0} {1} in the jungle", "backpack") == "a backpack in the jungle"
    assert single_prompt("a cube shaped {0} {1}", "stuffed animal") == "a cube shaped stuffed animal"
    assert pair_prompt("a red {0} {1}", "backpack", "cat") == "a red backpack and a red cat"
    assert pair_prompt("a {0} {1} on the beach", "can", "dog") == "a can and a dog on the beach"


def test_layout_subjects_cases_and_live_prompts(dreambench_layout: Path, caplog) -> None:
    bench = load_dreambench(dreambench_layout)
    # The 28 subjects without photos are named in a warning, not dropped silently.
    assert "28 of 30 DreamBench subjects have no photos" in caplog.text
    assert [s.name for s in bench.subjects] == ["backpack", "cat"]
    backpack, cat = bench.subjects
    assert not backpack.live and cat.live
    assert backpack.reference == dreambench_layout / "backpack" / "00.jpg"

    single = build_cases(bench, "single", None, 12)
    assert len(single) == 24
    by_id = {case.id: case for case in single}
    assert by_id["single/backpack/p10"].prompt == "a backpack with a wheat field in the background"
    assert by_id["single/cat/p10"].prompt == "a cat wearing a red hat"
    assert by_id["single/cat/p10"].targets == ("cat",)

    multi = build_cases(bench, "multi", None, 11)
    assert [case.id for case in multi][-1] == "multi/backpack+cat/p10"
    # A live subject in the pair selects the live-subject prompt list.
    assert multi[-1].prompt == "a backpack and a cat wearing a red hat"
    assert multi[-1].targets == ("backpack", "cat")


def test_pairs_never_bind_two_subjects_to_one_word(dreambench_dir: Path, tmp_path: Path) -> None:
    # cat and cat2 share the word "cat": cat pairs with the next subject of another class.
    photos = {"cat": "cat", "cat2": "cat", "clock": "can"}
    bench = load_dreambench(make_dreambench(dreambench_dir, tmp_path / "dataset", photos))
    pairs = [tuple(s.name for s in case.subjects) for case in build_cases(bench, "multi", None, 1)]
    assert pairs == [("cat", "clock")]
