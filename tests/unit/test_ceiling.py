"""Reading the output of Kafka's own performance tools (loadtest/ceiling.py); the samples are what
ProducerPerformance and ConsumerPerformance of kafka-tools 4.1 printed on this stack."""

from __future__ import annotations

import pytest

from loadtest.ceiling import (
    Ceiling,
    CeilingError,
    ConsumerResult,
    ProducerResult,
    measure_ceiling,
    parse_consumer,
    parse_producer,
    pipeline_share,
    report_lines,
)
from services.common.config import load_settings

PRODUCER_OUT = (
    "44837 records sent, 8854.1 records/sec (5.07 MB/sec), 220.0 ms avg latency, 2390.0 ms max latency.\n"
    "169660 records sent, 33656.0 records/sec (19.26 MB/sec), 1158.8 ms avg latency, 2307.0 ms max latency.\n"
    "300000 records sent, 26455.0 records/sec (15.14 MB/sec), 968.31 ms avg latency, 2390.00 ms max latency, "
    "1000 ms 50th, 1843 ms 95th, 2190 ms 99th, 2306 ms 99.9th.\n"
)
CONSUMER_HEADER = ("start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, "
                   "rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec\n")
CONSUMER_OUT = CONSUMER_HEADER + (
    "2026-11-30 11:55:00:226, 2026-11-30 11:55:04:560, 171.6614, 39.6081, 300000, 69220.1200, 1346, 2988, "
    "57.4503, 100401.6064\n"
)
CONSUMER_TIMED_OUT = CONSUMER_HEADER + (
    "WARNING: Exiting before consuming the expected number of messages: timeout (2000 ms) exceeded. You can use "
    "the --timeout option to increase the timeout.\n"
    "2026-11-30 11:55:08:514, 2026-11-30 11:55:10:583, 0.0000, 0.0000, 0, 0.0000, 0, 2069, 0.0000, 0.0000\n"
)


def test_producer_summary_is_the_line_with_percentiles() -> None:
    assert parse_producer(PRODUCER_OUT) == ProducerResult(
        records=300_000, records_per_s=26455.0, mb_per_s=15.14, avg_ms=968.31, max_ms=2390.0,
        p50_ms=1000, p95_ms=1843, p99_ms=2190, p999_ms=2306,
    )


def test_producer_without_summary_is_an_error() -> None:
    progress_only = PRODUCER_OUT.splitlines()[0]
    with pytest.raises(CeilingError, match="no summary line"):
        parse_producer(progress_only)
    with pytest.raises(CeilingError):
        parse_producer("")


def test_consumer_table() -> None:
    assert parse_consumer(CONSUMER_OUT) == ConsumerResult(
        records=300_000, mb=171.6614, records_per_s=69220.12, rebalance_ms=1346, fetch_ms=2988,
        fetch_records_per_s=100401.6064, fetch_mb_per_s=57.4503,
    )


def test_consumer_warning_between_header_and_values() -> None:
    result = parse_consumer(CONSUMER_TIMED_OUT)
    assert (result.records, result.fetch_ms, result.fetch_records_per_s) == (0, 2069, 0.0)


def test_consumer_output_without_table_or_values_is_an_error() -> None:
    with pytest.raises(CeilingError, match="no result table"):
        parse_consumer("Exception in thread main: SaslAuthenticationException\n")
    with pytest.raises(CeilingError, match="no line of values"):
        parse_consumer(CONSUMER_HEADER)
    renamed = CONSUMER_OUT.replace("fetch.nMsg.sec", "fetch.records.sec")
    with pytest.raises(CeilingError, match=r"no column fetch\.nMsg\.sec"):
        parse_consumer(renamed)
    with pytest.raises(CeilingError, match="not a number"):
        parse_consumer(CONSUMER_OUT.replace(", 300000,", ", lots,"))


def test_report_and_pipeline_share() -> None:
    produced, consumed = parse_producer(PRODUCER_OUT), parse_consumer(CONSUMER_OUT)
    lines = report_lines(produced, consumed, 600, 8, 1)
    assert lines[0] == ("Kafka's own tools on this broker (300,000 records of 600 B, a scratch topic of 8 partitions, "
                        "replication factor 1, as admin):")
    assert "26,455 records/s (15.14 MB/s)" in lines[1] and "p99 2190 ms" in lines[1]
    assert lines[2].startswith(
        "  ConsumerPerformance: 100,402 records/s reading (57.45 MB/s, 300,000 records in 2988 ms)")
    ceiling = Ceiling(26455.0, 100401.6064, 600, 300_000, lines)
    assert pipeline_share(ceiling, 1491.0) == [
        "pipeline ÷ Kafka's own tools: 1,491 requests/s = 5.64% of the producer's 26,455 records/s, "
        "1.49% of the consumer's 100,402 records/s"
    ]
    assert "n/a of the producer's 0 records/s" in pipeline_share(Ceiling(0.0, 1.0, 600, 1, []), 5.0)[0]


@pytest.mark.parametrize(("record_bytes", "records", "timeout_s"), [(0, 10, 5.0), (600, 0, 5.0), (600, 10, 0.0)])
def test_measure_refuses_nonsense_before_touching_kafka(record_bytes: int, records: int, timeout_s: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        measure_ceiling(load_settings(), record_bytes, records, timeout_s)
