"""`python -m engines.artifact_sets`: delete the artifact sets no worker will load again.

The shared artifacts volume holds one folder per set, `<root>/<set>`: the ONNX exports, TensorRT
engines (keyed inside by graph, GPU and TensorRT version) and compile caches of one model version
and one worker image. Each image brings its own set, so without a clean-up the volume fills with
sets of images long gone (~60 GB each for two 1024² buckets). The engine-build Job runs this after
building the current set: it stamps the current set as built now, keeps it and the newest
`keep - 1` other sets (what a rollback would load) and deletes the rest.

    python -m engines.artifact_sets --root /artifact-sets --current ckpts-1-0.2.0 --keep 2
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# Set names are one path segment: no separators, no dot-dot, nothing a shell or kubelet expands.
SET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,127}")
STAMP = ".built"


def sets_to_delete(built: dict[str, float], current: str, keep: int) -> list[str]:
    """The sets to delete: all but `current` and the newest `keep - 1` others (by build time)."""
    if keep < 1:
        raise ValueError("keep must be at least 1: the current set is always kept")
    others = sorted((name for name in built if name != current), key=lambda name: built[name], reverse=True)
    return sorted(others[keep - 1 :])


def built_time(directory: Path) -> float:
    """When a set was last built: its stamp, else (a set from before stamps) the folder's mtime."""
    stamp = directory / STAMP
    return (stamp if stamp.is_file() else directory).stat().st_mtime


def collect(root: Path, current: str, keep: int) -> list[str]:
    """Stamp `current` as built now, delete the sets `sets_to_delete` names; returns them."""
    if not SET_NAME.fullmatch(current):
        raise ValueError(f"artifact set name {current!r} must match {SET_NAME.pattern} (set ARTIFACT_SET)")
    current_dir = root / current
    current_dir.mkdir(parents=True, exist_ok=True)
    (current_dir / STAMP).write_text(f"{time.time():.0f}\n")
    built = {entry.name: built_time(entry) for entry in root.iterdir() if entry.is_dir()}
    doomed = sets_to_delete(built, current, keep)
    for name in doomed:
        logger.info("deleting artifact set %s (built %s)", name, time.ctime(built[name]))
        shutil.rmtree(root / name)
    return doomed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="the folder holding one folder per set")
    parser.add_argument("--current", required=True, help="the set just built (ARTIFACT_SET)")
    parser.add_argument("--keep", type=int, default=2, help="sets kept, the current one included")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        deleted = collect(args.root, args.current, args.keep)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    logger.info(
        "kept %s and the newest %d other set(s); deleted %d", args.current, args.keep - 1, len(deleted)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
