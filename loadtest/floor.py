"""The measured floor (issue 14): the least CPU per request that this pipeline's topology can cost.

The pipeline's hops, counted from the code (README "Benchmark", "The floor"):
  requester --fsi.ingress--> settlement stage (router, then engine, in one process) --fsi.replies--> requester
  (the router answers 1101, 9001/9002, 2501-2504, 5301 and its refusals itself, the engine the rest)
  engine --fsi.settlements--> clearing's positions group, smartmon's persons agent (two readers of every event)
  smartmon --<app>-persons-changelog--> (its table's changelog; also fsi.monitor.stays and fsi.judgements)
How many records each hop carries per request is counted on the real topics around a `loadtest.bench` run
of the same rate (`--bench`), else taken from DEFAULT_TOPOLOGY_COUNTS.

The floor replays that topology on scratch topics of the same broker with do-nothing relays, one process
per stage as in the pipeline: each is the project's consumer shell (`BatchConsumer`: the project's client
settings, background offset commits, batches as large as the rate allows) around a processor that only
forwards bytes of the bench's record sizes. The engine relay optionally (`--pg`, default) writes the least
rows a settlement needs in one PostgreSQL transaction per batch: the request's stored response, and for a
settlement its ledger row and its person's accumulator (one statement per table, as the engine writes).
Per phase (a fixed rate, and saturation: a bounded window of requests in flight) it prints the CPU per
request of every process, the ratio to the 0.3 ms target and to the real pipeline measured in the same run.
`--two-stages` runs router and engine as two stages with a topic between them (the design before 2026-12-01,
fsi.routed): what the hop cost.
Bounded in time and count; it deletes its topics, consumer groups and tables at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing as mp
import os
import random
import re
import secrets
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.protocol.admin import DeleteGroupsRequest

from loadtest.bench import cpu_between, infra_cpu, proc_cpu
from services.common.config import Settings, load_settings
from services.common.consumer import BatchConsumer, BatchProcessor, Outbox, Record
from services.common.kafka import (
    ADMIN,
    IDLE_FETCH_WAIT_MS,
    client_auth,
    connect_pool,
    make_admin,
    make_group_consumer,
    make_producer,
)
from topics.catalog import INGRESS, REPLIES, SETTLEMENTS, TopicSpec

TARGET_MS = 0.3  # the stack CPU per request
# Records on the pipeline's topics, national mix, counted on the real topics around a bench run (2026-11-30
# 21:57 UTC, 10 s at 100 requests/s; README "The floor"). `--bench` counts them again in each run.
DEFAULT_TOPOLOGY_COUNTS = {"ingress": 979, "routed": 822, "replies": 979, "settlements": 239, "side": 239}
# Mean value bytes of each topic's records (the same bench run's, read from the real topics): what a topic
# that has no records yet is given.
DEFAULT_SIZES = {"ingress": 1_052, "routed": 1_357, "replies": 748, "settlements": 1_008, "side": 1_087}
SETTLEMENT_READERS = ("clearing", "smartmon")  # the groups that read every settlement event
RELAYS = ("router", "engine", *SETTLEMENT_READERS)
# The share of requests the router passes on to the engine (the rest it answers itself): counted on fsi.routed
# while that topic existed (DEFAULT_TOPOLOGY_COUNTS); a property of the mix, not of the design.
ROUTED_SHARE = DEFAULT_TOPOLOGY_COUNTS["routed"] / DEFAULT_TOPOLOGY_COUNTS["ingress"]
REAL_TOPICS = {"ingress": INGRESS.name, "replies": REPLIES.name,
               "settlements": SETTLEMENTS.name, "side": "xsettle-smartmon-persons-changelog"}
# Requests in flight at saturation: batches as large as the relays take (a window of 2,000 was the limit:
# 2,000 / the chain's latency).
SATURATION_IN_FLIGHT = 10_000
# The record's head: send time (ns), sequence number, what it causes (bit 0: routed; bits 1-3: events).
HEAD = struct.Struct(">qqB")
REPLY_PARTITION = 0


# Pure parts: topology, arithmetic, parsing ---------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """Records per request on each hop."""

    routed: float  # fsi.routed records per request: the share the router passes on to the engine
    settlements: float  # settlement events per request
    side: float  # smartmon's own output records per settlement event (changelog, stays, judgements)
    readers: int = len(SETTLEMENT_READERS)
    merged: bool = False  # router and engine one stage: no fsi.routed hop (a design with one hop less)

    @property
    def hop(self) -> float:
        return 0.0 if self.merged else self.routed

    @property
    def produced(self) -> float:
        """Records produced per request: the request, the routed record, the reply, the events, smartmon's."""
        return 1 + self.hop + 1 + self.settlements * (1 + self.side)

    @property
    def consumed(self) -> float:
        """Records consumed per request (smartmon's own output has no reader in the request's path)."""
        return 1 + self.hop + 1 + self.settlements * self.readers

    def describe(self) -> str:
        stages = "router and engine one stage: no routed record" if self.merged else f"{self.routed:.3f} routed"
        return (f"{stages}, 1 reply, {self.settlements:.3f} settlement events (read by "
                f"{self.readers} groups), {self.side:.3f} smartmon records per event: {self.produced:.2f} records "
                f"produced and {self.consumed:.2f} consumed per request")


def topology_from_counts(counts: dict[str, int]) -> Topology:
    """From records counted on each topic over the same requests (`ingress` is the requests)."""
    requests = counts["ingress"]
    if requests <= 0:
        raise ValueError("no requests counted on the ingress topic")
    events = counts["settlements"]
    routed = counts["routed"] / requests if "routed" in counts else ROUTED_SHARE
    return Topology(routed=min(routed, 1.0), settlements=events / requests,
                    side=counts["side"] / events if events else 0.0)


def effects(rng: random.Random, topo: Topology) -> tuple[bool, int]:
    """(routed, settlement events) of one request, drawn so that their means are the topology's."""
    if topo.routed <= 0 or rng.random() >= topo.routed:
        return False, 0
    per_routed = topo.settlements / topo.routed
    events = int(per_routed)
    if rng.random() < per_routed - events:
        events += 1
    return True, min(events, 7)


def encode_head(sent_ns: int, seq: int, routed: bool, events: int) -> bytes:
    return HEAD.pack(sent_ns, seq, int(routed) | (events << 1))


def decode_head(value: bytes) -> tuple[int, int, bool, int]:
    sent_ns, seq, flags = HEAD.unpack_from(value)
    return sent_ns, seq, bool(flags & 1), flags >> 1


def padded(head: bytes, size: int) -> bytes:
    return head + b"x" * max(0, size - len(head))


def per_request_ms(cpu_s: dict[str, float], requests: int) -> dict[str, float]:
    """CPU seconds per process over a phase -> ms per request."""
    return {name: 1000 * s / max(requests, 1) for name, s in cpu_s.items()}


def net_of_idle(cpu_s: float, idle_cpu_per_s: float, wall_s: float) -> float:
    """A shared process's CPU less what it spends idle over the same time (the rest of the stack's polling)."""
    return max(0.0, cpu_s - idle_cpu_per_s * wall_s)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


_BENCH_CPU = re.compile(r"stack CPU per request ([\d.]+) ms: (.*)")
_BENCH_ACHIEVED = re.compile(r"achieved\s+([\d.]+) requests/s")


@dataclass
class BenchFigures:
    stack_ms: float
    per_process_ms: dict[str, float]
    achieved_rps: float


def parse_bench(text: str) -> BenchFigures:
    """The first rate's stack CPU per request (total and per process) and achieved rate of a bench report."""
    cpu = _BENCH_CPU.search(text)
    achieved = _BENCH_ACHIEVED.search(text)
    if cpu is None or achieved is None:
        raise ValueError("no 'stack CPU per request' or 'achieved' line in the bench's report")
    per: dict[str, float] = {}
    for part in cpu.group(2).split(" (")[0].split(", "):
        name, _, value = part.rpartition(" ")
        per[name] = float(value)
    return BenchFigures(float(cpu.group(1)), per, float(achieved.group(1)))


@dataclass
class Phase:
    name: str
    target_rps: float | None  # None: saturation
    sent: int
    answered: int
    wall_s: float
    latencies_s: list[float]
    cpu_s: dict[str, float]  # per process, Kafka and PostgreSQL net of idle
    cpu_raw_s: dict[str, float]
    generator_cpu_s: float
    relayed: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0  # the sending part of wall_s (the rest: the drain)

    @property
    def achieved_rps(self) -> float:
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def offered_rps(self) -> float:
        return self.sent / self.load_s if self.load_s > 0 else 0.0


HELD_SHARE = 0.95  # as the bench's: the rate offered at least 95% of the target
P99_BOUND_MS = 100.0


def held(ph: Phase) -> tuple[bool, str]:
    """A fixed rate is held when it was offered, every request answered, and p99 within the bound."""
    why = []
    if ph.target_rps is not None and ph.offered_rps < HELD_SHARE * ph.target_rps:
        why.append(f"offered {ph.offered_rps:.1f}/s < {HELD_SHARE:.0%} of {ph.target_rps:g}/s")
    if ph.answered < ph.sent:
        why.append(f"{ph.sent - ph.answered} never answered")
    p99_ms = 1000 * percentile(sorted(ph.latencies_s), 0.99)
    if p99_ms > P99_BOUND_MS:
        why.append(f"p99 {p99_ms:.1f} ms > {P99_BOUND_MS:g} ms")
    return not why, "; ".join(why)


def phase_lines(ph: Phase, topo: Topology, bench: BenchFigures | None, in_flight: int) -> list[str]:
    per = per_request_ms(ph.cpu_s, ph.answered)
    raw = per_request_ms(ph.cpu_raw_s, ph.answered)
    total = sum(per.values())
    lat = sorted(ph.latencies_s)
    target = f"{ph.target_rps:g} requests/s" if ph.target_rps is not None else \
        f"saturation ({in_flight} requests in flight)"
    ok, why = held(ph)
    out = [
        f"floor at {target}: sent {ph.sent}, answered {ph.answered} in {ph.wall_s:.1f} s = "
        f"{ph.achieved_rps:.1f} requests/s; latency p50 {1000 * percentile(lat, 0.5):.1f} ms, "
        f"p99 {1000 * percentile(lat, 0.99):.1f} ms",
        f"  sent in {ph.load_s:.1f} s = {ph.offered_rps:.1f} requests/s offered; "
        + ("HELD" if ok else "NOT HELD: " + why) + f" (p99 <= {P99_BOUND_MS:g} ms, every request answered"
        + (f", >= {HELD_SHARE:.0%} of the target offered)" if ph.target_rps is not None else ")"),
        "  records relayed: " + ", ".join(f"{k} {v}" for k, v in ph.relayed.items()),
        f"  floor CPU per request {total:.3f} ms: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items())
        + " (kafka and postgres net of their idle; raw " + ", ".join(
            f"{k} {raw[k]:.3f}" for k in ("kafka", "postgres") if k in raw) + ")",
        f"  load generator {1000 * ph.generator_cpu_s / max(ph.answered, 1):.3f} ms per request (not counted)",
        f"  floor / 0.3 ms target = {total / TARGET_MS:.2f}",
    ]
    if bench is not None:
        out.append(f"  floor / pipeline (bench in this run: {bench.stack_ms:.3f} ms at {bench.achieved_rps:.1f} "
                   f"requests/s) = {total / bench.stack_ms:.2f}" if bench.stack_ms > 0 else "")
    return [line for line in out if line]


# Topics, groups, tables ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scratch:
    tag: str
    prefix: str

    def topic(self, hop: str) -> str:
        return f"{self.prefix}xsettle.floor-{self.tag}.{hop}"

    def group(self, relay: str) -> str:
        return f"floor-{self.tag}-{relay}"

    def table(self, what: str) -> str:
        return f"floor_{self.tag}_{what}"


def scratch_for(s: Settings) -> Scratch:
    return Scratch(f"{os.getpid()}{secrets.token_hex(3)}", s.topic_prefix)


def _spec(name: str, partitions: int) -> TopicSpec:
    return TopicSpec(name, partitions, 3_600_000, "delete", "bytes", bytes, "the floor's scratch topic")


def topic_partitions(s: Settings) -> dict[str, int]:
    return {"ingress": s.partitions, "routed": s.partitions, "replies": REPLIES.partitions,
            "settlements": s.partitions, "side": s.partitions}


async def create_topics(s: Settings, sc: Scratch) -> None:
    admin = make_admin(s)
    await admin.start()
    try:
        # An hour's retention bounds what a run killed before its clean-up leaves behind.
        await admin.create_topics([NewTopic(sc.topic(hop), n, s.replication_factor,
                                            topic_configs={"retention.ms": "3600000"})
                                   for hop, n in topic_partitions(s).items()], timeout_ms=15_000)
    finally:
        await admin.close()


async def delete_scratch(s: Settings, sc: Scratch, deadline_s: float = 20.0) -> list[str]:
    """Delete the topics, then the groups (a group is deletable once its static members' sessions ended,
    SESSION_TIMEOUT_MS at most). Returns what could not be deleted."""
    left: list[str] = []
    admin = make_admin(s)
    await admin.start()
    try:
        try:
            await admin.delete_topics([sc.topic(hop) for hop in topic_partitions(s)], timeout_ms=15_000)
        except Exception as e:
            left.append(f"topics ({type(e).__name__})")
        groups = [s.topic_prefix + sc.group(r) for r in RELAYS]
        end = time.monotonic() + deadline_s
        while groups and time.monotonic() < end:
            pending = []
            for g in groups:
                try:
                    node = await admin.find_coordinator(g)
                    resp = await admin._send_request_to_node(node, DeleteGroupsRequest([g]))
                except Exception:
                    pending.append(g)
                    continue
                if any(code not in (0, 69) for _, code in resp.results):  # 69: the group is gone already
                    pending.append(g)
            groups = pending
            if groups:
                await asyncio.sleep(1.0)
        left += groups
    finally:
        await admin.close()
    return left


def pg_tables(sc: Scratch) -> dict[str, str]:
    return {
        "processed": f"CREATE TABLE {sc.table('processed')} (msgid text PRIMARY KEY, response bytea NOT NULL)",
        "ledger": f"CREATE TABLE {sc.table('ledger')} (setl_id text PRIMARY KEY, psn_no text NOT NULL, "
                  "amount_fen bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())",
        "accumulator": f"CREATE TABLE {sc.table('accumulator')} (psn_no text PRIMARY KEY, total_fen bigint NOT NULL)",
    }


# Relays (one process each) ------------------------------------------------------------------------


@dataclass(frozen=True)
class RelayConfig:
    role: str
    scratch: Scratch
    sizes: dict[str, int]
    pg: bool
    persons: int
    merged: bool = False


class Relay(BatchProcessor[bytes]):
    """Forwards bytes: what the pipeline's stage produces per record, nothing computed."""

    stage = "floor"

    def __init__(self, cfg: RelayConfig, counter: Synchronized, pool: asyncpg.Pool | None) -> None:
        self.cfg = cfg
        self.counter = counter
        self.pool = pool
        self.decoder = bytes

    async def process(self, records: list[Record[bytes]], outbox: Outbox) -> None:
        sc, sizes = self.cfg.scratch, self.cfg.sizes
        if self.cfg.role == "router":
            to_engine = []
            for rec in records:
                if not decode_head(rec.value)[2]:
                    outbox.add(sc.topic("replies"), padded(rec.value[:HEAD.size], sizes["replies"]),
                               partition=REPLY_PARTITION)
                elif self.cfg.merged:
                    to_engine.append(rec)
                else:
                    outbox.add(sc.topic("routed"), padded(rec.value[:HEAD.size], sizes["routed"]), key=rec.raw.key)
            if to_engine:
                await self._engine(to_engine, outbox)
        elif self.cfg.role == "engine":
            await self._engine(records, outbox)
        elif self.cfg.role == "smartmon":
            for rec in records:
                outbox.add(sc.topic("side"), padded(rec.value[:HEAD.size], sizes["side"]), key=rec.raw.key)
        self.counter.value += len(records)

    async def _engine(self, records: list[Record[bytes]], outbox: Outbox) -> None:
        sc, sizes = self.cfg.scratch, self.cfg.sizes
        if self.pool is not None:
            await self._write(records)
        for rec in records:
            events = decode_head(rec.value)[3]
            outbox.add(sc.topic("replies"), padded(rec.value[:HEAD.size], sizes["replies"]), partition=REPLY_PARTITION)
            for _ in range(events):
                outbox.add(sc.topic("settlements"), padded(rec.value[:HEAD.size], sizes["settlements"]),
                           key=rec.raw.key)

    async def _write(self, records: list[Record[bytes]]) -> None:
        """The least rows of the batch, one statement per table, one transaction (synchronous commit)."""
        assert self.pool is not None
        sc = self.cfg.scratch
        msgids, responses, setl_ids, psns, amounts = [], [], [], [], []
        accum: dict[str, int] = {}
        for rec in records:
            _, seq, _, events = decode_head(rec.value)
            msgid = f"{sc.tag}-{seq}"
            msgids.append(msgid)
            responses.append(padded(rec.value[:HEAD.size], self.cfg.sizes["replies"]))
            psn = (rec.raw.key or b"").decode()
            for i in range(events):
                setl_ids.append(f"S{msgid}-{i}")
                psns.append(psn)
                amounts.append(12_345)
                accum[psn] = accum.get(psn, 0) + 12_345  # one row per person: ON CONFLICT touches a row once
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"INSERT INTO {sc.table('processed')} SELECT * FROM unnest($1::text[], $2::bytea[]) "
                               "ON CONFLICT DO NOTHING", msgids, responses)
            if setl_ids:
                await conn.execute(f"INSERT INTO {sc.table('ledger')} (setl_id, psn_no, amount_fen) SELECT * FROM "
                                   "unnest($1::text[], $2::text[], $3::bigint[]) ON CONFLICT DO NOTHING",
                                   setl_ids, psns, amounts)
                await conn.execute(f"INSERT INTO {sc.table('accumulator')} SELECT * FROM unnest($1::text[], "
                                   f"$2::bigint[]) ON CONFLICT (psn_no) DO UPDATE SET total_fen = "
                                   f"{sc.table('accumulator')}.total_fen + EXCLUDED.total_fen",
                                   list(accum), list(accum.values()))


def _relay_main(cfg: RelayConfig, counter: Synchronized, stop_flag: Any) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_relay(cfg, counter, stop_flag))


async def _relay(cfg: RelayConfig, counter: Synchronized, stop_flag: Any) -> None:
    s = load_settings()
    source = {"router": "ingress", "engine": "routed"}.get(cfg.role, "settlements")
    stop = asyncio.Event()
    writes = cfg.role == "engine" or (cfg.role == "router" and cfg.merged)
    pool = await connect_pool(s, 2, session_reset=False) if writes and cfg.pg else None
    producer = make_producer(s, ADMIN, linger_ms=0)  # as router and engine
    await producer.start()
    topic = cfg.scratch.topic(source)
    shell = BatchConsumer(make_group_consumer(s, ADMIN, cfg.scratch.group(cfg.role), topic),
                          cfg.scratch.group(cfg.role), _spec(topic, s.partitions), Relay(cfg, counter, pool),
                          producer, max_records=s.batch_size_max)
    task = asyncio.create_task(shell.run(stop))
    try:
        while not stop_flag.is_set() and not task.done():
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await task
        await producer.stop()
        if pool is not None:
            await pool.close()


# The generator (the floor's own process) ----------------------------------------------------------


class Generator:
    """Produces requests of the ingress size and reads the replies from one partition, as the bench does."""

    def __init__(self, s: Settings, sc: Scratch, sizes: dict[str, int], topo: Topology, persons: int,
                 seed: int) -> None:
        self.s, self.sc, self.sizes, self.topo = s, sc, sizes, topo
        self.keys = [f"F{i:011d}".encode() for i in range(persons)]
        self.rng = random.Random(seed)
        self.producer: AIOKafkaProducer = make_producer(s, ADMIN, linger_ms=1)  # as the bench's KafkaCaller
        self.replies = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN),
                                        group_id=None, enable_auto_commit=False, auto_offset_reset="latest",
                                        fetch_max_wait_ms=IDLE_FETCH_WAIT_MS)
        self.seq = 0
        self.answered = 0
        self.latencies: list[float] = []
        self.progress = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        await self.replies.start()
        tp = TopicPartition(self.sc.topic("replies"), REPLY_PARTITION)
        self.replies.assign([tp])
        await self.replies.seek_to_end(tp)
        await self.replies.position(tp)
        self.reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        await self.replies.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self.replies.getmany(timeout_ms=1_000, max_records=2_000)
            now = time.time_ns()
            for recs in batches.values():
                for rec in recs:
                    self.latencies.append((now - decode_head(rec.value)[0]) / 1e9)
                self.answered += len(recs)
            if batches:
                self.progress.set()

    async def _send(self) -> asyncio.Future[Any]:
        routed, events = effects(self.rng, self.topo)
        self.seq += 1
        value = padded(encode_head(time.time_ns(), self.seq, routed, events), self.sizes["ingress"])
        return await self.producer.send(self.sc.topic("ingress"), value, key=self.rng.choice(self.keys))  # type: ignore[no-any-return]

    def reset(self) -> tuple[int, int]:
        self.latencies = []
        return self.seq, self.answered

    async def fixed_rate(self, rate: float, seconds: float, max_requests: int) -> None:
        acks: list[asyncio.Future[Any]] = []
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < seconds and sent < max_requests:
            due = min(int(rate * elapsed) + 1, max_requests)
            while sent < due:
                acks.append(await self._send())
                sent += 1
            if len(acks) > 1_000:
                await asyncio.gather(*acks)
                acks = []
            await asyncio.sleep(0.005)
        await asyncio.gather(*acks)

    async def saturate(self, seconds: float, max_requests: int, in_flight: int) -> None:
        acks: list[asyncio.Future[Any]] = []
        end = time.monotonic() + seconds
        first = self.seq
        while time.monotonic() < end and self.seq - first < max_requests:
            while self.seq - self.answered < in_flight and self.seq - first < max_requests:
                acks.append(await self._send())
            if len(acks) > 1_000:
                await asyncio.gather(*acks)
                acks = []
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), timeout=max(0.0, end - time.monotonic()))
            except TimeoutError:
                break
        await asyncio.gather(*acks)

    async def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.answered < self.seq and time.monotonic() < end:
            await asyncio.sleep(0.05)


# CPU snapshots ------------------------------------------------------------------------------------


# component -> {pid: CPU seconds so far}: several pids for PostgreSQL (the postmaster and its backends).
CpuSnap = dict[str, dict[int, float]]


def cpu_now(s: Settings, relays: dict[str, int]) -> CpuSnap:
    out = {name: {pid: proc_cpu(pid)} for name, pid in relays.items()}
    infra = infra_cpu(s)
    for name in ("kafka", "postgres"):
        out[name] = infra[name][1] if name in infra else {}
    t = os.times()
    out["generator"] = {0: t.user + t.system}
    return out


def diff(before: CpuSnap, after: CpuSnap) -> dict[str, float]:
    """CPU seconds between two snapshots: a process gone by the second one is not counted (a backend that
    ended between them), a new one counted whole."""
    return {k: cpu_between(before.get(k, {}), pids) for k, pids in after.items()}


# Record counts and sizes of the real topics --------------------------------------------------------


async def end_offsets(s: Settings, topics: dict[str, str]) -> dict[str, int]:
    """Sum of the end offsets of every partition of each topic (0 for a topic that does not exist)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for hop, name in topics.items():
            parts = consumer.partitions_for_topic(s.topic_prefix + name) or set()
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(s.topic_prefix + name) or set()
            tps = [TopicPartition(s.topic_prefix + name, p) for p in parts]
            out[hop] = sum((await consumer.end_offsets(tps)).values()) if tps else 0
        return out
    finally:
        await consumer.stop()


async def mean_sizes(s: Settings, topics: dict[str, str], per_partition: int = 50) -> dict[str, int]:
    """Mean value bytes of the last records of each real topic (the default where it has none)."""
    out = dict(DEFAULT_SIZES)
    for hop, name in topics.items():
        sizes = await _last_sizes(s, s.topic_prefix + name, per_partition)
        if sizes:
            out[hop] = round(sum(sizes) / len(sizes))
    return out


async def _last_sizes(s: Settings, topic: str, per_partition: int) -> list[int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or set()]
        if not tps:
            return []
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        wanted = 0
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - per_partition))
            wanted += min(per_partition, ends[tp] - starts[tp])
        sizes: list[int] = []
        deadline = time.monotonic() + 5
        while len(sizes) < wanted and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                sizes += [len(r.value or b"") for r in recs]
        return sizes
    finally:
        await consumer.stop()


# The run ------------------------------------------------------------------------------------------


def run_bench(rate: float, seconds: float, processes: int) -> str:
    cmd = [sys.executable, "-m", "loadtest.bench", "--rate", f"{rate:g}", "--seconds", f"{seconds:g}",
           "--processes", str(processes)]
    print("bench: " + " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadtest.bench exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


async def measure(args: argparse.Namespace) -> list[str]:
    s = load_settings()
    lines = [f"loadtest.floor, {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load average "
             + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f", {os.cpu_count()} CPUs"]
    benches: dict[float, BenchFigures] = {}
    counts = dict(DEFAULT_TOPOLOGY_COUNTS)
    if args.bench:
        for i, rate in enumerate(sorted(args.rate)):
            before = await end_offsets(s, REAL_TOPICS)
            text = await asyncio.to_thread(run_bench, rate, args.bench_seconds, args.bench_processes)
            after = await end_offsets(s, REAL_TOPICS)
            benches[rate] = parse_bench(text)
            counted = {hop: after[hop] - before[hop] for hop in REAL_TOPICS}
            lines += ["", f"pipeline at {rate:g} requests/s (loadtest.bench, same run):"] + [
                "  " + t.strip() for t in text.splitlines()
                if t.startswith(("rate ", "  achieved", "  stack CPU", "  all requests", "  machine"))]
            lines.append("  records on the real topics during it: " + ", ".join(f"{k} {v}" for k, v in counted.items()))
            if i == 0:
                # The lowest rate's counts: a saturated pipeline leaves visits cut short and requests unanswered,
                # which is not the mix's topology.
                counts = counted
    topo = dataclasses.replace(topology_from_counts(counts), merged=not args.two_stages)
    sizes = await mean_sizes(s, REAL_TOPICS)
    lines += ["", "topology: " + topo.describe(),
              "record sizes (value bytes): " + ", ".join(f"{k} {v}" for k, v in sizes.items())]

    sc = scratch_for(s)
    relays: dict[str, Any] = {}  # multiprocessing's spawn processes
    counters: dict[str, Synchronized] = {}
    ctx = mp.get_context("spawn")
    stop_flag = ctx.Event()
    pool: asyncpg.Pool | None = None
    gen: Generator | None = None
    try:
        # The rest of the stack's idle CPU in Kafka and PostgreSQL, before the floor's clients exist.
        idle0 = cpu_now(s, {})
        await asyncio.sleep(args.idle_seconds)
        idle = {k: v / args.idle_seconds for k, v in diff(idle0, cpu_now(s, {})).items()}
        lines.append(f"idle (the rest of the stack, {args.idle_seconds:g} s): kafka {1000 * idle['kafka']:.1f}, "
                     f"postgres {1000 * idle['postgres']:.1f} ms CPU per s")
        await create_topics(s, sc)
        if args.pg:
            pool = await connect_pool(s, 1)
            for ddl in pg_tables(sc).values():
                await pool.execute(ddl)
        roles = [r for r in RELAYS if not (topo.merged and r == "engine")]
        for role in roles:
            counters[role] = ctx.Value("q", 0)
            cfg = RelayConfig(role, sc, sizes, args.pg, args.persons, topo.merged)
            relays[role] = ctx.Process(target=_relay_main, args=(cfg, counters[role], stop_flag), daemon=True)
            relays[role].start()
        pids = {role: p.pid for role, p in relays.items() if p.pid is not None}
        gen = Generator(s, sc, sizes, topo, args.persons, args.seed)
        await gen.start()
        # Warm-up: every relay has its partitions (each saw records) and the chain answers.
        warm_end = time.monotonic() + args.warmup_seconds + 30
        while time.monotonic() < warm_end:
            await gen.fixed_rate(min(*args.rate, 50.0), 1.0, 1_000)
            if all(c.value > 0 for c in counters.values()) and gen.answered > 0:
                break
        else:
            raise RuntimeError("the floor's relays did not all get records within the warm-up")
        await gen.fixed_rate(min(args.rate), args.warmup_seconds, args.max_requests)
        await gen.drain(5.0)
        # What the floor's own processes cost with nothing to relay (their held fetches, the commits' timers).
        q0 = cpu_now(s, pids)
        await asyncio.sleep(args.idle_seconds)
        quiet = diff(q0, cpu_now(s, pids))
        lines.append("the floor's processes idle: " + ", ".join(
            f"{r} {1000 * quiet[r] / args.idle_seconds:.1f}" for r in roles) + " ms CPU per s")

        phases: list[Phase] = []
        plan: list[tuple[str, float | None]] = [("fixed", rate) for rate in args.rate]
        if args.saturation_seconds > 0:
            plan.append(("saturation", None))
        for name, rate in plan:
            first_seq, first_answered = gen.reset()
            relayed0 = {r: c.value for r, c in counters.items()}
            c0, t0 = cpu_now(s, pids), time.monotonic()
            if rate is not None:
                await gen.fixed_rate(rate, args.seconds, args.max_requests)
            else:
                await gen.saturate(args.saturation_seconds, args.max_requests, args.in_flight)
            load_s = time.monotonic() - t0
            await gen.drain(args.drain_seconds)
            c1, t1 = cpu_now(s, pids), time.monotonic()
            used = diff(c0, c1)
            wall = t1 - t0
            net = {r: used[r] for r in roles}
            net["kafka"] = net_of_idle(used["kafka"], idle["kafka"], wall)
            net["postgres"] = net_of_idle(used["postgres"], idle["postgres"], wall)
            phases.append(Phase(name, rate, gen.seq - first_seq, gen.answered - first_answered, wall,
                                gen.latencies, net, {k: used[k] for k in ("kafka", "postgres")}, used["generator"],
                                {r: c.value - relayed0[r] for r, c in counters.items()}, load_s))
        for ph in phases:
            bench = benches.get(ph.target_rps) if ph.target_rps is not None else None
            lines += ["", *phase_lines(ph, topo, bench, args.in_flight)]
    finally:
        if gen is not None:
            await gen.stop()
        stop_flag.set()
        for p in relays.values():
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
        if pool is not None:
            for table in pg_tables(sc):
                await pool.execute(f"DROP TABLE IF EXISTS {sc.table(table)}")
            await pool.close()
        left = await delete_scratch(s, sc)
        lines.append("" if not left else "WARNING: not deleted: " + ", ".join(left))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, nargs="+", default=[100.0],
                    help="requests/s of each fixed-rate phase (and of the bench's runs)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of each fixed-rate phase")
    ap.add_argument("--in-flight", type=int, default=SATURATION_IN_FLIGHT, help="requests in flight at saturation")
    ap.add_argument("--saturation-seconds", type=float, default=10.0, help="seconds at saturation; 0: none")
    ap.add_argument("--max-requests", type=int, default=200_000, help="at most this many requests per phase")
    ap.add_argument("--drain-seconds", type=float, default=10.0)
    ap.add_argument("--warmup-seconds", type=float, default=5.0)
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="Kafka's and PostgreSQL's idle CPU measured")
    ap.add_argument("--persons", type=int, default=6_500, help="distinct keys (the default population)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pg", action=argparse.BooleanOptionalAction, default=True,
                    help="the engine relay writes a settlement's least rows in PostgreSQL")
    ap.add_argument("--two-stages", action="store_true",
                    help="router and engine as two stages with a topic between them (the design before the "
                         "settlement stage): what that hop cost")
    ap.add_argument("--bench", action="store_true",
                    help="first run loadtest.bench --rate R at each rate, and count the hops on the real topics")
    ap.add_argument("--bench-seconds", type=float, default=20.0)
    ap.add_argument("--bench-processes", type=int, default=1, help="the bench's generator processes")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    if not (all(0 < r <= 20_000 for r in args.rate) and len(args.rate) <= 5 and 0 < args.seconds <= 600
            and 0 <= args.saturation_seconds <= 600 and 0 < args.in_flight <= 50_000):
        ap.error("--rate: at most 5 rates in (0, 20000]; --seconds in (0, 600], --saturation-seconds in [0, 600], "
                 "--in-flight in (0, 50000]")
    lines = uvloop.run(measure(args))
    text = "\n".join(lines).rstrip() + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
