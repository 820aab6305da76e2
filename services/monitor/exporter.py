"""Monitor shell: polls Kafka and PostgreSQL on a timer and serves the latest snapshot.

Each poll builds a complete snapshot and swaps it in, so a group or a month that
disappears disappears from /metrics too (a custom collector, not long-lived
Gauge children). A failed poll keeps the previous snapshot, counts
`xs_monitor_poll_errors_total{source}` and is retried on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.config import Settings
from services.common.consumer import FailureKind, classify, until_up
from services.common.kafka import client_auth, make_admin
from services.common.metrics import serve_metrics
from services.common.response import SHANGHAI
from services.common.shards import ShardPools
from services.monitor.lag import PartitionLag, group_lags
from services.monitor.ledger import FUND_COLUMNS, MonthFigures, month_figures
from services.monitor.targets import Target, load_targets
from services.refdata.regions import PROVINCES

log = logging.getLogger("monitor")

# Each Kafka poll costs the broker ~25 requests (topics, offsets, and per group its coordinator, members and
# commits); lag alerts look at minutes, so every 5 s is fresh enough.
KAFKA_POLL_S: Final = 5.0
LEDGER_POLL_S: Final = 3.0
PARTITIONS_EVERY_S: Final = 3600.0  # the ledger's monthly partitions, created ahead
KAFKA_TIMEOUT_MS: Final = 5_000
POLL_ERRORS = Counter("xs_monitor_poll_errors_total", "Failed polls of a source (kept the last snapshot)",
                      ["source"])


@dataclass
class Snapshot:
    lags: list[PartitionLag] = field(default_factory=list)
    end_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    members: dict[str, int] = field(default_factory=dict)
    month: MonthFigures | None = None
    polled_at: dict[str, float] = field(default_factory=dict)


class MonitorCollector(Collector):  # type: ignore[misc]
    def __init__(self, targets: list[Target]) -> None:
        self.snapshot = Snapshot()
        self.targets = targets

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        lag = GaugeMetricFamily("xs_kafka_consumer_lag_messages",
                                "Records behind the end of the partition (last stable offset), per consumer group",
                                labels=["group", "topic", "partition"])
        committed = GaugeMetricFamily("xs_kafka_consumer_committed_offset", "Committed offset of a consumer group",
                                      labels=["group", "topic", "partition"])
        for x in snap.lags:
            labels = [x.group, x.topic, str(x.partition)]
            lag.add_metric(labels, x.lag)
            if x.committed is not None:
                committed.add_metric(labels, x.committed)
        end = GaugeMetricFamily("xs_kafka_partition_end_offset",
                                "Last stable offset of a partition (grows with every record produced)",
                                labels=["topic", "partition"])
        for (topic, p), offset in sorted(snap.end_offsets.items()):
            end.add_metric([topic, str(p)], offset)
        members = GaugeMetricFamily("xs_kafka_consumer_group_members", "Members of a consumer group",
                                    labels=["group"])
        for group, n in sorted(snap.members.items()):
            members.add_metric([group], n)
        yield from (lag, committed, end, members)

        people = GaugeMetricFamily(
            "xs_ledger_month_person_times",
            "This month's non-local person-times from the ledger: kind=direct (settled, not reversed) or "
            "kind=manual (manual claims)",
            labels=["insured_prov", "treating_prov", "scope", "visit_type", "kind"])
        funds = GaugeMetricFamily("xs_ledger_month_fund_paid_yuan",
                                  "This month's net fund amounts from the ledger (settled − reversed), in yuan",
                                  labels=["insured_prov", "treating_prov", "fund"])
        month_start = GaugeMetricFamily("xs_ledger_month_start_timestamp_seconds",
                                        "Start of the month the ledger figures cover (Asia/Shanghai)")
        if snap.month is not None:
            month_start.add_metric([], snap.month.start.replace(tzinfo=SHANGHAI).timestamp())
            per_fund: dict[tuple[str, str, str], int] = {}
            for (ins, trt, scope, vt), cell in sorted(snap.month.cells.items()):
                if scope != "local":
                    people.add_metric([ins, trt, scope, vt, "direct"], cell.direct)
                    people.add_metric([ins, trt, scope, vt, "manual"], cell.manual)
                for f in FUND_COLUMNS:
                    per_fund[(ins, trt, f)] = per_fund.get((ins, trt, f), 0) + cell.funds_fen[f]
            for (ins, trt, f), fen in sorted(per_fund.items()):
                funds.add_metric([ins, trt, f], fen / 100)
        yield from (people, funds, month_start)

        target = GaugeMetricFamily("xs_direct_settlement_target_ratio",
                                   "Direct-settlement rate target of an insured province (fraction)",
                                   labels=["insured_prov", "scope", "visit_type"])
        for t in self.targets:
            target.add_metric([t.insured_prov, t.scope, t.visit_type], t.ratio)
        polled = GaugeMetricFamily("xs_monitor_last_poll_timestamp_seconds", "When a source was last polled "
                                   "successfully", labels=["source"])
        for source, at in sorted(snap.polled_at.items()):
            polled.add_metric([source], at)
        yield from (target, polled)


class Monitor:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.collector = MonitorCollector(load_targets(PROVINCES))
        self.admin = make_admin(s, "monitor", request_timeout_ms=KAFKA_TIMEOUT_MS)
        self.offsets = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, "monitor"), group_id=None,
                                        enable_auto_commit=False,
                                        isolation_level="read_committed", request_timeout_ms=KAFKA_TIMEOUT_MS)
        self.pool: asyncpg.Pool | None = None
        self.shards: ShardPools | None = None
        self._partitions_due = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        REGISTRY.register(self.collector)
        serve_metrics(self.s.monitor_metrics_port)
        # No connection at start: the pool connects on the first poll and after a database restart.
        self.pool = await asyncpg.create_pool(self.s.pg_dsn, min_size=0, max_size=1)
        self.shards = await ShardPools.connect(self.s, 1)
        await until_up("Kafka admin client", self.admin.start, stop)
        await until_up("Kafka consumer", self.offsets.start, stop)
        log.info("monitor ready on :%d", self.s.monitor_metrics_port)
        try:
            await asyncio.gather(
                self._every(KAFKA_POLL_S, "kafka", self.poll_kafka, stop),
                self._every(LEDGER_POLL_S, "ledger", self.poll_ledger, stop),
            )
        finally:
            await self.offsets.stop()
            await self.admin.close()
            await self.shards.close()
            await self.pool.close()

    async def _every(self, period_s: float, source: str, poll: Callable[[], Awaitable[None]],
                     stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await asyncio.wait_for(poll(), timeout=max(period_s * 5, 10))
                self.collector.snapshot.polled_at[source] = time.time()
            except Exception as e:
                POLL_ERRORS.labels(source).inc()
                if classify(e) is FailureKind.INFRASTRUCTURE:
                    log.warning("%s poll failed: %s", source, type(e).__name__)
                else:  # a bug: logged in full, and the monitor goes on
                    log.exception("%s poll failed", source)
            delay = max(0.0, period_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def poll_kafka(self) -> None:
        # Only this deployment's topics (Settings.topic_prefix; a test run's own).
        topics = [t for t in await self.admin.list_topics() if t.startswith(self.s.topic_prefix)
                  and not t.startswith("__")]
        partitions: dict[str, list[int]] = {}
        for meta in await self.admin.describe_topics(topics):
            if meta["error_code"] == 0:
                partitions[meta["topic"]] = [p["partition"] for p in meta["partitions"]]
        tps = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
        end = {(tp.topic, tp.partition): o for tp, o in (await self.offsets.end_offsets(tps)).items()}
        begin = {(tp.topic, tp.partition): o for tp, o in (await self.offsets.beginning_offsets(tps)).items()}
        # Only this deployment's groups (Settings.topic_prefix), labelled without the prefix.
        prefix = self.s.topic_prefix
        groups = sorted(g for g, protocol in await self.admin.list_consumer_groups()
                        if protocol in ("consumer", "") and g.startswith(prefix))
        lags: list[PartitionLag] = []
        members: dict[str, int] = {}
        for group in groups:
            # One group per request: aiokafka 0.14 fails to decode a multi-group answer from Kafka 4.1.
            for resp in await self.admin.describe_consumer_groups([group]):
                for g in resp.groups:
                    members[g[1].removeprefix(prefix)] = len(g[5])
            committed = {(tp.topic, tp.partition): om.offset
                         for tp, om in (await self.admin.list_consumer_group_offsets(group)).items()}
            lags += group_lags(group.removeprefix(prefix), committed, partitions, begin, end)
        snap = self.collector.snapshot
        snap.lags, snap.end_offsets, snap.members = lags, end, members

    async def poll_ledger(self) -> None:
        assert self.pool is not None and self.shards is not None
        self.collector.snapshot.month = await month_figures(self.pool, self.shards)
        if time.monotonic() >= self._partitions_due:
            self._partitions_due = time.monotonic() + PARTITIONS_EVERY_S
            try:
                await self.ensure_partitions()
            except asyncpg.PostgresError as e:  # not the month figures' fault: say so, try again in an hour
                log.warning("creating ledger partitions ahead failed: %s", type(e).__name__)

    async def ensure_partitions(self) -> None:
        """This month's and the next months' ledger partitions on every shard (the retention command does
        the same): a month never starts in the default partition while the monitor runs."""
        assert self.shards is not None
        for name, shard in self.shards:
            created = await shard.fetchval(
                "SELECT ensure_ledger_partitions(now()::date, (now() + interval '3 months')::date)")
            if created:
                log.info("shard %s: created ledger partitions %s", name, ", ".join(created))
