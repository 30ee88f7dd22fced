"""The CLI checks what it can before loading the model: with a model directory that does not exist,
a bad target or setting is still the error reported (and in about a second, not after a load)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "dog"], "does not occur"),
        (["--target", "cat", "--mask-reused-step", "0"], "mask_reused_step must be at least 1"),
        (["--target", "cat", "--width", "100"], "multiple of 32"),
        (["--target", "cat", "--prompt", "a cat " + "very " * 80], "at most 75"),
    ],
)
def test_bad_input_is_reported_before_the_model_loads(
    tmp_path: Path, dreambench_dir: Path, extra, message
) -> None:
    args = ["--prompt", "a cat in the snow", *extra] if "--prompt" not in extra else extra
    command = [
        sys.executable,
        "-m",
        "realcustom",
        "generate",
        "--model",
        str(tmp_path / "no-such-model"),
        "--image",
        str(dreambench_dir / "cat.jpg"),
        "--out",
        str(tmp_path / "out.png"),
        *args,
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
