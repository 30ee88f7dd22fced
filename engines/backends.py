"""Backends that run the denoising loop, chosen by name, with a capability check at selection.

`eager` is the eager loop (realcustom.denoise). `compiled` (torch.compile + CUDA graphs,
engines/compiled.py) and `tensorrt` (engines built from ONNX, engines/tensorrt/) register here; a
backend that cannot run on this machine says why in one log line and the runner falls back to
`eager`.

What the rest of engines uses of a backend is written down here as protocols, not discovered:

* `Backend`: `name` and `denoise` (a whole loop; `Runner.run` and every job run alone);
* `WarmsUp`: `warmup()` prepares graphs/engines before serving (`Runner.warmup` calls it);
* `Counted`: `stats`, monotonic counters (`graph_replays`, `graph_misses`, ...) the worker exports;
* `SteppedBackend`: all three plus `graphs`, the `StepGraphs` that step-level batching drives
  (engines/step_batching.py): fixed-shape states per (bucket, settings), one step function per
  graph key, and `prepare` for families made on demand. How the UNet's two roles run inside a
  step is the graphs' `UNetCalls` (realcustom.step): torch modules for `compiled`, TensorRT
  engines for `tensorrt`.

`step_graphs`, `backend_stats` and `warm_up` are the only places that ask which of these a backend is.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from engines.static_loop import Bucket, GraphKey, GraphSettings
from realcustom.denoise import Conditioning, LoopResult, LoopSettings, denoise
from realcustom.pipeline import RealCustomPipeline
from realcustom.step import LoopState

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


@runtime_checkable
class WarmsUp(Protocol):
    def warmup(self) -> None:
        """Compile, capture or load what serving needs, before the first request."""
        ...


@runtime_checkable
class Counted(Protocol):
    stats: Mapping[str, int]


@runtime_checkable
class StepGraphs(Protocol):
    """What step-level batching drives (engines.graph_loop.GraphLoop is the implementation)."""

    pipeline: RealCustomPipeline
    partial_guidance: bool  # MASK_UPDATE steps whose guidance pass covers a prefix were captured
    states: MutableMapping[tuple[Bucket, GraphSettings], LoopState]
    steps: MutableMapping[GraphKey, Callable[[], None]]
    stats: Counter[str]

    def prepare(self, buckets: Sequence[Bucket], graph_settings: Sequence[GraphSettings]) -> None:
        """Allocate the states and capture every step of these (bucket, settings)."""
        ...


@runtime_checkable
class SteppedBackend(Backend, WarmsUp, Counted, Protocol):
    """A backend whose captured steps a running batch replays row group by row group."""

    graphs: StepGraphs


def step_graphs(backend: Backend) -> StepGraphs | None:
    """The graphs step-level batching replays, or None (eager: families are made on demand)."""
    return backend.graphs if isinstance(backend, SteppedBackend) else None


def backend_stats(backend: Backend) -> dict[str, int]:
    return dict(backend.stats) if isinstance(backend, Counted) else {}


def warm_up(backend: Backend) -> None:
    if isinstance(backend, WarmsUp):
        backend.warmup()


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
