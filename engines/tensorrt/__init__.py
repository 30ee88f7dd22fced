"""TensorRT engines built from the exported ONNX graphs (engines/onnx_export.py).

`tensorrt` is imported lazily (only `builder`, `runtime` and a `TensorRTBackend` that passed its
capability check touch it), so this package imports, and its cache-key logic is tested, on
machines without TensorRT or a GPU. See docs/ENGINES.md for what has and has not run.
"""

from __future__ import annotations

import importlib.util


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (None when it can)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None
