"""The one decoder of reference photos, for every entry point (CLI, API, worker). Torch-free.

Untrusted bytes -> an upright 8-bit RGB image, with bounded memory and CPU:
- the structure is walked before any decoder sees the bytes (`realcustom.image_structure`: sizes,
  JPEG scans, chunks, frames, metadata, each bounded), and the memory the decode will take is
  computed from it (`plan_decode`, per format) and checked against `DecodeBounds.max_bytes`;
- a JPEG larger than needed is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (`draft`);
- the image is converted to RGB in horizontal strips, each reduced by an integer box filter, then
  the (under 2 x `max_side`) result is box-resized to a longest side of `max_side`: no full-size
  RGBA or RGB copy is ever made; the largest buffers are the decoded source and the decoder's own
  (JPEG coefficients, WebP canvases), both counted by the plan.

Deviations from the official code (`Image.open(path).convert("RGB")`, then the encoder's bilinear
resize to R x R), also listed in service/README.md:
1. EXIF orientation is applied (the official code ignores it, so a phone photo may lie sideways);
2. transparent pixels (RGBA, LA, palette with transparency) are composited over white (the
   official `convert("RGB")` drops alpha and keeps whatever colour hides under it);
3. 16-bit grayscale is rescaled to 8 bits (the official conversion clips it, mostly to white);
4. an image whose longest side exceeds `max_side` is first reduced to that side by box filters
   (JPEG: partly by DCT scaling); the official code resizes the full image with bilinear interpolation
   without anti-aliasing. Images within `max_side` in RGB, L or CMYK are returned exactly as the
   official conversion gives them, so the library path stays bit-exact for them.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, replace

from PIL import Image, PngImagePlugin

from realcustom.image_structure import (
    ACCEPTED,
    MIB,
    DecodeBounds,
    ImageRejectedError,
    ImageTooComplexError,
    Structure,
    check_frames,
    read_structure,
)

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
# Largest decoded source (width x height) accepted by default; a 24 MP camera photo fits.
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MIN_SIDE = 16
DEFAULT_BOUNDS = DecodeBounds()
# Longest side of a decoded reference: twice the 768 x 768 the released encoder squashes it to, so
# photos up to 1536 px (DreamBench's 1280 included) stay exactly as the official code reads them,
# and a job carries at most 7 MiB per subject.
REFERENCE_MAX_SIDE = 1536
# Pixels converted at a time (one strip): bounds the conversion buffers to a few MiB.
STRIP_PIXELS = 1 << 20
# Pillow lets the text chunks of one PNG expand to 64 MiB; reference photos need none of it.
PngImagePlugin.MAX_TEXT_MEMORY = 1 << 20

# Bytes per pixel of Pillow's storage (LA and PA take 4, like RGB).
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# libwebp's animation decoder (Pillow's only WebP path) keeps two RGBA canvases while the image
# lives, and hands Pillow a third copy (freed once decoded) for its own 4-byte image: 16 bytes per
# canvas pixel at the peak, 12 kept during conversion.
WEBP_KEPT_BYTES_PER_PIXEL = 12
WEBP_TRANSIENT_BYTES_PER_PIXEL = 4
# Live buffers per pixel of a strip while it is converted: with transparency the crop, RGBA, white,
# composite and RGB (20); 16-bit the crop, rescaled, 8-bit and RGB (12); else the crop and RGB.
STRIP_BYTES_WITH_ALPHA = 20
STRIP_BYTES_SIXTEEN_BIT = 12
# What a JPEG coefficient block takes (64 x 16-bit).
JPEG_BLOCK_BYTES = 128
# PNG raw bytes per pixel per bit of depth: the channels of each mode Pillow decodes PNGs to.
_PNG_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255, 255)
# EXIF orientation -> the transpose that makes the image upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class DecodePlan:
    """How an image will be decoded, and the memory that takes, from its structure alone."""

    structure: Structure
    draft: tuple[int, int] | None  # JPEG: the size asked of libjpeg's DCT scaling
    decoded: tuple[int, int]  # size of the decoded source
    factor: int  # integer box reduction of the strips
    source_bytes: int  # the decoded source, and what its decoder keeps while it lives (WebP)
    decoder_bytes: int  # the decoder's buffers, freed when decoding ends (JPEG coefficients)
    conversion_bytes: int  # strips, the reduced image, the resized and transposed copies

    @property
    def peak_bytes(self) -> int:
        """The source lives throughout; the decoder's buffers are gone before conversion starts."""
        return self.source_bytes + max(self.decoder_bytes, self.conversion_bytes)


def _storage(mode: str) -> int:
    return _STORAGE_BYTES.get(mode, 4)


def _strip_bytes(mode: str) -> int:
    if mode in _WITH_ALPHA or mode in ("P", "PA"):
        return STRIP_BYTES_WITH_ALPHA
    if mode in _SIXTEEN_BIT:
        return STRIP_BYTES_SIXTEEN_BIT
    return _storage(mode) + 4


def _jpeg_draft_scale(width: int, height: int, target: tuple[int, int]) -> int:
    """The scale Pillow's `JpegImageFile.draft` picks for `target` (its own rule)."""
    scale = min(width // target[0], height // target[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def _jpeg_coefficient_bytes(structure: Structure) -> int:
    """libjpeg's whole-image coefficient buffer (progressive or multi-scan files), as jdcoefct.c
    allocates it: per component, its blocks rounded up to whole MCUs, 128 bytes each, at full
    resolution whatever the output scale."""
    if not structure.full_coefficient_buffer:
        return 0
    h_max = max(h for h, _ in structure.sampling)
    v_max = max(v for _, v in structure.sampling)
    total = 0
    for h, v in structure.sampling:
        columns = -(-structure.width * h // (h_max * 8))
        rows = -(-structure.height * v // (v_max * 8))
        total += -(-columns // h) * h * -(-rows // v) * v * JPEG_BLOCK_BYTES
    return total


def plan_decode(structure: Structure, max_side: int = REFERENCE_MAX_SIDE) -> DecodePlan:
    """What `decode_reference` will do with an image of this structure, and its memory: a function
    of the header only (documented in service/README.md)."""
    width, height = structure.width, structure.height
    factor = max(1, max(width, height) // max_side)
    draft = None
    decoded = (width, height)
    if structure.format == "JPEG":
        if factor > 1:
            draft = (math.ceil(width / factor), math.ceil(height / factor))
            scale = _jpeg_draft_scale(width, height, draft)
            decoded = (-(-width // scale), -(-height // scale))
            factor = max(1, max(decoded) // max_side)
        # libjpeg's line buffers: a few rows of MCUs per component (context rows for upsampling).
        v_max = max(v for _, v in structure.sampling)
        line_buffers = width * len(structure.sampling) * 8 * v_max * 4
        source = decoded[0] * decoded[1] * _storage(structure.mode)
        decoder = _jpeg_coefficient_bytes(structure) + line_buffers
    elif structure.format == "PNG":
        row = math.ceil(width * _PNG_CHANNELS.get(structure.mode, 4) * structure.bit_depth / 8) + 1
        source, decoder = width * height * _storage(structure.mode), 2 * row
    else:
        source = width * height * WEBP_KEPT_BYTES_PER_PIXEL
        decoder = width * height * WEBP_TRANSIENT_BYTES_PER_PIXEL
    conversion = _conversion_bytes(structure.mode, decoded, factor, max_side)
    return DecodePlan(structure, draft, decoded, factor, source, decoder, conversion)


def _conversion_bytes(mode: str, size: tuple[int, int], factor: int, max_side: int) -> int:
    """Strips and the reduced image (unless an RGB source is used as is), the box resize (Pillow
    resizes rows first, into an image of the new width and the old height) and the upright copy."""
    width, height = size
    reduced = size
    total = 0
    if not (mode == "RGB" and factor == 1):
        rows = factor * max(1, STRIP_PIXELS // (width * factor))
        reduced = (-(-width // factor), -(-height // factor))
        total += min(rows, height) * width * _strip_bytes(mode) + reduced[0] * reduced[1] * 4
    final = reduced
    if max(reduced) > max_side:
        scale = max_side / max(reduced)
        final = (round(reduced[0] * scale), round(reduced[1] * scale))
        total += final[0] * reduced[1] * 4 + final[0] * final[1] * 4
    return total + final[0] * final[1] * 4


def _open(data: bytes) -> Image.Image:
    try:
        # Pillow only warns between 1x and 2x its own bomb limit; ours is explicit and checked from
        # the header before.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageRejectedError(
            f"the image expands to too many pixels ({error}); send a smaller image"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageRejectedError(f"the data is not a PNG, JPEG or WebP image; {ACCEPTED}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejectedError(f"the image could not be read ({error}); is it truncated?") from None


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageRejectedError(
            f"the image is {width}x{height} pixels, more than the {max_pixels} allowed; send a smaller image"
        )
    if min(width, height) < min_side:
        raise ImageRejectedError(
            f"the image is {width}x{height} pixels; each side must be at least {min_side}"
        )


def read_plan(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_side: int = REFERENCE_MAX_SIDE,
    bounds: DecodeBounds = DEFAULT_BOUNDS,
) -> DecodePlan:
    """The structure of `data` checked against every limit and bound, and its decode plan; decodes
    no pixel and does not call Pillow."""
    structure = read_structure(data, bounds)
    _check_size(structure.width, structure.height, max_pixels, min_side)
    plan = plan_decode(structure, max_side)
    _check_bytes(plan, bounds)
    return plan


def _check_bytes(plan: DecodePlan, bounds: DecodeBounds) -> None:
    structure = plan.structure
    if plan.peak_bytes > bounds.max_bytes:
        raise ImageTooComplexError(
            f"decoding this {structure.width}x{structure.height} {_describe(structure)} would take "
            f"{plan.peak_bytes / MIB:.0f} MiB, more than the {bounds.max_bytes / MIB:.0f} MiB allowed; "
            "send a smaller image"
        )


def _describe(structure: Structure) -> str:
    if structure.format == "JPEG":
        kind = "progressive " if structure.full_coefficient_buffer else ""
        return f"{kind}JPEG with {len(structure.sampling)} components"
    if structure.format == "WEBP":
        return "WebP (16 bytes per pixel to decode)"
    return f"{structure.mode} PNG"


def decode_reference(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_side: int = REFERENCE_MAX_SIDE,
    bounds: DecodeBounds = DEFAULT_BOUNDS,
) -> Image.Image:
    """PNG/JPEG/WebP bytes -> upright 8-bit RGB, longest side <= `max_side`, or ImageRejectedError
    (ImageTooComplexError when the structure is past one of `bounds`)."""
    plan = read_plan(data, max_pixels=max_pixels, min_side=min_side, max_side=max_side, bounds=bounds)
    structure = plan.structure
    image = _open(data)
    # Pillow must see what the plan was made for, else the plan's bound would not hold.
    if (image.format not in (structure.format, "MPO")) or image.size != (structure.width, structure.height):
        raise ImageRejectedError("the image's headers disagree with each other; is it corrupt?")
    if image.mode != structure.mode:  # e.g. a WebP whose alpha flag says otherwise: plan again
        plan = plan_decode(replace(structure, mode=image.mode), max_side)
        _check_bytes(plan, bounds)
    check_frames(getattr(image, "n_frames", 1), bounds)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
        if plan.draft is not None:
            # DCT-domain downscaling: decodes at most the size the reduction needs.
            image.draft(None, plan.draft)
        image.load()
        rgb = _to_rgb_reduced(image, plan.factor)
        if max(rgb.size) > max_side:  # the reduced image is under 2 x max_side: fit it exactly
            scale = max_side / max(rgb.size)
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BOX)
    except MemoryError:
        raise ImageTooComplexError("decoding the image ran out of memory; send a smaller image") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejectedError(f"the image could not be decoded ({error}); is it truncated?") from None
    transpose = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return rgb.transpose(transpose) if transpose is not None else rgb


def _to_rgb_reduced(image: Image.Image, factor: int) -> Image.Image:
    """Convert strip by strip (rows a multiple of `factor`), each reduced `factor` times."""
    width, height = image.size
    if image.mode == "RGB" and factor == 1:
        return image
    out = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    rows = factor * max(1, STRIP_PIXELS // (width * factor))
    for top in range(0, height, rows):
        strip = _strip_to_rgb(image.crop((0, top, width, min(top + rows, height))))
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return out


def _strip_to_rgb(strip: Image.Image) -> Image.Image:
    """Any mode -> RGB: 16-bit rescaled (not clipped), transparency over white."""
    if strip.mode in ("P", "PA"):
        strip = strip.convert("RGBA")  # applies the palette's transparency
    if strip.mode in _SIXTEEN_BIT:
        strip = strip.point(lambda value: value / 256).convert("L")
    if strip.mode in _WITH_ALPHA:
        rgba = strip.convert("RGBA")
        alpha = rgba.getextrema()[3]
        # Uniform strips (the bulk of a transparent canvas) skip the composite: same pixels, less CPU.
        if alpha == (0, 0):
            return Image.new("RGB", rgba.size, _WHITE[:3])
        if alpha == (255, 255):
            return rgba.convert("RGB")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return strip.convert("RGB")
