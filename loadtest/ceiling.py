"""Kafka's own ceiling on this stack: what the broker moves with Kafka's own performance tools, to set
the pipeline's rate against.

    python -m loadtest.ceiling [--records 200000] [--bytes 600] [--timeout 120]

`ProducerPerformance` then `ConsumerPerformance` (artifact kafka-tools, run by deploy/kafka.py's
run_tool) on the same broker as the services, authenticated as `admin`, on a scratch topic of their own
(as many partitions as the keyed topics, deleted afterwards; the consumer's group commits nothing): the
producer sends `--records` records of `--bytes` bytes as fast as it can, with acks=all, idempotence and
the services' batching (linger 2 ms, 256 KiB batches, no compression); the consumer reads them back from
the start. Both are bounded by the record count and `--timeout` seconds (a tool still running then is
killed and the measurement fails). The bench calls `measure_ceiling` (blocking: in a thread) and prints
`pipeline_share` next to its own rate.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError

from deploy import kafka as cluster
from deploy.common import StackError, _run_async
from services.common.config import Settings, load_settings
from services.common.kafka import ADMIN, make_admin
from services.common.secrets import secrets_dir

PRODUCER_MAIN = "org.apache.kafka.tools.ProducerPerformance"
CONSUMER_MAIN = "org.apache.kafka.tools.ConsumerPerformance"
# Full JIT (run_tool's default stops at the first tier: fine for admin commands, not for throughput);
# an English locale keeps the tools' printf decimals parseable.
PERF_JVM = ("-Xmx512M", "-Duser.language=en", "-Duser.country=US")
# The services' producer settings (services/common/kafka.py make_producer), in the Java client's names.
PRODUCER_PROPS = ("acks=all", "enable.idempotence=true", "linger.ms=2", "batch.size=262144",
                  "compression.type=none")
# The longest the consumer waits for the next record once the producer is done (its --timeout).
CONSUMER_IDLE_MS = 10_000
DEFAULT_RECORDS = 200_000
DEFAULT_BYTES = 600  # a typical request; the bench passes its own measured size


class CeilingError(RuntimeError):
    """The ceiling could not be measured (broker down, a tool failed or ran out of time)."""


@dataclass(frozen=True)
class Ceiling:
    produce_records_per_s: float
    consume_records_per_s: float
    record_bytes: int
    records: int
    lines: list[str]  # the report's text


@dataclass(frozen=True)
class ProducerResult:
    records: int
    records_per_s: float
    mb_per_s: float
    avg_ms: float
    max_ms: float
    p50_ms: int
    p95_ms: int
    p99_ms: int
    p999_ms: int


@dataclass(frozen=True)
class ConsumerResult:
    records: int
    mb: float
    records_per_s: float  # over the whole run, the group join included
    rebalance_ms: int
    fetch_ms: int
    fetch_records_per_s: float  # reading only: the consumer's ceiling
    fetch_mb_per_s: float


# ProducerPerformance's summary line (printTotal); progress lines every 5 s lack the percentiles.
_PRODUCER_TOTAL = re.compile(
    r"^(?P<records>\d+) records sent, (?P<rate>[\d.]+) records/sec \((?P<mb>[\d.]+) MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency, (?P<p50>\d+) ms 50th, "
    r"(?P<p95>\d+) ms 95th, (?P<p99>\d+) ms 99th, (?P<p999>\d+) ms 99\.9th\.?\s*$",
    re.MULTILINE,
)


def parse_producer(stdout: str) -> ProducerResult:
    """The summary of ProducerPerformance's output (the last one when there are several)."""
    found = list(_PRODUCER_TOTAL.finditer(stdout))
    if not found:
        raise CeilingError("ProducerPerformance printed no summary line")
    m = found[-1]
    return ProducerResult(
        records=int(m["records"]), records_per_s=float(m["rate"]), mb_per_s=float(m["mb"]),
        avg_ms=float(m["avg"]), max_ms=float(m["max"]), p50_ms=int(m["p50"]), p95_ms=int(m["p95"]),
        p99_ms=int(m["p99"]), p999_ms=int(m["p999"]),
    )


_CONSUMER_FIELDS = ("data.consumed.in.MB", "data.consumed.in.nMsg", "nMsg.sec", "rebalance.time.ms",
                    "fetch.time.ms", "fetch.MB.sec", "fetch.nMsg.sec")


def parse_consumer(stdout: str) -> ConsumerResult:
    """ConsumerPerformance's table: a header line of comma-separated names, then the line of values (the
    times in it contain no comma); a warning (e.g. its timeout) may come between them."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("start.time"):
            names = [n.strip() for n in line.split(",")]
            rows = [r for r in lines[i + 1:] if r.count(",") == len(names) - 1]
            if not rows:
                raise CeilingError("ConsumerPerformance printed its header but no line of values")
            row = dict(zip(names, (v.strip() for v in rows[0].split(",")), strict=True))
            missing = [f for f in _CONSUMER_FIELDS if f not in row]
            if missing:
                raise CeilingError(f"ConsumerPerformance: no column {', '.join(missing)}")
            try:
                return ConsumerResult(
                    records=int(row["data.consumed.in.nMsg"]), mb=float(row["data.consumed.in.MB"]),
                    records_per_s=float(row["nMsg.sec"]), rebalance_ms=int(row["rebalance.time.ms"]),
                    fetch_ms=int(row["fetch.time.ms"]), fetch_records_per_s=float(row["fetch.nMsg.sec"]),
                    fetch_mb_per_s=float(row["fetch.MB.sec"]),
                )
            except ValueError as e:
                raise CeilingError(f"ConsumerPerformance: a value that is not a number ({e})") from None
    raise CeilingError("ConsumerPerformance printed no result table")


def _rate(x: float) -> str:
    return f"{x:,.0f}"


def report_lines(p: ProducerResult, c: ConsumerResult, record_bytes: int, partitions: int, rf: int) -> list[str]:
    return [
        f"Kafka's own tools on this broker ({p.records:,} records of {record_bytes} B, a scratch topic of "
        f"{partitions} partitions, replication factor {rf}, as {ADMIN}):",
        f"  ProducerPerformance (acks=all, idempotent, linger 2 ms, 256 KiB batches): "
        f"{_rate(p.records_per_s)} records/s ({p.mb_per_s:.2f} MB/s); latency avg {p.avg_ms:.1f} ms, "
        f"p50 {p.p50_ms} ms, p99 {p.p99_ms} ms, p99.9 {p.p999_ms} ms, max {p.max_ms:.0f} ms",
        f"  ConsumerPerformance: {_rate(c.fetch_records_per_s)} records/s reading ({c.fetch_mb_per_s:.2f} MB/s, "
        f"{c.records:,} records in {c.fetch_ms} ms); {_rate(c.records_per_s)} records/s with the group join "
        f"({c.rebalance_ms} ms)",
    ]


def pipeline_share(ceiling: Ceiling, requests_per_s: float) -> list[str]:
    """The pipeline's rate against the ceiling: each request is at least one record produced (the ingress)
    and one consumed (by the router), so this is an upper bound of the broker's share in the work."""
    def share(of: float) -> str:
        return f"{requests_per_s / of:.2%}" if of > 0 else "n/a"

    return [
        f"pipeline ÷ Kafka's own tools: {_rate(requests_per_s)} requests/s = {share(ceiling.produce_records_per_s)} "
        f"of the producer's {_rate(ceiling.produce_records_per_s)} records/s, "
        f"{share(ceiling.consume_records_per_s)} of the consumer's {_rate(ceiling.consume_records_per_s)} records/s",
    ]


# Running the tools -------------------------------------------------------------------------------


async def _create_topic(s: Settings, topic: str, partitions: int, rf: int) -> None:
    admin = make_admin(s, ADMIN)
    await admin.start()
    try:
        # Retention bounds what a run killed before its clean-up leaves behind.
        await admin.create_topics([NewTopic(topic, partitions, rf, topic_configs={"retention.ms": "3600000"})],
                                  timeout_ms=15_000)
    finally:
        await admin.close()


async def _delete_topic(s: Settings, topic: str) -> None:
    admin = make_admin(s, ADMIN)
    await admin.start()
    try:
        await admin.delete_topics([topic], timeout_ms=15_000)
    finally:
        await admin.close()


def _run(s: Settings, main: str, args: Sequence[str], deadline: float) -> str:
    left = deadline - time.monotonic()
    name = main.rsplit(".", 1)[-1]
    if left <= 1:
        raise CeilingError(f"no time left for {name}")
    try:
        res = cluster.run_tool(s, main, *args, timeout=left, jvm_options=PERF_JVM)
    except subprocess.TimeoutExpired:
        raise CeilingError(f"{name} did not finish within {left:.0f} s (killed)") from None
    except StackError as e:
        raise CeilingError(str(e)) from None
    if res.returncode != 0:
        raise CeilingError(f"{name} exited with {res.returncode}: {_tail(res.stderr or res.stdout)}")
    return res.stdout


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _consumer_config(s: Settings) -> Path:
    """The admin's client properties plus the consumer's own (ConsumerPerformance takes no inline
    properties): no offsets committed, so nothing of the group outlives the scratch topic."""
    auth = cluster.client_config(s, ADMIN).read_text()
    fd, name = tempfile.mkstemp(prefix=".ceiling-consumer-", suffix=".properties", dir=secrets_dir(s))  # 0600
    with os.fdopen(fd, "w") as f:
        f.write(auth + "enable.auto.commit=false\n")
    return Path(name)


def measure_ceiling(s: Settings, record_bytes: int, records: int, timeout_s: float = 60) -> Ceiling:
    """Kafka's producer and consumer ceilings on the stack's broker (blocking; raises CeilingError)."""
    if record_bytes < 1 or records < 1 or timeout_s <= 0:
        raise ValueError("record_bytes, records and timeout_s must be positive")
    deadline = time.monotonic() + timeout_s
    if not cluster._kafka_probe(s):  # a metadata request as admin, quietly
        raise CeilingError(f"Kafka does not answer on {s.kafka_bootstrap}: start the stack first")
    topic = f"{s.topic_prefix}xsettle.bench.ceiling-{os.getpid()}-{secrets.token_hex(3)}"
    partitions, rf = s.partitions, cluster.replication_factor(s)
    try:
        _run_async(_create_topic(s, topic, partitions, rf))
    except KafkaError as e:
        raise CeilingError(f"could not create the scratch topic: {e!r}") from None
    consumer_config: Path | None = None
    try:
        out = _run(s, PRODUCER_MAIN, [
            "--topic", topic, "--num-records", str(records), "--record-size", str(record_bytes),
            "--throughput", "-1", "--producer.config", str(cluster.client_config(s, ADMIN)),
            "--producer-props", f"bootstrap.servers={s.kafka_bootstrap}", *PRODUCER_PROPS,
        ], deadline)
        produced = parse_producer(out)
        if produced.records != records:
            raise CeilingError(f"ProducerPerformance sent {produced.records} of {records} records")
        consumer_config = _consumer_config(s)
        out = _run(s, CONSUMER_MAIN, [
            "--bootstrap-server", s.kafka_bootstrap, "--consumer.config", str(consumer_config),
            "--topic", topic, "--group", topic, "--messages", str(records),
            "--timeout", str(int(min(CONSUMER_IDLE_MS, max(1.0, deadline - time.monotonic()) * 1000))),
        ], deadline)
        consumed = parse_consumer(out)
        if consumed.records < records:
            raise CeilingError(f"ConsumerPerformance read {consumed.records} of {records} records")
    finally:
        if consumer_config is not None:
            consumer_config.unlink(missing_ok=True)
        try:
            _run_async(_delete_topic(s, topic))
        except KafkaError as e:  # its retention (an hour) removes it anyway
            print(f"ceiling: the scratch topic {topic} was not deleted: {e!r}", file=sys.stderr)
    return Ceiling(
        produce_records_per_s=produced.records_per_s,
        consume_records_per_s=consumed.fetch_records_per_s,
        record_bytes=record_bytes,
        records=records,
        lines=report_lines(produced, consumed, record_bytes, partitions, rf),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--records", type=int, default=DEFAULT_RECORDS,
                   help=f"records to produce and read back (default {DEFAULT_RECORDS})")
    p.add_argument("--bytes", type=int, default=DEFAULT_BYTES, help=f"record size (default {DEFAULT_BYTES})")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for both tools together (default 120)")
    args = p.parse_args(argv)
    if min(args.records, args.bytes) < 1 or args.timeout <= 0:
        p.error("--records, --bytes and --timeout must be positive")
    try:
        ceiling = measure_ceiling(load_settings(), args.bytes, args.records, args.timeout)
    except CeilingError as e:
        print(f"ceiling: {e}", file=sys.stderr)
        return 2
    print("\n".join(ceiling.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
