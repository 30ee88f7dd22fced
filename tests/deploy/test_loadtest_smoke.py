"""The k6 smoke scenario against the real service: Redis, the API and 2 workers on loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from deploy_checks import ROOT


@pytest.mark.integration
@pytest.mark.slow
def test_k6_smoke_passes_its_thresholds(tmp_path) -> None:
    # Fails (never skips) when the service can't start: that is what this test guards.
    assert shutil.which("redis-server"), "redis-server is needed to run the service"
    result = subprocess.run(
        [
            sys.executable,
            "loadtests/run.py",
            "--scenario",
            "smoke",
            "--duration",
            "20s",
            "--out",
            str(tmp_path),
            "--name",
            "smoke",
            "--logs",
            str(tmp_path / "logs"),
            "--ready-timeout",
            "120",
            "--k6-timeout",
            "90",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted((tmp_path / "logs").glob("*.log"))
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n{logs}"
    row = json.loads((tmp_path / "smoke.json").read_text())["result"]
    assert row["ok_200"] >= 4
    assert row["server_errors_5xx"] == row["transport_errors"] == row["bad_images"] == 0
    assert row["lost_jobs"] == []
