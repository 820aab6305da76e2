"""A small bounded benchmark of the in-event analysis (3102) through the HTTP gateway at light load.

One caller, requests one after another (light load: the latency of one request through gateway → router →
engine → shard → back, not a throughput), bounded by a count and a time budget. Each request is a real
3102 of a person with settled history (the engine reads it from the shard and runs every rule over it plus
the request's encounter). `tests/integration/test_monitoring_events.py::test_3102_latency_at_light_load`
runs it against the test stack and prints the line quoted in the README.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.his import GatewayClient


@dataclass(frozen=True)
class Latency:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    refused: int  # answers with infcode -1 (a benchmark with refusals measures the wrong thing)

    def line(self) -> str:
        return (f"3102 through the gateway: {self.count} requests, p50 {self.p50_ms:.1f} ms, "
                f"p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms, refused {self.refused}")


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_ms:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_ms)))
    return sorted_ms[rank - 1]


def summarize(samples_ms: Sequence[float], refused: int) -> Latency:
    ordered = sorted(samples_ms)
    return Latency(len(ordered), percentile(ordered, 50), percentile(ordered, 99),
                   ordered[-1] if ordered else math.nan, refused)


async def measure_3102(client: GatewayClient, envelope_of: Callable[[int], dict[str, Any]], *,
                       count: int = 300, seconds: float = 60.0, warmup: int = 10) -> Latency:
    """Send `warmup` + `count` envelopes (`envelope_of(i)`, each a new msgid) one at a time; stop early
    when `seconds` are spent. Returns the latencies of the measured ones."""
    deadline = time.monotonic() + seconds
    samples: list[float] = []
    refused = 0
    for i in range(warmup + count):
        if time.monotonic() > deadline:
            break
        env = envelope_of(i)
        started = time.perf_counter()
        answer = await client.call(env)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if i < warmup:
            continue
        samples.append(elapsed_ms)
        refused += answer["infcode"] != 0
    return summarize(samples, refused)
