"""The `tensorrt` backend: the static-buffer loop of engines/static_loop.py with the two UNet
roles run by TensorRT engines, each step captured as a CUDA graph around the engine launches.

Per bucket at warm-up: export the guidance and generation ("kv") graphs (engines/onnx_export.py),
build or load their engines from the cache (engines/tensorrt/builder.py), bind them to the
bucket's static buffers, and capture MASK_UPDATE / MASK_REUSE steps. Mask generation, CFG and
the scheduler stay in torch (inside the same CUDA graph); the image K/V are computed once per
request in torch. Loops without an engine for their shape run the torch step functions eagerly,
counted in `stats` like the compiled backend's misses.

Written against TensorRT 10's documented Python API; it has never run (no TensorRT and no GPU on
the machines this was developed on). Its capability check says so at selection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from engines.compiled import CudaGraphCapture, GraphBackend, GraphCache
from engines.static_loop import Bucket, Program, StaticBuffers, StepKind, finish_step
from engines.tensorrt import tensorrt_unavailable_reason
from engines.tensorrt.cache import BuildSettings, EngineCache
from realcustom.masks import generate_masks
from realcustom.pipeline import RealCustomPipeline

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path("artifacts/engines")


class TensorRTBackend(GraphBackend):
    name = "tensorrt"

    @staticmethod
    def unavailable_reason(pipeline: RealCustomPipeline) -> str | None:
        reason = tensorrt_unavailable_reason()
        if reason is None and pipeline.device.type != "cuda":
            reason = f"the model is on {pipeline.device}, not on a CUDA device"
        return reason

    def __init__(
        self,
        pipeline: RealCustomPipeline,
        buckets: Sequence[Bucket] | None = None,
        programs: Sequence[Program] | None = None,
        cache_dir: Path = DEFAULT_CACHE,
        model_id: str | None = None,
        precision: str | None = None,
    ):
        self._configure(pipeline, buckets, programs)
        self.cache_dir = Path(cache_dir)
        self.model_id = model_id or pipeline.name
        self.precision = precision or {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            pipeline.dtype, "fp32"
        )
        self.engines: dict[Bucket, dict[str, object]] = {}
        self._scratch: dict[int, dict[str, torch.Tensor]] = {}
        self.graphs = GraphCache(pipeline, CudaGraphCapture(), step_factory=self._make_step)

    # ---- engines ---------------------------------------------------------------------------

    def _load_engines(self, bucket: Bucket) -> dict[str, object]:
        from engines.onnx_export import export_all
        from engines.tensorrt.builder import cached_engine
        from engines.tensorrt.runtime import TensorRTEngine

        if bucket not in self.engines:
            export = export_all(self.pipeline, self.model_id, [bucket], self.cache_dir / "onnx")
            cache = EngineCache(self.cache_dir / "trt")
            loaded = {}
            for role, stem in (("guidance", f"guidance-{bucket}"), ("generation", f"generation-kv-{bucket}")):
                settings = BuildSettings(precision=self.precision)
                plan = cached_engine(export / f"{stem}.onnx", settings, cache)
                loaded[role] = TensorRTEngine(plan, self.pipeline.device)
            self.engines[bucket] = loaded
        return self.engines[bucket]

    def _make_step(self, buffers: StaticBuffers, kind: StepKind):
        engines = self._load_engines(buffers.bucket)
        batch = buffers.batch
        if id(buffers) not in self._scratch:
            self._scratch[id(buffers)] = {
                "latents2": torch.empty(
                    2 * batch,
                    *buffers.latents.shape[1:],
                    dtype=buffers.latents.dtype,
                    device=buffers.latents.device,
                ),
                "timestep": torch.empty(batch, dtype=torch.float32, device=buffers.latents.device),
                "timestep2": torch.empty(2 * batch, dtype=torch.float32, device=buffers.latents.device),
                "masks2": torch.empty(
                    2 * batch,
                    *buffers.masks.shape[1:],
                    dtype=buffers.latents.dtype,
                    device=buffers.latents.device,
                ),
            }
        scratch = self._scratch[id(buffers)]
        sdxl = buffers.pooled is not None
        guidance_feeds = {
            "latents": buffers.latents,
            "timestep": scratch["timestep"],
            "text": buffers.half(buffers.text),
            "target_tokens": buffers.target_tokens,
        }
        generation_feeds = {
            "latents": scratch["latents2"],
            "timestep": scratch["timestep2"],
            "text": buffers.text,
            "masks": scratch["masks2"],
        }
        if sdxl:
            guidance_feeds.update(
                pooled=buffers.half(buffers.pooled), time_ids=buffers.half(buffers.time_ids)
            )
            generation_feeds.update(pooled=buffers.pooled, time_ids=buffers.time_ids)
        for layer, (key, value) in enumerate(buffers.image_kv):
            generation_feeds[f"image_k_{layer:02d}"] = key
            generation_feeds[f"image_v_{layer:02d}"] = value
        guidance, generation = engines["guidance"], engines["generation"]
        guidance_out = guidance.bind(guidance_feeds)
        generation_out = generation.bind(generation_feeds)
        program = buffers.program

        def step() -> None:
            timestep = buffers.schedule.timestep(buffers.step)
            if kind is StepKind.MASK_UPDATE:
                scratch["timestep"].copy_(timestep.expand(batch))
                guidance.execute()
                maps = list(guidance_out["layer_maps"].unbind(2))
                masks, _ = generate_masks(
                    maps, buffers.mask_size, program.mask_mode, buffers.mask_scope, program.overlap
                )
                buffers.masks.copy_(masks)
            scratch["latents2"].copy_(torch.cat([buffers.latents, buffers.latents]))
            scratch["timestep2"].copy_(timestep.expand(2 * batch))
            scratch["masks2"].copy_(torch.cat([buffers.masks, buffers.masks]))
            generation.execute()
            finish_step(buffers, generation_out["eps"])

        return step
