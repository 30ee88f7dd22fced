"""Shared test set-up: one thread (tiny calls vary 100x with two), fixture locations.

torch is never imported here: torch-free tests (the planner, contracts) run without it. Whatever
test imports it runs single-threaded all the same.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest


def _one_thread() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def pytest_collection_finish(session) -> None:
    _one_thread()  # test modules that import torch at the top were imported by now


def pytest_runtest_setup(item) -> None:
    _one_thread()  # and those that import it inside a test


PROJECT_ROOT = Path(__file__).resolve().parent.parent
DREAMBENCH = PROJECT_ROOT / "examples" / "dreambench"


@pytest.fixture(scope="session")
def dreambench_dir() -> Path:
    assert DREAMBENCH.is_dir(), f"DreamBench fixtures missing at {DREAMBENCH}"
    return DREAMBENCH


@pytest.fixture(scope="session")
def tiny_pipeline():
    from realcustom.loading import load_pipeline

    return load_pipeline("tiny")
