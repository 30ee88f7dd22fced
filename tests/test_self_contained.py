"""The repository stands on its own: no tracked file reads the workspace's fixture folder."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The workspace keeps incoming fixtures in a `shared/` folder beside the repository; a clone
# elsewhere has none. Any path that climbs out of the repository into it is a dependency on it.
OUTSIDE = re.compile(
    r"\.\./shared|/work/shared|\.parent\s*/\s*[\"']shared[\"']|parents\[2\]\s*/\s*[\"']shared"
)


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def test_no_tracked_file_reads_outside_the_repository() -> None:
    offenders = []
    for path in tracked_files():
        if path == Path(__file__) or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary fixtures
        offenders += [
            f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line)
        ]
    assert not offenders, "tracked files read the workspace's shared folder:\n" + "\n".join(offenders)


def test_fixtures_are_in_the_repository_with_their_provenance() -> None:
    golden = ROOT / "tests" / "fixtures" / "golden" / "realcustom_tiny_sdxl"
    photos = ROOT / "examples" / "dreambench"
    for folder in (golden, photos):
        assert (folder / "PROVENANCE.md").is_file(), f"{folder} has no PROVENANCE.md"
    assert (golden / "manifest.json").is_file()
    assert {path.stem for path in photos.glob("*.jpg")} == {"backpack", "berry_bowl", "can", "cat"}
    tracked = {path.relative_to(ROOT) for path in tracked_files()}
    for folder in (golden, photos):
        for path in folder.iterdir():
            assert path.relative_to(ROOT) in tracked, f"{path.relative_to(ROOT)} is not committed"
