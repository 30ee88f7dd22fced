"""The one decoder of reference photos, for every entry point (CLI, API, worker). Torch-free.

Untrusted bytes -> an upright 8-bit RGB image, with bounded memory and CPU:
- the format and size are read from the header and checked before any pixel is decoded;
- a JPEG larger than needed is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (`draft`);
- the image is converted to RGB in horizontal strips, each reduced by an integer box filter, then
  the (under 2 x `max_side`) result is box-resized to a longest side of `max_side`: no full-size
  RGBA or RGB copy is ever made, the largest buffer is the decoded source itself (at most
  `max_pixels` x the bytes per pixel of its mode).

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
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
# Largest decoded source (width x height) accepted by default; a 24 MP camera photo fits.
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MIN_SIDE = 16
# Longest side of a decoded reference: twice the 768 x 768 the released encoder squashes it to, so
# photos up to 1536 px (DreamBench's 1280 included) stay exactly as the official code reads them,
# and a job carries at most 7 MiB per subject.
REFERENCE_MAX_SIDE = 1536
# Pixels converted at a time (one strip): bounds the conversion buffers to a few MiB.
STRIP_PIXELS = 1 << 20
# Pillow lets the text chunks of one PNG expand to 64 MiB; reference photos need none of it.
PngImagePlugin.MAX_TEXT_MEMORY = 1 << 20

_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
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


class ImageRejectedError(ValueError):
    """The bytes are not an image we accept; the message says what to change."""


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded."""

    format: str
    width: int
    height: int
    mode: str

    @property
    def decode_bytes(self) -> int:
        """Memory the decoded source will take (the largest buffer of a decode)."""
        return self.width * self.height * _BYTES_PER_PIXEL.get(self.mode, 4)


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageRejectedError("the image is empty; send a PNG, JPEG or WebP file")
    try:
        # Pillow only warns between 1x and 2x its own bomb limit; ours is explicit and checked from
        # the header by the caller.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageRejectedError(
            f"the image expands to too many pixels ({error}); send a smaller image"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageRejectedError("the data is not a PNG, JPEG or WebP image; send one of those") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejectedError(f"the image could not be read ({error}); is it truncated?") from None


def _check_header(image: Image.Image, max_pixels: int, min_side: int) -> ImageHeader:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejectedError(
            f"the image is {width}x{height} pixels, more than the {max_pixels} allowed; send a smaller image"
        )
    if min(width, height) < min_side:
        raise ImageRejectedError(
            f"the image is {width}x{height} pixels; each side must be at least {min_side}"
        )
    return ImageHeader(str(image.format), width, height, image.mode)


def read_header(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> ImageHeader:
    """Format, size and mode from the header (checked against the limits); decodes no pixel."""
    return _check_header(_open(data), max_pixels, min_side)


def decode_reference(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_side: int = REFERENCE_MAX_SIDE,
) -> Image.Image:
    """PNG/JPEG/WebP bytes -> upright 8-bit RGB, longest side <= `max_side`, or ImageRejectedError."""
    image = _open(data)
    header = _check_header(image, max_pixels, min_side)
    factor = max(1, max(header.width, header.height) // max_side)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
        if factor > 1 and header.format == "JPEG":
            # DCT-domain downscaling: decodes at most the size the reduction needs.
            image.draft(None, (math.ceil(header.width / factor), math.ceil(header.height / factor)))
            factor = max(1, max(image.size) // max_side)
        image.load()
        rgb = _to_rgb_reduced(image, factor)
        if max(rgb.size) > max_side:  # the reduced image is under 2 x max_side: fit it exactly
            scale = max_side / max(rgb.size)
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BOX)
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
