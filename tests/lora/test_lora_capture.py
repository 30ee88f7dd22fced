"""Adapters loaded at run time are used by captured steps without recapture.

The running batch's steps are compiled with torch.compile(fullgraph=True, backend="aot_eager")
and captured with `WarmupCapture` (what CudaGraphCapture runs before recording) while the bank is
empty. Then adapters are loaded into free slots, requests with different adapters join mid-flight
and move between buckets, under `error_on_recompile`: each result equals diffusers' fused weights
run eagerly.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch._dynamo
from capture_unet import load_capture_pipeline
from lora_helpers import diffusers_fused, one_of_each_kind, random_lora, save_peft, tiny_conditioning
from torch._dynamo.utils import counters

from engines.graph_loop import GraphLoop, WarmupCapture
from engines.static_loop import Bucket, GraphSettings
from engines.step_batching import RowRequest, RunningBatch
from realcustom.denoise import LoopSettings, denoise
from realcustom.lora.bank import AdapterBank
from realcustom.lora.files import load_adapter
from realcustom.lora.requests import LoRAChoice

PROMPT = "a photo of a dog on a sofa"


@pytest.mark.slow
def test_adapters_loaded_after_capture_are_used_without_recompiling(tmp_path):
    pipeline = load_capture_pipeline()
    base = copy.deepcopy(pipeline.unet)
    targets = one_of_each_kind(base)
    files = {}
    for seed, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        files[name] = save_peft(tmp_path / name, random_lora(base, seed + 20, rank=4, targets=targets), 4)
    AdapterBank(pipeline.unet, targets="all", slots=2, rank=4, per_row=1)

    torch._dynamo.reset()
    counters.clear()
    family = [Bucket(rows, 64, 64) for rows in (1, 2)]
    graphs = GraphLoop(pipeline, WarmupCapture(warmup_runs=1), compile_backend="aot_eager")
    graphs.prepare(family, [GraphSettings()])  # the bank is empty while steps are captured
    assert graphs.stats["graphs_captured"] == 4
    assert dict(counters["graph_break"]) == {}, counters["graph_break"]
    compiled = counters["stats"]["unique_graphs"]
    batch = RunningBatch(graphs, family, GraphSettings())
    bank = pipeline.unet.adapters

    def request(key: str, seed: int, choice: LoRAChoice, steps: int) -> RowRequest:
        index, scale = bank.rows([[choice]])
        cond = dataclasses.replace(
            tiny_conditioning(pipeline, PROMPT, "dog", 3.5, 1), lora_index=index, lora_scale=scale
        )
        return RowRequest(key, cond, pipeline.prepare_latents([seed], [1], 64, 64), steps, 2)

    finished = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        bank.load(load_adapter(files["a"], pipeline.unet.unet, name="a"))
        first = request("first", 1, LoRAChoice("a", 1.0), 4)
        assert batch.join(first)
        batch.step()
        bank.load(load_adapter(files["b"], pipeline.unet.unet, name="b"))  # loaded mid-flight
        second = request("second", 2, LoRAChoice("b", 0.7), 3)
        assert batch.join(second) and batch.bucket.batch == 2
        while batch.slots:
            finished.update({done.key: done for done in batch.step()})
    assert counters["stats"]["unique_graphs"] == compiled  # nothing recompiled, nothing recaptured
    assert graphs.stats["graphs_captured"] == 4

    for row, (name, scale) in ((first, ("a", 1.0)), (second, ("b", 0.7))):
        fused = diffusers_fused(base, files[name], scale)
        cond = tiny_conditioning(pipeline, PROMPT, "dog", 3.5, 1)
        settings = LoopSettings(row.num_steps, "dpm", ("max_norm",), row.mask_reused_step)
        reference = denoise(fused, cond, row.latents, settings)
        plain = denoise(base, cond, row.latents, settings)
        assert float((reference.latents - plain.latents).abs().max()) > 0.05, "the adapter must matter"
        tolerance = 2e-5 * max(1.0, float(reference.latents.abs().max()))
        torch.testing.assert_close(finished[row.key].latents, reference.latents, rtol=0, atol=tolerance)
        torch.testing.assert_close(finished[row.key].masks, reference.masks[-1], rtol=0, atol=1e-5)
