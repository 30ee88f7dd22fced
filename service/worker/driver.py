"""The NVIDIA driver a worker needs for the CUDA its torch was built with, checked at start-up.

A CUDA 13 build of torch on a node whose driver is older (R535-R570 are common on managed GPU
pools) fails deep inside its first CUDA call with an error that names neither the driver nor the
fix. The worker checks first and exits with a message that does. The check is a pure function of
two version strings; reading them is the thin part at the bottom.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

# Minimum Linux driver per CUDA major version (NVIDIA's CUDA compatibility tables: a driver of a
# major's first release runs every minor release of that major, "minor version compatibility").
MINIMUM_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
# Exit status of a worker whose node cannot run its image (the orchestrator shows it; restarting
# does not help, so the message says what to change).
EXIT_DRIVER_TOO_OLD = 4
PROC_VERSION = Path("/proc/driver/nvidia/version")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def minimum_driver(cuda: str) -> str | None:
    """The oldest driver that runs CUDA `cuda` (e.g. "13.0"); None for a major not in the table."""
    return MINIMUM_DRIVER.get(_version(cuda)[0])


def driver_problem(driver: str | None, cuda: str | None) -> str | None:
    """Why a driver cannot run a torch built for CUDA `cuda`, or None when it can (or when torch is
    a CPU build). `driver` None: no NVIDIA driver found on this node."""
    if cuda is None:
        return None
    needed = minimum_driver(cuda)
    if driver is None:
        return (
            f"no NVIDIA driver found (/proc/driver/nvidia/version, nvidia-smi): this worker's torch is "
            f"built for CUDA {cuda} and needs driver {needed or 'for it'} or newer on a GPU node"
        )
    if needed is not None and _version(driver) < _version(needed):
        return (
            f"NVIDIA driver {driver} is too old for this worker image: its torch is built for CUDA {cuda}, "
            f"which needs driver {needed} or newer. Upgrade the node's driver or move the workers to nodes "
            f"that have one (docs/DEPLOYMENT.md lists the driver per provider)"
        )
    return None


def parse_proc_version(text: str) -> str | None:
    """The driver version in /proc/driver/nvidia/version ("... Kernel Module  580.65.06 ...")."""
    match = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def read_driver_version(proc: Path = PROC_VERSION) -> str | None:
    """The node's driver version: the kernel module's, else nvidia-smi's (the container toolkit
    injects it); None when neither is there."""
    try:
        return parse_proc_version(proc.read_text())
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.split()[0] if out.split() else None


def check_driver(device: str | None, cuda: str | None, driver: str | None) -> None:
    """State the driver this image needs and exit if the node's is older. Only for a CUDA device
    (`device` unset means cuda when present: checked when a driver is there)."""
    if cuda is None or (device is None and driver is None):
        return
    logger.info(
        "this worker's torch is built for CUDA %s: needs NVIDIA driver >= %s; node driver: %s",
        cuda,
        minimum_driver(cuda),
        driver,
    )
    problem = driver_problem(driver, cuda)
    if problem is not None:
        logger.error("%s", problem)
        raise SystemExit(EXIT_DRIVER_TOO_OLD)


def check_driver_or_exit(device: str | None) -> None:
    """`check_driver` with this process' torch and this node's driver (worker start-up)."""
    if device is not None and not device.startswith("cuda"):
        return
    import torch  # the worker's torch; the API never imports this module

    check_driver(device, torch.version.cuda, read_driver_version())
