"""The k6 scripts on their own (k6 1.1 from the `deploy` extra): each one loads from any working
directory with its defaults (the photos found, its options built), states its expectation about
429s, refuses targets it must not load, and packs into the archive the in-cluster TestRun runs."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from deploy_checks import ROOT
from test_make_deploy import _make

K6 = Path(sys.executable).parent / "k6"
SCENARIOS = ("smoke", "steady", "spike", "soak", "async")


def inspect(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`k6 inspect`: runs the script's init code (fixtures, guard, options) and prints its options;
    `env` as `-e` variables (inspect does not pass the process environment to __ENV)."""
    return subprocess.run(
        [str(K6), "inspect", *(f"-e={name}={value}" for name, value in env.items()), script],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "K6_NO_USAGE_REPORT": "true"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_script_runs_on_its_own_with_its_expectations(scenario: str, tmp_path: Path) -> None:
    result = inspect(str(ROOT / "loadtests" / f"{scenario}.js"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    thresholds = json.loads(result.stdout)["thresholds"]
    # The spike expects 429s (back-pressure); every other scenario fails on one.
    expects_429 = scenario == "spike"
    assert ("rejected_429" not in thresholds) == expects_429, thresholds
    assert ("http_req_failed" not in thresholds) == expects_429
    assert thresholds["server_errors"] == ["rate==0"] and thresholds["transport_errors"] == ["rate==0"]
    # ALLOW_429 overrides the scenario's default either way.
    overridden = json.loads(
        inspect(
            str(ROOT / f"loadtests/{scenario}.js"), tmp_path, ALLOW_429="0" if expects_429 else "1"
        ).stdout
    )
    assert ("rejected_429" in overridden["thresholds"]) == expects_429


@pytest.mark.parametrize(
    ("base_url", "in_cluster", "accepted"),
    [
        ("http://127.0.0.1:8000", "", True),
        ("http://[::1]:8000", "", True),
        ("http://realcustom-api.realcustom.svc", "", False),
        ("http://realcustom-api.realcustom.svc", "1", True),
        ("http://realcustom-api.realcustom.svc.cluster.local:80", "1", True),
        ("http://10.0.0.12:8000", "1", False),
        ("https://api.example.com", "1", False),
        ("http://evil.svc.example.com", "1", False),
    ],
)
def test_targets_are_loopback_or_an_opted_in_cluster_service(
    base_url: str, in_cluster: str, accepted: bool, tmp_path: Path
) -> None:
    result = inspect(str(ROOT / "loadtests/smoke.js"), tmp_path, BASE_URL=base_url, IN_CLUSTER=in_cluster)
    assert (result.returncode == 0) == accepted, result.stderr
    if not accepted:
        assert "BASE_URL must be a loopback address" in result.stderr


def test_the_cluster_run_ships_an_archive_the_testrun_can_run(tmp_path: Path) -> None:
    calls = _make("loadtest-cluster", tmp_path, SCENARIO="async", RATE="3", DURATION="5m")
    (config_map,) = [
        yaml.safe_load(call["stdin"]) for call in calls if "kind: ConfigMap" in call.get("stdin", "")
    ]
    archive = base64.b64decode(config_map["binaryData"]["archive.tar"])
    assert len(archive) < 900 * 1024, "a ConfigMap holds 1 MiB at most"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = tar.getnames()
    assert any(name.endswith("loadtests/async.js") for name in names)
    assert any(name.endswith("examples/dreambench/cat.jpg") for name in names)
    # The previous run goes first, then the TestRun with the scenario's parameters.
    kinds = [call["args"][:4] for call in calls]
    assert ["-n", "realcustom", "delete", "testrun"] in kinds
    (apply,) = [call for call in calls if call["args"][:2] == ["apply", "-k"]]
    (testrun,) = [doc for doc in yaml.safe_load_all(apply["rendered"]) if doc]
    assert testrun["spec"]["arguments"] == "--quiet -e RATE=3 -e DURATION=5m"
    assert testrun["spec"]["script"]["configMap"] == {"name": "realcustom-k6", "file": "archive.tar"}
    env = {e["name"]: e.get("value") for e in testrun["spec"]["runner"]["env"]}
    # The archive, as the runner gets it, loads against the Service with the runner's environment.
    (tmp_path / "archive.tar").write_bytes(archive)
    result = inspect(
        "archive.tar", tmp_path, BASE_URL=env["BASE_URL"], IN_CLUSTER=env["IN_CLUSTER"], RATE="3"
    )
    assert result.returncode == 0, result.stderr
    assert inspect("archive.tar", tmp_path, BASE_URL=env["BASE_URL"]).returncode != 0
