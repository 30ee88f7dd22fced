"""One reference decoder process: `realcustom.decoding` under a CPU-time and an address-space
limit (resource.setrlimit), so that an image slipping past the header bounds still cannot hold
the API: the kernel stops this process instead (service/decoders.py restarts it).

Started as `python -m service.decoder_process '<config JSON>'` with a shared memory file (memfd,
`shared_fd` in the config) that carries the payloads; stdin and stdout carry fixed headers only, so
an image costs two wake-ups and no pipe copies:
- request: the image's length (u32), the image itself in shared memory;
- reply: status (u8), width, height, payload length (u32 each); the payload in shared memory: the
  RGB pixels (OK), or the error as JSON `{"code", "message"}` (REJECTED, INTERNAL).
Imports Pillow and the decoder only: no torch, no service settings. glibc's allocator keeps a
reference's buffers from one image to the next (service/api/allocator.py).
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import resource
import struct
import sys
import traceback
from typing import Any

from PIL import Image

from realcustom.decoding import DecodeBounds, ImageRejectedError, decode_reference
from service.api.allocator import tune_decoder_allocator

REQUEST = struct.Struct("<I")
REPLY = struct.Struct("<BIII")
OK, REJECTED, INTERNAL = 0, 1, 2
READY = b"R"


def read_exact(fd: int, size: int) -> bytes | None:
    """`size` bytes from `fd`, or None at end of file."""
    parts, left = [], size
    while left:
        part = os.read(fd, min(left, 1 << 20))
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _vm_size() -> int:
    status = open("/proc/self/status").read()  # noqa: SIM115 - read at once
    return int(status.split("VmSize:")[1].split()[0]) * 1024


def _warm_up() -> None:
    """Load Pillow's plugins and first-call buffers before the address-space limit is measured."""
    for fmt in ("PNG", "JPEG", "WEBP"):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (1, 2, 3)).save(buffer, format=fmt)
        decode_reference(buffer.getvalue(), min_side=1)


def _arm_cpu_limit(seconds: float) -> None:
    """The soft limit is on the process's total CPU time: move it `seconds` past what is used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used + seconds), hard))


def _decode(data: bytes, config: dict[str, Any], bounds: DecodeBounds) -> tuple[int, int, int, bytes]:
    try:
        image = decode_reference(
            data, max_pixels=config["max_pixels"], min_side=config["min_side"], bounds=bounds
        )
    except ImageRejectedError as error:
        return REJECTED, 0, 0, json.dumps({"code": error.code, "message": str(error)}).encode()
    except MemoryError:
        message = "decoding the image ran out of memory; send a smaller image"
        return REJECTED, 0, 0, json.dumps({"code": "image_too_complex", "message": message}).encode()
    except Exception as error:  # a bug: the API answers 500 with an error id
        traceback.print_exc()
        return INTERNAL, 0, 0, json.dumps({"code": "internal_error", "message": repr(error)}).encode()
    return OK, image.width, image.height, image.tobytes()


def serve(config: dict[str, Any]) -> None:
    bounds = DecodeBounds(**config["bounds"])
    tune_decoder_allocator()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _warm_up()
    shared = mmap.mmap(config["shared_fd"], config["shared_bytes"])
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + config["memory_bytes"], hard))
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    write_all(stdout, READY)
    while True:
        header = read_exact(stdin, REQUEST.size)
        if header is None:
            return
        (length,) = REQUEST.unpack(header)
        data = shared[:length]
        _arm_cpu_limit(config["cpu_s"])
        status, width, height, payload = _decode(data, config, bounds)
        del data
        size = len(payload)
        shared[:size] = payload
        del payload
        write_all(stdout, REPLY.pack(status, width, height, size))


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
