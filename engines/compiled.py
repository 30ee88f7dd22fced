"""The `compiled` backend: torch.compile'd steps captured as CUDA graphs, one per graph key.

At warm-up, for every configured bucket (batch, height, width, subjects) and `GraphSettings`
(scheduler family, mask mode, overlap), the backend allocates the bucket's `LoopState`, compiles
`realcustom.step.denoise_step` for both step kinds and captures each as a CUDA graph in one shared
memory pool. A request's loop is then: copy its conditioning and noise into the state of the
smallest bucket that holds it (extra rows repeat the last row, extra subject slots are zero),
compute every layer's image K/V once into the state, and replay one graph per step; the step index
advances inside the graph, and between replays the host only enqueues a copy of the step's mask
into the mask history: no host synchronisation inside the loop.

Everything runs without autograd: parameters are frozen at load (realcustom.loading) and warm-up,
capture and replay run under `torch.no_grad()`, so no buffer ever carries autograd history (which
would make dynamo recompile and keep every warm-up forward's activations alive).

A loop whose key was not captured (no fitting bucket, other settings) runs the same step eagerly
on a state of its exact shape, counted in `stats` (`graph_misses` per step); a diffusers scheduler
runs the eager loop (`eager_loops`). The worker exports these counters.

Capture is pluggable: `CudaGraphCapture` on a GPU; on the CPU, `WarmupCapture` runs the very same
warm-up (compilation included) and replays the compiled function without a graph, which is how the
CPU tests execute everything but the CUDA graph itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

from engines.graph_loop import CudaGraphCapture, GraphLoop, WarmupCapture, check_compile_mode
from engines.static_loop import Bucket, GraphSettings
from realcustom.denoise import Conditioning, LoopResult, LoopSettings
from realcustom.pipeline import RealCustomPipeline


class GraphBackend:
    """What the graph-replaying backends share: buckets, graph settings, the loop, its counters."""

    graphs: GraphLoop

    def _configure(
        self,
        pipeline: RealCustomPipeline,
        buckets: Sequence[Bucket] | None,
        graph_settings: Sequence[GraphSettings] | None,
    ) -> None:
        self.pipeline = pipeline
        size = pipeline.default_size
        self.bucket_config = list(buckets) if buckets else [Bucket(1, size, size)]
        self.graph_settings = list(graph_settings) if graph_settings else [GraphSettings()]
        self.prepared = False

    @property
    def stats(self) -> Counter[str]:
        return self.graphs.stats

    def warmup(self) -> None:
        """Capture every configured bucket (called by Runner.warmup before serving)."""
        if not self.prepared:
            self.graphs.prepare(self.bucket_config, self.graph_settings)
            self.prepared = True

    def denoise(
        self,
        pipeline: RealCustomPipeline,
        cond: Conditioning,
        latents: torch.Tensor,
        settings: LoopSettings,
        on_step: Callable[[], None] | None = None,
    ) -> LoopResult:
        return self.graphs.denoise(cond, latents, settings, on_step)


class CompiledBackend(GraphBackend):
    """torch.compile + CUDA graphs; needs a CUDA device (falls back to eager otherwise)."""

    name = "compiled"
    default_compile_backend = "inductor"

    @staticmethod
    def unavailable_reason(pipeline: RealCustomPipeline) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        if pipeline.device.type != "cuda":
            return f"the model is on {pipeline.device}, not on a CUDA device"
        return None

    def __init__(
        self,
        pipeline: RealCustomPipeline,
        buckets: Sequence[Bucket] | None = None,
        graph_settings: Sequence[GraphSettings] | None = None,
        compile_backend: str | None = default_compile_backend,
        compile_mode: str | None = None,
        capture: WarmupCapture | None = None,
        partial_uncond: bool = False,
    ):
        """partial_uncond: also capture steps whose generation pass runs the unconditional half on
        the first 0, 1, 2, 4 ... rows (CFG-free rows in passes of B rows; 4x the graphs of a
        bucket of 4 rows)."""
        self._configure(pipeline, buckets, graph_settings)
        if capture is None:
            capture = CudaGraphCapture() if pipeline.device.type == "cuda" else WarmupCapture()
        check_compile_mode(compile_mode, capture)
        self.graphs = GraphLoop(
            pipeline, capture, compile_backend, compile_mode, partial_uncond=partial_uncond
        )
