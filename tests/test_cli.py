"""`python -m realcustom generate` in a real subprocess, on a DreamBench photo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "realcustom", "generate", "--model", "tiny", *args]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_generate_writes_image_and_mask(tmp_path: Path, dreambench_dir: Path) -> None:
    out, mask = tmp_path / "out.png", tmp_path / "mask.png"
    result = cli(
        "--image",
        str(dreambench_dir / "cat.jpg"),
        "--prompt",
        "a cat in the snow",
        "--target",
        "cat",
        "--out",
        str(out),
        "--mask-out",
        str(mask),
        "--seed",
        "0",
        "--steps",
        "4",
        "--width",
        "256",
        "--height",
        "256",
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (256, 256)
    assert Image.open(mask).size == (256, 256)


def test_two_subjects_write_side_by_side_masks(tmp_path: Path, dreambench_dir: Path) -> None:
    mask = tmp_path / "mask.png"
    result = cli(
        "--image",
        str(dreambench_dir / "cat.jpg"),
        "--target",
        "cat",
        "--image",
        str(dreambench_dir / "can.jpg"),
        "--target",
        "can",
        "--prompt",
        "a cat next to a can",
        "--out",
        str(tmp_path / "out.png"),
        "--mask-out",
        str(mask),
        "--steps",
        "2",
        "--width",
        "128",
        "--height",
        "128",
        "--num-images",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(mask).size == (256, 128)
    assert (tmp_path / "out_1.png").is_file() and (tmp_path / "out_2.png").is_file()


@pytest.mark.parametrize(
    ("image", "target", "extra", "message"),
    [
        ("missing.jpg", "cat", [], "cannot read image"),
        ("README.md", "cat", [], "cannot read image"),
        ("cat.jpg", "dog", [], "does not occur"),
        ("cat.jpg", "cat", ["--width", "250"], "multiple of 32"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, dreambench_dir, image, target, extra, message) -> None:
    result = cli(
        "--image",
        str(dreambench_dir / image),
        "--target",
        target,
        "--prompt",
        "a cat in the snow",
        "--out",
        str(tmp_path / "out.png"),
        "--steps",
        "2",
        *extra,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
