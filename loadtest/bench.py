"""The benchmark: open loop at a target rate (held or not), or the closed loop's sustainable rate.

    python -m loadtest.bench --rate R [--arrivals constant|poisson] [--seconds 20] [--max-requests N]
    python -m loadtest.bench --step [--start-rate 100] [--step-factor 1.5 | --step-increment N] [--p99-bound-ms 100]
    python -m loadtest.bench [--seconds 20] [--max-stays 20000] [--concurrency 64]
    common: [--via kafka|http] [--mix national|inpatient] [--ceiling] [--profile]

Open loop (`--rate`, `--step`; loadtest.openloop): visits arrive at the target rate whatever the
answers, every latency counted from the request's due time into HDR histograms; the report says per
rate whether it was held (achieved ≥ 95% of target or of what the arrivals ask, p99 within the
bound, no unexpected errors) and the step mode the highest rate held. Closed loop (neither flag):
`--concurrency` visits run at once, each sequential, a new one as soon as one ends, so the rate is
what the pipeline sustains at that concurrency. Visits: the national mix (REFERENCE §7) or inpatient
stays only (2401 → 2301 ×1–2 → 2402 → 2303 → 2304 → 10% 2305).

The closed loop:

- `--via kafka` (default): envelopes are produced straight into `fsi.ingress`
  (key psn_no, headers reply_topic / reply_partition / received_ns) and answers
  read from partition `--reply-partition` (3) of `fsi.replies`, matched by msgid.
- `--via http`: through the HTTP gateway, as a hospital does.

The run, within `--seconds` (plus at most `--drain-seconds` for requests in flight):
1. baseline (`--baseline-seconds`, part of `--seconds`): the raw Kafka round trip —
   produce a request-sized record to a scratch topic and consume it back, with the
   same concurrency and the same producer settings as the services;
2. the load; every request's latency is measured from send to answer.
Prometheus histograms (`xs_stage_seconds`, `xs_settlement_end_to_end_seconds`, the
gateway's) are scraped before and after the load, for a stage breakdown, and the
CPU time of every component is read from /proc, so numbers from a noisy shared
machine can be read in context (a component restarted during the load marks the run
invalid). `--repeat N` measures N times and adds a table of every run with the
medians. Results go to stdout as plain text; progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from prometheus_client.parser import text_string_to_metric_families

from deploy import stack
from loadtest.demo import HttpCaller
from loadtest.his import GatewayClient, Signer, Stay, msgids_continue_at, next_msgid, start_msgids_at
from loadtest.openloop import (
    HELD_SHARE,
    OpenLoopResult,
    held,
    lookup_share,
    merge_results,
    mix_items,
    quantiles_ms,
    requests_per_visit,
    run_open_loop,
    step_rates,
)
from loadtest.population import (
    DEFAULT_PERSONS_PER_REGION,
    DEFAULT_SEED,
    INPATIENT_ONLY,
    NATIONAL_MIX,
    SCOPES,
    SUSPICIOUS_SHARE,
    CatalogInfo,
    HospitalInfo,
    PersonInfo,
    PipelineUnavailable,
    Population,
    Stats,
    TransportError,
    drive_stay,
    ensure_national,
    ensure_refdata,
    fee_lines,
    load_population,
    percentile,
    persons_in_shards,
    population_signer,
    sample_population,
    shanghai_now,
    wait_ready,
)
from schemas.codec import decode_envelope, encode, peek_ids
from services.common.config import PROJECT_ROOT, Settings, load_settings
from services.common.kafka import ADMIN, IDLE_FETCH_WAIT_MS, client_auth, make_admin, make_producer
from services.common.signing import InstitutionKey, content_digest
from services.common.tls import client_session
from services.refdata.store import Filing
from services.router.auth import authenticate
from topics.catalog import INGRESS, REPLIES

# The stack's processes whose CPU the report reads (the dashboard and Prometheus are not on the request path;
# smartmon is not either, but it reads every settlement event, so its cost grows with the load).
SERVICES = ("gateway", "settle", "clearing", "monitor", "smartmon")
STACK = (*SERVICES, "kafka", "postgres")
ECHO_TOPIC = "xsettle.bench.echo"  # scratch topic of the raw round-trip baseline
# The benchmark's population: 130,000 persons. The monitoring checks read each person's settlements of the last
# 37 days, and every run dates its visits today: with the demo's 6,500 persons a day of benchmarks gave each
# about ten settled visits in that window (ten times a real insured person's), and the history reads grew with
# every run. With 130,000, a whole A/B session (about 22,000 visits per variant) adds a fifth of a visit each.
BENCH_PERSONS_PER_REGION: Final = 20_000
_decoder = msgspec.json.Decoder(float_hook=Decimal)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Kafka ingress ------------------------------------------------------------------------------


def _psn_no(envelope: dict[str, Any]) -> str | None:
    body = envelope.get("input") or {}
    for part in ("mdtrtinfo", "dscginfo", "data"):
        value = body.get(part)
        if isinstance(value, dict) and value.get("psn_no"):
            return str(value["psn_no"])
    items = body.get("feedetail") or body.get("data")
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return str(items[0].get("psn_no") or "") or None
    return None


class ReplyReader:
    """One partition of a topic, read from its end; records resolve futures waiting on their key."""

    def __init__(self, s: Settings, principal: str, topic: str, partition: int) -> None:
        self.tp = TopicPartition(topic, partition)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, **client_auth(s, principal), enable_auto_commit=False,
            auto_offset_reset="latest",
            # As the gateway's reply reader: the broker answers a fetch as soon as a reply is there, so this
            # only bounds idle polling (5 ms was ~200 empty fetches a second, in this process and in Kafka).
            fetch_max_wait_ms=IDLE_FETCH_WAIT_MS, isolation_level="read_committed", request_timeout_ms=10_000,
        )
        self.pending: dict[str, list[asyncio.Future[bytes]]] = {}  # several when a msgid is resent
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.assign([self.tp])
        await self.consumer.seek_to_end(self.tp)
        await self.consumer.position(self.tp)  # resolved now: nothing produced from here on is missed
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    def expect(self, key: str) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending.setdefault(key, []).append(fut)
        return fut

    def forget(self, key: str, fut: asyncio.Future[bytes]) -> None:
        waiters = self.pending.get(key)
        if waiters and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del self.pending[key]

    async def _read(self) -> None:
        while True:
            batches = await self.consumer.getmany(self.tp, timeout_ms=100, max_records=5000)
            for records in batches.values():
                for rec in records:
                    for fut in self.pending.pop(rec.key.decode() if rec.key else "", ()):
                        if not fut.done():
                            fut.set_result(rec.value)


class KafkaCaller:
    """A HIS writing straight into fsi.ingress and reading its answers from one fsi.replies partition."""

    def __init__(self, s: Settings, reply_partition: int, timeout_s: float) -> None:
        self.s = s
        self.reply_partition = reply_partition
        self.timeout_s = timeout_s
        self.producer: AIOKafkaProducer = make_producer(s, "his", linger_ms=1)
        # The principal `his` may only write requests; the answers are read the way the gateway reads
        # them, as `gateway` (README "Security").
        self.replies = ReplyReader(s, "gateway", REPLIES.name, reply_partition)
        self.headers_base = [("reply_topic", REPLIES.name.encode()), ("reply_partition", str(reply_partition).encode())]

    async def start(self) -> None:
        try:
            await self.producer.start()
            await self.replies.start()
        except (KafkaError, OSError) as e:
            raise TransportError(f"Kafka at {self.s.kafka_bootstrap}: {type(e).__name__}: {e}") from None

    async def stop(self) -> None:
        await self.replies.stop()
        await self.producer.stop()

    async def call(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """Send as the envelope's institution: signed, within its sign-in session (9001 the first time)."""
        signer = GatewayClient.default_signer
        if signer is None:
            return await self._send(encode(envelope), envelope["msgid"], _psn_no(envelope))
        await signer.ensure_session(envelope, lambda raw: self._send(raw, peek_ids(raw)[0] or "", None))
        return await self._send(signer.sign(envelope), envelope["msgid"], _psn_no(envelope))

    async def _send(self, value: bytes, msgid: str, psn_no: str | None) -> dict[str, Any]:
        key = (psn_no or msgid).encode()
        fut = self.replies.expect(msgid)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.producer.send_and_wait(
                    INGRESS.name, value, key=key,
                    headers=[*self.headers_base, ("received_ns", str(time.time_ns()).encode())],
                )
                raw = await fut
        except KafkaError as e:
            raise TransportError(f"Kafka: {type(e).__name__}: {e}") from None
        finally:
            self.replies.forget(msgid, fut)
        result = _decoder.decode(raw)
        if not isinstance(result, dict):
            raise TransportError("a reply that is not a JSON object")
        return result


# Generator processes (--processes N) ---------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorShare:
    """What one generator process drives: its own institutions and persons (so msgids, sign-in sessions,
    1101 rate limits and busy persons never meet another process's) and its own fsi.replies partition."""

    index: int
    via: str
    reply_partition: int
    request_timeout_s: float
    http_connections: int
    places: list[HospitalInfo]  # hospitals and pharmacies
    persons: list[PersonInfo]
    filings: dict[str, list[Filing]]
    catalog: dict[str, list[CatalogInfo]]
    seed: int
    suspicious_share: float
    keys: dict[str, bytes]  # fixmedins_code → signing secret of its institutions
    msgid_clock: int  # his.start_msgids_at: past every msgid the parent sent


def reply_partitions(first: int, n: int, gateway_partition: int) -> list[int]:
    """An fsi.replies partition for each of `n` generator processes: `first`, then downwards, never the
    gateway's (its reply reader would take those replies too and drop them, on the stack's CPU); beyond
    the free partitions processes share them, each skipping the others' answers."""
    free = [p % REPLIES.partitions for p in range(first, first - REPLIES.partitions, -1)]
    free = [p for p in free if p != gateway_partition]
    return [free[i % len(free)] for i in range(n)]


def generator_shares(pop: Population, signer: Signer, args: argparse.Namespace, gateway_partition: int
                     ) -> list[GeneratorShare]:
    """The population dealt out to `args.processes` generator processes, every n-th hospital, pharmacy and
    person each (sorted by code: each share spans the regions and scopes)."""
    n = args.processes
    if n > len(pop.hospitals):
        raise ValueError(f"--processes {n}: only {len(pop.hospitals)} hospitals to deal out (one at least each)")
    clock = msgids_continue_at()
    # Via HTTP the gateway answers on its own partition; the shares' partitions go unused.
    partitions = reply_partitions(args.reply_partition, n, gateway_partition) if args.via == "kafka" else [
        args.reply_partition] * n
    return [GeneratorShare(
        index=i, via=args.via, reply_partition=partitions[i],
        request_timeout_s=args.request_timeout, http_connections=max(4, args.http_connections // n),
        places=pop.hospitals[i::n] + pop.pharmacies[i::n], persons=pop.persons[i::n], filings=pop.filings,
        catalog=pop.catalog, seed=pop.seed, suspicious_share=pop.suspicious_share,
        keys={h.his.fixmedins_code: signer.keys[h.his.fixmedins_code]
              for h in pop.hospitals[i::n] + pop.pharmacies[i::n] if h.his.fixmedins_code in signer.keys},
        msgid_clock=clock,
    ) for i in range(n)]


def _generator_main(conn: Connection, share: GeneratorShare) -> None:
    """A generator process (spawned): runs each rate its parent sends, answers with its OpenLoopResult."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_generator(conn, share))


async def _generator(conn: Connection, share: GeneratorShare) -> None:
    s = load_settings()
    start_msgids_at(share.msgid_clock)
    pop = Population(share.places, share.persons, share.filings, share.catalog, seed=share.seed,
                     suspicious_share=share.suspicious_share)
    GatewayClient.default_signer = Signer(share.keys)
    caller: KafkaCaller | HttpCaller
    session: aiohttp.ClientSession | None = None
    if share.via == "kafka":
        caller = KafkaCaller(s, share.reply_partition, timeout_s=share.request_timeout_s)
    else:
        session = client_session(s, limit=share.http_connections)
        caller = HttpCaller(s.gateway_url, session, timeout_s=share.request_timeout_s)
    try:
        if isinstance(caller, KafkaCaller):
            await caller.start()
        conn.send(("ready", None))
        while (job := await asyncio.to_thread(conn.recv)) is not None:
            res = await run_open_loop(caller, pop, **job, log=log if share.index == 0 else lambda _: None)
            conn.send(("result", res))
    except Exception as e:  # the parent reports it and stops the run
        conn.send(("error", f"generator process {share.index}: {type(e).__name__}: {e}"))
    finally:
        if isinstance(caller, KafkaCaller):
            await caller.stop()
        if session is not None:
            await session.close()
        conn.close()


class GeneratorPool:
    """`--processes` generator processes, each a share of every rate (`GeneratorShare`); their results
    merged into one (`openloop.merge_results`: HDR histograms added exactly)."""

    def __init__(self, shares: list[GeneratorShare]) -> None:
        self.shares = shares
        self.conns: list[Connection] = []
        self.procs: list[BaseProcess] = []

    async def start(self, timeout_s: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")  # not fork: the parent's event loop and clients stay its own
        for share in self.shares:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_generator_main, args=(child, share), name=f"bench-generator-{share.index}",
                               daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(self._answer(conn, "ready") for conn in self.conns))

    async def _answer(self, conn: Connection, kind: str) -> Any:
        try:
            got, value = await asyncio.to_thread(conn.recv)
        except EOFError:
            raise TransportError("a generator process ended without an answer (see its error above)") from None
        if got == "error":
            raise TransportError(value)
        if got != kind:
            raise TransportError(f"a generator process answered {got!r}, not {kind!r}")
        return value

    async def run(self, *, rate: float, max_requests: int, seed: int, **job: Any) -> OpenLoopResult:
        """One rate: each process gets rate / N and max_requests / N, and a seed of its own."""
        n = len(self.conns)
        for i, conn in enumerate(self.conns):
            conn.send({**job, "rate": rate / n, "max_requests": max(1, max_requests // n), "seed": seed * 64 + i})
        parts = await asyncio.gather(*(self._answer(conn, "result") for conn in self.conns))
        return merge_results(parts)

    async def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 15)
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, 5)
        for conn in self.conns:
            conn.close()


async def ensure_echo_topic(s: Settings) -> None:
    admin = make_admin(s, request_timeout_ms=10_000)  # a scratch topic: the stack's own tooling
    await admin.start()
    try:
        if ECHO_TOPIC not in set(await admin.list_topics()):
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(ECHO_TOPIC, 1, 1, topic_configs={"retention.ms": str(3600_000)})], timeout_ms=10_000
                )
    finally:
        await admin.close()


async def raw_round_trip(s: Settings, concurrency: int, seconds: float, payload: bytes) -> tuple[list[float], float]:
    """Produce → consume back on a scratch topic, `concurrency` loops; (latencies, elapsed)."""
    await ensure_echo_topic(s)
    producer = make_producer(s, ADMIN, linger_ms=1)
    reader = ReplyReader(s, ADMIN, ECHO_TOPIC, 0)
    await producer.start()
    await reader.start()
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def loop(w: int) -> None:
        i = 0
        while time.monotonic() < end:
            i += 1
            key = f"echo-{os.getpid()}-{w}-{i}"
            fut = reader.expect(key)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(10):
                    await producer.send_and_wait(ECHO_TOPIC, payload, key=key.encode(), partition=0)
                    await fut
            except TimeoutError:
                reader.forget(key, fut)
                continue
            latencies.append(time.perf_counter() - started)

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(loop(w) for w in range(concurrency)))
    finally:
        await reader.stop()
        await producer.stop()
    return latencies, time.monotonic() - t0


# Metrics and CPU ----------------------------------------------------------------------------------


@dataclass
class Hist:
    buckets: dict[float, float]  # upper bound → cumulative count
    count: float
    total: float

    def minus(self, other: Hist | None) -> Hist:
        if other is None:
            return self
        return Hist({le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()},
                    self.count - other.count, self.total - other.total)

    def quantile(self, q: float) -> float:
        """histogram_quantile: linear interpolation inside the bucket holding rank q·count."""
        if self.count <= 0:
            return float("nan")
        rank = q * self.count
        lower_le, lower_n = 0.0, 0.0
        for le, n in sorted(self.buckets.items()):
            if n >= rank:
                if le == float("inf"):
                    return lower_le
                return lower_le + (le - lower_le) * ((rank - lower_n) / (n - lower_n) if n > lower_n else 1.0)
            lower_le, lower_n = le, n
        return lower_le


Scrape = tuple[dict[tuple[str, str], Hist], dict[tuple[str, ...], float]]


async def scrape(s: Settings) -> Scrape:
    """Histograms (name, label) and xs_requests_total counters from the three services."""
    hists: dict[tuple[str, str], Hist] = {}
    counters: dict[tuple[str, ...], float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for port in (s.gateway_metrics_port, s.settle_metrics_port):
            try:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            for family in text_string_to_metric_families(text):
                if family.name == "xs_requests" or family.name == "xs_requests_total":
                    for sample in family.samples:
                        if sample.name.endswith("_total"):
                            lb = sample.labels
                            key = (lb.get("stage", ""), lb.get("infno", ""), lb.get("outcome", ""))
                            counters[key] = counters.get(key, 0.0) + sample.value
                    continue
                if family.type != "histogram" or not family.name.startswith("xs_"):
                    continue
                for sample in family.samples:
                    labels = {k: v for k, v in sample.labels.items() if k != "le"}
                    label = ",".join(f"{v}" for _, v in sorted(labels.items()))
                    h = hists.setdefault((family.name, label), Hist({}, 0.0, 0.0))
                    if sample.name.endswith("_bucket"):
                        h.buckets[float(sample.labels["le"])] = sample.value
                    elif sample.name.endswith("_count"):
                        h.count = sample.value
                    elif sample.name.endswith("_sum"):
                        h.total = sample.value
    return hists, counters


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK


def _children(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


# component → (its main pid, {pid: CPU seconds so far}) — several pids for PostgreSQL's backends.
CpuSnap = dict[str, tuple[int, dict[int, float]]]


def infra_cpu(s: Settings) -> CpuSnap:
    """CPU seconds so far of Kafka and of PostgreSQL (the postmaster and its backends), those running."""
    out: CpuSnap = {}
    kpid = stack.kafka_pid(s)
    if kpid:
        out["kafka"] = (kpid, {kpid: proc_cpu(kpid)})
    ppid = stack.pg_pid(s)
    if ppid:
        out["postgres"] = (ppid, {pid: proc_cpu(pid) for pid in (ppid, *_children(ppid))})
    return out


def cpu_snapshot(s: Settings) -> CpuSnap:
    """CPU seconds so far of each component, this process, and the whole machine (busy, from /proc/stat;
    pid 0). A different main pid in a later snapshot means the component restarted in between."""
    out: CpuSnap = {}
    for name in SERVICES:
        pid = stack.service_pid(name, s)
        if pid:
            out[name] = (pid, {pid: proc_cpu(pid)})
    out.update(infra_cpu(s))
    t = os.times()
    out["bench (this client)"] = (os.getpid(), {os.getpid(): t.user + t.system})
    try:
        cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        values = [int(v) for v in cpu]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        out["machine busy"] = (0, {0: (sum(values[:8]) - idle) / _CLK})
    except (OSError, ValueError, IndexError):
        pass
    return out


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def rss_lines(s: Settings) -> list[str]:
    """Resident memory of every process of the stack now (MB). PostgreSQL: the postmaster and its largest
    backend (backends share the buffer pool, so their sum would count it many times)."""
    parts = []
    for name in (*SERVICES, "dashboard"):
        pid = stack.service_pid(name, s)
        parts.append(f"{name} {_rss_mb(pid):.0f}" if pid else f"{name} -")
    kpid = stack.kafka_pid(s)
    parts.append(f"kafka {_rss_mb(kpid):.0f}" if kpid else "kafka -")
    ppid = stack.pg_pid(s)
    if ppid:
        backends = [_rss_mb(p) for p in _children(ppid)]
        parts.append(f"postgres {_rss_mb(ppid):.0f} (largest of {len(backends)} backends "
                     f"{max(backends, default=0.0):.0f})")
    prom = stack.prometheus_pid(s)
    parts.append(f"prometheus {_rss_mb(prom):.0f}" if prom else "prometheus -")
    return ["", "memory after the load (RSS, MB)", "  " + ", ".join(parts)]


def cpu_used(before: CpuSnap, after: CpuSnap, name: str) -> float:
    """CPU seconds between the snapshots: processes gone by the second one are not counted, new ones are
    counted whole."""
    return cpu_between(before[name][1], after[name][1])


def cpu_between(old: dict[int, float], new: dict[int, float]) -> float:
    """CPU seconds of a component's processes between two readings ({pid: CPU seconds so far}): a process
    gone by the second is not counted, a new one counted whole."""
    return sum(cpu - old.get(pid, 0.0) for pid, cpu in new.items())


def restarted(before: CpuSnap, after: CpuSnap) -> list[str]:
    return [name for name, (pid, _) in before.items() if name in after and after[name][0] != pid] + [
        name for name in before.keys() ^ after.keys() if name in ("gateway", "settle", "kafka", "postgres")
    ]


def code_version() -> str:
    """The commit the services run from (as checked out now), and whether they have local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "services", "schemas", "topics"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "code: unknown (no git)"
    return f"code: git {head}" + (" + uncommitted changes in services/schemas/topics" if dirty.strip() else "")


def machine_info() -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        f"machine: nproc {nproc}, {model}",
        f"         Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}, load average at start {load}",
    ]


# The run ------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.1f}"


def lat_row(name: str, values: Sequence[float]) -> str:
    return (f"  {name:26} {len(values):8d} {_ms(percentile(values, 50)):>8} {_ms(percentile(values, 90)):>8} "
            f"{_ms(percentile(values, 99)):>8} {_ms(max(values) if values else float('nan')):>8}")


LAT_HEADER = f"  {'latency ms':26} {'count':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}"


async def load_phase(caller: Any, pop: Population, stats: Stats, args: argparse.Namespace,
                     seconds: float) -> str | None:
    rng = random.Random(args.seed ^ time.time_ns())
    t0 = time.monotonic()
    stats.t0 = t0
    deadline = t0 + seconds
    launched = 0
    unreachable: list[str] = []

    def go_on() -> bool:
        return time.monotonic() < deadline and not unreachable

    async def worker() -> None:
        nonlocal launched
        while go_on() and launched < args.max_stays:
            scn = pop.scenario(rng, kinds=MIXES[args.mix], items=mix_items(args.mix),
                               lookup_share=lookup_share(args.mix))
            if scn is None:
                await asyncio.sleep(0.005)
                continue
            launched += 1
            try:
                await drive_stay(caller, scn, stats, go_on=go_on, resends=1)
            except TransportError as e:
                unreachable.append(str(e))
            finally:
                pop.release(scn)

    async def progress() -> None:
        while True:
            await asyncio.sleep(2.0)
            settle = stats.latencies.get("2304", [])
            log(f"  {time.monotonic() - t0:5.0f}s settled {stats.settled:7d} "
                f"({stats.rate_in_window(stats.settled_at, 2.0):6.1f}/s)  requests "
                f"{stats.rate_in_window(stats.answered_at, 2.0):7.1f}/s  2304 p50 "
                f"{_ms(percentile(settle[-2000:], 50))} ms  errors {sum(stats.errors().values())}")

    reporter = asyncio.create_task(progress())
    workers = asyncio.gather(*(worker() for _ in range(args.concurrency)))
    await asyncio.wait({workers}, timeout=seconds)
    stats.run_s = min(time.monotonic(), deadline) - t0
    done, _ = await asyncio.wait({workers}, timeout=args.drain_seconds)
    if not done:
        workers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await workers
        log(f"bench: requests still unanswered {args.drain_seconds:g} s after the end were abandoned")
    stats.drain_s = time.monotonic() - t0 - stats.run_s
    reporter.cancel()
    return unreachable[0] if unreachable else None


def report(args: argparse.Namespace, info: dict[str, Any], pop: Population, stats: Stats,
           raw: tuple[list[float], float], metrics: tuple[Scrape, Scrape], cpu: tuple[CpuSnap, CpuSnap],
           load_s: float, started_at: datetime) -> list[str]:
    out = [f"xsettle benchmark, {started_at:%Y-%m-%d %H:%M} UTC", *machine_info(), code_version()]
    out.append(f"run: via {args.via}, concurrency {args.concurrency} stays, load {load_s:.1f} s "
               f"(max {args.max_stays} stays), baseline {raw[1]:.1f} s; reference data seed "
               f"{args.seed}: {info['persons']} persons, {len(pop.hospitals)} hospitals; population "
               f"{args.population}: {info.get('persons_in_shards', info['persons']):,} persons in the shards, "
               f"{len(pop.persons)} driven")
    window = max(stats.run_s, 1e-9)
    end = stats.t0 + stats.run_s
    settled_in = sum(1 for t in stats.settled_at if t <= end)
    answered_in = sum(1 for t in stats.answered_at if t <= end)
    o = stats.stay_outcomes
    settle = stats.latencies.get("2304", [])
    every = stats.all_latencies()
    out += [
        "",
        f"pipeline ({'gateway → ' if args.via == 'http' else ''}fsi.ingress → settle (router, engine) + "
        "PostgreSQL → fsi.replies)",
        f"  settlements/s     {settled_in / window:8.1f}   ({settled_in} settlements 2304 in {window:.1f} s; "
        f"{stats.settled} with the drain, {stats.reversed} reversed 2305)",
        f"  requests/s        {answered_in / window:8.1f}   ({answered_in} answered in {window:.1f} s, all "
        f"transactions; {stats.requests()} with the drain of {stats.drain_s:.1f} s)",
        f"  stays             {stats.stays_started} started: {o['done']} complete, {o['refused']} refused as "
        f"expected (unfiled), {o['failed']} failed, {o['cut']} cut at the end",
        "  by scope (settled) " + ", ".join(f"{s} {stats.settled_by_scope[s]}" for s in SCOPES),
        LAT_HEADER,
        lat_row("2304 settlement", settle),
        lat_row("all requests", every),
    ]
    for infno in sorted(stats.latencies):
        if infno != "2304":
            out.append(lat_row(f"  {infno}", stats.latencies[infno]))
    codes: Counter[str] = Counter()
    for (_, code), n in stats.outcomes.items():
        if code != "ok":
            codes[code] += n
    err = ", ".join(
        f"{c} {n}" + (f" ({stats.expected_refusals[c]} expected)" if stats.expected_refusals[c] else "")
        for c, n in codes.most_common()
    )
    out.append(f"  error answers     {err or 'none'}; resent after a timeout: {stats.resends}")

    raw_lat, raw_s = raw
    out += ["", f"baseline: raw Kafka round trip (produce acks=all → consume, {args.concurrency} concurrent, "
            f"1 partition, {raw_s:.1f} s)",
            f"  round trips/s     {len(raw_lat) / max(raw_s, 1e-9):8.1f}",
            LAT_HEADER, lat_row("raw round trip", raw_lat)]
    r50, r99 = percentile(raw_lat, 50), percentile(raw_lat, 99)
    if raw_lat and settle:
        out.append(f"  ratio pipeline / raw round trip: 2304 p50 {percentile(settle, 50) / r50:.1f}x, "
                   f"p99 {percentile(settle, 99) / r99:.1f}x; all requests p50 {percentile(every, 50) / r50:.1f}x, "
                   f"p99 {percentile(every, 99) / r99:.1f}x")
        out.append("  (one pipeline request = 2 Kafka hops + routing and a settlement batch with a PostgreSQL commit)")

    (h0, c0), (h1, c1) = metrics
    out += ["", "stages (Prometheus histograms of the services, difference over the load; quantiles "
            "interpolated in buckets)",
            f"  {'stage':44} {'count':>8} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8}"]
    rows = [
        ("xs_gateway_request_seconds", "2304", "gateway 2304: HTTP request → response"),
        ("xs_stage_seconds", "router", "router: one record"),
        ("xs_stage_seconds", "settle_batch", "settle: one batch (one PG transaction)"),
        ("xs_settlement_end_to_end_seconds", "2304", "2304: ingress receipt → ledger commit"),
        ("xs_settlement_end_to_end_seconds", "2301", "2301: ingress receipt → ledger commit"),
    ]
    for name, label, title in rows:
        if (name, label) not in h1:
            continue
        d = h1[(name, label)].minus(h0.get((name, label)))
        if d.count < 0:
            out.append(f"  {title:44} (the service restarted: its counters started again)")
            continue
        if d.count == 0:
            continue
        out.append(f"  {title:44} {d.count:8.0f} {_ms(d.total / d.count):>8} {_ms(d.quantile(0.5)):>8} "
                   f"{_ms(d.quantile(0.99)):>8}")
    settle_records = sum(v - c0.get(k, 0) for k, v in c1.items() if k[0] == "settle")
    batches = 0.0
    if ("xs_stage_seconds", "settle_batch") in h1:
        batches = h1[("xs_stage_seconds", "settle_batch")].minus(h0.get(("xs_stage_seconds", "settle_batch"))).count
    if batches > 0:
        out.append(f"  settle: {settle_records:.0f} records in {batches:.0f} batches = {settle_records / batches:.1f} "
                   "records per batch")

    before, after = cpu
    span = stats.run_s + stats.drain_s
    ncpu = os.cpu_count() or 1
    out += ["", f"CPU seconds during the load ({span:.1f} s wall; {ncpu} CPUs = {span * ncpu:.0f} CPU-seconds)"]
    parts, known = [], 0.0
    gone = restarted(before, after)
    for name in ("gateway", "settle", "kafka", "postgres", "bench (this client)"):
        if name in gone:
            parts.append(f"{name} restarted")
        elif name in after and name in before:
            used = cpu_used(before, after, name)
            known += used
            parts.append(f"{name}{' (all backends)' if name == 'postgres' else ''} {used:.1f}")
    out.append("  " + ", ".join(parts))
    stack_cpu = known - cpu_used(before, after, "bench (this client)")
    if not gone and stack_cpu > 0 and stats.requests():
        out.append(f"  stack CPU per request {1000 * stack_cpu / stats.requests():.2f} ms, per settled stay "
                   f"{1000 * stack_cpu / max(stats.settled, 1):.1f} ms (gateway + settle + kafka + "
                   "postgres; less sensitive to other load than the rates)")
        if verify_s := info.get("verify_s"):
            share = 100 * verify_s / (stack_cpu / stats.requests())
            out.append(f"  authentication (signature + clock window + msgid digest, the router's part measured alone "
                       f"on this run's typical request): {1e6 * verify_s:.1f} µs CPU per request = {share:.1f}% of "
                       "the stack CPU per request (objective < 5%)")
    if "machine busy" in after and "machine busy" in before and not gone:
        busy = cpu_used(before, after, "machine busy")
        out.append(f"  machine busy {busy:.1f} ({100 * busy / max(span * ncpu, 1e-9):.0f}%), "
                   f"of which other processes (not the stack, not this client) {max(0.0, busy - known):.1f}")
    if gone:
        out[1:1] = [f"WARNING: {', '.join(gone)} restarted during the load (pid changed): these numbers are "
                    "not comparable; run again"]
    return out


def key_numbers(stats: Stats, raw: tuple[list[float], float], cpu: tuple[CpuSnap, CpuSnap]) -> dict[str, float]:
    """The numbers compared across runs (nan when not available)."""
    nan = float("nan")
    window = max(stats.run_s, 1e-9)
    end = stats.t0 + stats.run_s
    settle, every, raw_lat = stats.latencies.get("2304", []), stats.all_latencies(), raw[0]
    before, after = cpu
    stack_cpu = nan
    if not restarted(before, after) and stats.requests():
        stack_cpu = sum(cpu_used(before, after, n) for n in ("gateway", "settle", "kafka", "postgres")
                        if n in before and n in after) / stats.requests()
    r50, r99 = percentile(raw_lat, 50), percentile(raw_lat, 99)
    return {
        "settl/s": sum(1 for t in stats.settled_at if t <= end) / window,
        "req/s": sum(1 for t in stats.answered_at if t <= end) / window,
        "2304 p50": percentile(settle, 50) * 1000, "2304 p90": percentile(settle, 90) * 1000,
        "2304 p99": percentile(settle, 99) * 1000,
        "all p50": percentile(every, 50) * 1000, "all p90": percentile(every, 90) * 1000,
        "all p99": percentile(every, 99) * 1000,
        "raw p50": r50 * 1000, "raw p99": r99 * 1000,
        "x raw p50": percentile(settle, 50) / r50 if raw_lat else nan,
        "x raw p99": percentile(settle, 99) / r99 if raw_lat else nan,
        "cpu ms/req": stack_cpu * 1000,
    }


def median_table(runs: list[dict[str, float]], invalid: list[bool]) -> list[str]:
    cols = list(runs[0])
    out = ["", f"summary of {len(runs)} runs (median over the valid runs; latencies in ms, x raw = 2304 latency / "
           "raw Kafka round trip)", "  " + f"{'run':>6} " + " ".join(f"{c:>10}" for c in cols)]
    for i, (k, bad) in enumerate(zip(runs, invalid, strict=True), 1):
        note = "  (a service restarted: ignored)" if bad else ""
        out.append("  " + f"{i:>6} " + " ".join(f"{k[c]:10.1f}" for c in cols) + note)
    valid = [k for k, bad in zip(runs, invalid, strict=True) if not bad] or runs
    out.append("  " + f"{'median':>6} " + " ".join(f"{statistics.median(k[c] for k in valid):10.1f}" for c in cols))
    return out


async def measure(s: Settings, args: argparse.Namespace, caller: Any, pop: Population, info: dict[str, Any],
                  hard_deadline: float) -> tuple[list[str], dict[str, float], bool, str | None]:
    """One baseline + load; returns (report lines, key numbers, invalid, unreachable message)."""
    started_at = datetime.now(UTC)
    baseline_s = min(args.baseline_seconds, args.seconds / 2)
    load_s = args.seconds - baseline_s
    log(f"bench: baseline, raw Kafka round trip for {baseline_s:g} s ...")
    raw = await raw_round_trip(s, args.concurrency, baseline_s, encode(pop_sample_envelope(pop)))
    log(f"bench: load via {args.via}, {args.concurrency} concurrent stays, {load_s:g} s ...")
    m0, cpu0 = await scrape(s), cpu_snapshot(s)
    stats = Stats()
    remaining = max(1.0, hard_deadline - time.monotonic() - args.drain_seconds)
    unreachable = await load_phase(caller, pop, stats, args, min(load_s, remaining))
    cpu1, m1 = cpu_snapshot(s), await scrape(s)
    lines = report(args, info, pop, stats, raw, (m0, m1), (cpu0, cpu1), load_s, started_at) + rss_lines(s)
    return lines, key_numbers(stats, raw, (cpu0, cpu1)), bool(restarted(cpu0, cpu1)), unreachable


async def run(args: argparse.Namespace) -> int:
    s = load_settings()
    try:
        dataset, info = await ensure_refdata(s, seed=args.seed, persons_per_region=args.persons_per_region)
        if args.population == "national":
            info["persons_in_shards"] = await ensure_national(s, args.seed)
            pop = await sample_population(s, dataset, len(dataset.persons), args.seed)
        else:
            info["persons_in_shards"] = await persons_in_shards(s)
            pop = await load_population(s, dataset)
        pop.seed, pop.suspicious_share = args.seed, args.suspicious_share
    except PipelineUnavailable as e:
        log(f"bench: {e}")
        return 2
    signer = GatewayClient.default_signer = await population_signer(s, pop, operator="bench")
    info["verify_s"] = verification_seconds(pop)
    # After the reference data is there: readiness at most 60 s, then each run --seconds + --drain-seconds.
    hard_deadline = time.monotonic() + 60 + args.repeat * (args.seconds + args.drain_seconds)
    open_mode = args.rate is not None or args.step
    session: aiohttp.ClientSession | None = None
    caller: Any
    if args.via == "kafka":
        caller = KafkaCaller(s, args.reply_partition, timeout_s=args.request_timeout)
    else:
        # TLS, keep-alive: no handshake per request; an open loop has as many requests in flight as it needs
        session = client_session(s, limit=args.http_connections if open_mode else args.concurrency + 4)
        caller = HttpCaller(s.gateway_url, session, timeout_s=args.request_timeout)
    results: list[tuple[list[str], dict[str, float], bool]] = []
    unreachable: str | None = None
    try:
        if isinstance(caller, KafkaCaller):
            await caller.start()
        log(f"bench: {await wait_ready(caller, pop, timeout_s=30)}")
        if open_mode and args.processes > 1:
            pool = GeneratorPool(generator_shares(pop, signer, args, s.gateway_instance))
            log(f"bench: starting {args.processes} generator processes ...")
            try:
                await pool.start()
                lines, _ = await open_loop(s, args, pool, pop, info)
            finally:
                await pool.stop()
            print("\n".join(lines))
            return 0
        if open_mode:
            lines, _ = await open_loop(s, args, caller, pop, info)
            print("\n".join(lines))
            return 0
        for i in range(args.repeat):
            if args.repeat > 1:
                log(f"bench: run {i + 1} of {args.repeat}")
            lines, key, invalid, unreachable = await measure(s, args, caller, pop, info, hard_deadline)
            results.append((lines, key, invalid))
            if unreachable:
                break
    except (TransportError, PipelineUnavailable) as e:
        log(f"bench: the pipeline is unreachable: {e}\nbench: start the stack with "
            "'.venv/bin/python -m deploy.stack start'")
        return 2
    finally:
        if isinstance(caller, KafkaCaller):
            await caller.stop()
        if session is not None:
            await session.close()
    if len(results) == 1:
        print("\n".join(results[0][0]))
    elif results:
        # The full report of the run with the median settlement rate, then every run's key numbers.
        ranked = sorted(range(len(results)), key=lambda i: results[i][1]["settl/s"])
        median_run = ranked[len(ranked) // 2]
        print("\n".join(results[median_run][0]))
        print(f"(the report above is run {median_run + 1}: the median settlement rate)")
        print("\n".join(median_table([r[1] for r in results], [r[2] for r in results])))
    if unreachable:
        log(f"bench: the pipeline became unreachable during the run: {unreachable}")
        return 2
    return 0


# Open loop -------------------------------------------------------------------------------------------

MIXES: dict[str, dict[str, float]] = {"national": NATIONAL_MIX, "inpatient": INPATIENT_ONLY}
GENERATOR_BUSY_SHARE = 0.7  # a generator process above this share of a core may be what limits the rate
OPEN_HEADER = f"  {'latency ms (from due time)':28} {'count':>8} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>8}"


def _open_row(name: str, q: dict[str, float]) -> str:
    return (f"  {name:28} {q['count']:8.0f} {q['p50']:8.1f} {q['p99']:8.1f} {q['p999']:8.1f} "
            f"{q['max']:8.1f}")


def open_report(res: OpenLoopResult, cpu: tuple[CpuSnap, CpuSnap], wall_s: float, p99_bound_ms: float
                ) -> list[str]:
    """One rate's section: rates, held, latencies per family, errors, CPU per request per process (over
    `wall_s`, the time between the CPU snapshots: the load and its drain)."""
    ok, why = held(res, p99_bound_ms)
    st = res.stats
    out = [
        f"rate {res.target_rps:g} requests/s: {'HELD' if ok else 'NOT HELD'}" + ("" if ok else f" ({why})"),
        f"  target    {res.target_rps:9.1f} requests/s = {res.visits_per_s:.1f} visits/s x "
        f"{res.requests_per_visit:.2f} requests per visit (the mix's mean)",
        f"  offered   {res.offered_rps:9.1f} requests/s ({res.offered} requests due in {res.window_s:g} s, "
        f"{res.arrivals} visits arrived" + (f", {res.skipped} found no free person" if res.skipped else "")
        + (", new visits stopped at --max-requests" if res.capped else "") + ")",
        f"  achieved  {res.achieved_rps:9.1f} requests/s ({res.answered_in_window} answered inside the window; "
        f"{st.requests()} with the drain of {st.drain_s:.1f} s, {res.unanswered} never answered)",
        f"  visits    {sum(st.stay_outcomes.values())}: "
        + ", ".join(f"{k} {n}" for k, n in sorted(st.stay_outcomes.items()))
        + "; settled by kind " + (", ".join(f"{k} {n}" for k, n in sorted(st.settled_by_kind.items())) or "none")
        + f"; {st.reversed} reversed",
        OPEN_HEADER, _open_row("all requests", quantiles_ms(res.book.overall)),
    ]
    out += [_open_row(name, quantiles_ms(h)) for name, h in sorted(res.book.families.items())]
    codes: Counter[str] = Counter()
    for (_, code), n in st.outcomes.items():
        if code != "ok":
            codes[code] += n
    out.append("  answers that are errors: " + (", ".join(
        f"{c} {n}" + (f" ({st.expected_refusals[c]} expected)" if st.expected_refusals[c] else "")
        for c, n in codes.most_common()) or "none") + "; unexpected: "
        + (", ".join(f"{c} {n}" for c, n in res.errors().most_common()) or "none")
        + f"; resent after a timeout {st.resends}")
    before, after = cpu
    gone = restarted(before, after)
    n = max(res.offered, 1)
    per = [f"{name} {1000 * cpu_used(before, after, name) / n:.3f}" for name in STACK
           if name in before and name in after and name not in gone]
    stack_ms = 1000 * sum(cpu_used(before, after, name) for name in STACK
                          if name in before and name in after and name not in gone) / n
    out.append(f"  stack CPU per request {stack_ms:.3f} ms: " + ", ".join(per)
               + (f" ({', '.join(gone)} restarted: not counted)" if gone else ""))
    per_process = res.generator_cpu_s or [res.client_cpu_s]
    if len(per_process) == 1:
        out.append(f"  load generator (this process): {1000 * res.client_cpu_s / n:.3f} ms CPU per request "
                   f"({res.client_cpu_s:.1f} CPU-s = {100 * res.client_cpu_s / max(wall_s, 1e-9):.0f}% "
                   f"of one core); latest visit start {1000 * res.sender_lag_max_s:.1f} ms after its arrival time")
    else:
        out.append(f"  load generator ({len(per_process)} processes): {1000 * res.client_cpu_s / n:.3f} ms CPU per "
                   f"request in all ({res.client_cpu_s:.1f} CPU-s); per process " + ", ".join(
                       f"{cpu:.1f} CPU-s = {100 * cpu / max(wall_s, 1e-9):.0f}% of one core" for cpu in per_process)
                   + f"; latest visit start {1000 * res.sender_lag_max_s:.1f} ms after its arrival time")
    if (busiest := max(per_process)) > GENERATOR_BUSY_SHARE * wall_s:
        out.append(f"  WARNING: a load generator process kept one core {100 * busiest / wall_s:.0f}% busy: at this "
                   "rate it may be the limit, not the pipeline (more --processes, each a share of the rate)")
    if "machine busy" in before and "machine busy" in after:
        busy = cpu_used(before, after, "machine busy")
        out.append(f"  machine busy {100 * busy / max(wall_s * (os.cpu_count() or 1), 1e-9):.0f}% of "
                   f"{os.cpu_count()} CPUs over {wall_s:.1f} s (this process included)")
    return out


def step_summary(results: list[tuple[OpenLoopResult, bool, float]], p99_bound_ms: float) -> list[str]:
    out = ["", f"step mode: held = achieved >= {HELD_SHARE:.0%} of target (of what the visits that arrived ask, "
           f"if fewer), p99 <= {p99_bound_ms:g} ms, no errors other than expected refusals",
           f"  {'target/s':>9} {'achieved/s':>10} {'held':>5} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
           f"{'stack CPU ms/req':>16}"]
    for res, ok, cpu_ms in results:
        q = quantiles_ms(res.book.overall)
        out.append(f"  {res.target_rps:9g} {res.achieved_rps:10.1f} {'yes' if ok else 'no':>5} {q['p50']:8.1f} "
                   f"{q['p99']:8.1f} {q['p999']:9.1f} {cpu_ms:16.3f}")
    best = max((r.target_rps for r, ok, _ in results if ok), default=None)
    out.append(f"  highest rate held: {best:g} requests/s" if best is not None else "  no rate was held")
    return out


def repeat_summary(runs: list[list[tuple[OpenLoopResult, bool, float]]], step: bool) -> list[str]:
    """The medians of `--repeat` open-loop runs: of the highest rate held (step mode), or of one rate's p99.
    On a shared machine one blip can end a step run early; the median of several says what the pipeline holds."""
    if step:
        best = [max((r.target_rps for r, ok, _ in run if ok), default=0.0) for run in runs]
        lower = " (of an even count, the lower: a rate that was measured)" if len(runs) % 2 == 0 else ""
        return [f"{len(runs)} step runs: highest rate held {', '.join(f'{b:g}' for b in best)} requests/s "
                f"(0: none); median {statistics.median_low(best):g} requests/s{lower}"]
    first = [run[0] for run in runs]
    p99 = [quantiles_ms(r.book.overall)["p99"] for r, _, _ in first]
    return [f"{len(runs)} runs at {first[0][0].target_rps:g} requests/s: held in {sum(ok for _, ok, _ in first)}; "
            f"p99 {', '.join(f'{q:.1f}' for q in p99)} ms, median {statistics.median(p99):.1f} ms; stack CPU per "
            f"request median {statistics.median(cpu for _, _, cpu in first):.3f} ms"]


def _stack_cpu_ms(cpu: tuple[CpuSnap, CpuSnap], requests: int) -> float:
    before, after = cpu
    gone = restarted(before, after)
    used = sum(cpu_used(before, after, n) for n in STACK if n in before and n in after and n not in gone)
    return 1000 * used / max(requests, 1)


async def open_loop(s: Settings, args: argparse.Namespace, caller: Any, pop: Population, info: dict[str, Any]
                    ) -> tuple[list[str], list[tuple[OpenLoopResult, bool, float]]]:
    """The open-loop run: one rate (--rate) or the step mode; the optional ceiling and profiles."""
    started_at = datetime.now(UTC)
    kinds = MIXES[args.mix]
    per_visit = requests_per_visit(pop, kinds, args.mix, args.seed)
    rates = [args.rate] if not args.step else step_rates(
        args.start_rate, factor=args.step_factor, increment=args.step_increment, max_rate=args.max_rate,
        max_steps=args.max_steps)
    out = [f"xsettle open-loop benchmark, {started_at:%Y-%m-%d %H:%M} UTC", *machine_info(), code_version(),
           f"run: via {args.via}, mix {args.mix} ({', '.join(f'{k} {v:g}' for k, v in kinds.items())}; "
           f"{per_visit:.2f} requests per visit), {args.arrivals} arrivals, {args.seconds:g} s per rate (at most "
           f"{args.max_requests} requests), drain {args.drain_seconds:g} s, after an unreported warm-up of "
           f"{args.warmup_seconds:g} s at the first rate; {info['persons']} persons, "
           f"{len(pop.hospitals)} hospitals, {len(pop.pharmacies)} pharmacies; population {args.population}", ""]
    def job(rate: float, seconds: float, seed: int) -> dict[str, Any]:
        return {"rate": rate, "seconds": seconds, "arrivals": args.arrivals, "kinds": kinds, "mix": args.mix,
                "max_requests": args.max_requests, "drain_s": args.drain_seconds, "seed": seed, "per_visit": per_visit}

    async def load(rate: float, seconds: float, seed: int) -> OpenLoopResult:
        if isinstance(caller, GeneratorPool):
            return await caller.run(**job(rate, seconds, seed))
        return await run_open_loop(caller, pop, **job(rate, seconds, seed), log=log)

    if args.warmup_seconds > 0:
        # A run's first requests open its connections, sign its institutions in and meet the stages' cold caches:
        # a few of them slow are the p99 of a short first step (25/s for 20 s: the 5th slowest of 500).
        log(f"bench: warm-up at {rates[0]:g} requests/s for {args.warmup_seconds:g} s (not reported) ...")
        warm = await load(rates[0], args.warmup_seconds, args.seed * 1000 - 1)
        if warm.unreachable:
            raise TransportError(warm.unreachable)
    profiler = None
    if args.profile:
        from loadtest.profile import StageProfiler  # the other half of issue 14: only when asked for

        profiler = StageProfiler()
        profiler.start(s, Path(args.profile_dir), args.repeat * len(rates) * (args.seconds + args.drain_seconds))
    runs: list[list[tuple[OpenLoopResult, bool, float]]] = []
    try:
        for n in range(args.repeat):
            if args.repeat > 1:
                log(f"bench: run {n + 1} of {args.repeat}")
                out.append(f"run {n + 1} of {args.repeat}")
            this_run: list[tuple[OpenLoopResult, bool, float]] = []
            runs.append(this_run)
            for i, rate in enumerate(rates):
                log(f"bench: open loop at {rate:g} requests/s for {args.seconds:g} s via {args.via} ...")
                cpu0, wall0 = cpu_snapshot(s), time.monotonic()
                res = await load(rate, args.seconds, args.seed * 1000 + 100 * n + i)
                cpu = (cpu0, cpu_snapshot(s))
                wall_s = time.monotonic() - wall0
                ok, why = held(res, args.p99_bound_ms)
                this_run.append((res, ok, _stack_cpu_ms(cpu, res.offered)))
                out += [*open_report(res, cpu, wall_s, args.p99_bound_ms), ""]
                log(f"bench: {rate:g}/s {'held' if ok else 'not held: ' + why}")
                if res.unreachable:
                    raise TransportError(res.unreachable)
                if args.step and not ok:
                    break
            if args.step:
                out += [*step_summary(this_run, args.p99_bound_ms), ""]
    finally:
        if profiler is not None:
            out += [*await asyncio.to_thread(profiler.stop), ""]
    if args.repeat > 1:
        out += repeat_summary(runs, args.step)
    results = [result for run in runs for result in run]
    if args.ceiling:
        from loadtest.ceiling import CeilingError, measure_ceiling  # the other half of issue 14: only when asked for

        record_bytes = len(encode(pop_sample_envelope(pop)))
        log(f"bench: Kafka's own producer and consumer tools, {args.ceiling_records} records of {record_bytes} B ...")
        try:
            ceiling = await asyncio.to_thread(measure_ceiling, s, record_bytes, args.ceiling_records)
        except CeilingError as e:
            return [*out, "", f"ceiling: not measured ({e})", *rss_lines(s)], results
        out += ["", *ceiling.lines]
        best = max((r.achieved_rps for r, ok, _ in results if ok), default=max(r.achieved_rps for r, _, _ in results))
        out.append(f"  pipeline ÷ ceiling: {best:.1f} requests/s (the highest held, else the highest achieved) = "
                   f"{100 * best / max(ceiling.produce_records_per_s, 1e-9):.2f}% of the producer tool's "
                   f"{ceiling.produce_records_per_s:.0f} records/s, "
                   f"{100 * best / max(ceiling.consume_records_per_s, 1e-9):.2f}% of the consumer tool's "
                   f"{ceiling.consume_records_per_s:.0f} records/s")
    return out + rss_lines(s), results


def verification_seconds(pop: Population, n: int = 2000) -> float:
    """CPU seconds the router spends authenticating one request (services.router.auth.authenticate and the
    msgid digest), measured on `n` signed copies of the run's typical request (median of 5 rounds)."""
    envelope = pop_sample_envelope(pop)
    code = envelope["fixmedins_code"]
    secret = os.urandom(32)
    signer = Signer({code: secret})
    signer.sessions[code] = "S" * 30
    raws = [signer.sign({**envelope, "msgid": next_msgid(code)}) for _ in range(n)]
    decoded = [decode_envelope(raw) for raw in raws]
    keys = {code: (InstitutionKey("K1", secret),)}
    rounds = []
    for _ in range(5):
        now = datetime.now(UTC)
        t0 = time.process_time()
        for env, raw in zip(decoded, raws, strict=True):
            if authenticate(env, raw, keys, now, 300) is not None:
                raise RuntimeError("the benchmark's own signed request did not verify")
            content_digest(env.infno, env.fixmedins_code, env.insuplc_admdvs, env.mdtrtarea_admvs, bytes(env.input))
        rounds.append((time.process_time() - t0) / n)
    return statistics.median(rounds)


def pop_sample_envelope(pop: Population) -> dict[str, Any]:
    """A typical request (a fee upload of 8 items), for the raw round trip's payload size."""
    rng = random.Random(0)
    hospital, person = pop.probe_pair()
    stay = Stay(hospital.his, person.psn_no, person.insuplc, person.insutype, shanghai_now())
    stay.mdtrt_id = "M" + hospital.his.fixmedins_code + "0" * 18
    return stay.upload(fee_lines(rng, pop.catalog[hospital.prov], 8))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked (a bad one exits with status 2 and the reason)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=20.0, help="baseline + load time (default 20)")
    p.add_argument("--max-stays", type=int, default=20_000, help="stop after this many stays (default 20000)")
    p.add_argument("--concurrency", type=int, default=64, help="stays in flight at once (default 64)")
    p.add_argument("--via", choices=("kafka", "http"), default="kafka", help="ingress path (default kafka)")
    p.add_argument("--baseline-seconds", type=float, default=3.0,
                   help="raw Kafka round trip before the load, part of --seconds (default 3)")
    p.add_argument("--drain-seconds", type=float, default=10.0,
                   help="time allowed for the requests in flight at the end (default 10)")
    p.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds before a request is resent with the same msgid (default 10)")
    p.add_argument("--reply-partition", type=int, default=3, choices=range(REPLIES.partitions),
                   metavar=f"0..{REPLIES.partitions - 1}", help="fsi.replies partition to read (default 3)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure this many times (baseline + load each) and print the medians; in the open loop, "
                        "the rate or the step runs this many times, with the medians of p99 or of the highest "
                        "rate held (default 1)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="reference-data seed (default 7)")
    p.add_argument("--persons-per-region", type=int, default=BENCH_PERSONS_PER_REGION,
                   help=f"reference-data size: persons per seed region (default {BENCH_PERSONS_PER_REGION:,}, "
                        f"{BENCH_PERSONS_PER_REGION * 13 // 2:,} persons in all; the demo's is "
                        f"{DEFAULT_PERSONS_PER_REGION:,})")
    p.add_argument("--population", choices=("default", "national"), default="default",
                   help="default: drive the reference data's persons; national: load the seed regions' real "
                        "population (about 13 million persons; generated and loaded once, ~10 min) and drive as "
                        "many persons sampled from it (default: default)")
    p.add_argument("--suspicious-share", type=float, default=0.0,
                   help="share of the persons showing each monitoring rule's suspicious behaviour, as in the "
                        f"demo (e.g. {SUSPICIOUS_SHARE:g}; default 0: the mix exactly as drawn)")
    p.add_argument("--mix", choices=tuple(MIXES), default="national",
                   help="visits drawn in the national shares (REFERENCE §7) with 1101 look-ups and reversals, or "
                        "inpatient stays only (default national)")
    o = p.add_argument_group("open loop (a target rate, whatever the answers)")
    o.add_argument("--rate", type=float, help="requests/s to offer (open loop; without it: closed loop)")
    o.add_argument("--arrivals", choices=("constant", "poisson"), default="poisson",
                   help="visit arrivals evenly spaced or a Poisson process (default poisson)")
    o.add_argument("--max-requests", type=int, default=200_000,
                   help="no new visit once this many requests were sent, per rate (default 200000)")
    o.add_argument("--step", action="store_true",
                   help="raise the rate from --start-rate until it is not held; report the highest rate held")
    o.add_argument("--start-rate", type=float, default=100.0, help="the step mode's first rate (default 100)")
    o.add_argument("--step-factor", type=float, default=1.5, help="next rate = rate x this (default 1.5)")
    o.add_argument("--step-increment", type=float, default=0.0,
                   help="next rate = rate + this (used when --step-factor is 1)")
    o.add_argument("--max-rate", type=float, default=20_000.0, help="the step mode stops above (default 20000)")
    o.add_argument("--max-steps", type=int, default=12, help="the step mode's most rates (default 12)")
    o.add_argument("--p99-bound-ms", type=float, default=100.0, help="held only with p99 within (default 100)")
    o.add_argument("--warmup-seconds", type=float, default=5.0,
                   help="first an unreported load at the first rate for this long: this run's connections, "
                        "sign-ins and the stages' caches are warm before anything is measured (default 5; 0: none)")
    o.add_argument("--processes", type=int, default=1,
                   help="generator processes, each a share of the rate with its own institutions and persons; "
                        "their histograms merged (default 1: this process)")
    o.add_argument("--http-connections", type=int, default=512,
                   help="most HTTP connections at once via http (default 512)")
    o.add_argument("--ceiling", action="store_true",
                   help="after the load, Kafka's own producer/consumer tools on the same broker "
                        "(loadtest.ceiling) and pipeline ÷ ceiling")
    o.add_argument("--ceiling-records", type=int, default=200_000, help="records the tools send (default 200000)")
    o.add_argument("--profile", action="store_true",
                   help="profile every stage with py-spy during the load (loadtest.profile)")
    o.add_argument("--profile-dir", default=str(PROJECT_ROOT / ".state" / "profiles"),
                   help="where the raw profiles go (default .state/profiles)")
    args = p.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    if args.step:
        try:
            step_rates(args.start_rate, factor=args.step_factor, increment=args.step_increment,
                       max_rate=args.max_rate, max_steps=args.max_steps)
        except ValueError as e:
            p.error(str(e))
    if (args.rate is not None or args.step) and args.max_requests < 1:
        p.error("--max-requests must be positive")
    if args.processes < 1 or (args.processes > 1 and args.rate is None and not args.step):
        p.error("--processes must be positive, and more than 1 only in the open loop (--rate or --step)")
    if args.seconds <= 0 or min(args.concurrency, args.max_stays, args.repeat) < 1 or args.drain_seconds < 0 \
            or args.warmup_seconds < 0:
        p.error("--seconds, --concurrency, --max-stays and --repeat must be positive, --drain-seconds and "
                "--warmup-seconds not negative")
    return args


if __name__ == "__main__":
    sys.exit(main())
