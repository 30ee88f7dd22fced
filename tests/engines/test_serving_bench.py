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


@pytest.mark.slow
def test_two_tenant_scenario_serves_every_arrival_with_both_policies(tmp_path):
    report = serving_bench.main(
        ["--scenario", "two-tenant", "--duration", "2", "--levels", "0.9", "--out", str(tmp_path)]
    )
    (level,) = report["levels"]
    for policy in ("fifo", "fair"):
        row = level[policy]
        assert row["heavy"]["requests"] > row["light"]["requests"] >= 1
        assert 0 < row["jain_served_cost"] <= 1 and row["light_p99_vs_alone"] > 0
    assert level["fifo"]["light"]["requests"] == level["light_alone"]["light"]["requests"]
    assert (tmp_path / "serving-bench-tenants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Jain" in (tmp_path / "serving-bench-tenants.md").read_text()


def test_jain_index_and_max_min_shares():
    assert serving_bench.jain([1.0, 1.0]) == 1.0
    assert serving_bench.jain([1.0, 0.0]) == 0.5
    assert serving_bench.fair_shares({"light": 1.0, "heavy": 10.0}, 6.0) == {"light": 1.0, "heavy": 5.0}
    assert serving_bench.fair_shares({"a": 4.0, "b": 4.0}, 6.0) == {"a": 3.0, "b": 3.0}
