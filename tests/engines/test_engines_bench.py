"""The benchmark scripts' CPU-independent parts, as dry runs on the tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_batched_gpu_bench_dry_run_on_cpu(tmp_path):
    """gpu_bench.py end to end on the CPU: tiny model, the static loop without graphs, one run."""
    bench = _script("gpu_bench")
    report = bench.main(
        [
            "--device",
            "cpu",
            "--models",
            "tiny",
            "--size",
            "64",
            "--steps",
            "2",
            "--mask-reused-step",
            "1",
            "--runs",
            "1",
            "--batches",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    (row,) = report["models"]["tiny"]["rows"]
    assert report["dry_run"] is True
    assert set(row["timings"]) == {"three_call", "batched", "compiled"}
    assert row["parity"]["compiled_vs_eager"]["latents_max_abs"] == 0.0
    assert row["graph_stats"]["graph_replays"] >= 2
    assert json.loads((tmp_path / "gpu-bench.json").read_text())["models"]["tiny"]["rows"]
    assert "| tiny 64² | 1 |" in (tmp_path / "gpu-bench.md").read_text()


def test_batched_cpu_bench_writes_a_ratio(tmp_path):
    bench = _script("cpu_bench")
    result = bench.main(
        [
            "--size",
            "64",
            "--steps",
            "2",
            "--mask-reused-step",
            "1",
            "--runs",
            "1",
            "--batches",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    (row,) = result["rows"]
    assert row["ratio"] > 0 and (tmp_path / "cpu-bench.md").is_file()
