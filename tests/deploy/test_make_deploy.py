"""`make deploy`, `make build-engines` and `make fetch-weights` as run against a cluster, with a
stand-in `kubectl` that records what would be applied: there is no cluster here. The stand-in
renders with the real kubectl (kustomize) and applies the label selector the Makefile passes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from deploy_checks import ROOT, kubectl, render

# Records every call; `apply -k DIR -l SELECTOR` renders DIR with the real kubectl; `get job`
# answers that the Job completed; `create ... --dry-run=client -o yaml` runs for real (offline).
_STAND_IN = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
log = os.environ["KUBECTL_LOG"]
entry = {{"args": args}}
if args[:2] == ["apply", "-k"]:
    entry["rendered"] = subprocess.run(
        [{real!r}, "kustomize", args[2]], check=True, capture_output=True, text=True
    ).stdout
    entry["selector"] = args[args.index("-l") + 1] if "-l" in args else None
elif args[:2] == ["apply", "-f"]:
    entry["stdin"] = sys.stdin.read()
elif "create" in args:
    sys.exit(subprocess.run([{real!r}, *args]).returncode)
elif "get" in args and "job" in args:
    print("Complete")
with open(log, "a") as handle:
    handle.write(json.dumps(entry) + "\\n")
"""


def _selected(labels: dict[str, str], selector: str) -> bool:
    """One `key in (a,b)` / `key notin (a,b)` requirement, as the API server evaluates it."""
    match = re.fullmatch(r"\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*", selector)
    assert match, f"unexpected selector {selector!r}"
    key, operator, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
    inside = labels.get(key) in values
    return inside if operator == "in" else not inside


def _make(target: str, tmp_path: Path, **variables: str) -> list[dict]:
    stand_in = tmp_path / "kubectl"
    stand_in.write_text(textwrap.dedent(_STAND_IN.format(python=sys.executable, real=kubectl())))
    stand_in.chmod(0o755)
    log = tmp_path / f"{target}.log"
    assignments = [f"{key}={value}" for key, value in {"KUBECTL": str(stand_in), **variables}.items()]
    result = subprocess.run(
        ["make", "--no-print-directory", target, *assignments],
        cwd=ROOT,
        env={"KUBECTL_LOG": str(log), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def _applied(calls: list[dict]) -> list[dict]:
    import yaml

    (apply,) = [call for call in calls if call["args"][:2] == ["apply", "-k"]]
    docs = [doc for doc in yaml.safe_load_all(apply["rendered"]) if doc]
    return [doc for doc in docs if _selected(doc["metadata"].get("labels", {}), apply["selector"])]


def _names(docs: list[dict]) -> set[tuple[str, str]]:
    return {(doc["kind"], re.sub(r"-[a-z0-9]{10}$", "", doc["metadata"]["name"])) for doc in docs}


def _config(docs: list[dict], role: str = "worker") -> dict:
    (found,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(f"realcustom-{role}-config")
    ]
    return found


@pytest.fixture(scope="module")
def prod_docs() -> list[dict]:
    return render("k8s/overlays/prod+ingress-nginx+gke")


def test_deploy_applies_everything_but_the_on_demand_jobs(tmp_path: Path, prod_docs: list[dict]) -> None:
    calls = _make(
        "deploy",
        tmp_path,
        REGISTRY="registry.example/team",
        TAG="v1",
        OVERLAY="prod",
        PROVIDER="gke",
        INGRESS="ingress-nginx",
        API_KEYS="k1,k2",
    )
    applied = _applied(calls)
    expected = {(kind, name) for kind, name in _names(prod_docs) if kind != "Job"}
    assert _names(applied) == expected
    # The provider profile and the ingress component are composed, the artifacts set is the image's.
    (worker,) = [
        d for d in applied if d["kind"] == "Deployment" and d["metadata"]["name"] == "realcustom-worker"
    ]
    assert (
        worker["spec"]["template"]["spec"]["affinity"]
        == next(
            d for d in prod_docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "realcustom-worker"
        )["spec"]["template"]["spec"]["affinity"]
    )
    assert _config(applied)["data"]["ARTIFACT_SET"] == "ckpts-1-v1"
    images = {
        c["image"]
        for doc in applied
        if doc["kind"] in {"Deployment", "StatefulSet"}
        for c in doc["spec"]["template"]["spec"]["containers"]
    }
    assert {"registry.example/team/realcustom-api:v1", "registry.example/team/realcustom-worker:v1"} <= images
    secrets = [call["stdin"] for call in calls if "stdin" in call and "kind: Secret" in call["stdin"]]
    assert any("realcustom-api-keys" in secret for secret in secrets)


@pytest.mark.parametrize(
    ("target", "job"),
    [("build-engines", "realcustom-engine-build"), ("fetch-weights", "realcustom-fetch-weights")],
)
def test_on_demand_job_replaces_its_last_run_with_the_workers_config(
    target: str, job: str, tmp_path: Path, prod_docs: list[dict]
) -> None:
    calls = _make(
        target,
        tmp_path,
        REGISTRY="registry.example/team",
        TAG="v2",
        PROVIDER="gke",
        GPU_KIND="nvidia-h100-80gb",
    )
    kinds = [call["args"][:2] for call in calls]
    # The previous run goes first (a Job's pod template is immutable), the wait comes last.
    assert kinds.index(["-n", "realcustom"]) < kinds.index(["apply", "-k"])
    assert calls[0]["args"][2:5] == ["delete", "job", job]
    assert "get" in calls[-1]["args"] and job in calls[-1]["args"]
    applied = _applied(calls)
    assert _names(applied) == {("ConfigMap", "realcustom-worker-config"), ("Job", job)}
    # The same ConfigMap as `make deploy` gives the workers of this image (its artifacts set).
    deployed = _applied(
        _make("deploy", tmp_path, REGISTRY="registry.example/team", TAG="v2", OVERLAY="prod", PROVIDER="gke")
    )
    assert _config(applied)["metadata"]["name"] == _config(deployed)["metadata"]["name"]
    (pod,) = [d["spec"]["template"]["spec"] for d in applied if d["kind"] == "Job"]
    assert pod["containers"][0]["image"] == "registry.example/team/realcustom-worker:v2"
    if job == "realcustom-engine-build":
        # On the GPU kind asked for, by the provider's GPU-kind label, besides its GPU node affinity.
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        assert "nodeAffinity" in pod["affinity"]


def test_prod_without_a_provider_profile_is_refused(tmp_path: Path) -> None:
    """prod's GPU workers cannot be scheduled without one: say so instead of applying them."""
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "deploy",
            "REGISTRY=r",
            "OVERLAY=prod-ha",
            f"KUBECTL={tmp_path}/none",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "needs PROVIDER=one of gke eks aks gpu-operator" in result.stderr
