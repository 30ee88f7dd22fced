"""The prepared GPU step-time script runs end to end (tiny model on the CPU, one step per setting)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step_gpu.py"


def test_train_step_benchmark_runs_on_the_tiny_model(tmp_path):
    spec = importlib.util.spec_from_file_location("train_step_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "train_step.json"
    # bf16 autocast on the CPU: the trainer's precision set-up (frozen bf16, trainable fp32).
    args = ["--model", "tiny", "--device", "cpu", "--mixed-precision", "bf16", "--resolution", "64"]
    args += ["--batch-sizes", "1", "2", "--warmup", "1", "--steps", "1", "--out", str(out)]
    module.main(args)
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert [(r["gradient_checkpointing"], r["batch_size"]) for r in runs] == [
        (True, 1),
        (True, 2),
        (False, 1),
        (False, 2),
    ]
    assert all(r["step_seconds_median"] > 0 and r["images_per_second"] > 0 for r in runs)
    assert results["trainable_parameters"] > 0
    assert all(0.5 < r["loss_last"] < 2.0 for r in runs)
