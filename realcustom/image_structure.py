"""The structure of an encoded image, walked before any decoder sees it. Torch-free, Pillow-free.

A small file can cost a decoder far more than its size: thousands of progressive JPEG scans (each
a pass over every block), a coefficient buffer of 2 bytes per pixel and component that libjpeg
fills whatever the scans hold, a million PNG chunks that Pillow reads one by one in Python, an
animated WebP whose canvas libwebp allocates three times. This module reads what those costs
depend on (sizes, components, scans, chunks, frames, metadata) from the file's own framing, with
Python work bounded by `DecodeBounds.max_chunks` units and C-speed searches over entropy-coded
data, and refuses a file past any bound before the decoder starts. `realcustom.decoding` turns the
structure into the bytes the decode will take (`decoding.plan_decode`).

Per format, the units walked (each counts against `max_chunks`):
- JPEG: marker segments up to EOI (the decoder stops there; MPO's further images are never read).
  Only baseline, extended sequential and progressive Huffman frames (SOF0-2) with 8-bit samples and
  1, 3 or 4 components are accepted. Scans (SOS) are counted (`max_jpeg_scans`); APPn and COM
  segments are metadata.
- PNG: chunks up to IEND; every ancillary chunk except the animation's (acTL, fcTL, fdAT) is
  metadata; frames are the larger of acTL's count and the fcTL chunks present; one ICC profile
  (iCCP) at most, as the format says (Pillow inflates each, up to 1 MB: 256 of them cost 0.5 s).
- WebP: RIFF chunks; ANMF chunks are frames; ICCP, EXIF, XMP and unknown chunks are metadata.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

MIB = 1 << 20


class ImageRejectedError(ValueError):
    """The bytes are not an image we accept; the message says what to change."""

    code = "invalid_image"


class ImageTooComplexError(ImageRejectedError):
    """The image is valid but would cost more to decode than a bound allows (its header says so,
    or its decoder process ran out of time or memory)."""

    code = "image_too_complex"


@dataclass(frozen=True)
class DecodeBounds:
    """What one decode may cost, checked from the structure before decoding (service settings:
    DECODE_MAX_BYTES, JPEG_MAX_SCANS, IMAGE_MAX_CHUNKS, IMAGE_MAX_METADATA_CHUNKS,
    IMAGE_MAX_METADATA_BYTES, IMAGE_MAX_FRAMES)."""

    # Memory the decode may take (decoded source, decoder buffers, conversion): a 25 MP RGBA PNG
    # (~145 MB) and a 24 MP progressive 4:2:0 JPEG (~120 MB) fit.
    max_bytes: int = 160 * MIB
    # libjpeg's standard progression writes 6 scans (grayscale), 10 (YCbCr) or 18 (CMYK); mozjpeg
    # and jpegli a similar number. Each scan is one more pass over the coefficients.
    max_jpeg_scans: int = 64
    # A 12 MiB PNG cut in 8 KiB IDAT chunks (libpng's default) has 1.5k chunks.
    max_chunks: int = 8192
    max_metadata_chunks: int = 256
    max_metadata_bytes: int = 4 * MIB
    # Only the first frame is decoded; the others are still parsed.
    max_frames: int = 1000


@dataclass(frozen=True)
class Structure:
    """What decoding will cost depends on, as the file declares it."""

    format: str  # JPEG, PNG or WEBP
    width: int
    height: int
    mode: str  # the Pillow mode the decoder will produce
    chunks: int  # structural units walked (segments, chunks)
    metadata_chunks: int = 0
    metadata_bytes: int = 0
    frames: int = 1
    # JPEG: (horizontal, vertical) sampling factors per component; scans; whether libjpeg keeps
    # every coefficient of the image (progressive, or a first scan without every component).
    sampling: tuple[tuple[int, int], ...] = ()
    scans: int = 0
    full_coefficient_buffer: bool = False
    # PNG: bit depth and colour type of IHDR.
    bit_depth: int = 8


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The next JPEG marker: 0xFF, then a code that is not stuffing (00), a restart (D0-D7) or fill
# (FF). libjpeg skips everything else between segments (with a warning), as in entropy data.
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_JPEG_FRAMES = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive"}
_JPEG_OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
# Bytes between marker segments before the first scan: Pillow skips them one by one in Python;
# encoders write none.
JPEG_MAX_HEADER_JUNK = 64 * 1024
# PNG colour type -> (allowed bit depths, Pillow mode at 8 bits, at 16 bits).
_PNG_MODES = {
    0: ({1, 2, 4, 8, 16}, "L", "I;16"),
    2: ({8, 16}, "RGB", "RGB"),
    3: ({1, 2, 4, 8}, "P", "P"),
    4: ({8, 16}, "LA", "LA"),
    6: ({8, 16}, "RGBA", "RGBA"),
}
_PNG_ANIMATION = {b"acTL", b"fcTL", b"fdAT"}
_WEBP_IMAGE_CHUNKS = {b"VP8 ", b"VP8L", b"ALPH", b"ANIM", b"ANMF"}

ACCEPTED = "send a PNG, JPEG or WebP file"


def read_structure(data: bytes, bounds: DecodeBounds) -> Structure:
    """The structure of `data`, or ImageRejectedError (ImageTooComplexError past a bound)."""
    if not data:
        raise ImageRejectedError(f"the image is empty; {ACCEPTED}")
    if data.startswith(b"\xff\xd8\xff"):
        return _walk_jpeg(data, bounds)
    if data.startswith(PNG_SIGNATURE):
        return _walk_png(data, bounds)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _walk_webp(data, bounds)
    raise ImageRejectedError(f"the data is not a PNG, JPEG or WebP image; {ACCEPTED}")


class _Counter:
    """Units walked and metadata seen, refused as soon as a bound is passed (the walk stays short)."""

    def __init__(self, kind: str, bounds: DecodeBounds) -> None:
        self.kind = kind
        self.bounds = bounds
        self.chunks = 0
        self.metadata_chunks = 0
        self.metadata_bytes = 0

    def unit(self) -> None:
        self.chunks += 1
        if self.chunks > self.bounds.max_chunks:
            raise ImageTooComplexError(
                f"the image has more than {self.bounds.max_chunks} {self.kind}; re-save it with a "
                "standard encoder"
            )

    def metadata(self, size: int) -> None:
        self.metadata_chunks += 1
        self.metadata_bytes += size
        if self.metadata_chunks > self.bounds.max_metadata_chunks:
            raise ImageTooComplexError(
                f"the image has more than {self.bounds.max_metadata_chunks} metadata {self.kind}; "
                "strip its metadata"
            )
        if self.metadata_bytes > self.bounds.max_metadata_bytes:
            raise ImageTooComplexError(
                f"the image carries more than {self.bounds.max_metadata_bytes} bytes of metadata; "
                "strip its metadata"
            )


def check_frames(frames: int, bounds: DecodeBounds) -> None:
    if frames > bounds.max_frames:
        raise ImageTooComplexError(
            f"the image has {frames} frames, more than the {bounds.max_frames} allowed (only the first "
            "is used); send a still image"
        )


def _walk_jpeg(data: bytes, bounds: DecodeBounds) -> Structure:
    count = _Counter("marker segments", bounds)
    position, junk, scans = 2, 0, 0
    frame: tuple[int, int, tuple[tuple[int, int], ...], bool] | None = None
    first_scan_components = 0
    while True:
        match = _JPEG_MARKER.search(data, position)
        if match is None:
            break  # truncated: the decoder stops here too
        if scans == 0:
            junk += match.start() - position
            if junk > JPEG_MAX_HEADER_JUNK:
                raise ImageRejectedError(
                    f"the JPEG has more than {JPEG_MAX_HEADER_JUNK} stray bytes between its header "
                    "segments; re-save it"
                )
        count.unit()
        code, position = data[match.end() - 1], match.end()
        if code == 0xD9:  # EOI
            break
        if code in (0x01, 0xD8):  # TEM, SOI: no length (libjpeg refuses a second SOI itself)
            continue
        if position + 2 > len(data):
            break
        (length,) = struct.unpack_from(">H", data, position)
        if length < 2:
            raise ImageRejectedError("the JPEG has a corrupt marker segment; is it truncated?")
        payload = data[position + 2 : position + length]
        position += length
        if code in _JPEG_FRAMES:
            if frame is not None:
                raise ImageRejectedError("the JPEG has two frame headers (SOF); send a single image")
            frame = _jpeg_frame(code, payload)
        elif code in _JPEG_OTHER_FRAMES:
            raise ImageRejectedError(
                "the JPEG is lossless, hierarchical or arithmetic-coded; send a baseline or progressive JPEG"
            )
        elif code == 0xDA:  # SOS, then entropy-coded data up to the next marker
            if frame is None:
                raise ImageRejectedError("the JPEG has a scan before its frame header; is it corrupt?")
            scans += 1
            if scans == 1:
                first_scan_components = payload[0] if payload else 0
            if scans > bounds.max_jpeg_scans:
                raise ImageTooComplexError(
                    f"the JPEG has more than {bounds.max_jpeg_scans} scans (encoders write about 10; "
                    "each is a pass over the whole image); re-save it"
                )
        elif 0xE0 <= code <= 0xEF or code == 0xFE:  # APPn, COM
            count.metadata(length)
    if frame is None:
        raise ImageRejectedError("the JPEG has no frame header; is it truncated?")
    width, height, sampling, progressive = frame
    return Structure(
        "JPEG",
        width,
        height,
        _JPEG_MODES[len(sampling)],
        count.chunks,
        count.metadata_chunks,
        count.metadata_bytes,
        sampling=sampling,
        scans=scans,
        full_coefficient_buffer=progressive or 0 < first_scan_components < len(sampling),
    )


def _jpeg_frame(code: int, payload: bytes) -> tuple[int, int, tuple[tuple[int, int], ...], bool]:
    if len(payload) < 6:
        raise ImageRejectedError("the JPEG frame header is truncated")
    precision, height, width, components = struct.unpack_from(">BHHB", payload)
    if precision != 8:
        raise ImageRejectedError(f"the JPEG has {precision}-bit samples; send an 8-bit JPEG")
    if components not in _JPEG_MODES or len(payload) < 6 + 3 * components:
        raise ImageRejectedError(
            f"the JPEG has {components} components; send a grayscale, colour or CMYK JPEG"
        )
    sampling = tuple(
        (payload[7 + 3 * index] >> 4, payload[7 + 3 * index] & 15) for index in range(components)
    )
    if any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in sampling):
        raise ImageRejectedError("the JPEG has invalid sampling factors; is it corrupt?")
    return width, height, sampling, code == 0xC2


def _walk_png(data: bytes, bounds: DecodeBounds) -> Structure:
    if data[12:16] != b"IHDR" or len(data) < 33:
        raise ImageRejectedError("the PNG does not start with its header (IHDR); is it corrupt?")
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if colour not in _PNG_MODES or depth not in _PNG_MODES[colour][0]:
        raise ImageRejectedError(f"the PNG has an invalid colour type {colour} / bit depth {depth}")
    count = _Counter("chunks", bounds)
    declared_frames, frame_controls, profiles = 1, 0, 0
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        count.unit()
        body = position + 8
        position = body + length + 4
        if kind == b"IEND":
            break
        if kind == b"acTL" and length >= 4 and body + 4 <= len(data):
            (declared_frames,) = struct.unpack_from(">I", data, body)
            check_frames(declared_frames, bounds)
        elif kind == b"fcTL":
            frame_controls += 1
            check_frames(frame_controls, bounds)
        elif kind == b"iCCP":
            profiles += 1
            if profiles > 1:  # Pillow inflates each one (up to 1 MB): the format allows one
                raise ImageRejectedError("the PNG has several ICC profiles (iCCP); the format allows one")
        if kind[0] & 0x20 and kind not in _PNG_ANIMATION:  # ancillary: lower-case first letter
            count.metadata(length)
    mode = _PNG_MODES[colour][2 if depth == 16 else 1]
    if colour == 0 and depth == 1:
        mode = "1"
    return Structure(
        "PNG",
        width,
        height,
        mode,
        count.chunks,
        count.metadata_chunks,
        count.metadata_bytes,
        frames=max(declared_frames, frame_controls, 1),
        bit_depth=depth,
    )


def _walk_webp(data: bytes, bounds: DecodeBounds) -> Structure:
    count = _Counter("chunks", bounds)
    size: tuple[int, int, str] | None = None
    frames = 0
    position = 12
    while position + 8 <= len(data):
        kind = data[position : position + 4]
        (length,) = struct.unpack_from("<I", data, position + 4)
        body = position + 8
        count.unit()
        if size is None:
            size = _webp_size(kind, data[body : body + min(length, 10)])
        elif kind == b"ANMF":
            frames += 1
            check_frames(frames, bounds)
        elif kind not in _WEBP_IMAGE_CHUNKS:  # ICCP, EXIF, XMP, unknown
            count.metadata(length)
        position = body + length + (length & 1)
    if size is None:
        raise ImageRejectedError("the WebP has no image chunk; is it truncated?")
    return Structure(
        "WEBP",
        *size,
        count.chunks,
        count.metadata_chunks,
        count.metadata_bytes,
        frames=max(frames, 1),
    )


def _webp_size(kind: bytes, head: bytes) -> tuple[int, int, str]:
    """Canvas size and Pillow mode (alpha or not) from the first chunk: VP8X (extended), VP8L
    (lossless) or VP8 (lossy)."""
    if kind == b"VP8X" and len(head) >= 10:
        mode = "RGBA" if head[0] & 0x10 else "RGB"
        return 1 + int.from_bytes(head[4:7], "little"), 1 + int.from_bytes(head[7:10], "little"), mode
    if kind == b"VP8L" and len(head) >= 5 and head[0] == 0x2F:
        bits = int.from_bytes(head[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, "RGBA" if bits >> 28 & 1 else "RGB"
    if kind == b"VP8 " and len(head) >= 10 and head[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", head, 6)
        return width & 0x3FFF, height & 0x3FFF, "RGB"
    raise ImageRejectedError("the WebP's first chunk is not an image header; is it corrupt?")
