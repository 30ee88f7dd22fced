"""Checks of exported graphs: onnx's checker, Polygraphy's inspection and accuracy comparison.

`check_graph` runs the graph in onnxruntime through Polygraphy's Comparator on the given inputs
and compares every output with the eager (torch) outputs. `polygraphy check lint` is not used: it
needs onnx_graphsurgeon, which is not a dependency here; `onnx.checker.check_model(full_check=True)`
(structure and shape inference) stands in for it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx


def check_model(path: Path) -> None:
    """onnx's structural check with full shape inference (raises on an invalid graph)."""
    onnx.checker.check_model(str(path), full_check=True)


def polygraphy_inspect(path: Path) -> str:
    """`polygraphy inspect model PATH` (the CLI, in this interpreter's environment): its report."""
    script = Path(sys.executable).parent / "polygraphy"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "polygraphy"]
    result = subprocess.run(
        [*command, "inspect", "model", str(path)], capture_output=True, text=True, check=True, timeout=300
    )
    return result.stdout + result.stderr


def check_graph(
    path: Path,
    feeds: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    atol: float = 1e-4,
    rtol: float = 0.0,
) -> bool:
    """Polygraphy: run the graph in onnxruntime on `feeds`, compare with `expected` outputs."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc

    runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]))
    results = Comparator.run([runner], data_loader=[dict(feeds)])
    golden = RunResults()
    golden.append(("eager", [IterationResult(outputs=dict(expected), runner_name="eager")]))
    results.extend(golden)
    accuracy = Comparator.compare_accuracy(
        results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True)
    )
    return bool(accuracy)
