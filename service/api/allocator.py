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

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
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
