"""`make engines`: export the ONNX graphs of a model's buckets into the artifact cache, and build
their TensorRT engines where TensorRT and a GPU exist.

    python -m engines.export --model tiny --buckets 1x128x128
    python -m engines.export --model sdxl-random --device cuda --dtype fp16 --buckets 1x1024x1024,4x1024x1024

Layout: <out>/onnx/<export key>/{projector,guidance,generation-kv}-<bucket>.onnx (+ .data files for
graphs over 2 GB) and manifest.json; <out>/trt/<engine key>/engine.plan + meta.json and
<out>/trt/timing.cache. Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from engines.onnx_export import export_all
from engines.static_loop import parse_buckets
from engines.tensorrt import tensorrt_unavailable_reason
from realcustom.loading import load_pipeline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny | sdxl-random | sd15-random | checkpoint dir")
    parser.add_argument("--buckets", default=None, help="BATCHxHEIGHTxWIDTH[sSUBJECTS],...")
    parser.add_argument("--out", type=Path, default=Path("artifacts/engines"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--precision", choices=("fp16", "bf16", "fp32"), default="fp16", help="TensorRT builder precision"
    )
    parser.add_argument("--variant", choices=("kv", "tokens"), default="kv")
    parser.add_argument("--external-data", action="store_true", help="always save weights as external data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    pipeline = load_pipeline(args.model, device=args.device, dtype=DTYPES[args.dtype])
    size = pipeline.default_size
    buckets = parse_buckets(args.buckets or f"1x{size}x{size}")
    started = time.perf_counter()
    directory = export_all(
        pipeline, args.model, buckets, args.out / "onnx", args.variant, True if args.external_data else None
    )
    summary: dict = {"onnx": str(directory), "export_s": round(time.perf_counter() - started, 1)}

    reason = tensorrt_unavailable_reason()
    if reason is None:
        from engines.tensorrt.builder import cached_engine
        from engines.tensorrt.cache import BuildSettings, EngineCache

        cache = EngineCache(args.out / "trt")
        manifest = json.loads((directory / "manifest.json").read_text())
        engines = {}
        for graph in manifest["graphs"]:
            settings = BuildSettings(precision=args.precision)
            engines[graph["stem"]] = str(cached_engine(directory / graph["file"], settings, cache))
        summary["engines"] = engines
    else:
        summary["engines"] = f"not built: {reason}"
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
