"""The one decoder of reference photos (realcustom/decoding.py): what it returns for every mode,
that it matches the official `Image.open(...).convert("RGB")` where it documents so, its limits at
their exact values, and that its memory stays bounded (measured in a fresh process)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from realcustom.cli import read_image
from realcustom.decoding import REFERENCE_MAX_SIDE, ImageRejectedError, decode_reference, read_plan

ROOT = Path(__file__).resolve().parents[1]


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def official(data: bytes) -> np.ndarray:
    """What the official scripts do with a file: open, convert to RGB."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP"), ("L", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG")],
)
def test_bit_exact_with_the_official_conversion_within_the_max_side(mode: str, fmt: str) -> None:
    # Longest side exactly at the bound: still untouched.
    data = encode(noise(REFERENCE_MAX_SIDE, 300).convert(mode), fmt)
    decoded = decode_reference(data)
    assert decoded.mode == "RGB" and decoded.size == (REFERENCE_MAX_SIDE, 300)
    assert np.array_equal(np.asarray(decoded), official(data))


def test_transparency_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))
    rgba.paste((0, 0, 0, 128), (32, 0, 64, 32))
    decoded = decode_reference(encode(rgba))
    assert decoded.getpixel((0, 0)) == (0, 0, 255)  # opaque kept
    assert decoded.getpixel((40, 40)) == (255, 255, 255)  # transparent red -> white, not red
    assert decoded.getpixel((40, 10)) == (127, 127, 127)  # half-transparent black over white

    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.paste(1, (0, 0, 32, 64))
    decoded = decode_reference(encode(palette))
    assert decoded.getpixel((0, 0)) == (0, 255, 0) and decoded.getpixel((40, 0)) == (255, 255, 255)

    la = decode_reference(encode(Image.new("LA", (64, 64), (10, 0))))
    assert la.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    gray16 = Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16))
    assert decode_reference(encode(gray16)).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256
    assert official(encode(gray16))[0, 0].tolist() == [255, 255, 255]  # the official path clips


@pytest.mark.parametrize(("value", "expected"), [(60000, 234), (32767, 127), (65535, 255), (383, 1)])
def test_sixteen_bit_is_divided_by_256(value: int, expected: int) -> None:
    """Values where /256 and /255 part ways (60000: 234.4 vs 235.3; 32767: 127.99 vs 128.5),
    truncated or rounded alike."""
    gray16 = Image.fromarray(np.full((64, 64), value, dtype=np.uint16))
    assert decode_reference(encode(gray16)).getpixel((0, 0)) == (expected,) * 3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(noise(96, 64), "JPEG", exif=exif, quality=95)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(decode_reference(data)), np.asarray(expected))


def test_large_images_are_reduced_like_a_full_size_composite_then_box_filter() -> None:
    """Strip-wise conversion and reduction equals converting the whole image, then reducing (with
    transparent, opaque and mixed strips)."""
    width, height = 2 * REFERENCE_MAX_SIDE + 400, 1700  # factor 2, then a box resize
    rgba = noise(width, height).convert("RGBA")
    alpha_values = np.random.default_rng(1).integers(0, 256, (height, width), dtype=np.uint8)
    alpha_values[:600] = 0  # whole strips fully transparent
    alpha_values[600:1000] = 255  # and fully opaque
    alpha = Image.fromarray(alpha_values)
    rgba.putalpha(alpha)
    data = encode(rgba)
    white = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    reference = Image.alpha_composite(white, rgba).convert("RGB").reduce(2)
    scale = REFERENCE_MAX_SIDE / max(reference.size)
    reference = reference.resize(
        (round(reference.width * scale), round(reference.height * scale)), Image.Resampling.BOX
    )
    decoded = decode_reference(data)
    assert decoded.size == (REFERENCE_MAX_SIDE, round(850 * scale))
    assert np.array_equal(np.asarray(decoded), np.asarray(reference))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_large_opaque_images_are_reduced_like_the_whole_image_box_filtered(mode: str) -> None:
    """An RGB (or L) source over 2 x max_side goes through the strips' integer reduction (factor 2
    here, several strips), then the box resize: equal to reducing the whole converted image."""
    width, height = 2 * REFERENCE_MAX_SIDE + 400, 1300
    source = noise(width, height, seed=3).convert(mode)
    reference = source.convert("RGB").reduce(2)
    scale = REFERENCE_MAX_SIDE / max(reference.size)
    reference = reference.resize(
        (round(reference.width * scale), round(reference.height * scale)), Image.Resampling.BOX
    )
    decoded = decode_reference(encode(source))
    assert decoded.size == (REFERENCE_MAX_SIDE, round(650 * scale))
    assert np.array_equal(np.asarray(decoded), np.asarray(reference))


def test_large_jpegs_decode_at_reduced_scale(dreambench_dir: Path) -> None:
    photo = Image.open(dreambench_dir / "cat.jpg").convert("RGB").resize((5632, 4224))  # 23.8 MP, 4:3
    data = encode(photo, "JPEG", quality=90)
    decoded = decode_reference(data)
    assert decoded.size == (REFERENCE_MAX_SIDE, REFERENCE_MAX_SIDE * 3 // 4)
    # Close to the full-size decode box-filtered to the same size (DCT scaling is not bit-exact).
    full = Image.open(io.BytesIO(data)).convert("RGB").resize(decoded.size, Image.Resampling.BOX)
    difference = np.abs(np.asarray(decoded, dtype=int) - np.asarray(full, dtype=int))
    assert difference.mean() < 2


def test_limits_at_their_exact_values() -> None:
    data = encode(noise(64, 50))
    assert decode_reference(data, max_pixels=64 * 50).size == (64, 50)
    with pytest.raises(ImageRejectedError, match="more than the 3199 allowed"):
        decode_reference(data, max_pixels=64 * 50 - 1)
    assert decode_reference(data, min_side=50).size == (64, 50)
    with pytest.raises(ImageRejectedError, match="at least 51"):
        decode_reference(data, min_side=51)
    assert read_plan(data).source_bytes == 64 * 50 * 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"not an image at all", "not a PNG, JPEG or WebP"),
        (encode(Image.new("RGB", (64, 64)), "GIF"), "not a PNG, JPEG or WebP"),
        (encode(noise(64, 64), "JPEG")[:300], "truncated"),
    ],
)
def test_bad_bytes_are_rejected_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(ImageRejectedError, match=message):
        decode_reference(data)


def test_the_cli_reads_with_the_same_decoder(tmp_path: Path) -> None:
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(path)
    assert read_image(str(path)).getpixel((0, 0)) == (156, 156, 156)


PEAK_SCRIPT = """
import io, json, sys
from PIL import Image
from realcustom.decoding import decode_reference
def peak_kib():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
data = open(sys.argv[1], "rb").read()
before = peak_kib()
image = decode_reference(data)
print(json.dumps({"size": image.size, "growth_mib": (peak_kib() - before) / 1024}))
"""


@pytest.mark.parametrize(
    ("mode", "source_bytes_per_pixel"),
    [("RGBA", 4), ("P", 1)],
)
def test_decoding_a_bomb_peaks_near_the_decoded_source(
    tmp_path: Path, mode: str, source_bytes_per_pixel: int
) -> None:
    """A 25 MP mostly transparent PNG (a few hundred KB): the peak grows by about the decoded
    source (100 MB RGBA, 25 MB palette), never by the full-size RGBA/RGB copies a plain
    convert-and-composite makes (+200 MB)."""
    side = 5000
    image = Image.new(mode, (side, side), 0 if mode == "P" else (255, 0, 0, 0))
    if mode == "P":
        image.putpalette([255, 0, 0] * 256)
        image.info["transparency"] = 0
    path = tmp_path / "bomb.png"
    image.save(path)
    assert path.stat().st_size < 1_000_000
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
    assert measured["size"] == [REFERENCE_MAX_SIDE, REFERENCE_MAX_SIDE]
    source_mib = side * side * source_bytes_per_pixel / 2**20
    assert measured["growth_mib"] < source_mib + 40, measured
    assert math.isfinite(measured["growth_mib"])
