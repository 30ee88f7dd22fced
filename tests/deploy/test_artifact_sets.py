"""The engine-build Job's clean-up of old artifact sets (engines/artifact_sets.py), on real folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import ROOT

from engines.artifact_sets import STAMP, collect, sets_to_delete


def test_keeps_the_current_set_and_the_newest_others() -> None:
    built = {"a": 1.0, "b": 4.0, "c": 3.0, "d": 2.0}
    assert sets_to_delete(built, current="a", keep=2) == ["c", "d"]
    assert sets_to_delete(built, current="a", keep=3) == ["d"]
    assert sets_to_delete(built, current="b", keep=1) == ["a", "c", "d"]
    assert sets_to_delete({}, current="a", keep=2) == []
    with pytest.raises(ValueError, match="at least 1"):
        sets_to_delete(built, "a", 0)


def _set(root: Path, name: str, age_s: float, stamped: bool = True) -> Path:
    directory = root / name / "engines" / "trt" / "0123"
    directory.mkdir(parents=True)
    (directory / "engine.plan").write_bytes(b"plan")
    when = 1_700_000_000 - age_s
    if stamped:
        (root / name / STAMP).write_text("x")
        os.utime(root / name / STAMP, (when, when))
    os.utime(root / name, (when, when))
    return root / name


def test_collect_deletes_old_sets_on_disk_and_stamps_the_current(tmp_path: Path) -> None:
    _set(tmp_path, "ckpts-1-0.1.0", age_s=300)
    _set(tmp_path, "ckpts-1-0.2.0", age_s=200)
    _set(tmp_path, "ckpts-1-0.0.9", age_s=900, stamped=False)  # from before stamps: folder mtime
    # The current set is being built: its stamp is written now, so it is the newest whatever its age.
    _set(tmp_path, "ckpts-2-0.2.0", age_s=10_000)
    assert collect(tmp_path, "ckpts-2-0.2.0", keep=2) == ["ckpts-1-0.0.9", "ckpts-1-0.1.0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts-1-0.2.0", "ckpts-2-0.2.0"]
    assert (tmp_path / "ckpts-2-0.2.0" / STAMP).is_file()
    # A rerun (another GPU kind's build of the same set) deletes nothing more.
    assert collect(tmp_path, "ckpts-2-0.2.0", keep=2) == []


@pytest.mark.parametrize("name", ["", "../x", "a/b", "Upper", ".hidden", "a b"])
def test_a_set_name_that_is_not_one_plain_folder_is_refused(tmp_path: Path, name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engines.artifact_sets", "--root", str(tmp_path), "--current", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "set ARTIFACT_SET" in result.stderr
    assert list(tmp_path.iterdir()) == []
