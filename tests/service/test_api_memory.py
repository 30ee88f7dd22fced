"""Decoding is bounded: the API's RSS while 20 clients upload 20 MP photos at once stays under
300 MiB, and under 160 MiB idle (benchmarks/api_memory.py measures it; results in
benchmarks/results/api_memory.md). Memory, unlike time, does not depend on the machine's load."""

from __future__ import annotations

import pytest

from benchmarks.api_memory import SCENARIOS, measure, photo

pytestmark = pytest.mark.integration

IDLE_LIMIT_MIB = 160
PEAK_LIMIT_MIB = 300


@pytest.mark.parametrize(
    ("scenario", "clients"), [(SCENARIOS[1], 20), (SCENARIOS[2], 4)], ids=lambda v: str(v)
)
def test_concurrent_large_uploads_keep_the_api_small(redis_server, scenario, clients: int) -> None:
    row = measure(redis_server.url, scenario, photo(20, scenario.image_format), clients)
    assert row["statuses"] == {"202": clients}, row
    assert row["idle_rss_mib"] < IDLE_LIMIT_MIB, row
    assert row["peak_rss_mib"] < PEAK_LIMIT_MIB, row
