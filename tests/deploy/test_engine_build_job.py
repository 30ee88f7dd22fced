"""The prod engine-build Job's command, run here on the tiny model, produces the engines the workers
look up: TensorRT engines are cached by sha256 of their ONNX graph + build settings + GPU + TensorRT
version (engines/tensorrt/cache.py), so the Job's graphs must be byte-identical to those a worker's
TensorRT backend exports for each of its buckets, and its builder precision the worker's."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
from deploy_checks import render

from engines import export
from engines.onnx_export import export_all
from engines.static_loop import parse_buckets
from engines.tensorrt.cache import onnx_digest
from realcustom.loading import load_pipeline

# Small buckets of the tiny model stand for the prod BUCKETS (same syntax, same code path).
BUCKETS = "1x128x128,2x128x128"


def _job_argv(model: str, buckets: str, out: Path) -> list[str]:
    """The Job's `python -m engines.export` arguments, with its environment filled in; on the CPU."""
    (job,) = [
        d
        for d in render("k8s/overlays/prod+ingress-nginx+gke")
        if d["kind"] == "Job" and "engine" in d["metadata"]["name"]
    ]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    shell = container["args"][-1].replace("$MODEL", model).replace("$BUCKETS", buckets)
    # The export, then the clean-up of old artifact sets: the export's command is the first.
    (export_command,) = [part for part in shell.split(";") if "engines.export" in part]
    words = shlex.split(export_command)
    argv = words[words.index("engines.export") + 1 :]
    argv[argv.index("--device") + 1] = "cpu"  # no GPU here; graphs are exported in fp32 either way
    argv[argv.index("--out") + 1] = str(out)
    return argv


@pytest.mark.slow
def test_the_jobs_engines_are_the_ones_workers_look_up(tmp_path: Path) -> None:
    argv = _job_argv("tiny", BUCKETS, tmp_path / "job")
    # A worker on a GPU loads real weights in bf16 (engines.runner.load_runner) and its TensorRT
    # backend builds in the pipeline's precision.
    assert argv[argv.index("--dtype") + 1] == "bf16" and argv[argv.index("--precision") + 1] == "bf16"
    job_dir = Path(export.main(argv)["onnx"])

    # The worker's TensorRT backend: one export per bucket, under the pipeline's own name.
    pipeline = load_pipeline("tiny", dtype=torch.bfloat16)
    for bucket in parse_buckets(BUCKETS):
        worker_dir = export_all(pipeline, pipeline.name, [bucket], tmp_path / "worker")
        for stem in (f"guidance-{bucket}", f"generation-kv-{bucket}"):
            assert onnx_digest(worker_dir / f"{stem}.onnx") == onnx_digest(job_dir / f"{stem}.onnx"), stem
