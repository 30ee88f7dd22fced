"""Inductor's own CUDA graphs are refused where ours record the step (two graph layers do not compose)."""

from __future__ import annotations

import pytest

from benchmarks import gpu_bench
from engines.graph_loop import CudaGraphCapture, EagerCapture, WarmupCapture, check_compile_mode

# A CUDA-graph capture as the backend holds it, without a device to allocate its pool on.
RECORDING = CudaGraphCapture.__new__(CudaGraphCapture)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_modes_with_inductor_cuda_graphs_are_refused_under_our_graphs(mode: str) -> None:
    with pytest.raises(ValueError, match="inductor's own CUDA graphs"):
        check_compile_mode(mode, RECORDING)


@pytest.mark.parametrize("mode", [None, "default", "max-autotune-no-cudagraphs"])
def test_modes_without_them_are_kept(mode: str | None) -> None:
    check_compile_mode(mode, RECORDING)


@pytest.mark.parametrize("capture", [WarmupCapture(), EagerCapture()])
def test_captures_that_record_nothing_take_any_mode(capture: WarmupCapture) -> None:
    check_compile_mode("reduce-overhead", capture)


def test_gpu_bench_refuses_such_a_mode_before_looking_for_a_device(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        gpu_bench.main(["--device", "cuda", "--compile-mode", "max-autotune"])
    assert stopped.value.code == 2
    assert "inductor's own CUDA graphs" in capsys.readouterr().err
