"""What bounding the decode costs a normal upload, and what it saves on hostile ones.

On the four DreamBench photos (examples/dreambench), median of interleaved repetitions:
- `structure`: walking the file's structure and planning the decode (`realcustom.decoding.read_plan`),
  the work the header bounds add to every decode;
- `in-process`: `decode_reference` (structure walk included), as the CLI decodes;
- `decoder process`: `service.decoders.DecoderPool.decode`, as the API decodes (the upload and the
  decoded pixels cross shared memory; two process wake-ups), and its fixed part: the round trip of
  a 4-byte file refused at once.
Then, for hostile files, the time to refuse them against the time a decoder without the bounds
spends on them (bounds lifted, in-process). Writes benchmarks/results/decode_overhead.{json,md}.

    .venv/bin/python benchmarks/decode_overhead.py [--repeat 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the hostile file builders

from hostile_images import png_flood, progressive_jpeg  # noqa: E402
from PIL import Image  # noqa: E402

from realcustom.decoding import DecodeBounds, ImageRejectedError, decode_reference, read_plan  # noqa: E402
from service.decoders import DecoderPool  # noqa: E402
from service.settings import Settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PHOTOS = sorted((ROOT / "examples" / "dreambench").glob("*.jpg"))


def median_ms(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def refuse_ms(data: bytes) -> float:
    started = time.perf_counter()
    try:
        decode_reference(data)
    except ImageRejectedError:
        return (time.perf_counter() - started) * 1000
    raise AssertionError("not refused")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_overhead")
    args = parser.parse_args()
    pool = DecoderPool(Settings(decode_concurrency=1))
    rows = []
    try:
        round_trips = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            try:
                pool.decode(b"junk", "bench")
            except ImageRejectedError:
                round_trips.append((time.perf_counter() - started) * 1000)
        round_trip_ms = statistics.median(round_trips)
        for path in PHOTOS:
            data = path.read_bytes()
            pool.decode(data, "bench")  # warm: the process started, the caches filled
            decode_reference(data)
            samples: dict[str, list[float]] = {"structure": [], "in-process": [], "decoder process": []}
            for _ in range(args.repeat):  # interleaved: machine noise hits all three alike
                samples["structure"].append(median_ms(lambda data=data: read_plan(data), 1))
                samples["in-process"].append(median_ms(lambda data=data: decode_reference(data), 1))
                samples["decoder process"].append(median_ms(lambda data=data: pool.decode(data, "b"), 1))
            size = Image.open(path).size
            row = {"photo": path.name, "bytes": len(data), "size": list(size)}
            row |= {name: round(statistics.median(values), 3) for name, values in samples.items()}
            rows.append(row)
    finally:
        pool.close()
    lifted = DecodeBounds(1 << 40, max_jpeg_scans=1 << 30, max_chunks=1 << 30, max_metadata_chunks=1 << 30)
    hostile = {
        "progressive JPEG, 25 MP grey, 300 scans": progressive_jpeg(5000, 5000, scans=300),
        "PNG, 64x64 with 100k empty ancillary chunks": png_flood(Image.new("RGB", (64, 64)), 100_000),
    }
    hostile_rows = []
    for name, data in hostile.items():
        started = time.perf_counter()
        decode_reference(data, bounds=lifted)
        unbounded = (time.perf_counter() - started) * 1000
        hostile_rows.append(
            {
                "file": name,
                "bytes": len(data),
                "refused_ms": round(refuse_ms(data), 2),
                "unbounded_ms": round(unbounded),
            }
        )
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "repeat": args.repeat,
        "process_round_trip_ms": round(round_trip_ms, 3),
        "photos": rows,
        "hostile": hostile_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Decode overhead of the header bounds and the decoder processes",
        "",
        f"`benchmarks/decode_overhead.py` on {report['machine']} (shared with other jobs: compare within "
        f"a row), median of {args.repeat} interleaved runs, milliseconds.",
        "",
        "| photo | bytes | size | structure walk | in-process decode | decoder process | walk / decode "
        "| process / in-process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['photo']} | {r['bytes']} | {r['size'][0]}x{r['size'][1]} | {r['structure']:.3f} | "
            f"{r['in-process']:.2f} | {r['decoder process']:.2f} | {r['structure'] / r['in-process']:.1%} | "
            f"{r['decoder process'] / r['in-process']:.2f}x |"
        )
    lines += [
        "",
        f"Round trip through a decoder process with no decoding (a 4-byte file refused): "
        f"{round_trip_ms:.3f} ms. The rest of the process's extra time is the copies (the upload into "
        "shared memory, the pixels out of it) and, on a loaded machine, the wait of two woken processes "
        "for a CPU.",
        "",
        "Hostile files: refused from their structure, against a decode with the bounds lifted.",
        "",
        "| file | bytes | refused in ms | unbounded decode ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['file']} | {r['bytes']} | {r['refused_ms']} | {r['unbounded_ms']} |" for r in hostile_rows
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
