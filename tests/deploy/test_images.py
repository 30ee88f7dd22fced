"""The images' inputs, offline (no Docker engine here: nothing is built): every PyPI package comes
from a lock with hashes that agrees with the tested one, the bases are pinned by digest before a
build (`make docker-pin`, refused otherwise), and the worker's base is CUDA's -base flavour."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from deploy_checks import ROOT

LOCKS = {name: ROOT / "docker" / f"requirements-{name}.lock" for name in ("api", "worker", "nodeps")}
# Packages of the CUDA build of torch (the tested lock has the CPU build, without them).
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a `uv pip compile --generate-hashes` file."""
    entries = {}
    for block in re.split(r"^(?=\S)", path.read_text(), flags=re.MULTILINE):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+) \\", block)
        if match:
            entries[_normal(match.group(1))] = (match.group(2), block.count("--hash=sha256:"))
    return entries


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_normal(name)] = version
    return pins


def test_image_locks_are_hashed_and_agree_with_the_tested_lock() -> None:
    tested = {
        name: version.split("+")[0] for name, (version, _) in lock_entries(ROOT / "requirements.lock").items()
    }
    # open-clip is installed without its dependencies, here as in `make install`, at the same pin.
    tested |= {
        _normal(n): v for n, v in re.findall(r"--no-deps ([\w-]+)==(\S+)", (ROOT / "Makefile").read_text())
    }
    for path in LOCKS.values():
        entries = lock_entries(path)
        assert entries, path
        for name, (version, hashes) in entries.items():
            assert hashes >= 1, f"{path.name}: {name} has no hash"
            if name in tested:
                assert version == tested[name], f"{path.name}: {name} {version}, tested with {tested[name]}"
            else:
                assert CUDA_ONLY.match(name), (
                    f"{path.name}: {name} was never tested (not in requirements.lock)"
                )
    project = _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    worker = lock_entries(LOCKS["worker"])
    assert {name: worker.get(name, ("",))[0] for name in project} == project
    api = lock_entries(LOCKS["api"])
    api_pins = _pins((ROOT / "docker/requirements-api.txt").read_text().splitlines())
    assert {name: api.get(name, ("",))[0] for name in api_pins} == api_pins
    assert not [name for name in api if name == "torch" or CUDA_ONLY.match(name)], (
        "the API image has no torch"
    )
    # torch from PyPI is the CUDA 13 build: its CUDA libraries come with it.
    assert "nvidia-cudnn-cu13" in worker and "nvidia-cublas" in worker


def _run_steps(dockerfile: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def test_every_install_in_the_images_comes_from_a_hashed_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = [
        command.strip()
        for step in _run_steps(dockerfile)
        for command in step.split("&&")
        if "pip install" in command
    ]
    assert installs
    unhashed = []
    for command in installs:
        if "--require-hashes" in command:
            (lock,) = re.findall(r"-r (docker/\S+\.lock)", command)
            assert (ROOT / lock).is_file(), lock
        elif command.endswith("--no-deps ."):
            continue  # the project itself, from the build context
        else:
            unhashed.append(command)
    # One documented exception: TensorRT from NVIDIA's index (its PyPI package is a stub).
    assert unhashed == ["uv pip install --no-deps --index-url ${TENSORRT_INDEX} ${TENSORRT_PACKAGES}"]
    assert re.search(r'ARG TENSORRT_PACKAGES="(tensorrt-cu13[\w-]*==[\d.]+ ?){3}"', dockerfile)


def _base_images() -> dict[str, str]:
    lines = (ROOT / "docker/base-images.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))


def test_base_images_are_the_dockerfile_args_and_cuda_is_the_base_flavour() -> None:
    args = dict(re.findall(r"^ARG ([A-Z_]+_IMAGE)=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert {name: ref.split("@")[0] for name, ref in _base_images().items()} == args
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-base-ubuntu\d+\.\d+", args["CUDA_IMAGE"])


# A docker client stand-in: `buildx imagetools inspect REF` answers a digest derived from REF,
# `build` records its arguments.
_DOCKER = """#!{python}
import hashlib, json, os, sys
args = sys.argv[1:]
if args[:3] == ["buildx", "imagetools", "inspect"]:
    print(json.dumps("sha256:" + hashlib.sha256(args[3].encode()).hexdigest()))
else:
    with open(os.environ["DOCKER_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
"""


def _make(target: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    docker = tmp_path / "docker"
    docker.write_text(textwrap.dedent(_DOCKER.format(python=sys.executable)))
    docker.chmod(0o755)
    assignments = [f"{k}={v}" for k, v in {"DOCKER": str(docker), **variables}.items()]
    return subprocess.run(
        ["make", "--no-print-directory", target, *assignments],
        cwd=ROOT,
        env={"DOCKER_LOG": str(tmp_path / "docker.log"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_builds_need_digests_which_docker_pin_writes(tmp_path: Path) -> None:
    bases = tmp_path / "base-images.env"
    bases.write_text((ROOT / "docker/base-images.env").read_text())
    refused = _make("docker-build", tmp_path, BASE_IMAGES=str(bases), TAG="t")
    assert refused.returncode != 0 and "not pinned by digest" in refused.stderr
    assert not (tmp_path / "docker.log").exists()

    assert _make("docker-pin", tmp_path, BASE_IMAGES=str(bases)).returncode == 0
    pinned = dict(
        line.split("=", 1) for line in bases.read_text().splitlines() if re.match(r"^[A-Z_]+=", line)
    )
    for name, ref in _base_images().items():
        tag = ref.split("@")[0]
        assert pinned[name] == f"{tag}@sha256:{hashlib.sha256(tag.encode()).hexdigest()}"
    assert "# " in bases.read_text()  # the comments stay

    built = _make("docker-build", tmp_path, BASE_IMAGES=str(bases), TAG="t")
    assert built.returncode == 0, built.stderr
    builds = [line for line in (tmp_path / "docker.log").read_text().splitlines()]
    assert len(builds) == 2
    for build in builds:
        for name, ref in pinned.items():
            assert f'"--build-arg", "{name}={ref}"' in build
