"""The `tensorrt` backend's loop on the CPU, with onnxruntime sessions in TensorRT's place.

Everything of the backend runs except TensorRT itself: the fp32 ONNX export of the bucket, the
engine feeds bound by address to the bucket's fp32 `LoopState`, `TensorRTUNetCalls` inside
`denoise_step`, the warm-up that precedes graph capture, and the replayed loop. The stand-in keeps
TensorRTEngine's contract (static tensors bound by name, checked for shape, dtype and contiguity;
outputs written into tensors allocated once), so a feed bound wrongly fails here.
"""

from __future__ import annotations

import onnxruntime as ort
import torch

from engines.graph_loop import WarmupCapture
from engines.static_loop import Bucket
from engines.tensorrt.backend import TensorRTBackend
from realcustom.denoise import LoopSettings, denoise
from realcustom.job_inputs import job_conditioning


class OnnxRuntimeEngine:
    """onnxruntime with TensorRTEngine's bind/execute contract (engines/tensorrt/runtime.py)."""

    def __init__(self, path):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        self.outputs = {o.name: torch.empty(o.shape) for o in self.session.get_outputs()}
        self.executions = 0

    def bind(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = set(self.inputs) - set(feeds)
        assert not missing, f"missing engine inputs: {sorted(missing)}"
        for name, shape in self.inputs.items():
            tensor = feeds[name]
            assert tuple(tensor.shape) == shape, (name, tuple(tensor.shape), shape)
            assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
        self.bound = {name: feeds[name] for name in self.inputs}  # by address: read at every run
        return self.execute()

    def execute(self) -> dict[str, torch.Tensor]:
        results = self.session.run(list(self.outputs), {n: t.numpy() for n, t in self.bound.items()})
        for output, value in zip(self.outputs.values(), results, strict=True):
            output.copy_(torch.from_numpy(value))
        self.executions += 1
        return self.outputs


def test_tensorrt_path_loop_with_onnxruntime_engines_matches_eager(tiny_pipeline, multi_jobs, tmp_path):
    pipeline = tiny_pipeline
    backend = TensorRTBackend(
        pipeline,
        buckets=[Bucket(4, 64, 64, 2)],
        cache_dir=tmp_path,
        open_engine=OnnxRuntimeEngine,
        capture=WarmupCapture(warmup_runs=1),
    )
    backend.warmup()
    assert backend.stats["graphs_captured"] == 2
    engines = backend.engines[Bucket(4, 64, 64, 2)]

    cond = job_conditioning(pipeline, multi_jobs)
    latents = pipeline.prepare_latents([1, 2], [1, 2], 64, 64)
    settings = LoopSettings(4, "dpm", ("max_norm",), 2)  # U, U, R, R
    before = {role: engine.executions for role, engine in engines.items()}
    result = backend.denoise(pipeline, cond, latents, settings)
    assert backend.stats["graph_replays"] == 4 and backend.stats["graph_misses"] == 0
    assert engines["guidance"].executions - before["guidance"] == 2  # mask-update steps only
    assert engines["generation"].executions - before["generation"] == 4

    eager = denoise(pipeline.unet, cond, latents, settings)
    scale = float(eager.latents.abs().max())
    torch.testing.assert_close(result.latents, eager.latents, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(result.masks, eager.masks, rtol=0, atol=1e-4)
