"""`python -m realcustom.eval` end to end on two DreamBench subjects with the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from realcustom.eval.cli import main
from realcustom.eval.metrics import image_image_score, region_image, text_image_score

ARGS = [
    "--model", "tiny", "--prompts", "2", "--images-per-prompt", "1", "--protocol", "both",
    "--size", "64", "--steps", "3", "--mask-reused-step", "2", "--tiny-metrics",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(dreambench_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from dreambench_layout import make_dreambench

    root = tmp_path_factory.mktemp("eval")
    dataset = make_dreambench(dreambench_dir, root / "dataset")
    out = root / "out"
    assert main(["--dreambench", str(dataset), "--out", str(out), *ARGS]) == 0
    return dataset, out


def test_writes_the_table_in_the_papers_format(run) -> None:
    _, out = run
    markdown = (out / "results.md").read_text()
    assert "Random weights" in markdown
    header = "| Method | Base | CLIP-B-T | CLIP-L-T | IR | CLIP-B-I | CLIP-L-I | DINO-I |"
    assert markdown.count(header) == 2  # single and multi
    ours = re.findall(r"^\| RealCustom\+\+ \(this run\) \| tiny \| (.*) \|$", markdown, re.MULTILINE)
    assert len(ours) == 2
    results = json.loads((out / "results.json").read_text())
    for line, protocol in zip(ours, ("single", "multi"), strict=True):
        cells = [cell.strip() for cell in line.split("|")]
        overall = results["summary"][protocol]["overall"]
        assert cells[2] == "n/a¹"
        assert cells[0] == f"{overall['CLIP-B-T']:.2f}" and cells[5] == f"{overall['DINO-I']:.2f}"
    assert "| RealCustom++ (paper) | SDXL | 33.43 | 31.20 | 1.1036 | 87.32 | 86.67 | 74.60 |" in markdown


def test_cases_and_means(run) -> None:
    _, out = run
    results = json.loads((out / "results.json").read_text())
    ids = [case["id"] for case in results["cases"]]
    assert ids == [
        "single/backpack/p00", "single/backpack/p01", "single/cat/p00", "single/cat/p01",
        "multi/backpack+cat/p00", "multi/backpack+cat/p01",
    ]  # fmt: skip
    assert [case["seed"] for case in results["cases"]] == [0, 1, 0, 1, 0, 1]
    single = results["summary"]["single"]
    assert single["images"] == 4
    values = [case["scores"]["CLIP-L-I"][0] for case in results["cases"][:4]]
    assert single["overall"]["CLIP-L-I"] == pytest.approx(sum(values) / 4)
    assert single["per_group"]["cat"]["DINO-I"] == pytest.approx(
        sum(case["scores"]["DINO-I"][0] for case in results["cases"][2:4]) / 2
    )


def test_stored_scores_match_a_recomputation(run, tiny_metric_models) -> None:
    dataset, out = run
    cases = {case["id"]: case for case in json.loads((out / "results.json").read_text())["cases"]}
    scorers = tiny_metric_models
    single = cases["single/cat/p01"]
    assert single["prompt"] == "a cat in the snow"
    image = Image.open(out / single["images"][0]).convert("RGB")
    reference = Image.open(dataset / "cat" / "00.jpg").convert("RGB")
    clip_t = text_image_score(
        scorers.clip_l.embed_texts([single["prompt"]]), scorers.clip_l.embed_images([image])
    )
    dino_i = image_image_score(scorers.dino.embed_images([image]), scorers.dino.embed_images([reference]))
    assert single["scores"]["CLIP-L-T"][0] == pytest.approx(clip_t[0], abs=1e-3)
    assert single["scores"]["DINO-I"][0] == pytest.approx(dino_i[0], abs=1e-3)

    # Multi-subject: each subject is scored inside its own mask region.
    multi = cases["multi/backpack+cat/p00"]
    assert multi["prompt"] == "a backpack and a cat in the jungle"
    image = Image.open(out / multi["images"][0]).convert("RGB")
    per_subject = []
    for index, name in enumerate(("backpack", "cat")):
        region = region_image(image, Image.open(out / multi["masks"][0][index]))
        assert region.size != image.size  # a top-25% mask never covers the whole image
        reference = Image.open(dataset / name / "00.jpg").convert("RGB")
        score = image_image_score(
            scorers.clip_b.embed_images([region]), scorers.clip_b.embed_images([reference])
        )
        assert multi["subject_scores"][name]["CLIP-B-I"][0] == pytest.approx(score[0], abs=1e-3)
        per_subject.append(score[0])
    assert multi["scores"]["CLIP-B-I"][0] == pytest.approx(sum(per_subject) / 2, abs=1e-3)


def test_gallery_links_every_file(run) -> None:
    _, out = run
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert all((out / source).is_file() for source in sources)
    assert sum("references/" in s for s in sources) == 4 + 2 * 2  # 4 single cases, 2 pair cases
    assert sum("/image_" in s for s in sources) == 6
    assert sum("/mask_" in s for s in sources) == 4 + 2 * 2
    strips = [s for s in sources if "/steps_" in s]
    assert len(strips) == 4 + 2 * 2
    # Mask recomputed at steps 1 and 2 (then reused): two 64 px frames per strip, 4 px apart.
    assert Image.open(out / strips[0]).size == (64 + 4 + 64, 64)
    assert "a <b>backpack</b> and a <b>cat</b> in the jungle" in page


def test_resumes_without_regenerating(run, capsys) -> None:
    dataset, out = run
    image = out / "samples" / "single" / "cat" / "p00" / "image_0.png"
    before = image.stat().st_mtime_ns
    (out / "samples" / "multi" / "backpack+cat" / "p01" / "record.json").unlink()
    assert main(["--dreambench", str(dataset), "--out", str(out), *ARGS]) == 0
    assert image.stat().st_mtime_ns == before
    assert (out / "samples" / "multi" / "backpack+cat" / "p01" / "record.json").is_file()
    assert len(json.loads((out / "results.json").read_text())["cases"]) == 6

    other = [arg if arg != "3" else "4" for arg in ARGS]  # other step count: another run
    assert main(["--dreambench", str(dataset), "--out", str(out), *other]) == 2
    assert "holds a run with other settings (sampling differ)" in capsys.readouterr().err
