"""The `tensorrt` backend: `realcustom.step.denoise_step` with the two UNet roles run by TensorRT
engines, each step captured as a CUDA graph around the engine launches.

Per bucket at warm-up: export the guidance and generation ("kv") graphs in fp32
(engines/onnx_export.py), build or load their engines from the cache (engines/tensorrt/builder.py,
reduced precision from the builder flag), bind them to the bucket's `LoopState` (kept in fp32: the
engines' inputs and outputs are fp32) and to a few staging buffers, and capture MASK_UPDATE /
MASK_REUSE steps through the same `GraphLoop` as the compiled backend. Mask generation, CFG and the
scheduler stay in torch inside the same graph; the image K/V are computed once per request in torch.
Loops without an engine for their shape run the torch step eagerly, counted like the compiled
backend's misses.

Written against TensorRT 10's documented Python API; it has never run (no TensorRT and no GPU on
the machines this was developed on). Its capability check says so at selection. The feed layout
(`EngineFeeds`) runs on the CPU in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from engines.compiled import GraphBackend
from engines.graph_loop import CudaGraphCapture, GraphLoop, WarmupCapture
from engines.static_loop import Bucket, GraphSettings
from engines.tensorrt import tensorrt_unavailable_reason
from engines.tensorrt.cache import BuildSettings, EngineCache
from realcustom.pipeline import RealCustomPipeline
from realcustom.step import LoopState

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path("artifacts/engines")


class EngineFeeds:
    """The tensors bound to the two engines of one state: the state's own (fp32, contiguous)
    conditioning and image K/V, plus staging buffers for what changes every step (latents,
    timesteps as float32, and the doubled batch of the generation pass).

    With an adapter bank, per-row LoRA is bound too: the state's `lora_index`/`lora_scale` to the
    guidance engine, their doubled copy (staged each step) to the generation engine, and the
    bank's slot buffers themselves to both, so an adapter loaded into a free slot is used by the
    next launch (no rebuild, no refit). The slots must be fp32 (`AdapterBank(..., dtype=float32)`)."""

    def __init__(self, state: LoopState, bank=None):
        if state.dtype != torch.float32:
            raise ValueError("TensorRT engines take fp32 inputs: allocate the state in fp32")
        rows, device = state.rows, state.latents.device

        def staging(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float32, device=device)

        self.latents = staging(rows, *state.latents.shape[1:])
        self.timestep = staging(rows)
        self.latents2 = staging(2 * rows, *state.latents.shape[1:])
        self.timestep2 = staging(2 * rows)
        self.masks2 = staging(2 * rows, *state.masks.shape[1:])
        self.guidance = {
            "latents": self.latents,
            "timestep": self.timestep,
            "text": state.half(state.text),
            "target_tokens": state.target_tokens,
        }
        self.generation = {
            "latents": self.latents2,
            "timestep": self.timestep2,
            "text": state.text,
            "masks": self.masks2,
        }
        if state.pooled is not None:
            self.guidance.update(pooled=state.half(state.pooled), time_ids=state.half(state.time_ids))
            self.generation.update(pooled=state.pooled, time_ids=state.time_ids)
        for layer, (key, value) in enumerate(state.image_kv):
            self.generation[f"image_k_{layer:02d}"] = key
            self.generation[f"image_v_{layer:02d}"] = value
        self.lora_index2 = self.lora_scale2 = None
        if bank is not None:
            self._bind_adapters(state, bank)

    def _bind_adapters(self, state: LoopState, bank) -> None:
        rows, per_row = state.rows, bank.per_row
        device = state.latents.device
        self.lora_index2 = torch.zeros(2 * rows, per_row, dtype=torch.int64, device=device)
        self.lora_scale2 = torch.zeros(2 * rows, per_row, dtype=torch.float32, device=device)
        self.guidance.update(lora_index=state.lora_index, lora_scale=state.lora_scale)
        self.generation.update(lora_index=self.lora_index2, lora_scale=self.lora_scale2)
        for number, layer in enumerate(bank.layers.values()):
            if layer.lora_down.dtype != torch.float32:
                raise ValueError(
                    "TensorRT engines take fp32 LoRA slots: make the bank with dtype=torch.float32"
                )
            for feeds in (self.guidance, self.generation):
                feeds[f"lora_down_{number:03d}"] = layer.lora_down
                feeds[f"lora_up_{number:03d}"] = layer.lora_up

    def bound(self) -> dict[str, torch.Tensor]:
        """Every tensor handed to TensorRT by address (all must be contiguous)."""
        return {
            **{f"guidance.{k}": v for k, v in self.guidance.items()},
            **{f"generation.{k}": v for k, v in self.generation.items()},
        }


class Engine(Protocol):
    """What the step needs of an engine (engines/tensorrt/runtime.py::TensorRTEngine)."""

    def bind(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def execute(self) -> dict[str, torch.Tensor]: ...


class TensorRTUNetCalls:
    """The UNet roles as engine launches on bound buffers (see `realcustom.step.UNetCalls`)."""

    def __init__(self, feeds: EngineFeeds, guidance: Engine, generation: Engine):
        self.feeds = feeds
        self.guidance_engine, self.generation_engine = guidance, generation
        self.guidance_out = guidance.bind(feeds.guidance)
        self.generation_out = generation.bind(feeds.generation)

    def guidance(self, state: LoopState, latents: torch.Tensor, timestep: torch.Tensor) -> list[torch.Tensor]:
        self.feeds.latents.copy_(latents)
        self.feeds.timestep.copy_(timestep)
        self.guidance_engine.execute()
        return list(self.guidance_out["layer_maps"].unbind(2))

    def generation(
        self, state: LoopState, latents: torch.Tensor, timestep: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        if latents.shape[0] != self.feeds.latents2.shape[0]:
            raise ValueError("the generation engine is built for cond + uncond rows (2B): no CFG-free prefix")
        if self.feeds.lora_index2 is not None:
            index, scale = state.adapter_rows(state.rows, state.rows)
            self.feeds.lora_index2.copy_(index)
            self.feeds.lora_scale2.copy_(scale)
        self.feeds.latents2.copy_(latents)
        self.feeds.timestep2.copy_(timestep)
        self.feeds.masks2.copy_(masks)
        self.generation_engine.execute()
        return self.generation_out["eps"]


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
        graph_settings: Sequence[GraphSettings] | None = None,
        cache_dir: Path = DEFAULT_CACHE,
        model_id: str | None = None,
        precision: str | None = None,
        open_engine: Callable[[Path], Engine] | None = None,
        capture: WarmupCapture | None = None,
    ):
        """open_engine: ONNX graph -> engine bound by `TensorRTUNetCalls` (default: build or load the
        TensorRT engine); capture: CUDA graphs by default (tests run the same path on the CPU with
        `WarmupCapture` and onnxruntime sessions standing in for TensorRT)."""
        self._configure(pipeline, buckets, graph_settings)
        self.cache_dir = Path(cache_dir)
        self.model_id = model_id or pipeline.name
        self.precision = precision or {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            pipeline.dtype, "fp32"
        )
        self.open_engine = open_engine or self._tensorrt_engine
        self.engines: dict[Bucket, dict[str, Engine]] = {}
        self.graphs = GraphLoop(
            pipeline, capture or CudaGraphCapture(), calls_factory=self._calls, state_dtype=torch.float32
        )

    def _tensorrt_engine(self, onnx_path: Path) -> Engine:
        from engines.tensorrt.builder import cached_engine
        from engines.tensorrt.runtime import TensorRTEngine

        plan = cached_engine(
            onnx_path, BuildSettings(precision=self.precision), EngineCache(self.cache_dir / "trt")
        )
        return TensorRTEngine(plan, self.pipeline.device)

    def _load_engines(self, bucket: Bucket) -> dict[str, Engine]:
        from engines.onnx_export import export_all

        if bucket not in self.engines:
            export = export_all(self.pipeline, self.model_id, [bucket], self.cache_dir / "onnx")
            self.engines[bucket] = {
                role: self.open_engine(export / f"{stem}.onnx")
                for role, stem in (
                    ("guidance", f"guidance-{bucket}"),
                    ("generation", f"generation-kv-{bucket}"),
                )
            }
        return self.engines[bucket]

    def _calls(self, state: LoopState, bucket: Bucket) -> TensorRTUNetCalls:
        engines = self._load_engines(bucket)
        feeds = EngineFeeds(state, self.pipeline.unet.adapters)
        return TensorRTUNetCalls(feeds, engines["guidance"], engines["generation"])
