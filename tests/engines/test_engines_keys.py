"""Graph keys, buckets, the device-side scheduler tables, and the TensorRT engine cache key."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engines.static_loop import Bucket, GraphKey, GraphSettings, parse_buckets, pick_bucket
from engines.tensorrt.cache import BuildSettings, EngineCache, engine_key, onnx_digest
from realcustom.schedulers import make_scheduler
from realcustom.step import RowSchedule, StepKind, step_kinds

U, R = StepKind.MASK_UPDATE, StepKind.MASK_REUSE


def test_batched_step_kinds_follow_mask_reused_step():
    assert step_kinds(5, 2) == [U, U, R, R, R]
    assert step_kinds(3, 99) == [U, U, U]
    assert step_kinds(3, 0) == [U, R, R]  # step 0 always computes a mask, as the official loop does
    assert step_kinds(25, 12).count(U) == 12


def test_batched_bucket_parsing_and_choice():
    buckets = parse_buckets("4x1024x1024, 1x1024x1024,1x512x768s2")
    assert buckets == [Bucket(1, 512, 768, 2), Bucket(1, 1024, 1024), Bucket(4, 1024, 1024)]
    assert str(Bucket(1, 512, 768, 2)) == "1x512x768s2"
    assert pick_bucket(buckets, 1, 1, 1024, 1024) == Bucket(1, 1024, 1024)
    assert pick_bucket(buckets, 3, 1, 1024, 1024) == Bucket(4, 1024, 1024)  # padded to 4 rows
    assert pick_bucket(buckets, 5, 1, 1024, 1024) is None
    assert pick_bucket(buckets, 1, 2, 1024, 1024) is None  # no 2-subject bucket at this size
    assert pick_bucket(buckets, 1, 2, 512, 768) == Bucket(1, 512, 768, 2)
    assert pick_bucket(buckets, 1, 1, 768, 512) is None  # height and width are not interchangeable
    for bad in ("4x1024", "0x64x64", "1x100x64", "ax64x64"):
        with pytest.raises(ValueError):
            parse_buckets(bad)


def test_batched_graph_keys_cover_kind_shape_and_program():
    bucket = Bucket(2, 64, 64)
    key = GraphKey.of(U, bucket, GraphSettings())
    assert key == GraphKey.of(U, Bucket(2, 64, 64), GraphSettings("dpm", ("max_norm",), "exclusive"))
    others = {
        GraphKey.of(R, bucket, GraphSettings()),
        GraphKey.of(U, Bucket(4, 64, 64), GraphSettings()),
        GraphKey.of(U, Bucket(2, 64, 96), GraphSettings()),
        GraphKey.of(U, Bucket(2, 64, 64, 2), GraphSettings()),
        GraphKey.of(U, bucket, GraphSettings("ddim")),
        GraphKey.of(U, bucket, GraphSettings(mask_mode=("min_max_norm",))),
        GraphKey.of(U, bucket, GraphSettings(overlap="sum")),
    }
    assert key not in others and len(others) == 7
    assert GraphSettings("diffusers-euler").capturable is False and GraphSettings("ddim").capturable


class _Rows:
    """The fields RowSchedule reads and writes (a LoopState's sampler part)."""

    def __init__(self, rows: int, seed: int):
        self.step = torch.zeros(rows, dtype=torch.int64)
        self.latents = torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        self.x0 = torch.zeros(rows, 4, 8, 8)
        self.anchor = torch.zeros(rows, 4, 8, 8)
        self.anchor_x0 = torch.zeros(rows, 4, 8, 8)


@pytest.mark.parametrize("name", ["dpm", "ddim"])
def test_batched_row_schedule_equals_the_eager_scheduler(name):
    """Per-step values gathered on the device from per-row step indices, bit-identical to the
    sampler's own eager step, with each row at its own step of its own schedule: row 0 runs a
    7-step loop; row 1 joins two steps later with a 4-step loop."""
    schedule = RowSchedule(name, 2, torch.device("cpu"), capacity=16)
    schedule.load(7)
    state = _Rows(2, seed=0)
    eager = {0: make_scheduler(name, 7)}
    samples = {0: state.latents[:1].clone()}
    generator = torch.Generator().manual_seed(1)
    for tick in range(7):
        if tick == 2:  # row 1 joins: its own schedule, its own noise, step 0
            schedule.load(4, slice(1, 2))
            state.step[1] = 0
            state.anchor[1] = state.anchor_x0[1] = 0
            eager[1], samples[1] = make_scheduler(name, 4), state.latents[1:].clone()
        eps = torch.randn(2, 4, 8, 8, generator=generator)
        timesteps, before = schedule.timestep(state), state.step.tolist()
        schedule.update(state, eps)
        state.step.add_(1)
        for row, scheduler in eager.items():
            k = before[row]
            if k >= len(scheduler.timesteps):
                continue  # past its end: the row has left the batch
            assert int(timesteps[row]) == int(scheduler.timesteps[k])
            samples[row], x0 = scheduler.step(k, eps[row : row + 1], samples[row])
            assert torch.equal(state.latents[row : row + 1], samples[row]), (name, row, k)
            assert torch.equal(state.x0[row : row + 1], x0)
    with pytest.raises(ValueError):
        schedule.load(17)


def test_onnx_engine_cache_key(tmp_path):
    graph = tmp_path / "unet.onnx"
    graph.write_bytes(b"graph")
    settings = BuildSettings("fp16", (("latents", (2, 4, 128, 128)), ("text", (2, 77, 2048))))
    digest = onnx_digest(graph)
    key = engine_key(digest, settings, "NVIDIA H100 80GB HBM3", "10.13.0")
    assert key == engine_key(onnx_digest(graph), settings, "NVIDIA H100 80GB HBM3", "10.13.0")
    # Shape order does not matter; everything else does.
    reordered = BuildSettings("fp16", (("text", (2, 77, 2048)), ("latents", (2, 4, 128, 128))))
    assert engine_key(digest, reordered, "NVIDIA H100 80GB HBM3", "10.13.0") == key
    variants = {
        engine_key(digest, BuildSettings("bf16", settings.shapes), "NVIDIA H100 80GB HBM3", "10.13.0"),
        engine_key(digest, BuildSettings("fp16", settings.shapes[:1]), "NVIDIA H100 80GB HBM3", "10.13.0"),
        engine_key(digest, settings, "NVIDIA H200", "10.13.0"),
        engine_key(digest, settings, "NVIDIA H100 80GB HBM3", "10.14.0"),
    }
    assert key not in variants and len(variants) == 4
    # The graph's bytes and its external data are part of the key.
    (tmp_path / "unet.data").write_bytes(b"weights")
    with_data = onnx_digest(graph)
    assert with_data != digest
    (tmp_path / "unet.data").write_bytes(b"weights2")
    assert onnx_digest(graph) != with_data
    with pytest.raises(ValueError):
        BuildSettings("int4")


def test_onnx_engine_cache_store_and_lookup(tmp_path):
    cache = EngineCache(tmp_path / "trt")
    assert cache.lookup("abc") is None
    path = cache.store("abc", b"plan-bytes", {"gpu": "test"})
    assert cache.lookup("abc") == path and path.read_bytes() == b"plan-bytes"
    assert not list((tmp_path / "trt" / "abc").glob("*.tmp"))


def test_onnx_engine_cache_concurrent_stores_of_one_key(tmp_path):
    """Workers starting together on a shared volume build the same engine: every store writes its
    own temporary file, so the plan is always one whole engine and no temporary file is left."""
    cache = EngineCache(tmp_path / "trt")
    plans = [bytes([i]) * (1 << 20) * (i + 1) for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda plan: cache.store("same", plan, {"size": len(plan)}), plans))
    stored = cache.lookup("same").read_bytes()
    assert stored in plans
    assert not [p.name for p in (tmp_path / "trt" / "same").iterdir() if p.name.endswith(".tmp")]


def test_onnx_digest_is_kept_beside_the_graph_until_a_file_changes(tmp_path):
    """Workers look engines up at every start: the graph is hashed once, not at every start."""
    graph = tmp_path / "unet.onnx"
    graph.write_bytes(b"graph")
    (tmp_path / "unet.data").write_bytes(b"weights")
    digest = onnx_digest(graph)
    sidecar = tmp_path / "unet.onnx.sha256.json"
    record = json.loads(sidecar.read_text())
    assert record["sha256"] == digest
    sidecar.write_text(json.dumps({**record, "sha256": "kept"}))  # what a second start reads
    assert onnx_digest(graph) == "kept"
    (tmp_path / "unet.data").write_bytes(b"weights, re-exported")  # size and mtime change
    assert (
        onnx_digest(graph) == hashlib.sha256(b"unet.onnx\0graphunet.data\0weights, re-exported").hexdigest()
    )
    sidecar.write_text("{not json")
    assert onnx_digest(graph) != "kept"  # an unreadable sidecar is ignored
