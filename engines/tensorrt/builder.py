"""Build a TensorRT engine from an exported ONNX graph (TensorRT 10 Python API, lazily imported).

Static shapes: the ONNX graphs have fixed dimensions, and the optimisation profile pins every
input to min = opt = max = its exported shape. A timing cache shared by all builds of one cache
root makes rebuilds (other buckets, the same layers) fast. Never run here: no TensorRT, no GPU.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from engines.tensorrt.cache import BuildSettings, EngineCache, atomic_write, engine_key, onnx_digest

logger = logging.getLogger(__name__)


def _trt():
    import tensorrt as trt  # lazy: not installable on the development machines

    return trt


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"


def build_engine(onnx_path: Path, settings: BuildSettings, timing_cache_path: Path | None = None) -> bytes:
    """Parse the ONNX graph and return the serialized engine (raises with the parser's errors)."""
    trt = _trt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the graph
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.builder_optimization_level
    if settings.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif settings.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)

    shapes = dict(settings.shapes)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(shapes.get(tensor.name, tuple(tensor.shape)))
        if any(dim < 0 for dim in shape):
            raise ValueError(f"input {tensor.name} has a dynamic shape {shape}; export static graphs")
        profile.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(profile)

    timing = b""
    if timing_cache_path is not None and Path(timing_cache_path).is_file():
        timing = Path(timing_cache_path).read_bytes()
    cache = config.create_timing_cache(timing)
    config.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path}")
    logger.info(
        "built %s (%s) in %.0f s", Path(onnx_path).name, settings.precision, time.perf_counter() - started
    )
    if timing_cache_path is not None:
        Path(timing_cache_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(timing_cache_path), bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def cached_engine(onnx_path: Path, settings: BuildSettings, cache: EngineCache) -> Path:
    """The engine for (graph, settings, this GPU, this TensorRT): from the cache, else built."""
    trt = _trt()
    digest = onnx_digest(onnx_path)
    key = engine_key(digest, settings, gpu_name(), trt.__version__)
    hit = cache.lookup(key)
    if hit is not None:
        return hit
    plan = build_engine(onnx_path, settings, cache.timing_cache_path)
    meta = {
        "onnx": str(onnx_path),
        "onnx_sha256": digest,
        "settings": json.loads(settings.canonical()),
        "gpu": gpu_name(),
        "tensorrt": trt.__version__,
    }
    return cache.store(key, plan, meta)
