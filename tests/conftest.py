"""Shared test set-up: one thread (tiny calls vary 100x with two), fixture locations."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

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
