"""The API's reference decoders: `DECODE_CONCURRENCY` processes (service/decoder_process.py), each
decoding one upload at a time under a CPU-time and an address-space limit, shared by API keys
through fair slots (`DECODE_CONCURRENCY_PER_KEY`; waiting keys served round robin).

Why processes: the header bounds (realcustom/image_structure.py) make a decode's cost a function of
its header; the process limits still hold for an image that slips past them (a decoder bug, a cost
no bound foresaw): the kernel stops the process, the request gets 422 `image_too_complex`, a fresh
process takes its place, and the API itself never holds a decode's buffers. The price per image is
copying the upload and the decoded pixels (at most 1536 x 1536 x 3 bytes) through shared memory,
and two wake-ups (benchmarks/decode_overhead.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

from realcustom.decoding import REFERENCE_MAX_SIDE, DecodeBounds, ImageRejectedError, ImageTooComplexError
from service.decoder_process import INTERNAL, OK, READY, REPLY, REQUEST, write_all
from service.fair_slots import ThreadFairSlots
from service.settings import Settings

logger = logging.getLogger(__name__)

# Above the decode's own bound, what the process's address space may hold: the upload and its
# copies, the reply, Python's own growth.
MEMORY_MARGIN_BYTES = 64 * 2**20
# A process needs this long to import Pillow and warm up (minutes only on a starved machine).
READY_TIMEOUT_S = 60.0
_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


def bounds_of(settings: Settings) -> DecodeBounds:
    return DecodeBounds(
        max_bytes=settings.decode_max_bytes,
        max_jpeg_scans=settings.jpeg_max_scans,
        max_chunks=settings.image_max_chunks,
        max_metadata_chunks=settings.image_max_metadata_chunks,
        max_metadata_bytes=settings.image_max_metadata_bytes,
        max_frames=settings.image_max_frames,
    )


def wall_limit_s(settings: Settings) -> float:
    """How long a reply may take in wall-clock time: the CPU limit, with room for a loaded machine
    (catches a process that stalls without using CPU)."""
    return 2 * settings.decode_cpu_s + 5


class DecoderProcess:
    """One decoder process, restarted when it dies."""

    def __init__(self, settings: Settings) -> None:
        self._cpu_s = settings.decode_cpu_s
        self._wall_s = wall_limit_s(settings)
        memory = settings.decode_max_bytes + 2 * settings.max_image_bytes + MEMORY_MARGIN_BYTES
        # Payloads travel in shared memory: an upload, or a decoded reference (RGB, within the side).
        self._shared_bytes = max(settings.max_image_bytes, REFERENCE_MAX_SIDE**2 * 3)
        self._shared_fd = os.memfd_create("reference-decoder", os.MFD_CLOEXEC)
        os.ftruncate(self._shared_fd, self._shared_bytes)
        self._shared = mmap.mmap(self._shared_fd, self._shared_bytes)
        self._config = json.dumps(
            {
                "max_pixels": settings.max_image_pixels,
                "min_side": settings.min_image_side,
                "cpu_s": settings.decode_cpu_s,
                "memory_bytes": memory,
                "bounds": vars(bounds_of(settings)),
                "shared_fd": self._shared_fd,
                "shared_bytes": self._shared_bytes,
            }
        )
        self.process = self._start()
        self._ready = False

    def _start(self) -> subprocess.Popen:
        path = os.pathsep.join(filter(None, [_PROJECT_ROOT, os.environ.get("PYTHONPATH")]))
        return subprocess.Popen(
            [sys.executable, "-m", "service.decoder_process", self._config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
            pass_fds=(self._shared_fd,),
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def decode(self, data: bytes) -> Image.Image:
        """The decoded reference, or ImageRejectedError (ImageTooComplexError when the process
        was stopped by a limit)."""
        if self.process.poll() is not None:
            self._restart()
        if not self._ready:
            if self._read(len(READY), time.monotonic() + READY_TIMEOUT_S) != READY:
                self._restart()
                raise RuntimeError("a decoder process did not start; see the log above")
            self._ready = True
        if len(data) > self._shared_bytes:
            raise ValueError(f"an upload of {len(data)} bytes passed the size check")
        deadline = time.monotonic() + self._wall_s
        self._shared[: len(data)] = data
        try:
            write_all(self.process.stdin.fileno(), REQUEST.pack(len(data)))
            header = self._read(REPLY.size, deadline)
        except BrokenPipeError:
            header = None
        if header is None:
            raise self._stopped()
        status, width, height, length = REPLY.unpack(header)
        if status == OK:
            with memoryview(self._shared) as shared, shared[:length] as pixels:
                return Image.frombytes("RGB", (width, height), pixels)
        error = json.loads(self._shared[:length])
        if status == INTERNAL:
            raise RuntimeError(f"the decoder process failed: {error['message']}")
        if error["code"] == ImageTooComplexError.code:
            raise ImageTooComplexError(error["message"])
        raise ImageRejectedError(error["message"])

    def _read(self, size: int, deadline: float) -> bytes | None:
        """`size` bytes of the reply, or None when the process ended or the deadline passed."""
        fd = self.process.stdout.fileno()
        parts, left = [], size
        while left:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            part = os.read(fd, min(left, 1 << 20))
            if not part:
                return None
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def _stopped(self) -> ImageTooComplexError:
        """The process died or overran its wall-clock limit on this image: why, and a fresh one."""
        try:
            code = self.process.wait(timeout=1)
            if code == -signal.SIGXCPU:
                reason = f"took more than the {self._cpu_s:g} s of CPU time a decode may take"
            else:
                reason = f"stopped its decoder process (exit {code}: out of memory or a decoder fault)"
        except subprocess.TimeoutExpired:
            reason = f"took more than {self._wall_s:g} s to decode"
        logger.warning("decoder process %d: an image %s; restarting it", self.pid, reason)
        self._restart()
        return ImageTooComplexError(f"the image {reason}; send a smaller or simpler image")

    def _restart(self) -> None:
        self.stop()
        self.process = self._start()
        self._ready = False

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    def close(self) -> None:
        self.stop()
        self._shared.close()
        os.close(self._shared_fd)


class DecoderPool:
    """`DECODE_CONCURRENCY` decoder processes behind fair slots."""

    def __init__(self, settings: Settings) -> None:
        self._slots = ThreadFairSlots(settings.decode_concurrency, settings.decode_concurrency_per_key)
        self.processes = [DecoderProcess(settings) for _ in range(settings.decode_concurrency)]
        self._idle = list(self.processes)
        self._lock = threading.Lock()

    def decode(self, data: bytes, owner: str) -> Image.Image:
        """Decode `data` for `owner` (in fair turn with other owners); blocks: call from a thread."""
        with self._slots.hold(owner):
            with self._lock:
                process = self._idle.pop()
            try:
                return process.decode(data)
            finally:
                with self._lock:
                    self._idle.append(process)

    def close(self) -> None:
        for process in self.processes:
            process.close()
