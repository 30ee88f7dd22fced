"""Fixtures of the evaluation tests: a DreamBench-layout folder, tiny metric models."""

from __future__ import annotations

from pathlib import Path

import pytest
from dreambench_layout import make_dreambench


@pytest.fixture
def dreambench_layout(dreambench_dir: Path, tmp_path: Path) -> Path:
    return make_dreambench(dreambench_dir, tmp_path / "dataset")


@pytest.fixture(scope="session")
def tiny_metric_models():
    from realcustom.eval.scorers import tiny_scorers

    return tiny_scorers()
