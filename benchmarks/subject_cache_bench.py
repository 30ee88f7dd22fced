"""The subject cache: what one reference costs encoded (SigLIP + DINOv2 on five views, then the
projector) against a cache hit, with the full-size encoders and projector (random weights built from
their real configs: SigLIP-so400m/14-384, DINOv2-L/14-reg4 at 384, the released SDXL projector).

One run each, on the CPU, through the service's own code: `RealCustomPipeline.image_tokens`' path
for the encoding, `TokenCache.inputs` (service/worker/subject_cache.py) for the hits: a device hit
(the worker's LRU) and a shared hit (another worker's tokens read from Redis and deserialised), and
what sharing them costs the worker that encoded them. Writes
benchmarks/results/subject-cache[-cuda].{json,md} (`--model tiny` writes nothing: the smoke test's mode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cpu_bench import cpu_model
from realcustom.decoding import decode_reference
from realcustom.models import SDXL, TINY
from realcustom.reference import ReferenceEncoder
from service.queue.keys import QueueKeys
from service.queue.protocol import SubjectSpec
from service.settings import Settings
from service.subjects.ids import feature_key
from service.subjects.store import RedisSubjectStore
from service.worker.subject_cache import TokenCache, to_stored

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "dreambench" / "cat.jpg"
SPECS = {"sdxl": SDXL, "tiny": TINY}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, *args):
    synchronize()
    started = time.perf_counter()
    value = function(*args)
    synchronize()
    return value, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(SPECS), default="sdxl")
    parser.add_argument("--photo", type=Path, default=PHOTO)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="`cuda` runs the encoders in bf16 on the GPU")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = SPECS[args.model]

    torch.manual_seed(0)
    (encoder, projector), build_s = timed(lambda: (ReferenceEncoder(spec.vision), spec.projector.build()))
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16  # as load_runner picks
    encoder.to(args.device, dtype).eval()
    projector.to(args.device, dtype).eval()
    image = decode_reference(args.photo.read_bytes())
    parameters = sum(p.numel() for module in (encoder, projector) for p in module.parameters())

    @torch.no_grad()
    def encode() -> torch.Tensor:  # RealCustomPipeline.image_tokens
        features = encoder(encoder.to_tensor([image]))
        parts = (features.global_tokens, features.local_tokens, features.shallow_tokens)
        return projector(*(None if part is None else part.to(dtype) for part in parts))[0]

    tokens, encode_s = timed(encode)
    print(f"encode + project: {encode_s:.2f} s -> tokens {tuple(tokens.shape)}")

    settings = Settings(redis_url=args.redis_url, queue_name=f"subject-bench-{uuid.uuid4().hex[:8]}")
    store = RedisSubjectStore(settings)
    key = feature_key(image.tobytes(), image.width, image.height, spec.name)
    subject = SubjectSpec.from_image(image, "cat", [2], shared=True)
    try:
        worker = TokenCache(4, store, spec.name)
        on_encoded = worker.inputs(subject)["on_encoded"]
        on_encoded(tokens, encode_s)
        worker._writer.shutdown(wait=True)
        _stored, serialise_s = timed(to_stored, tokens, encode_s)
        shared_ok, share_s = timed(store.put_tokens, key, _stored)
        device_hit, device_hit_s = timed(worker.inputs, subject)
        other = TokenCache(4, store, spec.name)
        shared_hit, shared_hit_s = timed(other.inputs, subject)
        assert (
            shared_ok
            and torch.equal(device_hit["tokens"], tokens)
            and torch.equal(shared_hit["tokens"], tokens)
        )
    finally:
        asyncio.run(_clean(store, settings))

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({cpu_model()}, {os.cpu_count()} CPUs, {args.threads} thread)"
        if args.device == "cpu"
        else torch.cuda.get_device_name(),
        "device": args.device,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "model": args.model,
        "encoder_projector_parameters": parameters,
        "build_s": build_s,
        "image": f"{args.photo.name} {image.width}x{image.height}",
        "tokens_shape": list(tokens.shape),
        "tokens_bytes": tokens.numel() * tokens.element_size(),
        "encode_project_s": encode_s,
        "device_hit_s": device_hit_s,
        "shared_hit_s": shared_hit_s,
        "share_serialise_s": serialise_s,
        "share_write_s": share_s,
        "speedup_device_hit": encode_s / device_hit_s,
        "speedup_shared_hit": encode_s / shared_hit_s,
    }
    print(json.dumps(result, indent=2))
    if args.model != "tiny":
        write(result, args.out / f"subject-cache{'' if args.device == 'cpu' else '-' + args.device}")
    return result


async def _clean(store: RedisSubjectStore, settings: Settings) -> None:
    """Delete every key of the bench's own queue (its name is unique to this run)."""
    await store.close()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        stale = list(client.scan_iter(match=QueueKeys(settings.queue_name).tag + ":*"))
        if stale:
            client.delete(*stale)
    finally:
        client.close()


def write(result: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    ms = 1e3
    lines = [
        f"# Subject cache ({result['date']}, {result['machine']}, torch {result['torch']})",
        "",
        f"Full-size reference encoders + projector of `{result['model']}` "
        f"({result['encoder_projector_parameters'] / 1e6:.0f} M parameters, random weights, "
        f"{result['dtype']} on {result['device']}), "
        f"one reference ({result['image']}), one run each. Tokens {tuple(result['tokens_shape'])}, "
        f"{result['tokens_bytes'] / 2**20:.1f} MiB.",
        "",
        "| per reference | time | vs encode |",
        "|---|---|---|",
        "| encode + project (SigLIP + DINOv2, 5 views, projector) | "
        f"{result['encode_project_s']:.2f} s | 1x |",
        f"| cache hit on the worker's device LRU | {result['device_hit_s'] * ms:.3f} ms | "
        f"{result['speedup_device_hit']:,.0f}x faster |",
        "| cache hit from the shared store (Redis read + deserialise) | "
        f"{result['shared_hit_s'] * ms:.1f} ms | "
        f"{result['speedup_shared_hit']:,.0f}x faster |",
        f"| sharing after a miss (serialise + Redis write, off the preparation thread) | "
        f"{(result['share_serialise_s'] + result['share_write_s']) * ms:.1f} ms | |",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
