"""The serving benchmark's machinery on a short run: both policies serve every arrival."""

from __future__ import annotations

import json

import pytest

from benchmarks import serving_bench


@pytest.mark.slow
def test_serving_bench_short_run_serves_every_arrival_with_both_policies(tmp_path):
    report = serving_bench.main(["--duration", "2", "--levels", "0.5", "--out", str(tmp_path)])
    (level,) = report["levels"]
    expected = len(serving_bench.poisson_times(level["rate_rps"], 2.0, 0))
    for policy in ("request_level", "step_level"):
        row = level[policy]
        assert row["requests"] == expected
        assert 0 <= row["time_to_first_step_p50_s"] <= row["queue_wait_p99_s"] <= row["latency_p99_s"]
        assert row["latency_p50_s"] <= row["latency_p99_s"]
    assert json.loads((tmp_path / "serving-bench.json").read_text())["levels"][0]["load"] == 0.5
    assert "p99 latency ratio" in (tmp_path / "serving-bench.md").read_text()


def test_serving_bench_arrivals_are_seeded_poisson():
    times = serving_bench.poisson_times(5.0, 200.0, seed=3)
    assert times == serving_bench.poisson_times(5.0, 200.0, seed=3)
    assert times == sorted(times) and times[-1] <= 200.0
    assert 900 < len(times) < 1100  # rate x duration, within a few standard deviations
