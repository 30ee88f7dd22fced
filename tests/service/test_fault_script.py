"""CI runs the fault script on each Redis topology: a worker SIGKILLed mid-batch and Redis failing
with jobs queued and running (single: SIGKILL + restart; Sentinel: the primary SIGKILLed, the
replica promoted; Cluster: the queue's master SIGKILLed + restarted) lose no accepted job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("fault_script.py")


@pytest.mark.parametrize("topology", ["single", "sentinel", "cluster"])
def test_fault_script_loses_no_accepted_job(topology: str, tmp_path: Path, dreambench_dir: Path) -> None:
    command = [
        sys.executable,
        str(SCRIPT),
        "--topology",
        topology,
        "--photo",
        str(dreambench_dir / "cat.jpg"),
        "--logs",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert finished.stdout.strip(), finished.stderr[-3000:]
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    logs = {path.name: path.read_text(errors="replace")[-1500:] for path in tmp_path.glob("*.log")}
    assert finished.returncode == 0 and summary["lost"] == [] and not summary["not_done"], (summary, logs)
    assert summary["accepted"] >= 12 and summary["worker_killed_mid_batch"]
    assert summary["queued_at_redis_crash"] > 0 and summary["delivered_at_redis_crash"] > 0
    if topology != "sentinel":  # Sentinel fails over instead: later submissions reach the new primary
        assert summary["refused_while_redis_down"] == 3
