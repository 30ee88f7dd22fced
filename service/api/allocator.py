"""glibc allocator settings for the API process (measured: benchmarks/results/api_memory.md).

By default glibc raises its mmap threshold after large frees and gives each thread its own arena,
so the multi-megabyte buffers of uploads and decodes end up in arenas that never shrink: 20
concurrent 20 MP uploads left the API at +115 MiB for good. A fixed 128 KiB threshold (large
buffers always mmap'd, so freed at once) and two arenas bring the peak down by ~60 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENA_MAX = 2


def tune_allocator() -> None:
    """Call before any thread starts. A no-op (logged) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("not glibc: allocator left at its defaults")
        return
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_ARENA_MAX, ARENA_MAX)):
        logger.warning("mallopt refused the allocator settings; memory may stay high after load peaks")


# The decoder processes (service/decoder_process.py): one thread, one reference after another. With
# glibc's defaults the decode, `tobytes` and their chunks grow and trim the heap on every image
# (measured: ~4000 page faults, 3x the decode's time for a 1280 px photo); buffers under 16 MiB
# (a reference's) stay in the heap for the next image, larger ones (a 25 MP source) are mmap'd and
# returned at once, and at most 32 MiB of free heap is kept.
DECODER_MMAP_THRESHOLD_BYTES = 16 * 2**20
DECODER_TRIM_THRESHOLD_BYTES = 32 * 2**20


def tune_decoder_allocator() -> None:
    """Call at the decoder process's start. A no-op (logged) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("not glibc: allocator left at its defaults")
        return
    if not (
        mallopt(M_MMAP_THRESHOLD, DECODER_MMAP_THRESHOLD_BYTES)
        and mallopt(M_TRIM_THRESHOLD, DECODER_TRIM_THRESHOLD_BYTES)
    ):
        logger.warning("mallopt refused the decoder's allocator settings; decoding may be slower")
