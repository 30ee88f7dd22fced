"""The `compiled` backend: torch.compile'd steps captured as CUDA graphs, one per graph key.

At warm-up, for every configured bucket (batch, height, width, subjects) and program (scheduler,
mask mode, overlap), the backend allocates the bucket's static buffers, compiles the two step
functions (MASK_UPDATE, MASK_REUSE) and captures each as a CUDA graph in one shared memory pool.
A request's loop is then: copy its conditioning and noise into the buffers of the smallest bucket
that holds it (extra rows repeat the last row, extra subject slots are zero), compute every layer's
image K/V once into the buffers, and replay one graph per step. Between replays the host only
enqueues work (the step-index increment and a copy of the step's mask into the history): there is
no host synchronisation inside the loop.

A loop whose key was not captured (no fitting bucket, another program, a diffusers scheduler) runs
eagerly and is counted in `stats` (`graph_misses` per step run uncaptured; `eager_loops` per loop
that fell back to the reference loop); the worker exports these counters.

Capture is pluggable (`CaptureStrategy`) so the key logic, the buffers and the replay loop are
tested on the CPU with `EagerCapture` (runs the step function on the buffers, no graph).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from engines.static_loop import (
    Bucket,
    GraphKey,
    Program,
    StaticBuffers,
    StepKind,
    advance,
    pick_bucket,
    run_step,
    step_kinds,
)
from realcustom.denoise import Conditioning, LoopResult, LoopSettings, denoise
from realcustom.pipeline import RealCustomPipeline

logger = logging.getLogger(__name__)

StepFn = Callable[[], None]


class EagerCapture:
    """No graph: 'replay' runs the step function on the static buffers (CPU tests, debugging)."""

    name = "eager"

    def capture(self, fn: StepFn, reset: Callable[[], None]) -> StepFn:
        return fn


class CudaGraphCapture:
    """torch.cuda.graph capture after warm-up runs on a side stream; all graphs share one pool.

    Sharing the pool is safe here: graphs are replayed one at a time on one stream, and every
    graph writes its results into buffers allocated outside capture (nothing it allocates
    outlives its own replay).
    """

    name = "cuda_graph"

    def __init__(self, warmup_runs: int = 3):
        self.warmup_runs = warmup_runs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []  # keep captured graphs alive

    def capture(self, fn: StepFn, reset: Callable[[], None]) -> StepFn:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):  # compiles, autotunes, initialises cuBLAS workspaces
                reset()
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        reset()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.graphs.append(graph)
        return graph.replay


def compile_step(fn: StepFn, compile_backend: str | None, mode: str | None = None) -> StepFn:
    """torch.compile the step (None: leave it eager). CUDA graphs are ours, so inductor's own
    cudagraph trees stay off (mode 'max-autotune-no-cudagraphs' or the default)."""
    if compile_backend is None:
        return fn
    import torch._dynamo

    # One compiled entry per (key, kind): raise dynamo's recompile limits accordingly
    # (`recompile_limit` is the newer name of `cache_size_limit`).
    config = torch._dynamo.config
    for name, value in (("recompile_limit", 256), ("accumulated_recompile_limit", 1024)):
        legacy = {"recompile_limit": "cache_size_limit"}.get(name, "accumulated_cache_size_limit")
        name = name if hasattr(config, name) else legacy
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), value))
    return torch.compile(fn, backend=compile_backend, mode=mode, dynamic=False)


class GraphCache:
    """Buffers per (bucket, program), captured step functions per graph key, and the counters."""

    def __init__(
        self,
        pipeline: RealCustomPipeline,
        capture: EagerCapture | CudaGraphCapture,
        compile_backend: str | None = None,
        compile_mode: str | None = None,
        step_factory: Callable[[StaticBuffers, StepKind], StepFn] | None = None,
    ):
        self.pipeline = pipeline
        self.step_factory = step_factory
        self.capture_strategy = capture
        self.compile_backend = compile_backend
        self.compile_mode = compile_mode
        self.buffers: dict[tuple[Bucket, Program], StaticBuffers] = {}
        self.steps: dict[GraphKey, StepFn] = {}
        self.buckets: list[Bucket] = []
        self.stats: Counter[str] = Counter()

    # ---- preparation ----------------------------------------------------------------------

    def _buffers(self, bucket: Bucket, program: Program, keep: bool = True) -> StaticBuffers:
        if (bucket, program) not in self.buffers:
            pipeline = self.pipeline
            tokens = pipeline.black_image_tokens()  # [1, T, C], cached once per process
            unet = pipeline.unet
            text_encoder_dim = unet.unet.config.cross_attention_dim
            pooled_dim = None
            if unet.is_sdxl:
                time_dims = 6 * unet.unet.config.addition_time_embed_dim
                pooled_dim = unet.unet.config.projection_class_embeddings_input_dim - time_dims
            channels, h, _ = pipeline.latent_shape(bucket.height, bucket.width)
            buffers = StaticBuffers(
                unet,
                bucket,
                program,
                text_shape=(77, text_encoder_dim),
                pooled_dim=pooled_dim,
                image_token_shape=tuple(tokens.shape[1:]),
                latent_channels=channels,
                latent_factor=bucket.height // h,
                device=pipeline.device,
                dtype=pipeline.dtype,
            )
            if not keep:
                return buffers
            self.buffers[bucket, program] = buffers
        return self.buffers[bucket, program]

    def _step_fn(self, buffers: StaticBuffers, kind: StepKind) -> StepFn:
        if self.step_factory is not None:  # e.g. TensorRT engines instead of the torch UNet
            return self.step_factory(buffers, kind)
        unet = self.pipeline.unet

        def step() -> None:
            run_step(unet, buffers, kind)

        return step

    def prepare(self, buckets: Sequence[Bucket], programs: Sequence[Program]) -> None:
        """Allocate, compile and capture every (bucket, program, kind); log what it cost."""
        for bucket in buckets:
            if bucket not in self.buckets:
                self.buckets.append(bucket)
            for program in programs:
                if not program.capturable:
                    logger.warning(
                        "program %s cannot be captured (scheduler); its loops run eagerly", program
                    )
                    continue
                buffers = self._buffers(bucket, program)
                for kind in StepKind:
                    key = GraphKey.of(kind, bucket, program)
                    if key in self.steps:
                        continue
                    started = time.perf_counter()
                    fn = compile_step(self._step_fn(buffers, kind), self.compile_backend, self.compile_mode)

                    def reset(buffers: StaticBuffers = buffers) -> None:
                        buffers.latents.normal_()
                        buffers.step.zero_()
                        buffers.schedule.load(2)

                    self.steps[key] = self.capture_strategy.capture(fn, reset)
                    self.stats["graphs_captured"] += 1
                    logger.info("captured %s in %.1f s", key, time.perf_counter() - started)

    # ---- the loop ------------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, cond: Conditioning, latents: torch.Tensor, settings: LoopSettings) -> LoopResult:
        program = Program.of(settings)
        batch, subjects = cond.batch_size, cond.image_tokens.shape[1]
        factor = 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)
        height, width = latents.shape[-2] * factor, latents.shape[-1] * factor
        if not program.capturable:
            self.stats["eager_loops"] += 1
            return denoise(self.pipeline.unet, cond, latents, settings)
        bucket = pick_bucket(self.buckets, batch, subjects, height, width)
        captured = bucket is not None and (bucket, program) in self.buffers
        if not captured:
            # Not prepared: the same step functions, run uncaptured on buffers of this exact shape.
            bucket = Bucket(batch, height, width, subjects)
        buffers = self._buffers(bucket, program, keep=captured)
        buffers.load(self.pipeline.unet, cond, latents, settings.num_inference_steps)

        kinds = step_kinds(settings.num_inference_steps, settings.mask_reused_step)
        history = torch.empty(
            len(kinds), *buffers.masks.shape, dtype=buffers.masks.dtype, device=latents.device
        )
        for k, kind in enumerate(kinds):
            step = self.steps.get(GraphKey.of(kind, bucket, program)) if captured else None
            if step is None:
                self.stats["graph_misses"] += 1
                run_step(self.pipeline.unet, buffers, kind)
            else:
                self.stats["graph_replays"] += 1
                step()
            history[k].copy_(buffers.masks)
            if k + 1 < len(kinds):
                advance(buffers)
        return LoopResult(buffers.x0[:batch].clone(), history[:, :batch, :subjects].clone())


class GraphBackend:
    """What the graph-replaying backends share: buckets, programs, the graph cache, its counters."""

    graphs: GraphCache

    def _configure(
        self,
        pipeline: RealCustomPipeline,
        buckets: Sequence[Bucket] | None,
        programs: Sequence[Program] | None,
    ) -> None:
        self.pipeline = pipeline
        size = pipeline.default_size
        self.bucket_config = list(buckets) if buckets else [Bucket(1, size, size)]
        self.programs = list(programs) if programs else [Program()]
        self.prepared = False

    @property
    def stats(self) -> Counter[str]:
        return self.graphs.stats

    def warmup(self) -> None:
        """Capture every configured bucket (called by Runner.warmup before serving)."""
        if not self.prepared:
            self.graphs.prepare(self.bucket_config, self.programs)
            self.prepared = True

    def denoise(
        self, pipeline: RealCustomPipeline, cond: Conditioning, latents: torch.Tensor, settings: LoopSettings
    ) -> LoopResult:
        return self.graphs.denoise(cond, latents, settings)


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
        programs: Sequence[Program] | None = None,
        compile_backend: str | None = default_compile_backend,
        compile_mode: str | None = None,
        capture: EagerCapture | CudaGraphCapture | None = None,
    ):
        self._configure(pipeline, buckets, programs)
        if capture is None:
            capture = CudaGraphCapture() if pipeline.device.type == "cuda" else EagerCapture()
        self.graphs = GraphCache(pipeline, capture, compile_backend, compile_mode)
