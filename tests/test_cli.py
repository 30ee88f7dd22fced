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


def test_preset_with_a_lora_file_and_a_bad_lora(tmp_path: Path, dreambench_dir: Path) -> None:
    """Fast mode from the command line: a preset's sampler and steps, a kohya-layout adapter."""
    import torch
    from safetensors.torch import save_file

    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    good, bad = tmp_path / "style.safetensors", tmp_path / "other-model.safetensors"
    save_file(
        {f"{stem}.lora_down.weight": torch.randn(2, 32), f"{stem}.lora_up.weight": torch.randn(32, 2)}, good
    )
    save_file(
        {f"{stem}.lora_down.weight": torch.randn(2, 64), f"{stem}.lora_up.weight": torch.randn(32, 2)}, bad
    )
    common = ["--image", str(dreambench_dir / "cat.jpg"), "--prompt", "a cat in the snow", "--target", "cat"]
    common += ["--width", "64", "--height", "64", "--preset", "dmd2-4step"]
    out = tmp_path / "fast.png"
    result = cli(*common, "--out", str(out), "--lora", "style=0.8", "--lora-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64)
    result = cli(*common, "--out", str(tmp_path / "x.png"), "--lora", str(bad))
    assert result.returncode == 2
    assert "do not fit the layer" in result.stderr and "other-model" in result.stderr
