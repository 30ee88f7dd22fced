"""Hostile image files whose decoding cost is not their size, written byte by byte (JPEG segments
and entropy-coded data, PNG chunks with their CRCs, RIFF chunks), for the decoder's tests and the
API's hardening tests. Each builder says what a naive decoder pays for it."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

# --- JPEG ---------------------------------------------------------------------------------------

SOI, EOI = b"\xff\xd8", b"\xff\xd9"


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


class _BitWriter:
    """Entropy-coded bits, MSB first, with 0xFF byte stuffing and 1-bit padding (T.81 F.1.2.3)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.value = 0
        self.count = 0

    def write(self, value: int, bits: int) -> None:
        self.value = (self.value << bits) | value
        self.count += bits
        while self.count >= 8:
            self.count -= 8
            byte = (self.value >> self.count) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0)
        self.value &= (1 << self.count) - 1

    def flush(self) -> bytes:
        if self.count:
            self.write((1 << (8 - self.count)) - 1, 8 - self.count)
        return bytes(self.out)


def huffman_table_of_one(table_class: int, symbol: int) -> bytes:
    """A Huffman table (DHT payload) with a single symbol of code `0` (1 bit)."""
    counts = bytes([1] + [0] * 15)
    return bytes([table_class << 4]) + counts + bytes([symbol])


def jpeg_frame(sof: int, width: int, height: int, components: int, sampling: int = 0x11) -> bytes:
    specs = b"".join(bytes([index + 1, sampling if index == 0 else 0x11, 0]) for index in range(components))
    return jpeg_segment(sof, struct.pack(">BHHB", 8, height, width, components) + specs)


def jpeg_scan(components: list[int], start: int, end: int, approx: int = 0) -> bytes:
    specs = b"".join(bytes([component, 0x00]) for component in components)
    return jpeg_segment(0xDA, bytes([len(components)]) + specs + bytes([start, end, approx]))


def _blocks(width: int, height: int) -> int:
    return -(-width // 8) * -(-height // 8)


def _dc_scan(blocks: int) -> bytes:
    """Every block's DC difference 0: one 1-bit symbol each."""
    bits = _BitWriter()
    for _ in range(blocks // 8):
        bits.write(0, 8)
    bits.write(0, blocks % 8)
    return bits.flush()


def _ac_scan_all_empty(blocks: int) -> bytes:
    """An AC scan whose blocks are all end-of-band: EOB runs (symbol 0xE0, 14 extra bits)."""
    bits = _BitWriter()
    while blocks > 0:
        run = min(blocks, (1 << 15) - 1)
        run = max(run, 1 << 14)
        bits.write(0, 1)
        bits.write(run - (1 << 14), 14)
        blocks -= run
    return bits.flush()


def progressive_jpeg(width: int, height: int, scans: int, components: int = 1, dc: bool = False) -> bytes:
    """A complete progressive JPEG of empty AC scans (EOB runs over every block, ~30 bytes each),
    `scans` in all, going round the components; with `dc`, a DC scan first (1 bit per block).
    libjpeg accepts scans that refine nothing (a warning) and walks every block of every scan:
    work linear in scans x blocks. Its coefficient buffer (components x 2 bytes per pixel) is
    zeroed and read whatever the scans hold: a 300-byte 25 MP CMYK file costs 200 MB."""
    blocks = _blocks(width, height)
    parts = [
        SOI,
        jpeg_segment(0xDB, b"\x00" + b"\x01" * 64),
        jpeg_frame(0xC2, width, height, components),
        jpeg_segment(0xC4, huffman_table_of_one(0, 0)),
        jpeg_segment(0xC4, huffman_table_of_one(1, 0xE0)),
    ]
    if dc:
        parts += [jpeg_scan(list(range(1, components + 1)), 0, 0), _dc_scan(blocks * components)]
        scans -= 1
    ac = _ac_scan_all_empty(blocks)
    parts += [jpeg_scan([1 + index % components], 1, 63) + ac for index in range(scans)]
    return b"".join(parts) + EOI


def truncated_progressive_jpeg(width: int, height: int, components: int = 4) -> bytes:
    """A header and the start of a first scan, then nothing (no EOI)."""
    return (
        SOI
        + jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
        + jpeg_frame(0xC2, width, height, components)
        + jpeg_segment(0xC4, huffman_table_of_one(0, 0))
        + jpeg_scan(list(range(1, components + 1)), 0, 0)
        + b"\x00" * 64
    )


def jpeg_with_segments(data: bytes, count: int, marker: int = 0xFE, payload: bytes = b"") -> bytes:
    """A JPEG with `count` extra segments (COM by default) right after SOI."""
    return data[:2] + jpeg_segment(marker, payload) * count + data[2:]


# --- PNG ----------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) chunks of a PNG."""
    chunks, offset = [], len(PNG_SIGNATURE)
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        chunks.append((data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return chunks


def build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(png_chunk(kind, data) for kind, data in chunks)


def png_flood(
    image: Image.Image, count: int, kind: bytes = b"ruSt", data: bytes = b"", after_idat: bool = False
) -> bytes:
    """`image` as a PNG with `count` ancillary chunks before its first IDAT (or after its last)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    chunks = png_chunks(buffer.getvalue())
    flood = png_chunk(kind, data) * count
    position = len(chunks) - 1 if after_idat else next(i for i, (k, _) in enumerate(chunks) if k == b"IDAT")
    encoded = [png_chunk(k, d) for k, d in chunks]
    return PNG_SIGNATURE + b"".join(encoded[:position]) + flood + b"".join(encoded[position:])


def png_split_idat(image: Image.Image, chunk_bytes: int) -> bytes:
    """`image` as a PNG whose image data is cut into IDAT chunks of `chunk_bytes` (0: also one
    empty IDAT between each)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    chunks = png_chunks(buffer.getvalue())
    stream = b"".join(data for kind, data in chunks if kind == b"IDAT")
    step = max(1, chunk_bytes)
    pieces = [stream[i : i + step] for i in range(0, len(stream), step)]
    if chunk_bytes == 0:
        pieces = [piece for part in pieces for piece in (part, b"")]
    head = [(k, d) for k, d in chunks if k not in (b"IDAT", b"IEND")]
    return build_png(head + [(b"IDAT", piece) for piece in pieces] + [(b"IEND", b"")])


def apng(width: int, height: int, frames: int, declared: int | None = None) -> bytes:
    """An animated PNG: `frames` frames of one colour (each an fcTL and an fdAT), the first the
    default image; acTL declares `declared` frames (default: `frames`)."""
    row = b"\x00" + b"\x80\x40\x20" * width
    pixels = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [(b"IHDR", header), (b"acTL", struct.pack(">II", declared or frames, 0))]
    sequence = 0
    for index in range(frames):
        control = struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, 1, 10, 0, 0)
        chunks.append((b"fcTL", control))
        sequence += 1
        if index == 0:
            chunks.append((b"IDAT", pixels))
        else:
            chunks.append((b"fdAT", struct.pack(">I", sequence) + pixels))
            sequence += 1
    return build_png([*chunks, (b"IEND", b"")])


# --- WebP ---------------------------------------------------------------------------------------


def riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, offset = [], 12
    while offset + 8 <= len(data):
        kind, (length,) = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)
        chunks.append((kind, data[offset + 8 : offset + 8 + length]))
        offset += 8 + length + (length & 1)
    return chunks


def webp(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"WEBP" + b"".join(riff_chunk(kind, data) for kind, data in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def vp8x(width: int, height: int, flags: int) -> bytes:
    return bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")


def animated_webp(width: int, height: int, frames: int, frame_side: int = 16) -> bytes:
    """An animated WebP of a `width` x `height` canvas with `frames` small lossless frames."""
    buffer = io.BytesIO()
    Image.new("RGB", (frame_side, frame_side), (200, 30, 30)).save(buffer, format="WEBP", lossless=True)
    frame = dict(riff_chunks(buffer.getvalue()))[b"VP8L"]
    anmf = bytes(6) + (frame_side - 1).to_bytes(3, "little") * 2 + (100).to_bytes(3, "little") + b"\x00"
    chunks = [(b"VP8X", vp8x(width, height, 0x02)), (b"ANIM", b"\xff\xff\xff\xff\x00\x00")]
    chunks += [(b"ANMF", anmf + riff_chunk(b"VP8L", frame))] * frames
    return webp(chunks)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()
