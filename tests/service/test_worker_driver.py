"""The worker's driver check (service/worker/driver.py): the pure decision on version strings, the
reader on real /proc formats, and the start-up exit with its message."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from service.worker.driver import (
    EXIT_DRIVER_TOO_OLD,
    check_driver,
    check_driver_or_exit,
    driver_problem,
    minimum_driver,
    parse_proc_version,
    read_driver_version,
)

# /proc/driver/nvidia/version of the proprietary and the open kernel modules.
PROPRIETARY = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
OPEN = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)\n"
    "GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)\n"
)


@pytest.mark.parametrize(
    ("driver", "cuda", "refused"),
    [
        ("535.104.05", "13.0", True),  # R535: common on managed pools, too old for CUDA 13
        ("570.172.08", "13.0", True),
        ("580.65.06", "13.0", False),  # the first driver of CUDA 13
        ("580.82.07", "13.1", False),  # minor version compatibility within a major
        ("535.104.05", "12.8", False),
        ("525.60.12", "12.1", True),
        ("999.1", "14.0", False),  # a major the table does not know: not refused
    ],
)
def test_the_decision_is_the_cuda_majors_minimum(driver: str, cuda: str, refused: bool) -> None:
    problem = driver_problem(driver, cuda)
    assert (problem is not None) == refused
    if refused:
        assert (
            driver in problem and minimum_driver(cuda) in problem and "Upgrade the node's driver" in problem
        )


def test_a_cpu_build_needs_no_driver_and_a_cuda_build_without_one_is_told() -> None:
    assert driver_problem(None, None) is None and driver_problem("535.104.05", None) is None
    assert "no NVIDIA driver found" in driver_problem(None, "13.0")


def test_the_reader_parses_both_kernel_modules(tmp_path: Path) -> None:
    assert parse_proc_version(PROPRIETARY) == "535.104.05"
    assert parse_proc_version(OPEN) == "580.65.06"
    assert parse_proc_version("garbage") is None
    proc = tmp_path / "version"
    proc.write_text(OPEN)
    assert read_driver_version(proc) == "580.65.06"
    if shutil.which("nvidia-smi") is None:
        assert read_driver_version(tmp_path / "absent") is None


def test_an_old_driver_stops_the_worker_with_what_to_change(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.worker.driver"), pytest.raises(SystemExit) as stopped:
        check_driver("cuda", "13.0", "570.172.08")
    assert stopped.value.code == EXIT_DRIVER_TOO_OLD
    assert "needs NVIDIA driver >= 580.65.06; node driver: 570.172.08" in caplog.text
    assert "NVIDIA driver 570.172.08 is too old for this worker image" in caplog.text
    # An explicit CUDA device without any driver is refused too; auto-detection on a CPU node is not.
    with pytest.raises(SystemExit):
        check_driver("cuda", "13.0", None)
    check_driver(None, "13.0", None)
    check_driver("cuda:0", "13.0", "580.95.05")


def test_the_worker_on_this_machine_passes_its_own_check() -> None:
    """The real reader and this torch: a CPU build (no CUDA) or a GPU node with a recent driver."""
    check_driver_or_exit("cpu")
    check_driver_or_exit(None if torch.version.cuda is None else "cuda")
