"""Where the router reads person facts: measured (README, "Where person facts are read").

    python -m loadtest.person_reads pg [--persons 3000000] [--batches 200] [--shard s1]
    python -m loadtest.person_reads changelog [--records 1000000] [--partitions 8]
    python -m loadtest.person_reads cleanup [--shard s1]

`pg`: fills one shard database of this stack (XS_* settings) with `--persons` synthetic persons
(psn_no `BENCH…`, a third of them with a filing) by `INSERT … SELECT generate_series` (skipped for
what is already there), then reads random batches of 1, 50 and 500 psn_nos with the router's own
query (`services.refdata.store.fetch_persons`: one statement, `psn_no = ANY($1)`, filings aggregated)
and prints the batch latency and the cost per record. `cleanup` deletes the BENCH rows again.

`rss`: the running router's resident memory (this stack's `deploy.stack start`), before and after
`--requests` 5301 queries (answered by the router from the batch's persons) for persons sampled from
every shard, through the HTTP gateway — the same number whatever the shards hold.

`changelog`: the alternative, a partition-local store restored from a compacted changelog topic
(as Kafka Streams / faust tables do). Creates the compacted topic `<prefix>bench.person-changelog`,
produces `--records` person records (key psn_no, msgpack value) once, then restores every partition
from the beginning into (a) a Python dict and (b) an on-disk SQLite table (stdlib; a RocksDB-like
local store), and prints the restore rate, the memory or disk per record, the lookup cost, and the
restore time of 13 million persons spread over n partitions.

Bounded: every loop runs a fixed count; nothing is sent anywhere but this stack's loopback servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from deploy.stack import service_pid
from loadtest.his import GatewayClient, Hospital, simulator_signer
from services.common.config import Settings, load_settings
from services.common.kafka import ADMIN, client_auth, make_admin
from services.common.shards import ShardPools, shard_dsns
from services.common.tls import client_session
from services.refdata.store import fetch_persons

PREFIX = "BENCH"
FILL_CHUNK = 500_000
BATCH_SIZES = (1, 50, 500)
NATIONAL_PERSONS = 13_000_000  # cross-region insured persons to restore (issue 10)
SEED = 10


def _psn(i: int) -> str:
    return f"{PREFIX}{i:010d}"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def fill(conn: asyncpg.Connection, persons: int) -> int:
    have = await conn.fetchval("SELECT count(*) FROM person WHERE psn_no LIKE 'BENCH%'")
    start = time.perf_counter()
    for lo in range(have + 1, persons + 1, FILL_CHUNK):
        hi = min(lo + FILL_CHUNK - 1, persons)
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO person (psn_no, insuplc_admdvs, insutype, psn_type, assistance, acct_balc_fen,"
                " chronic, chronic_file, certno, psn_name)"
                f" SELECT '{PREFIX}' || lpad(g::text, 10, '0'), '150400', CASE WHEN g % 2 = 0 THEN '310' ELSE '390'"
                " END, '1501', NULL, g % 100000, CASE WHEN g % 7 = 0 THEN '{HTN}'::text[] ELSE '{}' END,"
                " CASE WHEN g % 7 = 0 THEN '{HTN}'::text[] ELSE '{}' END, NULL, NULL"
                " FROM generate_series($1::int, $2::int) AS g", lo, hi)
            await conn.execute(
                "INSERT INTO filing (filing_id, psn_no, filing_type, begndate, enddate, target_admdvs)"
                f" SELECT 'BF' || g, '{PREFIX}' || lpad(g::text, 10, '0'), 'LONG_TERM', DATE '2026-01-01',"
                " DATE '2026-12-31', '510000' FROM generate_series($1::int, $2::int) AS g WHERE g % 3 = 0", lo, hi)
        print(f"  filled {hi:,} persons ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if have < persons:
        await conn.execute("ANALYZE person")
        await conn.execute("ANALYZE filing")
    return int(have)


async def measure_pg(s: Settings, shard: str, persons: int, batches: int) -> None:
    conn = await asyncpg.connect(shard_dsns(s)[shard])
    try:
        had = await fill(conn, persons)
        total = await conn.fetchval("SELECT count(*) FROM person")
        size = await conn.fetchval("SELECT pg_total_relation_size('person') + pg_total_relation_size('filing')")
        print(f"PostgreSQL shard {shard}: {total:,} persons ({persons - min(had, persons):,} added now), "
              f"person + filing {size / 2**20:,.0f} MiB")
        rng = random.Random(SEED)
        print("batch size | batches | round trips/batch | batch p50 ms | batch p95 ms | per record µs (mean)")
        for size_ in BATCH_SIZES:
            await fetch_persons(conn, [_psn(rng.randint(1, persons)) for _ in range(size_)])  # warm the statement
            times = []
            found = 0
            for _ in range(batches):
                keys = [_psn(i) for i in rng.sample(range(1, persons + 1), size_)]  # distinct
                t0 = time.perf_counter()
                got, _filings = await fetch_persons(conn, keys)
                times.append(time.perf_counter() - t0)
                found += len(got)
            assert found == batches * size_, "every sampled person must be found"
            q = statistics.quantiles(times, n=20)
            print(f"{size_:>10} | {batches:>7} | {1:>17} | {statistics.median(times) * 1e3:>12.2f} | "
                  f"{q[18] * 1e3:>12.2f} | {statistics.fmean(times) / size_ * 1e6:>20.1f}")
    finally:
        await conn.close()


async def cleanup(s: Settings, shard: str) -> None:
    conn = await asyncpg.connect(shard_dsns(s)[shard])
    try:
        f = await conn.execute(f"DELETE FROM filing WHERE psn_no LIKE '{PREFIX}%'")
        p = await conn.execute(f"DELETE FROM person WHERE psn_no LIKE '{PREFIX}%'")
        await conn.execute("VACUUM ANALYZE person")
        print(f"deleted: {p}, {f}")
    finally:
        await conn.close()


def _router_rss(s: Settings) -> int:
    pid = service_pid("settle", s)
    assert pid is not None, "the settlement stage (which routes) is not running (python -m deploy.stack start)"
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


async def measure_rss(s: Settings, requests: int, concurrency: int) -> None:
    shards = await ShardPools.connect(s, 2)
    hub = await asyncpg.create_pool(s.pg_dsn, min_size=1, max_size=1)
    try:
        counts = {name: await pool.fetchval("SELECT count(*) FROM person") for name, pool in shards}
        sample: list[tuple[str, str]] = []
        for _name, pool in shards:
            sample += [(r["psn_no"], r["insuplc_admdvs"]) for r in await pool.fetch(
                "SELECT psn_no, insuplc_admdvs FROM person TABLESAMPLE BERNOULLI (50) REPEATABLE (10) LIMIT $1",
                requests)]
        code, admdvs = await hub.fetchrow("SELECT fixmedins_code, admdvs FROM hospital ORDER BY 1 LIMIT 1")
        signer = await simulator_signer(s, hub, [code], operator="person-reads")
    finally:
        await hub.close()
        await shards.close()
    hospital = Hospital(code, "rss probe", admdvs.strip(), live_clock=True)
    rng = random.Random(SEED)
    picks = [rng.choice(sample) for _ in range(requests)]
    before = _router_rss(s)
    answered = 0
    async with client_session(s) as session:
        client = GatewayClient(s.gateway_url, session, signer=signer)

        async def worker(mine: list[tuple[str, str]]) -> None:
            nonlocal answered
            for psn_no, insuplc in mine:
                r = await client.call(hospital.envelope("5301", {"data": {"psn_no": psn_no}}, insuplc=insuplc.strip()))
                answered += r["infcode"] == 0
        await asyncio.gather(*(worker(picks[i::concurrency]) for i in range(concurrency)))
    after = _router_rss(s)
    print(f"persons per shard: {', '.join(f'{k} {v:,}' for k, v in counts.items())}")
    print(f"router RSS before {before / 2**20:.1f} MiB, after {requests:,} 5301 queries ({answered:,} answered ok) "
          f"{after / 2**20:.1f} MiB")


# The changelog alternative ----------------------------------------------------------------------


class PersonRecord(msgspec.Struct, array_like=True):
    insuplc_admdvs: str
    insutype: str
    psn_type: str
    assistance: str | None
    acct_balc_fen: int
    chronic: list[str]
    filings: list[tuple[str, str, str, str, str | None]]


def _value(i: int) -> bytes:
    filings: list[tuple[str, str, str, str, str | None]] = (
        [(f"BF{i}", "LONG_TERM", "2026-01-01", "2026-12-31", "510000")] if i % 3 == 0 else [])
    return msgspec.msgpack.encode(PersonRecord("150400", "310" if i % 2 == 0 else "390", "1501", None,
                                               i % 100000, ["HTN"] if i % 7 == 0 else [], filings))


async def _ensure_topic(s: Settings, topic: str, partitions: int) -> None:
    admin = make_admin(s)  # a scratch topic of this measurement: the stack's own tooling
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs={
            "cleanup.policy": "compact", "segment.bytes": str(64 * 2**20)})])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


async def _produce(s: Settings, topic: str, records: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), acks="all",
                                enable_idempotence=True,
                                linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    start = time.perf_counter()
    try:
        for lo in range(1, records + 1, 20_000):
            futures = [await producer.send(topic, _value(i), key=_psn(i).encode())
                       for i in range(lo, min(lo + 20_000, records + 1))]
            await asyncio.gather(*futures)
        print(f"  produced {records:,} records in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    finally:
        await producer.stop()


async def _restore(s: Settings, topic: str, parts: list[TopicPartition], sink: str,
                   db: sqlite3.Connection | None) -> tuple[float, int, dict[bytes, bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 2**20, fetch_max_bytes=32 * 2**20)
    await consumer.start()
    store: dict[bytes, bytes] = {}
    n = 0
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        start = time.perf_counter()
        pending = {tp for tp in parts if ends[tp] > 0}
        while pending:
            for tp, batch in (await consumer.getmany(*pending, timeout_ms=1000, max_records=50_000)).items():
                if sink == "dict":
                    for rec in batch:
                        msgspec.msgpack.decode(rec.value, type=PersonRecord)  # what a restore must do to check
                        store[rec.key] = rec.value
                else:
                    assert db is not None
                    db.executemany("INSERT OR REPLACE INTO person (psn_no, value) VALUES (?, ?)",
                                   [(rec.key, rec.value) for rec in batch])
                    db.commit()
                n += len(batch)
                if batch and batch[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
        return time.perf_counter() - start, n, store
    finally:
        await consumer.stop()


async def measure_changelog(s: Settings, records: int, partitions: int, lookups: int) -> None:
    topic = f"{s.topic_prefix}bench.person-changelog"
    await _ensure_topic(s, topic, partitions)
    probe = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN))
    await probe.start()
    parts = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        have = sum((await probe.end_offsets(parts)).values())
    finally:
        await probe.stop()
    if have < records:
        await _produce(s, topic, records)
    rng = random.Random(SEED)
    keys = [_psn(rng.randint(1, records)).encode() for _ in range(lookups)]

    rss0 = _rss_bytes()
    seconds, n, store = await _restore(s, topic, parts, "dict", None)
    rss = _rss_bytes() - rss0
    t0 = time.perf_counter()
    for k in keys:
        msgspec.msgpack.decode(store[k], type=PersonRecord)
    dict_lookup = (time.perf_counter() - t0) / lookups
    rate_dict = n / seconds
    store.clear()

    with tempfile.TemporaryDirectory(dir=s.state_dir) as tmp:
        db = sqlite3.connect(os.path.join(tmp, "store.sqlite"))
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("CREATE TABLE person (psn_no BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
        seconds_sql, n_sql, _ = await _restore(s, topic, parts, "sqlite", db)
        disk = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        t0 = time.perf_counter()
        for k in keys:
            row = db.execute("SELECT value FROM person WHERE psn_no = ?", (k,)).fetchone()
            msgspec.msgpack.decode(row[0], type=PersonRecord)
        sql_lookup = (time.perf_counter() - t0) / lookups
        db.close()
    rate_sql = n_sql / seconds_sql

    print(f"compacted changelog {topic}: {n:,} records in {partitions} partitions, one consumer restoring all")
    print("store | restore s | records/s | size per record | lookup µs (get + decode)")
    print(f"dict (memory) | {seconds:.1f} | {rate_dict:,.0f} | {rss / n:,.0f} B RSS | {dict_lookup * 1e6:.1f}")
    print(f"SQLite (disk) | {seconds_sql:.1f} | {rate_sql:,.0f} | {disk / n_sql:,.0f} B disk | {sql_lookup * 1e6:.1f}")
    print(f"restore of {NATIONAL_PERSONS:,} persons over n partitions (each instance restoring its share):")
    for p in (8, 16, 32, 64):
        share = NATIONAL_PERSONS / p
        print(f"  n={p:>2}: {share:>12,.0f} records/partition: dict {share / rate_dict:6.0f} s "
              f"({share * rss / n / 2**20:,.0f} MiB), SQLite {share / rate_sql:6.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    pg = sub.add_parser("pg", help="batch reads from a shard filled with --persons")
    pg.add_argument("--persons", type=int, default=3_000_000, choices=range(1, 20_000_001), metavar="N")
    pg.add_argument("--batches", type=int, default=200, choices=range(1, 10_001), metavar="N")
    pg.add_argument("--shard", default="s1")
    cl = sub.add_parser("changelog", help="restore a partition-local store from a compacted topic")
    cl.add_argument("--records", type=int, default=1_000_000, choices=range(1, 5_000_001), metavar="N")
    cl.add_argument("--partitions", type=int, default=8, choices=range(1, 65), metavar="N")
    cl.add_argument("--lookups", type=int, default=100_000, choices=range(1, 1_000_001), metavar="N")
    rss = sub.add_parser("rss", help="the running router's RSS around --requests 5301 queries")
    rss.add_argument("--requests", type=int, default=2000, choices=range(1, 100_001), metavar="N")
    rss.add_argument("--concurrency", type=int, default=16, choices=range(1, 257), metavar="N")
    clean = sub.add_parser("cleanup", help="delete the BENCH persons")
    clean.add_argument("--shard", default="s1")
    args = parser.parse_args(argv)
    s = load_settings()
    if args.command == "pg":
        asyncio.run(measure_pg(s, args.shard, args.persons, args.batches))
    elif args.command == "rss":
        asyncio.run(measure_rss(s, args.requests, args.concurrency))
    elif args.command == "changelog":
        asyncio.run(measure_changelog(s, args.records, args.partitions, args.lookups))
    else:
        asyncio.run(cleanup(s, args.shard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
