"""ONNX export of the tiny model: onnxruntime matches eager within 1e-4; Polygraphy checks."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engines.onnx_check import check_graph, check_model, polygraphy_inspect
from engines.onnx_export import (
    GraphSpec,
    example_inputs,
    export_all,
    graph_module,
    save_with_external_data,
)
from engines.static_loop import Bucket, GraphSettings, bucket_state
from engines.tensorrt.backend import EngineFeeds
from engines.tensorrt.cache import onnx_digest
from realcustom.masks import generate_masks

BUCKET = Bucket(1, 64, 64, 2)  # two subject slots: the multi-subject map and mask paths
ATOL = 1e-4


@pytest.fixture(scope="module")
def export(tiny_pipeline, tmp_path_factory):
    directory = export_all(tiny_pipeline, "tiny", [BUCKET], tmp_path_factory.mktemp("onnx"))
    return directory, json.loads((directory / "manifest.json").read_text())


def _run(tiny_pipeline, directory, entry):
    spec = GraphSpec(entry["graph"], Bucket(**entry["bucket"]), entry["variant"])
    names, inputs = example_inputs(tiny_pipeline, spec)
    module, output_names = graph_module(tiny_pipeline, spec)
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    feeds = {name: tensor.numpy() for name, tensor in zip(names, inputs, strict=True)}
    return feeds, dict(zip(output_names, (e.numpy() for e in expected), strict=True))


def test_onnx_export_writes_every_graph_with_static_shapes(export, tiny_pipeline):
    directory, manifest = export
    stems = [g["stem"] for g in manifest["graphs"]]
    assert stems == ["projector-1x64x64", "guidance-1x64x64s2", "generation-kv-1x64x64s2"]
    generation = onnx.load(str(directory / "generation-kv-1x64x64s2.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in generation.graph.input}
    layers = tiny_pipeline.unet.num_layers
    assert len([n for n in inputs if n.startswith("image_k_")]) == layers
    assert inputs["masks"] == [2, 2, 4, 4] and inputs["latents"] == [2, 4, 8, 8]
    assert all(all(d > 0 for d in dims) for dims in inputs.values())  # static


def test_onnx_graphs_match_eager_in_onnxruntime(export, tiny_pipeline):
    directory, manifest = export
    for entry in manifest["graphs"]:
        feeds, expected = _run(tiny_pipeline, directory, entry)
        session = ort.InferenceSession(str(directory / entry["file"]), providers=["CPUExecutionProvider"])
        outputs = session.run(list(expected), feeds)
        for name, got in zip(expected, outputs, strict=True):
            assert got.shape == expected[name].shape, (entry["stem"], name)
            assert np.abs(got - expected[name]).max() <= ATOL, (entry["stem"], name)


def test_onnx_guidance_maps_give_the_eager_masks(export, tiny_pipeline):
    """Masks from the exported stacked maps equal masks from the eager per-layer maps."""
    directory, manifest = export
    entry = next(g for g in manifest["graphs"] if g["graph"] == "guidance")
    feeds, _ = _run(tiny_pipeline, directory, entry)
    session = ort.InferenceSession(str(directory / entry["file"]), providers=["CPUExecutionProvider"])
    (layer_maps,) = session.run(["layer_maps"], feeds)
    scope = torch.tensor([0.25])
    from_onnx, _ = generate_masks(list(torch.from_numpy(layer_maps).unbind(2)), (4, 4), ("max_norm",), scope)
    with torch.no_grad():
        _, maps, _ = tiny_pipeline.unet.guidance(
            *(torch.from_numpy(feeds[n]) for n in ("latents", "timestep", "text", "pooled", "time_ids")),
            target_tokens=torch.from_numpy(feeds["target_tokens"]),
        )
    eager, _ = generate_masks(maps, (4, 4), ("max_norm",), scope)
    assert torch.equal(from_onnx > 0, eager > 0)
    torch.testing.assert_close(from_onnx, eager, rtol=0, atol=ATOL)


def test_onnx_polygraphy_checks(export, tiny_pipeline):
    directory, manifest = export
    for entry in manifest["graphs"]:
        path = directory / entry["file"]
        check_model(path)
        feeds, expected = _run(tiny_pipeline, directory, entry)
        assert check_graph(path, feeds, expected, atol=ATOL), entry["stem"]
    report = polygraphy_inspect(directory / "guidance-1x64x64s2.onnx")
    assert "target_tokens" in report and "(1, 2, 77)" in report and "layer_maps" in report


def test_onnx_external_data_round_trip(export, tiny_pipeline, tmp_path):
    """Graphs over 2 GB are saved with external data: the same path, forced on the tiny graph."""
    directory, manifest = export
    entry = next(g for g in manifest["graphs"] if g["graph"] == "generation")
    target = tmp_path / "generation.onnx"
    save_with_external_data(onnx.load(str(directory / entry["file"])), target)
    data = tmp_path / "generation.data"
    assert data.is_file() and data.stat().st_size > target.stat().st_size
    feeds, expected = _run(tiny_pipeline, directory, entry)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (eps,) = session.run(["eps"], feeds)
    assert np.abs(eps - expected["eps"]).max() <= ATOL
    check_model(target)
    before = onnx_digest(target)
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    assert onnx_digest(target) != before  # the engine cache key sees the weights


def test_onnx_export_is_reused_when_complete(export, tiny_pipeline):
    directory, _ = export
    mtime = (directory / "manifest.json").stat().st_mtime_ns
    assert export_all(tiny_pipeline, "tiny", [BUCKET], directory.parent) == directory
    assert (directory / "manifest.json").stat().st_mtime_ns == mtime


def test_onnx_generation_tokens_variant_matches_eager(tiny_pipeline, tmp_path):
    """The generation graph that takes image tokens (K/V projected inside) instead of K/V."""
    from engines.onnx_export import export_graph

    spec = GraphSpec("generation", Bucket(1, 64, 64), "tokens")
    path = export_graph(tiny_pipeline, spec, tmp_path / f"{spec.stem}.onnx")
    names, inputs = example_inputs(tiny_pipeline, spec)
    assert names[-1] == "image_tokens"
    module, _ = graph_module(tiny_pipeline, spec)
    with torch.no_grad():
        expected = module(*inputs).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (eps,) = session.run(["eps"], {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    assert np.abs(eps - expected).max() <= ATOL


def test_onnx_guidance_graph_outputs_only_the_maps(export):
    """ε of the guidance pass is unused by the loop: not an output, so TensorRT can prune the tail."""
    directory, _ = export
    graph = onnx.load(str(directory / "guidance-1x64x64s2.onnx"), load_external_data=False)
    assert [output.name for output in graph.graph.output] == ["layer_maps"]


def test_onnx_bf16_pipeline_exports_fp32_graphs_that_pass_the_checker(tiny_pipeline, tmp_path):
    """A bf16 pipeline is exported from an fp32 copy (TensorRT's BF16 flag picks the precision):
    bf16 Conv nodes would fail onnx.checker at opset 17. The bf16 pipeline itself is untouched."""
    bf16 = copy.deepcopy(tiny_pipeline).to(torch.bfloat16)
    directory = export_all(bf16, "tiny-bf16", [Bucket(1, 64, 64)], tmp_path)
    assert bf16.dtype == torch.bfloat16
    for path in sorted(directory.glob("*.onnx")):
        onnx.checker.check_model(str(path), full_check=True)
        graph = onnx.load(str(path))
        types = {i.type.tensor_type.elem_type for i in [*graph.graph.input, *graph.graph.output]}
        assert types == {onnx.TensorProto.FLOAT}, path.name
        assert all(t.data_type != onnx.TensorProto.BFLOAT16 for t in graph.graph.initializer), path.name


def test_onnx_tensorrt_feeds_are_contiguous_fp32_views_of_the_state(tiny_pipeline):
    """Every buffer bound to a TensorRT engine (by address) is contiguous fp32 and, for the
    conditioning and image K/V, is the state's own storage (no per-step copy)."""
    state = bucket_state(tiny_pipeline, Bucket(2, 64, 64, 2), GraphSettings(), torch.float32)
    feeds = EngineFeeds(state)
    bound = feeds.bound()
    assert len(bound) == 4 + 4 + 2 + 2 + 2 * tiny_pipeline.unet.num_layers  # + pooled/time_ids (SDXL)
    for name, tensor in bound.items():
        assert tensor.is_contiguous() and tensor.dtype == torch.float32, name
    assert feeds.generation["image_k_00"].data_ptr() == state.image_kv[0][0].data_ptr()
    assert feeds.guidance["text"].data_ptr() == state.text.data_ptr()
    with pytest.raises(ValueError, match="fp32"):
        EngineFeeds(bucket_state(tiny_pipeline, Bucket(1, 64, 64), GraphSettings(), torch.bfloat16))
