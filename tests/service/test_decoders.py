"""The decoder processes (service/decoders.py, service/decoder_process.py), for real: what the API
gets is what the in-process decoder gives; an image that slips past the header bounds is stopped
by the process's CPU-time limit (SIGXCPU) or address-space limit, the process is replaced and the
next image is served; a decoder that dies between images is replaced transparently."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_images import encode, progressive_jpeg
from PIL import Image

from realcustom.decoding import ImageRejectedError, ImageTooComplexError, decode_reference
from service.decoder_process import READY, REJECTED, REPLY, REQUEST
from service.decoders import DecoderPool
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DREAMBENCH = ROOT / "examples" / "dreambench"


@pytest.fixture
def pool_of():
    pools: list[DecoderPool] = []

    def make(**settings) -> DecoderPool:
        pools.append(DecoderPool(Settings(**settings)))
        return pools[-1]

    yield make
    for pool in pools:
        pool.close()


def test_decoded_references_are_the_in_process_decoders(pool_of) -> None:
    pool = pool_of(decode_concurrency=1)
    for path in sorted(DREAMBENCH.glob("*.jpg")):
        data = path.read_bytes()
        assert pool.decode(data, "owner").tobytes() == decode_reference(data).tobytes(), path.name
    with pytest.raises(ImageRejectedError, match="not a PNG, JPEG or WebP") as refused:
        pool.decode(b"GIF89a not really", "owner")
    assert refused.value.code == "invalid_image"
    with pytest.raises(ImageTooComplexError, match="more than 64 scans"):
        pool.decode(progressive_jpeg(5000, 5000, scans=3000), "owner")


def test_the_cpu_limit_stops_an_image_past_the_header_bounds(pool_of) -> None:
    """With the scan bound lifted, 3000 scans over 25 MP take many seconds of CPU: the process is
    killed at DECODE_CPU_S, the request refused, and a fresh process serves the next image."""
    pool = pool_of(decode_concurrency=1, decode_cpu_s=1, jpeg_max_scans=100_000)
    cat = (DREAMBENCH / "cat.jpg").read_bytes()
    pool.decode(cat, "owner")  # started and warm
    (process,) = pool.processes
    first_pid = process.pid
    started = time.perf_counter()
    with pytest.raises(ImageTooComplexError, match="more than the 1 s of CPU time"):
        pool.decode(progressive_jpeg(5000, 5000, scans=3000), "owner")
    elapsed = time.perf_counter() - started
    assert elapsed < 8, f"stopped after {elapsed:.1f} s"
    assert process.pid != first_pid
    assert pool.decode(cat, "owner").size == (1282, 1282)


def test_a_decoder_that_stalls_is_stopped_by_the_wall_clock_limit(pool_of) -> None:
    """A process that uses no CPU but never answers (stopped here) is killed after
    2 x DECODE_CPU_S + 5 s and replaced."""
    pool = pool_of(decode_concurrency=1, decode_cpu_s=0.25)
    cat = (DREAMBENCH / "cat.jpg").read_bytes()
    pool.decode(cat, "owner")
    (process,) = pool.processes
    stalled_pid = process.pid
    os.kill(stalled_pid, signal.SIGSTOP)
    started = time.perf_counter()
    with pytest.raises(ImageTooComplexError, match=r"took more than 5\.5 s to decode"):
        pool.decode(cat, "owner")
    assert 5.5 <= time.perf_counter() - started < 15
    assert process.pid != stalled_pid
    assert pool.decode(cat, "owner").size == (1282, 1282)


def test_a_decoder_that_died_between_images_is_replaced(pool_of) -> None:
    pool = pool_of(decode_concurrency=1)
    cat = (DREAMBENCH / "cat.jpg").read_bytes()
    pool.decode(cat, "owner")
    (process,) = pool.processes
    first_pid = process.pid
    os.kill(first_pid, signal.SIGKILL)
    process.process.wait()
    assert pool.decode(cat, "owner").size == (1282, 1282)
    assert process.pid != first_pid


def test_the_address_space_limit_turns_an_allocation_into_a_refusal() -> None:
    """A process whose memory limit is below what an image needs (the header bound lifted): the
    allocation fails, the image is refused as too complex, and the process serves the next one."""
    shared_bytes = 16 << 20
    shared_fd = os.memfd_create("test-decoder")
    os.ftruncate(shared_fd, shared_bytes)
    shared = mmap.mmap(shared_fd, shared_bytes)
    config = {
        "max_pixels": 25_000_000,
        "min_side": 16,
        "cpu_s": 30,
        "memory_bytes": 64 << 20,
        "bounds": {"max_bytes": 1 << 40},
        "shared_fd": shared_fd,
        "shared_bytes": shared_bytes,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service.decoder_process", json.dumps(config)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=(shared_fd,),
    )
    try:
        assert process.stdout.read(1) == READY

        def decode(data: bytes) -> tuple[int, bytes]:
            shared[: len(data)] = data
            process.stdin.write(REQUEST.pack(len(data)))
            process.stdin.flush()
            status, _, _, length = REPLY.unpack(process.stdout.read(REPLY.size))
            return status, shared[:length]

        status, payload = decode(encode(Image.new("RGBA", (5000, 5000)), "PNG"))  # needs ~150 MiB
        assert status == REJECTED
        assert json.loads(payload) == {
            "code": "image_too_complex",
            "message": "decoding the image ran out of memory; send a smaller image",
        }
        status, payload = decode(encode(Image.new("RGB", (64, 48), (1, 2, 3)), "PNG"))
        assert status == 0 and len(payload) == 64 * 48 * 3
    finally:
        process.kill()
        process.wait()
        shared.close()
        os.close(shared_fd)
