"""Backends that run the denoising loop, chosen by name, with a capability check at selection.

`eager` is the eager loop (realcustom.denoise). `compiled` (torch.compile + CUDA graphs,
engines/compiled.py) and `tensorrt` (engines built from ONNX, engines/tensorrt/) register here; a
backend that cannot run on this machine says why in one log line and the runner falls back to
`eager`. Optional members a backend may have: `warmup()` (prepare graphs/engines before serving)
and `stats` (a mapping of counters, e.g. `graph_misses`, that the worker exports).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from realcustom.denoise import Conditioning, LoopResult, LoopSettings, denoise
from realcustom.pipeline import RealCustomPipeline

logger = logging.getLogger(__name__)

StepCallback = Callable[[], None]


class Backend(Protocol):
    name: str

    def denoise(
        self,
        pipeline: RealCustomPipeline,
        cond: Conditioning,
        latents: torch.Tensor,
        settings: LoopSettings,
        on_step: StepCallback | None = None,
    ) -> LoopResult:
        """The loop; `on_step` is called on the host after each step is issued (progress)."""
        ...


class EagerBackend:
    """The eager loop, as written in realcustom/denoise.py (what faster backends are checked against)."""

    name = "eager"

    @staticmethod
    def unavailable_reason(pipeline: RealCustomPipeline) -> str | None:
        return None

    def __init__(self, pipeline: RealCustomPipeline):
        self.pipeline = pipeline

    def denoise(
        self,
        pipeline: RealCustomPipeline,
        cond: Conditioning,
        latents: torch.Tensor,
        settings: LoopSettings,
        on_step: StepCallback | None = None,
    ) -> LoopResult:
        return denoise(pipeline.unet, cond, latents, settings, on_step=on_step)


def _registry() -> dict[str, type]:
    from engines.compiled import CompiledBackend
    from engines.tensorrt.backend import TensorRTBackend

    return {"eager": EagerBackend, "compiled": CompiledBackend, "tensorrt": TensorRTBackend}


BACKENDS: dict[str, type] = _registry()


def select_backend(name: str, pipeline: RealCustomPipeline, **options) -> Backend:
    """The named backend, or `eager` with one log line saying why the named one cannot run here.

    `options` (e.g. `buckets`) go to the named backend only, never to the eager fallback.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}")
    backend_class = BACKENDS[name]
    reason = backend_class.unavailable_reason(pipeline)
    if reason is not None:
        logger.warning("backend %r unavailable (%s); falling back to 'eager'", name, reason)
        return EagerBackend(pipeline)
    return backend_class(pipeline, **options)
