"""requirements.lock (hashes) must not drift from the pins in pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", requirement).lower()


def test_lock_holds_every_project_pin_at_its_version_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [
        *project["dependencies"],
        *(pin for extra in ("dev", "deploy") for pin in project["optional-dependencies"][extra]),
    ]
    lock = (ROOT / "requirements.lock").read_text()
    locked = {
        _name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.MULTILINE)
    }
    for pin in pins:
        name, version = pin.split("==")
        # torch is the CPU build (local version label +cpu) of the pinned release.
        assert locked.get(_name(name), "").split("+")[0] == version, f"{pin} not locked; regenerate (README)"
    entries = re.split(r"^(?=\S)", lock, flags=re.MULTILINE)
    unhashed = [
        entry.split()[0]
        for entry in entries
        if "==" in entry.split("\n")[0] and "--hash=sha256:" not in entry
    ]
    assert not unhashed, unhashed
