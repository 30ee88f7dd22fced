"""The device kit (make device-kit) and tools/device_check.sh, checked on the CPU.

The script's stages run for real in its dry-run mode (DEVICE_CHECK_DRY_RUN=1: tiny models, 64²,
2 steps, the kit's install only planned); building the kit downloads its wheels from PyPI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy
import pytest
import torch
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "device_check.sh"
STAGES = ["install", "gpu_tests", "sd15", "sdxl", "gpu_inductor", "sd15_inductor", "lora"]
# Recorded beside torch/transformers: diffusers imports whatever peft/accelerate the image has.
RECORDED = {"torch", "transformers", "diffusers", "peft", "accelerate", "pytest", "requests"}
CARRY_LIMIT = 64 * 2**20


def _device_kit():
    spec = importlib.util.spec_from_file_location("device_kit", ROOT / "tools" / "device_kit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run_check(out: Path, kit: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DEVICE_CHECK_DRY_RUN": "1", "PYTHON": sys.executable}
    environment.update(OUT=str(out), DEVICE_KIT=str(kit), **env)
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )


def _stages(out: Path) -> dict[str, dict]:
    lines = (out / "stages.jsonl").read_text().splitlines()
    return {record["stage"]: record for record in map(json.loads, lines)}


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("device-kit")
    build = subprocess.run(
        [sys.executable, "tools/device_kit.py", "build", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert "MiB of the 64 MiB one device call carries" in build.stdout
    return out


def test_device_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):  # apt's shellcheck; absent on some CI images
        lint = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout


def test_make_device_kit_calls_the_kit_builder():
    plan = subprocess.run(
        ["make", "-n", "device-kit", "DEVICE_KIT=some/kit"], cwd=ROOT, capture_output=True, text=True
    )
    assert plan.returncode == 0, plan.stderr
    assert "tools/device_kit.py build --out some/kit" in plan.stdout


def test_kit_accepts_only_pure_python_wheels():
    kit = _device_kit()
    assert kit.pure_python_tag("diffusers-0.42.1-py3-none-any.whl") == "py3-none-any"
    assert kit.pure_python_tag("six-1.17.0-py2.py3-none-any.whl") == "py2.py3-none-any"
    assert kit.pure_python_tag("regex-2026.1.1-cp312-cp312-manylinux_2_17_x86_64.whl") is None
    assert kit.pure_python_tag("enum34-1.1.10-py2-none-any.whl") is None


def test_kit_install_plans_only_what_the_interpreter_lacks(tmp_path):
    """Installed packages are kept at their own version; absent ones get one pip call from the kit
    (resolved against what is installed) and `--no-deps` ones another; torch is pinned."""
    entries = [
        {"name": "numpy", "version": "0.0.1", "deps": True},
        {"name": "realcustom-absent-probe", "version": "1.0", "deps": True},
        {"name": "realcustom-absent-vocabulary", "version": "2.0", "deps": False},
    ]
    (tmp_path / "kit.json").write_text(json.dumps({"wheels": entries}))
    report = tmp_path / "environment.json"
    command = [sys.executable, str(ROOT / "tools" / "device_kit.py"), "install", "--kit", str(tmp_path)]
    run = subprocess.run(
        [*command, "--report", str(report), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(report.read_text())
    assert result["present"] == {"numpy": numpy.__version__}
    assert result["missing"] == ["realcustom-absent-probe==1.0", "realcustom-absent-vocabulary==2.0"]
    resolved, alone = result["commands"]
    assert "--no-index" in resolved and resolved.endswith("realcustom-absent-probe==1.0")
    assert "--no-deps" in alone and alone.endswith("realcustom-absent-vocabulary==2.0")
    # Metadata may say 2.11.0 where torch.__version__ says 2.11.0+cu130: versions, not strings.
    assert Version(result["image"]["torch"]).public == Version(torch.__version__).public
    assert result["installed"] == {}


def test_kit_install_without_a_kit_says_how_to_make_one(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "device_kit.py"), "install", "--kit", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "make device-kit" in run.stderr


@pytest.mark.slow
def test_device_kit_holds_pure_python_wheels_under_64_mib(kit):
    manifest = json.loads((kit / "kit.json").read_text())
    wheels = {entry["name"]: entry for entry in manifest["wheels"]}
    assert {"diffusers", "open-clip-torch", "pytest", "pluggy", "iniconfig"} <= set(wheels)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"diffusers=={wheels["diffusers"]["version"]}"' in pyproject  # the pinned version
    assert not wheels["open-clip-torch"]["deps"]  # only its vocabulary file is used
    files = sorted(path.name for path in kit.glob("*.whl"))
    assert files == sorted(entry["file"] for entry in wheels.values())  # one version of each
    for entry in wheels.values():
        assert re.search(r"-py(2\.)?3-none-any\.whl$", entry["file"]), entry["file"]
        assert (kit / entry["file"]).stat().st_size == entry["bytes"]
    assert manifest["python_version"] == "3.12"
    assert manifest["total_bytes"] == sum(entry["bytes"] for entry in wheels.values()) < CARRY_LIMIT


@pytest.mark.slow
def test_device_kit_requirements_are_met_by_the_kit_or_the_device_image(kit):
    device_kit = _device_kit()
    wheels = json.loads((kit / "kit.json").read_text())["wheels"]
    assert device_kit.unmet_requirements(kit, wheels) == []
    without = [entry for entry in wheels if entry["name"] != "lazy-importer"]
    (unmet,) = device_kit.unmet_requirements(kit, without)
    assert unmet.startswith("importlib-metadata needs lazy-importer") and "not in the kit" in unmet


def _plan(output: str) -> dict[str, str]:
    return {line.split()[1]: line for line in output.splitlines() if line.startswith("plan: ")}


def test_device_check_plan_keeps_inductor_out_of_gpu_tests_and_cuts_with_sigint(tmp_path):
    run = _run_check(tmp_path, tmp_path / "no-kit", DEVICE_CHECK_STAGES="none")
    plan = _plan(run.stdout)
    assert list(plan) == STAGES
    assert all("timeout -s INT -k " in line for line in plan.values())
    assert "gpu\\ and\\ not\\ inductor" in plan["gpu_tests"]
    assert "gpu\\ and\\ inductor" in plan["gpu_inductor"]
    assert "--check-imports" in plan["install"]
    # The full-size inductor compile cannot fit a default window: never in the default plan.
    default = _plan(_run_check(tmp_path / "default", tmp_path / "no-kit", DEVICE_CHECK_TOTAL_S="0").stdout)
    assert "not selected" in default["sd15_inductor"] and "not selected" not in default["gpu_inductor"]


@pytest.mark.slow
def test_device_check_dry_run_runs_every_stage_and_writes_rows(tmp_path, kit):
    run = _run_check(tmp_path, kit)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    stages = _stages(tmp_path)
    assert list(stages) == STAGES
    assert all(stages[name]["status"] == "passed" for name in STAGES[:-2]), stages
    assert stages["sd15_inductor"]["status"] == stages["lora"]["status"] == "skipped"  # only when named
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["dry_run"] and environment["missing"] == []  # this venv has the whole kit
    assert environment["site"] is None  # this venv is writable
    assert set(environment["versions"]) >= RECORDED
    assert environment["versions"]["diffusers"] == environment["image"]["diffusers"]
    assert environment["imports"]["errors"] == {}
    assert {"engines.compiled", "benchmarks.harness", "realcustom.loading"} <= set(
        environment["imports"]["modules"]
    )
    assert (tmp_path / "gpu-tests.xml").is_file() and (tmp_path / "gpu-inductor-tests.xml").is_file()
    rows = json.loads((tmp_path / "gpu-bench.json").read_text())["rows"]
    assert [r["model"] for r in rows if r["row"] == "summary"] == ["tiny-sd15", "tiny"]
    log = (tmp_path / "device-check.log").read_text()
    assert "=== stages" in log and "| compiled |" in log
    assert "phase model build (tiny, bfloat16, cpu): done in" in log


@pytest.mark.slow
def test_device_check_named_inductor_bench_times_batched_and_compiled(tmp_path, kit):
    run = _run_check(tmp_path, kit, DEVICE_CHECK_STAGES="sd15_inductor")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert _stages(tmp_path)["sd15_inductor"]["status"] == "passed"
    rows = json.loads((tmp_path / "gpu-bench.json").read_text())["rows"]
    assert {r["loop"] for r in rows if r["row"] == "timing"} == {"batched", "compiled"}


@pytest.mark.slow
def test_a_cut_stage_says_which_phase_it_was_in(tmp_path, kit):
    """SIGINT, not SIGTERM: the bench logs the phase it was stopped in and its traceback, and the
    rows it measured stay in gpu-bench.json."""
    run = _run_check(
        tmp_path,
        kit,
        DEVICE_CHECK_STAGES="sd15",
        DEVICE_CHECK_BUDGET_SD15="25",
        DEVICE_CHECK_BENCH_ARGS="--runs 1000000",
    )
    assert run.returncode != 0
    assert _stages(tmp_path)["sd15"]["status"] == "timed_out"
    log = (tmp_path / "device-check.log").read_text()
    assert re.search(r"phase [^:]+: stopped after [\d.]+ s \(KeyboardInterrupt", log), log[-3000:]
    assert "KeyboardInterrupt" in log.split("phase model build")[-1]
    rows = json.loads((tmp_path / "gpu-bench.json").read_text())["rows"]
    assert [r["row"] for r in rows][:1] == ["load"]


def _wheel(folder: Path, name: str, version: str, module: str) -> Path:
    """A minimal pure-Python wheel (PEP 427) holding one module."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{module}.py": "VALUE = 1\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}.dist-info/RECORD,,\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            wheel.writestr(member, text)
    return path


def test_kit_installs_into_a_site_folder_when_the_environment_is_read_only(tmp_path):
    """--force-site takes the path of a read-only image: everything --no-deps into --site, then the
    import check sees it there (with the folder on PYTHONPATH, as device_check.sh sets)."""
    kit = tmp_path / "kit"
    kit.mkdir()
    wheel = _wheel(kit, "realcustom-site-probe", "1.0", "realcustom_site_probe")
    entry = {"name": "realcustom-site-probe", "version": "1.0", "deps": True, "file": wheel.name}
    (kit / "kit.json").write_text(json.dumps({"wheels": [entry]}))
    stage = tmp_path / "stage.py"
    stage.write_text("import realcustom_site_probe\n")
    site, report = tmp_path / "site", tmp_path / "environment.json"
    command = [sys.executable, str(ROOT / "tools" / "device_kit.py"), "install", "--kit", str(kit)]
    command += ["--site", str(site), "--report", str(report), "--check-imports", str(stage)]
    planned = subprocess.run([*command, "--dry-run"], capture_output=True, text=True)
    assert planned.returncode == 1  # nothing installed: the import check names what is missing
    assert "realcustom_site_probe" in json.loads(report.read_text())["imports"]["errors"]
    run = subprocess.run([*command, "--force-site"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(report.read_text())
    assert result["site"] == str(site) and (site / "realcustom_site_probe.py").is_file()
    (resolved,) = result["commands"]
    assert f"--target {site} --no-deps" in resolved
    assert result["installed"] == {"realcustom-site-probe": "1.0"}
    assert result["imports"] == {"modules": ["realcustom_site_probe"], "errors": {}}


@pytest.mark.slow
def test_device_check_stage_over_its_budget_is_cut_and_the_next_still_runs(tmp_path, kit):
    run = _run_check(tmp_path, kit, DEVICE_CHECK_STAGES="sd15,sdxl", DEVICE_CHECK_BUDGET_SD15="2")
    assert run.returncode != 0  # a stage was cut
    stages = _stages(tmp_path)
    assert list(stages) == STAGES
    assert stages["sd15"]["status"] == "timed_out" and stages["sd15"]["rc"] == 124
    assert stages["sd15"]["budget_s"] == 2 and stages["sd15"]["seconds"] <= 2 + 10
    assert stages["sdxl"]["status"] == "passed"
    skipped = ("install", "gpu_tests", "gpu_inductor", "sd15_inductor", "lora")
    assert {stages[name]["status"] for name in skipped} == {"skipped"}
    rows = json.loads((tmp_path / "gpu-bench.json").read_text())["rows"]
    assert {r["model"] for r in rows if r["row"] == "summary"} == {"tiny"}


@pytest.mark.slow
def test_device_check_lora_stage_runs_when_named(tmp_path, kit):
    """The opt-in per-row LoRA stage (rows x ranks, benchmarks/lora_bench.py) in its dry run."""
    run = _run_check(tmp_path, kit, DEVICE_CHECK_STAGES="install,lora")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    stages = _stages(tmp_path)
    assert stages["lora"]["status"] == "passed" and stages["sdxl"]["status"] == "skipped"
    report = json.loads((tmp_path / "lora-bench.json").read_text())
    assert [(r["rows"], r["rank"]) for r in report["results"]] == [(1, 4), (2, 4)]
    assert all(r["lora_ms"] > 0 and r["flop_ratio"] > 0 for r in report["results"])
    assert "| rows | rank |" in (tmp_path / "device-check.log").read_text()
