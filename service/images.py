"""Decoding of untrusted reference images and encoding of results (pillow only, no torch).

The API decodes every image once to reject bad input at the edge; workers decode the same bytes
with the same function, so both sides see exactly the same RGB image.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

from PIL import Image, ImageOps

OutputFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageRejectedError(ValueError):
    """The bytes are not an image we accept; the message says what to change."""


def decode_subject_image(data: bytes, *, max_pixels: int, min_side: int) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes to an upright 8-bit RGB image, or raise ImageRejectedError."""
    if not data:
        raise ImageRejectedError("the image is empty; send a PNG, JPEG or WebP file")
    try:
        # Pillow only warns between 1x and 2x its own limit; our limit is explicit, so check it here
        # from the header before any pixel is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejectedError(
                f"the image is {width}x{height} pixels, more than the {max_pixels} allowed; "
                "send a smaller image"
            )
        if min(width, height) < min_side:
            raise ImageRejectedError(
                f"the image is {width}x{height} pixels; each side must be at least {min_side}"
            )
        image.load()
    except ImageRejectedError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageRejectedError(
            f"the image expands to too many pixels ({error}); send a smaller image"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageRejectedError("the data is not a PNG, JPEG or WebP image; send one of those") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageRejectedError(f"the image could not be decoded ({error}); is it truncated?") from None
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode (RGBA, LA, P, CMYK, 16-bit, grayscale) to 8-bit RGB, alpha over white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: rescale to 8 bits instead of clipping to white.
        image = image.point(lambda value: value / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def encode_image(image: Image.Image, output_format: OutputFormat) -> bytes:
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()
