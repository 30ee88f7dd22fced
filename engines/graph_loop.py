"""`GraphLoop`: the denoising step over fixed-shape states, compiled and captured once per graph key.

A state per (bucket, `GraphSettings`) holds every tensor a step reads or writes; a step per
`GraphKey` (step kind, bucket, settings, guidance rows) runs `realcustom.step.denoise_step` on it,
compiled by torch.compile when asked and captured by a capture strategy:

* `CudaGraphCapture`: warm-up on a side stream, then a CUDA graph (all graphs share one pool);
* `WarmupCapture`: the same warm-up (compilation included), then the function itself: how the CPU
  tests execute everything but the CUDA graph;
* `EagerCapture`: no warm-up, no graph (step-level batching on the eager backend, cheap tests).

`GraphLoop.denoise` runs one whole loop on the smallest prepared bucket (the `compiled` and
`tensorrt` backends); step-level batching (engines/step_batching.py) replays its steps row group
by row group instead.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from engines.static_loop import Bucket, GraphKey, GraphSettings, bucket_state, pick_bucket
from realcustom.denoise import Conditioning, LoopResult, LoopSettings, denoise
from realcustom.pipeline import RealCustomPipeline
from realcustom.step import LoopState, StepKind, TorchUNetCalls, UNetCalls, denoise_step, step_kinds

logger = logging.getLogger(__name__)

StepFn = Callable[[], None]


class WarmupCapture:
    """Warm-up runs (compilation, autotuning, lazy initialisation), then replay = the function.

    The CPU stand-in for CUDA graphs: it calls the step exactly as `CudaGraphCapture` does
    before recording, so tests exercise compilation and the step on real buffers.
    """

    name = "warmup"

    records_graphs = False  # True where replays are recorded graphs (inductor's own must stay off)

    def __init__(self, warmup_runs: int = 2):
        self.warmup_runs = warmup_runs

    def capture(self, fn: StepFn, reset: Callable[[], None]) -> StepFn:
        with torch.no_grad():
            for _ in range(self.warmup_runs):
                reset()
                fn()
        return fn


class EagerCapture(WarmupCapture):
    """No warm-up and no graph: the step function as it is (debugging, cheap CPU tests)."""

    name = "eager"

    def __init__(self) -> None:
        super().__init__(warmup_runs=0)


class CudaGraphCapture(WarmupCapture):
    """Warm-up on a side stream, then `torch.cuda.graph` capture; all graphs share one pool.

    Sharing the pool is safe here: graphs are replayed one at a time on one stream, and every
    graph writes its results into buffers allocated outside capture (nothing it allocates
    outlives its own replay).
    """

    name = "cuda_graph"

    records_graphs = True

    def __init__(self, warmup_runs: int = 3):
        super().__init__(warmup_runs)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []  # keep captured graphs alive

    def capture(self, fn: StepFn, reset: Callable[[], None]) -> StepFn:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            super().capture(fn, reset)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        reset()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.graphs.append(graph)
        return graph.replay


def inductor_records_graphs(mode: str | None) -> bool:
    """Whether torch.compile's `mode` turns on inductor's own CUDA graphs (cudagraph trees:
    'reduce-overhead', 'max-autotune'); an unknown mode is torch's own error."""
    if mode is None:
        return False
    import torch._inductor

    return bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs"))


def check_compile_mode(mode: str | None, capture: WarmupCapture) -> None:
    """Two layers of CUDA graphs do not compose: where our capture records graphs, refuse a mode
    whose inductor records its own inside them."""
    if capture.records_graphs and inductor_records_graphs(mode):
        raise ValueError(
            f"compile mode {mode!r} turns on inductor's own CUDA graphs, which cannot run inside the "
            "graphs this backend records: use 'max-autotune-no-cudagraphs' or the default mode"
        )


def compile_step(fn: StepFn, compile_backend: str | None, mode: str | None = None) -> StepFn:
    """torch.compile the step with fullgraph=True (a graph break is an error, not a slow path);
    None leaves it eager. CUDA graphs are ours, so inductor's own cudagraph trees stay off
    (mode 'max-autotune-no-cudagraphs' or the default)."""
    if compile_backend is None:
        return fn
    import torch._dynamo

    # One compiled entry per (key, kind): raise dynamo's recompile limits accordingly.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 256)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
    return torch.compile(fn, backend=compile_backend, mode=mode, dynamic=False, fullgraph=True)


CallsFactory = Callable[[LoopState, Bucket], UNetCalls]


def _powers_below(rows: int) -> list[int]:
    """1, 2, 4 ... below `rows`: the prefixes captured beside the whole bucket."""
    prefixes, count = [], 1
    while count < rows:
        prefixes.append(count)
        count *= 2
    return prefixes


class GraphLoop:
    """Drives loops over captured steps: a state per (bucket, settings), a step per graph key."""

    def __init__(
        self,
        pipeline: RealCustomPipeline,
        capture: WarmupCapture,
        compile_backend: str | None = None,
        compile_mode: str | None = None,
        calls_factory: CallsFactory | None = None,
        state_dtype: torch.dtype | None = None,
        partial_guidance: bool = False,
        partial_uncond: bool = False,
    ):
        self.pipeline = pipeline
        # Also capture MASK_UPDATE steps whose guidance pass covers only the first 1, 2, 4 ... rows
        # (step-level batching keeps rows in their mask-update phase first). More graphs per
        # bucket; the UNet calls must accept fewer guidance rows (torch modules do).
        self.partial_guidance = partial_guidance
        # Also capture steps whose generation pass runs the unconditional half on the first 0, 1,
        # 2, 4 ... rows only (CFG-free rows need none; rows with CFG are kept first). More graphs
        # per bucket; the UNet calls must accept fewer generation rows (torch modules do; TensorRT
        # engines are built for 2B rows).
        self.partial_uncond = partial_uncond
        self.state_dtype = state_dtype  # None: the model's dtype (TensorRT engines want fp32)
        self.capture_strategy = capture
        self.compile_backend = compile_backend
        self.compile_mode = compile_mode
        # How the UNet roles run inside a step (torch modules unless a backend says otherwise).
        self.calls_factory = calls_factory or (lambda state, bucket: TorchUNetCalls(pipeline.unet))
        self.states: dict[tuple[Bucket, GraphSettings], LoopState] = {}
        self.steps: dict[GraphKey, StepFn] = {}
        self.buckets: list[Bucket] = []
        self.stats: Counter[str] = Counter()

    # ---- preparation ----------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, buckets: Sequence[Bucket], graph_settings: Sequence[GraphSettings]) -> None:
        """Allocate, compile and capture every (bucket, settings, kind); log what it cost."""
        for bucket in buckets:
            if bucket not in self.buckets:
                self.buckets.append(bucket)
            for settings in graph_settings:
                if not settings.capturable:
                    logger.warning("%s cannot be captured (scheduler); its loops run eagerly", settings)
                    continue
                state = self.states.get((bucket, settings))
                if state is None:
                    state = bucket_state(self.pipeline, bucket, settings, self.state_dtype)
                    self.states[bucket, settings] = state
                calls = self.calls_factory(state, bucket)
                for kind, guidance_rows, uncond_rows in self._variants(bucket):
                    key = GraphKey.of(kind, bucket, settings, guidance_rows, uncond_rows)
                    if key in self.steps:
                        continue
                    started = time.perf_counter()

                    def step(
                        calls=calls,
                        state=state,
                        kind=kind,
                        mask=settings.mask,
                        rows=guidance_rows,
                        uncond=uncond_rows,
                    ) -> None:
                        denoise_step(calls, state, kind, mask, guidance_rows=rows or None, uncond_rows=uncond)

                    def reset(state: LoopState = state) -> None:
                        state.latents.normal_()
                        state.step.zero_()
                        state.schedule.load(2)

                    fn = compile_step(step, self.compile_backend, self.compile_mode)
                    self.steps[key] = self.capture_strategy.capture(fn, reset)
                    self.stats["graphs_captured"] += 1
                    logger.info("captured %s in %.1f s", key, time.perf_counter() - started)

    def _variants(self, bucket: Bucket) -> list[tuple[StepKind, int, int | None]]:
        """(kind, guidance rows: 0 = all, unconditional rows: None = all) of every step captured
        for `bucket`."""
        variants = [(kind, 0) for kind in StepKind]
        if self.partial_guidance:
            variants += [(StepKind.MASK_UPDATE, rows) for rows in _powers_below(bucket.batch)]
        uncond = [None] + ([0, *_powers_below(bucket.batch)] if self.partial_uncond else [])
        return [(kind, guidance, rows) for rows in uncond for kind, guidance in variants]

    # ---- the loop ------------------------------------------------------------------------

    @torch.no_grad()
    def denoise(
        self,
        cond: Conditioning,
        latents: torch.Tensor,
        settings: LoopSettings,
        on_step: Callable[[], None] | None = None,
    ) -> LoopResult:
        """One loop; `on_step` is called on the host after each step is issued (a replay is
        asynchronous on a GPU: a hung kernel shows as the host blocking at the loop's end)."""
        graph_settings = GraphSettings.of(settings)
        if not graph_settings.capturable:
            self.stats["eager_loops"] += 1
            return denoise(self.pipeline.unet, cond, latents, settings, on_step=on_step)
        batch, subjects = cond.batch_size, cond.image_tokens.shape[1]
        factor = 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)
        height, width = latents.shape[-2] * factor, latents.shape[-1] * factor
        bucket = pick_bucket(self.buckets, batch, subjects, height, width)
        state = self.states.get((bucket, graph_settings)) if bucket is not None else None
        if state is None:
            # Not prepared: the same step, run uncaptured on a state of this exact shape.
            bucket = Bucket(batch, height, width, subjects)
            state = bucket_state(self.pipeline, bucket, graph_settings)
            captured, calls = False, TorchUNetCalls(self.pipeline.unet)
        else:
            captured, calls = True, None
        state.schedule.load(settings.num_inference_steps, **settings.schedule_options)
        state.load(self.pipeline.unet, cond, latents, settings.mask_reused_step, state.schedule)

        kinds = step_kinds(settings.num_inference_steps, settings.mask_reused_step)
        history = torch.empty(len(kinds), *state.masks.shape, dtype=state.masks.dtype, device=latents.device)
        for k, kind in enumerate(kinds):
            if captured:
                self.stats["graph_replays"] += 1
                self.steps[GraphKey.of(kind, bucket, graph_settings)]()
            else:
                self.stats["graph_misses"] += 1
                denoise_step(calls, state, kind, graph_settings.mask)
            history[k].copy_(state.masks)
            if on_step is not None:
                on_step()
        return LoopResult(state.x0[:batch].clone(), history[:, :batch, :subjects].clone())
