"""The benchmark scripts' CPU-independent parts, as dry runs on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_batched_gpu_bench_dry_run_writes_each_row_as_it_is_measured(tmp_path):
    """gpu_bench.py on the CPU (tiny, no graphs): the JSON grows row by row while it runs, the
    timing rows are rewritten after every round, and the finished file holds every row kind."""
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu"]
    command += ["--model", "tiny", "--size", "64", "--steps", "2", "--mask-reused-step", "1"]
    command += ["--runs", "3", "--unet-repeats", "1", "--out", str(tmp_path)]
    results = tmp_path / "gpu-bench.json"
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    row_counts, timing_runs = [], set()
    while process.poll() is None:
        if results.is_file():  # replaced atomically: always a whole file
            rows = json.loads(results.read_text())["rows"]
            if not row_counts or row_counts[-1] != len(rows):
                row_counts.append(len(rows))
            timing_runs |= {r["runs"] for r in rows if r["row"] == "timing" and r["loop"] == "batched"}
        time.sleep(0.02)
    output = process.stdout.read()
    assert process.returncode == 0, output
    assert len(row_counts) >= 4 and row_counts == sorted(row_counts), row_counts
    assert len(timing_runs) >= 2, timing_runs  # seen mid-way, before the last round

    rows = json.loads(results.read_text())["rows"]
    kinds = {(r["row"], r.get("key")) for r in rows}
    loops = ("three_call", "batched", "compiled")
    assert {("load", None), ("capture", None), ("summary", None)} <= kinds
    assert {(kind, loop) for kind in ("first_run", "timing", "step_kind") for loop in loops} <= kinds
    assert {
        ("unet_call", name) for name in ("guidance_b", "generation_tokens_b", "generation_kv_2b")
    } <= kinds
    first = {r["key"]: r for r in rows if r["row"] == "first_run"}
    assert first["compiled"]["parity"]["latents_rel_l2"] < 1e-5
    assert first["compiled"]["parity"]["mask_support_agreement"] == 1.0
    assert first["three_call"]["parity"]["latents_rel_l2"] < 1e-4
    assert first["compiled"]["graph_stats"]["graph_replays"] >= 2
    timing = {r["key"]: r for r in rows if r["row"] == "timing"}
    assert all(timing[loop]["runs"] == 3 and timing[loop]["median_s"] > 0 for loop in loops)
    (summary,) = [r for r in rows if r["row"] == "summary"]
    assert summary["dry_run"] is True and "goals" not in summary  # goal figures are for a GPU only
    assert set(summary["ratios"]) == {
        "three_call_over_batched",
        "three_call_over_compiled",
        "batched_over_compiled",
    }
    (compiled_kinds,) = [r for r in rows if r["row"] == "step_kind" and r["key"] == "compiled"]
    assert compiled_kinds["graph_misses_added"] == 0 and compiled_kinds["mask_update_ms"] > 0
    assert "| compiled |" in (tmp_path / "gpu-bench.md").read_text()


def test_gpu_bench_records_a_failed_capture_and_still_times_the_eager_loops(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu"]
    command += ["--model", "tiny", "--size", "64", "--steps", "2", "--mask-reused-step", "1", "--runs", "1"]
    command += ["--unet-repeats", "1", "--compile-backend", "no-such-backend", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    rows = json.loads((tmp_path / "gpu-bench.json").read_text())["rows"]
    (capture,) = [r for r in rows if r["row"] == "capture"]
    assert "no-such-backend" in capture["error"]
    assert {r["loop"] for r in rows if r["row"] == "timing"} == {"three_call", "batched"}
    assert "compile + capture failed" in (tmp_path / "gpu-bench.md").read_text()


def test_gpu_bench_draws_random_weights_on_the_target_device():
    """The GPU path builds the model under the device as default device; on `meta` it is free and
    shows that every parameter and buffer follows it (nothing is drawn on the CPU and moved)."""
    pipeline, drawn_on = _script("gpu_bench").load("tiny", torch.device("meta"), torch.bfloat16)
    assert drawn_on == "meta"
    assert {t.device.type for t in (*pipeline.parameters(), *pipeline.buffers())} == {"meta"}


def test_gpu_bench_rejects_an_unknown_loop(tmp_path, capsys):
    bench = _script("gpu_bench")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--loops", "batched,fast", "--out", str(tmp_path)])
    assert "unknown loops ['fast']" in capsys.readouterr().err


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


def test_a_stop_between_phases_names_the_phase_that_ended_last(caplog):
    """A SIGINT that lands while rows are written (between phases) still says where the bench was;
    one stopped inside a phase is logged once, by that phase."""
    phases = _script("gpu_bench").PhaseLog()
    with caplog.at_level("INFO", logger="gpu_bench"):
        with phases("timing round 1/3"):
            pass
        phases.stopped(KeyboardInterrupt())
    assert "phase after timing round 1/3: stopped after" in caplog.text
    assert "(KeyboardInterrupt())" in caplog.text

    caplog.clear()
    phases = _script("gpu_bench").PhaseLog()
    with caplog.at_level("INFO", logger="gpu_bench"), pytest.raises(KeyboardInterrupt):
        try:
            with phases("UNet call guidance_b"):
                raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            phases.stopped(interrupt)
            raise
    assert caplog.text.count("stopped after") == 1
    assert "phase UNet call guidance_b: stopped after" in caplog.text
