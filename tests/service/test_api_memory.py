"""Decoding is bounded: the API's RSS while 20 clients upload 20 MP photos at once stays under
300 MiB, and under 160 MiB idle; each decoder process stays within its decode budget
(DECODE_MAX_BYTES) over its idle size (benchmarks/api_memory.py measures it; results in
benchmarks/results/api_memory.md). Memory, unlike time, does not depend on the machine's load."""

from __future__ import annotations

import gc

import pytest

from benchmarks.api_memory import SCENARIOS, measure, photo
from service.queue.blobs import join_blobs, split_blobs
from service.queue.protocol import SubjectSpec
from service.settings import Settings

IDLE_LIMIT_MIB = 160
PEAK_LIMIT_MIB = 300
DECODER_IDLE_LIMIT_MIB = 48


@pytest.mark.parametrize(
    ("scenario", "clients"), [(SCENARIOS[1], 20), (SCENARIOS[2], 4)], ids=lambda v: str(v)
)
def test_concurrent_large_uploads_keep_the_api_small(redis_server, scenario, clients: int) -> None:
    row = measure(redis_server.url, scenario, photo(20, scenario.image_format), clients)
    assert row["statuses"] == {"202": clients}, row
    assert row["idle_rss_mib"] < IDLE_LIMIT_MIB, row
    assert row["peak_rss_mib"] < PEAK_LIMIT_MIB, row
    assert len(row["decoders_idle_mib"]) == 2 and max(row["decoders_idle_mib"]) < DECODER_IDLE_LIMIT_MIB, row
    assert row["decoder_peak_mib"] < DECODER_IDLE_LIMIT_MIB + Settings().decode_max_bytes / 2**20, row


def test_moving_a_job_through_the_queue_format_leaves_no_reference_cycle() -> None:
    """A cycle holding a job's image bytes kept 4.7 MiB per job alive until the cyclic GC ran."""
    spec = SubjectSpec(image=bytes(3 * 64 * 64), width=64, height=64, target="cat", token_indices=[2])
    gc.collect()
    gc.disable()
    try:
        document, blobs = split_blobs(spec)
        assert join_blobs(SubjectSpec, document, blobs) == spec
        del document, blobs
        assert gc.collect() == 0
    finally:
        gc.enable()
