"""Images whose cost is not their size (realcustom/image_structure.py, realcustom/decoding.py):
every hostile class is refused from its structure before any decoder runs, quickly and without
memory; every bound at its exact value; the plan's memory is what the decode really takes
(measured in a fresh process); the structure agrees with Pillow on size, mode and DCT scaling; and
every format but PNG, JPEG and WebP is refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hostile_images import (
    SOI,
    animated_webp,
    apng,
    build_png,
    encode,
    huffman_table_of_one,
    jpeg_frame,
    jpeg_scan,
    jpeg_segment,
    jpeg_with_segments,
    png_flood,
    png_split_idat,
    progressive_jpeg,
    riff_chunks,
    truncated_progressive_jpeg,
    webp,
)
from PIL import Image

from realcustom.decoding import (
    DecodeBounds,
    ImageRejectedError,
    ImageTooComplexError,
    decode_reference,
    plan_decode,
    read_plan,
)
from realcustom.image_structure import JPEG_MAX_HEADER_JUNK, read_structure

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
DEFAULTS = DecodeBounds()


def photo(width: int, height: int) -> Image.Image:
    cat = Image.open(ROOT / "examples" / "dreambench" / "cat.jpg").convert("RGB")
    return cat.resize((width, height))


def refused_quickly(data: bytes, match: str, bounds: DecodeBounds = DEFAULTS) -> ImageRejectedError:
    """Refused before decoding: in milliseconds, whatever the file would cost a decoder."""
    started = time.perf_counter()
    with pytest.raises(ImageRejectedError, match=match) as caught:
        decode_reference(data, bounds=bounds)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.25, f"refusing took {elapsed * 1000:.0f} ms"
    return caught.value


# --- each hostile class, refused ---------------------------------------------------------------


def test_thousands_of_progressive_scans_are_refused_before_decoding() -> None:
    """25 MP grayscale, 3000 empty scans: ~100 KB that libjpeg walks 3000 times over 390k blocks
    (seconds to minutes of CPU)."""
    data = progressive_jpeg(5000, 5000, scans=3000)
    assert len(data) < 150_000
    error = refused_quickly(data, "more than 64 scans")
    assert isinstance(error, ImageTooComplexError) and error.code == "image_too_complex"


def test_scans_at_their_exact_bound() -> None:
    at_bound = progressive_jpeg(64, 64, scans=DEFAULTS.max_jpeg_scans, components=3, dc=True)
    assert decode_reference(at_bound).size == (64, 64)
    assert read_plan(at_bound).structure.scans == DEFAULTS.max_jpeg_scans
    refused_quickly(progressive_jpeg(64, 64, scans=DEFAULTS.max_jpeg_scans + 1), "more than 64 scans")


def test_what_real_encoders_write_is_far_below_the_scan_bound() -> None:
    """libjpeg's standard progression (Pillow's progressive=True): 6 scans grey, 10 YCbCr, 18 CMYK."""
    scans = {
        mode: read_plan(encode(photo(256, 192).convert(mode), "JPEG", progressive=True)).structure.scans
        for mode in ("L", "RGB", "CMYK")
    }
    assert scans == {"L": 6, "RGB": 10, "CMYK": 18}
    assert max(scans.values()) * 3 < DEFAULTS.max_jpeg_scans


def test_a_tiny_progressive_cmyk_jpeg_of_25_mp_is_refused_by_its_coefficient_buffer() -> None:
    """~300 bytes that make libjpeg allocate and zero 4 x 2 bytes per pixel (200 MB) whatever
    `draft` asks; the same with the data cut short."""
    data = progressive_jpeg(5000, 5000, scans=4, components=4)
    assert len(data) < 400
    plan = read_plan(data, bounds=DecodeBounds(max_bytes=1 << 40))
    assert plan.decoder_bytes >= 5000 * 5000 * 4 * 2
    refused_quickly(data, r"progressive JPEG with 4 components would take 2\d\d MiB")
    refused_quickly(truncated_progressive_jpeg(5000, 5000), "would take")
    # A baseline (single-scan) JPEG of the same size is decoded at 1/2 scale without that buffer.
    header = SOI + jpeg_frame(0xC0, 5000, 5000, 4) + jpeg_scan([1, 2, 3, 4], 0, 63)
    baseline = read_plan(header, bounds=DecodeBounds(max_bytes=1 << 40))
    assert baseline.decoder_bytes < 2 * MIB and baseline.decoded == (2500, 2500)


def test_a_sequential_jpeg_with_one_component_per_scan_counts_its_coefficient_buffer() -> None:
    """Non-interleaved sequential files buffer every coefficient too (libjpeg: multiple scans)."""
    head = SOI + jpeg_frame(0xC0, 4000, 4000, 3)
    one_per_scan = read_plan(head + jpeg_scan([1], 0, 63), bounds=DecodeBounds(max_bytes=1 << 40))
    interleaved = read_plan(head + jpeg_scan([1, 2, 3], 0, 63), bounds=DecodeBounds(max_bytes=1 << 40))
    assert one_per_scan.structure.full_coefficient_buffer
    assert not interleaved.structure.full_coefficient_buffer
    assert one_per_scan.decoder_bytes - interleaved.decoder_bytes == 4000 * 4000 * 3 * 2


def test_a_million_png_chunks_are_refused_after_a_few_hundred() -> None:
    """12 MiB of empty ancillary chunks before IDAT (Pillow reads each in Python: seconds), after
    the last IDAT (read by Pillow's load_end), or empty IDAT chunks between the image data."""
    small = Image.new("RGB", (64, 64), (10, 20, 30))
    before = png_flood(small, 1_000_000)
    assert len(before) > 12_000_000
    error = refused_quickly(before, "more than 256 metadata chunks")
    assert error.code == "image_too_complex"
    refused_quickly(png_flood(small, 1_000_000, after_idat=True), "more than 256 metadata chunks")
    refused_quickly(png_flood(small, 1_000_000, kind=b"tEXt", data=b"k\0v"), "more than 256 metadata chunks")
    empty_idats = png_split_idat(photo(512, 512), 0)
    refused_quickly(empty_idats, "more than 32 chunks", replace(DEFAULTS, max_chunks=32))
    refused_quickly(png_split_idat(photo(512, 512), 1), "more than 8192 chunks")


def test_one_icc_profile_at_most_in_a_png() -> None:
    """Pillow inflates every iCCP chunk (up to 1 MB each): 256 of 1 KB took 0.5 s of CPU."""
    profile = b"icc\0\0" + zlib.compress(bytes(1_000_000), 9)
    small = Image.new("RGB", (64, 64), (10, 20, 30))
    assert decode_reference(png_flood(small, 1, kind=b"iCCP", data=profile)).size == (64, 64)
    refused_quickly(png_flood(small, 256, kind=b"iCCP", data=profile), "several ICC profiles")


def test_truncated_structures_are_refused_not_crashed() -> None:
    """Every prefix of real files of each format: a clear refusal or a decode, never another error."""
    files = [
        encode(photo(64, 48), "JPEG", progressive=True),
        encode(photo(64, 48).convert("RGBA"), "PNG"),
        apng(64, 48, 2),
        encode(photo(64, 48), "WEBP"),
        animated_webp(64, 48, 2),
    ]
    for data in files:
        for end in range(0, len(data), max(1, len(data) // 200)):
            with contextlib.suppress(ImageRejectedError):
                decode_reference(data[:end])


def test_chunk_and_metadata_bounds_at_their_exact_values() -> None:
    small = Image.new("RGB", (64, 64), (10, 20, 30))
    at_bound = png_flood(small, DEFAULTS.max_metadata_chunks)
    assert read_plan(at_bound).structure.metadata_chunks == DEFAULTS.max_metadata_chunks
    assert decode_reference(at_bound).size == (64, 64)
    refused_quickly(png_flood(small, DEFAULTS.max_metadata_chunks + 1), "more than 256 metadata chunks")
    # Bytes: one chunk of exactly the bound's length passes, one byte more does not.
    bounds = replace(DEFAULTS, max_metadata_bytes=100_000)
    assert read_plan(png_flood(small, 1, data=bytes(100_000)), bounds=bounds)
    refused_quickly(png_flood(small, 1, data=bytes(100_001)), "more than 100000 bytes of metadata", bounds)
    # Chunks: the plain PNG has IHDR, IDAT, IEND.
    plain = encode(small, "PNG")
    assert read_plan(plain, bounds=replace(DEFAULTS, max_chunks=3)).structure.chunks == 3
    refused_quickly(plain, "more than 2 chunks", replace(DEFAULTS, max_chunks=2))


def test_jpeg_segment_floods_and_junk_are_refused() -> None:
    jpeg = encode(photo(128, 96), "JPEG")
    refused_quickly(jpeg_with_segments(jpeg, 100_000), "more than 256 metadata marker segments")
    refused_quickly(jpeg_with_segments(jpeg, 9000, 0xDB, b"\x00" + b"\x01" * 64), "more than 8192 marker")
    photoshop = b"Photoshop 3.0\x00" + (b"8BIM\x04\x04\x00\x00" + bytes(4)) * 5000
    refused_quickly(jpeg_with_segments(jpeg, 100, 0xED, photoshop), "more than 4194304 bytes of metadata")
    segment_end = 4 + struct.unpack_from(">H", jpeg, 4)[0]
    junk = jpeg[:segment_end] + bytes(JPEG_MAX_HEADER_JUNK + 1) + jpeg[segment_end:]
    refused_quickly(junk, "stray bytes")
    some_junk = jpeg[:segment_end] + bytes(1000) + jpeg[segment_end:]
    assert decode_reference(some_junk).size == (128, 96)  # libjpeg and Pillow skip it, as we do


def test_animations_are_bounded_by_frames_and_canvas() -> None:
    """Only the first frame is decoded; frames are counted and the canvas priced (libwebp keeps
    two RGBA canvases: 16 bytes per pixel), before libwebp or Pillow sees the file."""
    assert decode_reference(apng(64, 48, 3)).size == (64, 48)
    assert read_plan(apng(64, 48, 3)).structure.frames == 3
    refused_quickly(apng(64, 48, 2, declared=1001), "1001 frames")
    refused_quickly(apng(64, 48, 1001, declared=1), "1001 frames")
    assert decode_reference(animated_webp(64, 48, 5)).size == (64, 48)
    refused_quickly(animated_webp(64, 48, 1001), "1001 frames")
    canvas_bomb = animated_webp(5000, 5000, 2)
    assert len(canvas_bomb) < 1000
    refused_quickly(canvas_bomb, r"5000x5000 WebP .* would take 381 MiB")
    # A still WebP at the same size too: Pillow decodes every WebP through the animation decoder.
    refused_quickly(encode(Image.new("RGB", (5000, 5000)), "WEBP", lossless=True), "would take")


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("GIF", {}),
        ("TIFF", {}),
        ("BMP", {}),
        ("ICO", {}),
        ("PPM", {}),
        ("TGA", {}),
        ("QOI", {}),
        ("JPEG2000", {}),
        ("PCX", {}),
        ("SGI", {}),
        ("DDS", {}),
    ],
)
def test_every_other_format_pillow_reads_is_refused(fmt: str, params: dict) -> None:
    try:
        data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), fmt, **params)
    except (KeyError, OSError) as error:  # no encoder in this Pillow build
        pytest.fail(f"cannot write {fmt}: {error}")
    with pytest.raises(ImageRejectedError, match="not a PNG, JPEG or WebP"):
        decode_reference(data)


@pytest.mark.parametrize(
    ("sof", "precision", "message"),
    [
        (0xC3, 8, "lossless, hierarchical or arithmetic"),
        (0xC9, 8, "lossless, hierarchical or arithmetic"),
        (0xCA, 8, "lossless, hierarchical or arithmetic"),
        (0xC5, 8, "lossless, hierarchical or arithmetic"),
        (0xC1, 12, "12-bit samples"),
    ],
)
def test_jpeg_variants_beyond_baseline_and_progressive_are_refused(
    sof: int, precision: int, message: str
) -> None:
    frame = jpeg_segment(sof, struct.pack(">BHHB", precision, 64, 64, 1) + b"\x01\x11\x00")
    with pytest.raises(ImageRejectedError, match=message):
        read_structure(SOI + frame + jpeg_segment(0xC4, huffman_table_of_one(0, 0)), DEFAULTS)


def test_two_components_or_two_frames_are_refused() -> None:
    two = jpeg_segment(0xC0, struct.pack(">BHHB", 8, 64, 64, 2) + b"\x01\x11\x00\x02\x11\x00")
    with pytest.raises(ImageRejectedError, match="2 components"):
        read_structure(SOI + two, DEFAULTS)
    with pytest.raises(ImageRejectedError, match="two frame headers"):
        read_structure(SOI + jpeg_frame(0xC0, 64, 64, 1) + jpeg_frame(0xC2, 64, 64, 1), DEFAULTS)


def test_a_webp_or_png_lying_about_its_size_is_refused() -> None:
    """The structure's size is the one Pillow must see, else the plan would not hold."""
    still = encode(Image.new("RGB", (64, 48), (1, 2, 3)), "WEBP", lossless=True)
    chunks = riff_chunks(still)
    header = bytes([0x00, 0, 0, 0]) + (63).to_bytes(3, "little") + (4999).to_bytes(3, "little")
    lying = webp([(b"VP8X", header), *chunks])
    assert read_plan(lying).structure.height == 5000
    with pytest.raises(ImageRejectedError):
        decode_reference(lying)


# --- the plan agrees with Pillow and with the memory really used --------------------------------


@pytest.mark.parametrize(
    "size", [(5001, 3001), (4999, 7), (1537, 1536), (3072, 3073), (6000, 4000), (12289, 1600), (100, 9000)]
)
def test_the_planned_dct_scaling_is_pillows(size: tuple[int, int]) -> None:
    width, height = size
    data = SOI + jpeg_frame(0xC0, width, height, 3) + jpeg_scan([1, 2, 3], 0, 63)
    plan = plan_decode(read_structure(data, DEFAULTS))
    image = Image.open(io.BytesIO(data))
    if plan.draft is not None:
        image.draft(None, plan.draft)
    assert image.size == plan.decoded


@pytest.mark.parametrize(
    ("image", "fmt", "params"),
    [
        (Image.new("1", (40, 30)), "PNG", {}),
        (Image.new("L", (40, 30)), "PNG", {"bits": 4}),
        (Image.new("L", (40, 30)), "PNG", {}),
        (Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG", {}),
        (Image.new("P", (40, 30)), "PNG", {}),
        (Image.new("LA", (40, 30)), "PNG", {}),
        (Image.new("RGB", (40, 30)), "PNG", {}),
        (Image.new("RGBA", (40, 30)), "PNG", {}),
        (Image.new("L", (40, 30)), "JPEG", {}),
        (Image.new("RGB", (40, 30)), "JPEG", {"progressive": True}),
        (Image.new("CMYK", (40, 30)), "JPEG", {}),
        (Image.new("RGB", (40, 30)), "WEBP", {}),
        (Image.new("RGB", (40, 30)), "WEBP", {"lossless": True}),
        (Image.new("RGBA", (40, 30), (1, 2, 3, 4)), "WEBP", {}),
        (Image.new("RGBA", (40, 30), (1, 2, 3, 4)), "WEBP", {"lossless": True}),
    ],
)
def test_the_structure_predicts_pillows_mode_and_size(image: Image.Image, fmt: str, params: dict) -> None:
    data = encode(image, fmt, **params)
    structure = read_structure(data, DEFAULTS)
    opened = Image.open(io.BytesIO(data))
    assert (structure.format, structure.width, structure.height, structure.mode) == (
        opened.format,
        *opened.size,
        opened.mode,
    )


PEAK_SCRIPT = """
import json, sys
from PIL import Image
from realcustom.decoding import DecodeBounds, decode_reference, read_plan
import io
for fmt in ("PNG", "JPEG", "WEBP"):  # plugins and first-call allocations, as a decoder process has them
    buffer = io.BytesIO(); Image.new("RGB", (64, 48)).save(buffer, fmt); decode_reference(buffer.getvalue())
data = open(sys.argv[1], "rb").read()
bounds = DecodeBounds(max_bytes=1 << 40)
plan = read_plan(data, bounds=bounds)
def peak():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024
before = peak()
decode_reference(data, bounds=bounds)
growth = peak() - before
print(json.dumps({"planned": plan.peak_bytes, "measured": growth}))
"""

PEAK_CASES = {
    # libjpeg's coefficient buffer dominates: 4 components x 2 bytes per pixel.
    "progressive CMYK, 20 MP, 300 bytes": lambda: progressive_jpeg(5000, 4000, scans=4, components=4),
    "progressive grey, 25 MP, 64 scans": lambda: progressive_jpeg(5000, 5000, scans=64),
    "progressive 4:2:0 photo, 24 MP": lambda: encode(photo(6000, 4000), "JPEG", quality=90, progressive=True),
    "baseline photo, 24 MP (DCT scaling)": lambda: encode(photo(6000, 4000), "JPEG", quality=90),
    "animated WebP, 8 MP canvas": lambda: animated_webp(3000, 2700, 3),
    "RGBA PNG, 25 MP": lambda: encode(Image.new("RGBA", (5000, 5000), (255, 0, 0, 0)), "PNG"),
    "16-bit grey PNG, 25 MP": lambda: encode(Image.fromarray(np.full((5000, 5000), 9, np.uint16)), "PNG"),
    "RGB PNG within 2 x 1536 (resize only)": lambda: encode(photo(3000, 2000), "PNG"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PEAK_CASES))
def test_the_planned_memory_is_what_the_decode_takes(tmp_path: Path, case: str) -> None:
    """Measured peak growth (fresh process, plugins loaded) within [75% of the plan, plan + 8 MiB]:
    the plan neither misses a buffer nor refuses images for memory they do not take."""
    path = tmp_path / "image"
    path.write_bytes(PEAK_CASES[case]())
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured = json.loads(result.stdout)
    planned, growth = measured["planned"], measured["measured"]
    assert 0.75 * planned <= growth <= planned + 8 * MIB, (
        f"planned {planned / MIB:.0f} MiB, measured {growth / MIB:.0f} MiB"
    )


def test_the_default_budget_takes_real_photos_and_refuses_bombs() -> None:
    """Within the default 160 MiB: a 25 MP RGBA PNG and a 24 MP progressive 4:2:0 photo. Past it:
    a 25 MP progressive CMYK JPEG and a WebP canvas over ~9.5 MP."""
    accepted = {
        "25 MP RGBA PNG": build_png([(b"IHDR", struct.pack(">IIBBBBB", 5000, 5000, 8, 6, 0, 0, 0))]),
        "24 MP progressive 4:2:0": SOI
        + jpeg_frame(0xC2, 6000, 4000, 3, sampling=0x22)
        + jpeg_scan([1, 2, 3], 0, 0),
        "9 MP WebP": webp([(b"VP8X", bytes(4) + (2999).to_bytes(3, "little") * 2)]),
    }
    for name, data in accepted.items():
        assert read_plan(data).peak_bytes <= DEFAULTS.max_bytes, name
    refused = {
        "25 MP progressive CMYK": SOI + jpeg_frame(0xC2, 5000, 5000, 4) + jpeg_scan([1, 2, 3, 4], 0, 0),
        "10 MP WebP": webp([(b"VP8X", bytes(4) + (3199).to_bytes(3, "little") * 2)]),
    }
    for name, data in refused.items():
        with pytest.raises(ImageTooComplexError, match="would take"):
            read_plan(data)
        assert read_plan(data, bounds=DecodeBounds(max_bytes=1 << 40)).peak_bytes > DEFAULTS.max_bytes, name


def test_a_multi_picture_jpeg_is_its_first_picture_and_its_pictures_are_counted() -> None:
    """MPO (Pillow opens JPEGs with an MP index as such): the walk stops at the first picture's
    EOI, the decoder reads only that picture, and the pictures count as frames."""
    buffer = io.BytesIO()
    first, second = Image.new("RGB", (64, 48), (200, 0, 0)), Image.new("RGB", (64, 48), (0, 200, 0))
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert read_plan(data).structure.chunks < 20
    assert decode_reference(data).getpixel((0, 0)) == (200, 0, 0)
    refused_quickly(data, "2 frames, more than the 1 allowed", replace(DEFAULTS, max_frames=1))
