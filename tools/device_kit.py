"""The device kit: the wheels the GPU machine's image lacks, built here, installed there offline.

The device image (docs/ENGINES.md, "Device kit") has CPython 3.12 with its own CUDA torch,
transformers, timm and pytest, but no diffusers, no open-clip and no package registry. The project
runs there from source (PYTHONPATH=.); the kit carries only pure-Python wheels, so one kit serves
any CPU architecture and Python 3.12 build.

    python tools/device_kit.py build --out outputs/device-kit     # here: `make device-kit`
    python3 tools/device_kit.py install --kit outputs/device-kit  # there: tools/device_check.sh

Standard library only: `install` runs under the device's python before anything is installed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

PYTHON_VERSION = "3.12"
# What one device call carries in all: the working tree plus the carried paths.
CARRY_LIMIT_BYTES = 64 * 2**20
MANIFEST = "kit.json"
# Never replaced by the kit: the image's CUDA builds and what they were built against.
IMAGE_OWNED = ("torch", "transformers", "numpy", "triton")
# Versions recorded in environment.json: the image's builds, the kit, and what diffusers picks up
# from the image when present (peft, accelerate) or what the stages use (pytest, requests).
RECORDED = (
    *IMAGE_OWNED,
    "diffusers",
    "open-clip-torch",
    "huggingface-hub",
    "safetensors",
    "pillow",
    "peft",
    "accelerate",
    "pytest",
    "requests",
    "onnx",
    "onnxruntime",
)
# What the device image holds of what the kit's wheels require (the device tool's KINDS.md,
# its package list of 2026-11-17; versions where its pip list gives them). `build` checks that
# every requirement of a resolved kit wheel is here or in the kit.
DEVICE_IMAGE = {
    "filelock": None,
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "packaging": None,
    "pillow": None,
    "pygments": None,
    "regex": None,
    "requests": None,
    "safetensors": "0.8.0",
}
# The device's interpreter, for the requirements' environment markers.
DEVICE_MARKERS = {
    "python_version": PYTHON_VERSION,
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "extra": "",
}


@dataclass(frozen=True)
class KitWheel:
    name: str
    why: str
    deps: bool = True  # False: installed with --no-deps (its requirements are not used)


KIT = (
    KitWheel("diffusers", "UNet and VAE classes (realcustom.models)"),
    KitWheel("importlib-metadata", "a declared requirement of diffusers"),
    KitWheel("zipp", "a requirement of importlib-metadata"),
    KitWheel("lazy-importer", "a requirement of importlib-metadata"),
    KitWheel("open-clip-torch", "only its CLIP BPE vocabulary file (realcustom.tokenizer)", deps=False),
    KitWheel("pytest", "the GPU tests (stage gpu_tests)"),
    KitWheel("pluggy", "a requirement of pytest"),
    KitWheel("iniconfig", "a requirement of pytest"),
)

# name-version(-build)?-python-abi-platform.whl (PEP 427)
_WHEEL = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pure_python_tag(filename: str) -> str | None:
    """The wheel's `py-abi-platform` tag when it installs on any CPython 3, else None."""
    match = _WHEEL.match(filename)
    if not match or match["abi"] != "none" or match["plat"] != "any":
        return None
    if "py3" not in match["py"].split("."):
        return None
    return f"{match['py']}-{match['abi']}-{match['plat']}"


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def working_tree_bytes(root: Path) -> int | None:
    """Bytes of what a device call sends besides the carried paths (tracked + untracked, not ignored)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = (root / name for name in listed.decode().split("\0") if name)
    return sum(path.stat().st_size for path in paths if path.is_file())


def unmet_requirements(out: Path, entries: list[dict]) -> list[str]:
    """Requirements of the resolved kit wheels that neither the kit nor the device image meets."""
    from packaging.requirements import Requirement  # build runs here, in the project's venv

    kit = {_canonical(entry["name"]): entry["version"] for entry in entries}
    image = {_canonical(name): version for name, version in DEVICE_IMAGE.items()}
    unmet = []
    for entry in (e for e in entries if e["deps"]):
        with zipfile.ZipFile(out / entry["file"]) as wheel:
            metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
            lines = wheel.read(metadata).decode().splitlines()
        for line in (line for line in lines if line.startswith("Requires-Dist:")):
            requirement = Requirement(line.removeprefix("Requires-Dist:").strip())
            if requirement.marker is not None and not requirement.marker.evaluate(DEVICE_MARKERS):
                continue
            name = _canonical(requirement.name)
            version = kit.get(name, image.get(name))
            if name not in kit and name not in image:
                unmet.append(f"{entry['name']} needs {requirement}: not in the kit, not on the device image")
            elif version is not None and not requirement.specifier.contains(version, prereleases=True):
                unmet.append(f"{entry['name']} needs {requirement}: the kit or the image has {version}")
    return unmet


def build(out: Path) -> dict:
    """Download the kit's wheels at the versions pinned in this environment; check tags and size."""
    out.mkdir(parents=True, exist_ok=True)
    pins = {}
    for wheel in KIT:
        version = installed_version(wheel.name)
        if version is None:
            raise SystemExit(f"device-kit: {wheel.name} is not installed here; run `make install` first")
        pins[wheel.name] = version
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--only-binary", ":all:",
            # Pure Python only: a wheel with compiled code would not match and pip stops with an error.
            "--python-version", PYTHON_VERSION,
            "--implementation", "py", "--abi", "none", "--platform", "any",
            "--dest", str(out),
            *(f"{name}=={version}" for name, version in pins.items()),
        ],
        check=True,
    )  # fmt: skip
    by_name = {}
    for path in sorted(out.glob("*.whl")):
        match = _WHEEL.match(path.name)
        key = _canonical(match["name"]) if match else None
        expected = next((w.name for w in KIT if _canonical(w.name) == key), None)
        if expected is None or match["version"] != pins[expected]:
            path.unlink()  # left by an earlier build: one version of each in the kit
            continue
        by_name[expected] = path
    entries = []
    for wheel in KIT:
        path = by_name.get(wheel.name)
        if path is None:
            raise SystemExit(f"device-kit: pip saved no wheel for {wheel.name}=={pins[wheel.name]}")
        tag = pure_python_tag(path.name)
        if tag is None:
            raise SystemExit(f"device-kit: {path.name} is not a pure-Python wheel")
        entries.append(
            {
                **asdict(wheel),
                "version": pins[wheel.name],
                "file": path.name,
                "tag": tag,
                "bytes": path.stat().st_size,
            }
        )
    if unmet := unmet_requirements(out, entries):
        raise SystemExit("device-kit: incomplete:\n  " + "\n  ".join(unmet))
    total = sum(entry["bytes"] for entry in entries)
    manifest = {"python_version": PYTHON_VERSION, "total_bytes": total, "wheels": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    tree = working_tree_bytes(Path(__file__).resolve().parent.parent)
    print(f"device kit: {len(entries)} wheels, {total / 2**20:.1f} MiB in {out}")
    for entry in entries:
        print(f"  {entry['file']}  ({entry['bytes'] / 2**20:.2f} MiB) {entry['why']}")
    if tree is not None:
        print(
            f"with the working tree ({tree / 2**20:.1f} MiB): {(tree + total) / 2**20:.1f} MiB of the "
            f"{CARRY_LIMIT_BYTES / 2**20:.0f} MiB one device call carries"
        )
    if total + (tree or 0) >= CARRY_LIMIT_BYTES:
        raise SystemExit("device-kit: over the 64 MiB a device call carries")
    print(f"on the device: run with carry=['{out}'] and the command `bash tools/device_check.sh`")
    return manifest


def install_plan(manifest: dict) -> dict[str, list[dict]]:
    """Split the kit into what the running interpreter already has and what it lacks."""
    plan: dict[str, list[dict]] = {"present": [], "missing": []}
    for entry in manifest["wheels"]:
        version = installed_version(entry["name"])
        if version is None:
            plan["missing"].append(entry)
        else:  # the image's own version is kept, whatever the kit holds
            plan["present"].append({**entry, "installed": version})
    return plan


def pip_commands(kit: Path, missing: list[dict], constraints: Path, target: Path | None) -> list[list[str]]:
    """pip calls from the kit alone: resolved (requirements checked against the image) or --no-deps.

    With `target` (the image's environment is read-only) everything goes there `--no-deps`: pip
    ignores the installed packages for a --target install, and `build` already checked that the
    kit and the image together meet every requirement.
    """
    base = [
        sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(kit),
        "--disable-pip-version-check", "--no-compile", "--quiet", "--constraint", str(constraints),
    ]  # fmt: skip
    if target is not None:
        every = [f"{e['name']}=={e['version']}" for e in missing]
        return [[*base, "--target", str(target), "--no-deps", *every]] if every else []
    commands = []
    resolved = [f"{e['name']}=={e['version']}" for e in missing if e["deps"]]
    if resolved:
        commands.append([*base, *resolved])
    alone = [f"{e['name']}=={e['version']}" for e in missing if not e["deps"]]
    if alone:
        commands.append([*base, "--no-deps", *alone])
    return commands


def environment_writable() -> bool:
    """Whether pip can install into this interpreter's own site-packages."""
    return os.access(sysconfig.get_paths()["purelib"], os.W_OK)


def imported_modules(paths: list[Path]) -> list[str]:
    """Every module the files import by absolute name (what a later stage will import)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    names.discard("__future__")
    return sorted(names)


# Run by a fresh interpreter that sees what was just installed (the --target folder included):
# every module imported, and the versions that matter, as one JSON line.
_PROBE = """
import importlib, importlib.metadata, json, sys, traceback
modules, packages = json.loads(sys.argv[1]), json.loads(sys.argv[2])
errors = {}
for name in modules:
    try:
        importlib.import_module(name)
    except BaseException as error:
        errors[name] = traceback.format_exception_only(error)[-1].strip()
versions = {}
for name in packages:
    try:
        versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        versions[name] = None
print(json.dumps({"import_errors": errors, "versions": versions}))
"""


def probe(modules: list[str], packages: list[str], site: Path | None) -> dict:
    """Import `modules` and read the versions of `packages` in a new interpreter (`site` on its path)."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(modules), json.dumps(packages)],
        capture_output=True,
        text=True,
        env=env,
    )
    if run.returncode != 0 or not run.stdout.strip():
        return {"import_errors": {"<probe>": (run.stderr or "no output").strip()[-2000:]}, "versions": {}}
    return json.loads(run.stdout.strip().splitlines()[-1])


def install(
    kit: Path, report: Path | None, dry_run: bool, site: Path, check: list[Path], force_site: bool
) -> int:
    if not (kit / MANIFEST).is_file():
        print(f"no device kit at {kit}: run `make device-kit` there and carry its folder", file=sys.stderr)
        return 2
    manifest = json.loads((kit / MANIFEST).read_text())
    plan = install_plan(manifest)
    image = {name: installed_version(name) for name in RECORDED}
    target = site if force_site or not environment_writable() else None
    result = {
        "python": sys.version.split()[0],
        "image": image,
        "present": {e["name"]: e["installed"] for e in plan["present"]},
        "missing": [f"{e['name']}=={e['version']}" for e in plan["missing"]],
        "dry_run": dry_run,
        # Where the kit went: None = the image's own environment; else a folder on PYTHONPATH.
        "site": None if target is None else str(target),
        "commands": [],
        "installed": {},
    }
    status = 0
    with tempfile.TemporaryDirectory() as scratch:
        # The image's own builds are pinned: a requirement wanting another torch fails, never replaces it.
        constraints = Path(scratch) / "image.txt"
        constraints.write_text(
            "".join(f"{name}=={v}\n" for name, v in image.items() if name in IMAGE_OWNED and v)
        )
        for command in pip_commands(kit, plan["missing"], constraints, target):
            result["commands"].append(" ".join(command[command.index("install") :]))
            if not dry_run and subprocess.run(command).returncode != 0:
                status = 1
    # What every later stage imports, imported now: a missing module fails here, not in a stage.
    kit_names = [e["name"] for e in manifest["wheels"]]
    probed = probe(imported_modules(check), [*RECORDED, *kit_names], target)
    result["imports"] = {"modules": imported_modules(check), "errors": probed["import_errors"]}
    result["versions"] = probed["versions"]
    if probed["import_errors"]:
        status = 1
    if not dry_run:
        result["installed"] = {e["name"]: probed["versions"].get(e["name"]) for e in plan["missing"]}
        if any(version is None for version in result["installed"].values()):
            status = 1
    text = json.dumps(result, indent=2)
    print(text)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text + "\n")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="download the kit (here, with network)")
    build_cmd.add_argument("--out", type=Path, default=Path("outputs/device-kit"))
    install_cmd = commands.add_parser("install", help="install what this interpreter lacks (there, offline)")
    install_cmd.add_argument("--kit", type=Path, default=Path("outputs/device-kit"))
    install_cmd.add_argument("--report", type=Path, default=None, help="also write the JSON report here")
    install_cmd.add_argument(
        "--dry-run", action="store_true", help="report what would be installed, install nothing"
    )
    install_cmd.add_argument(
        "--site",
        type=Path,
        default=Path("/tmp/realcustom-site"),
        help="where the kit goes (--target) when the image's environment is not writable",
    )
    install_cmd.add_argument(
        "--force-site", action="store_true", help="install into --site even if the environment is writable"
    )
    install_cmd.add_argument(
        "--check-imports",
        type=Path,
        nargs="*",
        default=[],
        help="files whose imports must all succeed after the install (the later stages' entry points)",
    )
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out)
        return 0
    return install(args.kit, args.report, args.dry_run, args.site, args.check_imports, args.force_site)


if __name__ == "__main__":
    sys.exit(main())
