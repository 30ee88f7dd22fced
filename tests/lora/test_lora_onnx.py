"""Per-row LoRA as graph inputs: ONNX export of both UNet roles with `lora_index`, `lora_scale` and
every targeted layer's slot buffers as inputs, run in onnxruntime against eager; an adapter loaded
after export is used by the same sessions; and the `tensorrt` backend's loop (onnxruntime sessions
in TensorRT's place, engine feeds bound by address to the bank's buffers) equals the eager loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from lora_helpers import TARGETS, random_lora, save_peft, tiny_conditioning

from engines.graph_loop import WarmupCapture
from engines.onnx_export import GraphSpec, example_inputs, export_graph, graph_module
from engines.static_loop import Bucket
from engines.tensorrt.backend import TensorRTBackend
from realcustom.denoise import LoopSettings, denoise
from realcustom.lora.bank import AdapterBank
from realcustom.lora.files import load_adapter
from realcustom.lora.requests import LoRAChoice
from realcustom.models import SPECS, build_pipeline

BUCKET = Bucket(2, 64, 64)
PROMPT = "a photo of a dog on a sofa"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pipeline = build_pipeline(SPECS["tiny"]).requires_grad_(False)
    folder = tmp_path_factory.mktemp("adapters")
    files = {}
    for seed, name in enumerate(("a", "b", "c")):
        (folder / name).mkdir()
        files[name] = save_peft(folder / name, random_lora(pipeline.unet, 30 + seed, rank=4), alpha=4)
    AdapterBank(pipeline.unet, targets=TARGETS, slots=3, rank=4, per_row=2, dtype=torch.float32)
    return pipeline, files, folder


def load(pipeline, files, name):
    pipeline.unet.adapters.load(load_adapter(files[name], pipeline.unet.unet, name=name))


def session_outputs(session, names, inputs):
    wanted = {i.name for i in session.get_inputs()}
    feeds = {name: tensor.numpy() for name, tensor in zip(names, inputs, strict=True) if name in wanted}
    return session.run(None, feeds)


@pytest.mark.parametrize("graph", ["guidance", "generation"])
def test_exported_graph_takes_adapters_as_inputs_and_matches_eager(world, graph):
    pipeline, files, folder = world
    bank = pipeline.unet.adapters
    if "a" not in bank.adapters:
        load(pipeline, files, "a")
    spec = GraphSpec(graph, BUCKET)
    path = export_graph(pipeline, spec, folder / f"{graph}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names, inputs = example_inputs(pipeline, spec)
    graph_inputs = [i.name for i in session.get_inputs()]
    assert "lora_index" in graph_inputs and "lora_scale" in graph_inputs
    assert sum(name.startswith("lora_down_") for name in names) == len(TARGETS)
    if graph == "generation":
        assert graph_inputs == names
    else:  # the exporter drops the slots of layers after the last attn2 (the maps do not need them)
        assert set(graph_inputs) < set(names) and "lora_down_000" in graph_inputs
    rows = inputs[names.index("latents")].shape[0]
    module, _ = graph_module(pipeline, spec)

    def compare(choices):
        index, scale = bank.rows(choices)
        feeds = list(inputs)
        feeds[names.index("lora_index")], feeds[names.index("lora_scale")] = index, scale
        with torch.no_grad():
            expected = module(*feeds)
        (got,) = session_outputs(session, names, feeds)
        np.testing.assert_allclose(
            got, expected.numpy(), rtol=0, atol=1e-4 * max(1, float(expected.abs().max()))
        )
        return expected

    mixed = [[LoRAChoice("a", 1.0)], []] * (rows // 2)
    plain = compare([[]] * rows)
    with_a = compare(mixed)
    assert float((with_a[0] - plain[0]).abs().max()) > 1e-3  # the adapter matters in the graph
    # An adapter loaded after export: the same session, fed the bank's updated slot buffers.
    if "b" not in bank.adapters:
        load(pipeline, files, "b")
    names, inputs = example_inputs(pipeline, spec)  # the bank's buffers, now holding "b" too
    with_b = compare([[LoRAChoice("b", 0.5), LoRAChoice("a", -1.0)], []] * (rows // 2))
    assert float((with_b[0] - with_a[0]).abs().max()) > 1e-3


class OnnxRuntimeEngine:
    """onnxruntime with TensorRTEngine's bind/execute contract (as in the tensorrt-path test; the
    LoRA row index is the one int64 input)."""

    def __init__(self, path):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        self.outputs = {o.name: torch.empty(o.shape) for o in self.session.get_outputs()}

    def bind(self, feeds):
        assert set(self.inputs) <= set(feeds), sorted(set(self.inputs) - set(feeds))
        for name, shape in self.inputs.items():
            tensor = feeds[name]
            dtype = torch.int64 if name == "lora_index" else torch.float32
            assert tuple(tensor.shape) == shape and tensor.dtype == dtype and tensor.is_contiguous(), name
        self.bound = {name: feeds[name] for name in self.inputs}  # by address: read at every run
        return self.execute()

    def execute(self):
        results = self.session.run(list(self.outputs), {n: t.numpy() for n, t in self.bound.items()})
        for output, value in zip(self.outputs.values(), results, strict=True):
            output.copy_(torch.from_numpy(value))
        return self.outputs


@pytest.mark.slow
def test_tensorrt_path_binds_the_bank_and_uses_adapters_loaded_after_warmup(tmp_path):
    pipeline = build_pipeline(SPECS["tiny"]).requires_grad_(False)
    folder = tmp_path / "c"
    folder.mkdir()
    path = save_peft(folder, random_lora(pipeline.unet, 40, rank=4), alpha=4)
    AdapterBank(pipeline.unet, targets=TARGETS, slots=2, rank=4, per_row=1, dtype=torch.float32)
    backend = TensorRTBackend(
        pipeline,
        buckets=[BUCKET],
        cache_dir=tmp_path,
        open_engine=OnnxRuntimeEngine,
        capture=WarmupCapture(1),
    )
    backend.warmup()  # exported and bound with an empty bank
    pipeline.unet.adapters.load(load_adapter(path, pipeline.unet.unet, name="c"))
    index, scale = pipeline.unet.adapters.rows([[LoRAChoice("c", 0.9)], []])
    cond = dataclasses.replace(
        tiny_conditioning(pipeline, PROMPT, "dog", 3.5, 2), lora_index=index, lora_scale=scale
    )
    latents = pipeline.prepare_latents([1, 2], [1, 1], 64, 64)
    settings = LoopSettings(3, "dpm", ("max_norm",), 2)
    result = backend.denoise(pipeline, cond, latents, settings)
    assert backend.stats["graph_replays"] == 3 and backend.stats["graph_misses"] == 0
    eager = denoise(pipeline.unet, cond, latents, settings)
    without = denoise(
        pipeline.unet, dataclasses.replace(cond, lora_index=None, lora_scale=None), latents, settings
    )
    assert float((eager.latents[0] - without.latents[0]).abs().max()) > 0.05  # row 0 has the adapter
    scale = float(eager.latents.abs().max())
    torch.testing.assert_close(result.latents, eager.latents, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(result.masks, eager.masks, rtol=0, atol=1e-4)
