"""Graph keys, buckets, the device-side scheduler tables, and the TensorRT engine cache key."""

from __future__ import annotations

import pytest
import torch

from engines.static_loop import (
    Bucket,
    DeviceSchedule,
    GraphKey,
    Program,
    StepKind,
    parse_buckets,
    pick_bucket,
    step_kinds,
)
from engines.tensorrt.cache import BuildSettings, EngineCache, engine_key, onnx_digest
from realcustom.schedulers import make_scheduler

U, R = StepKind.MASK_UPDATE, StepKind.MASK_REUSE


def test_batched_step_kinds_follow_mask_reused_step():
    assert step_kinds(5, 2) == [U, U, R, R, R]
    assert step_kinds(3, 99) == [U, U, U]
    assert step_kinds(3, 0) == [U, R, R]  # step 0 always computes a mask, as the reference does
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
    key = GraphKey.of(U, bucket, Program())
    assert key == GraphKey.of(U, Bucket(2, 64, 64), Program("dpm", ("max_norm",), "exclusive"))
    others = {
        GraphKey.of(R, bucket, Program()),
        GraphKey.of(U, Bucket(4, 64, 64), Program()),
        GraphKey.of(U, Bucket(2, 64, 96), Program()),
        GraphKey.of(U, Bucket(2, 64, 64, 2), Program()),
        GraphKey.of(U, bucket, Program("ddim")),
        GraphKey.of(U, bucket, Program(mask_mode=("min_max_norm",))),
        GraphKey.of(U, bucket, Program(overlap="sum")),
    }
    assert key not in others and len(others) == 7
    assert Program("diffusers-euler").capturable is False and Program("ddim").capturable


@pytest.mark.parametrize("name", ["dpm", "ddim"])
def test_batched_device_schedule_equals_the_reference_scheduler(name):
    """Per-step values looked up on the device from a step-index tensor, orders chosen with where."""
    steps = 7
    reference = make_scheduler(name, steps)
    schedule = DeviceSchedule(name, torch.device("cpu"), capacity=16)
    schedule.load(steps)

    class Buffers:  # the fields DeviceSchedule.step reads
        step = torch.zeros(1, dtype=torch.int64)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        anchor = torch.zeros(2, 4, 8, 8)
        anchor_x0 = torch.zeros(2, 4, 8, 8)

    sample = Buffers.latents.clone()
    generator = torch.Generator().manual_seed(1)
    for k in range(steps):
        eps = torch.randn(2, 4, 8, 8, generator=generator)
        Buffers.step.fill_(k)
        assert int(schedule.timestep(Buffers.step)) == int(reference.timesteps[k])
        expected, expected_x0 = reference.step(k, eps, sample)
        out, x0 = schedule.step(Buffers, eps)
        assert torch.equal(out, expected) and torch.equal(x0, expected_x0)
        Buffers.latents = sample = out
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
