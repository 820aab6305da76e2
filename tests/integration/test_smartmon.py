"""The monitoring stream end to end: crafted settlement events (with visit facts) written straight into the
run's fsi.settlements → smartmon (faust, real Kafka) → fsi.judgements → the clearing service's sink → hub
`judgement`. Expected judgements are those of the pure transitions (services/smartmon/state.py) over the
same events, and spelled out (rule, setl_ids, amounts) where a test is about one rule.

Persons `mon…` are this module's own, one set per test; dates fixed (March 2026)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from datetime import date
from typing import Any

import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from deploy import stack as stack_ctl
from schemas.internal import DeadLetter, SettlementEvent
from schemas.monitoring import Judgement
from services.clearing import store
from services.common.config import Settings
from services.common.kafka import ADMIN, client_auth, make_admin, make_producer
from services.smartmon.rules import RuleBook, load_rules
from services.smartmon.state import CostGroupState, PersonState, apply_event, apply_stay
from tests.monitoring_events import cost_stays, reverse, settle
from topics.acls import CLEARING_GROUPS
from topics.catalog import DEADLETTER, JUDGEMENTS, MONITOR_STAYS, SETTLEMENTS, SMARTMON_APP

pytestmark = pytest.mark.timeout(300)
WAIT_S = 150  # a rejoin and the backlog; and one watchdog restart of a stalled stream (30 s + 10 s + a restart)
SINK_GROUP = CLEARING_GROUPS[3]
_encoder = msgspec.json.Encoder(decimal_format="number")


@pytest.fixture
async def producer(services: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = make_producer(services, ADMIN)
    await p.start()
    yield p
    await p.stop()


async def send(producer: AIOKafkaProducer, events: Sequence[SettlementEvent | bytes], key: bytes | None = None) -> None:
    for ev in events:
        if isinstance(ev, bytes):
            await producer.send_and_wait(SETTLEMENTS.name, ev, key=key)
        else:
            await producer.send_and_wait(SETTLEMENTS.name, _encoder.encode(ev), key=ev.psn_no.encode())


def expected(events: Sequence[SettlementEvent], book: RuleBook) -> dict[str, Judgement]:
    """What the receiver holds (latest judgement per jr_id) after the pure transitions over `events`,
    cost groups included."""
    persons: dict[str, PersonState] = {}
    groups: dict[str, CostGroupState] = {}
    held: dict[str, Judgement] = {}
    for ev in events:
        out = apply_event(persons.setdefault(ev.psn_no, PersonState()), ev, book)
        held.update((j.jr_id, j) for j in out.judgements)
        for stay in out.stays:
            held.update((j.jr_id, j) for j in apply_stay(groups.setdefault(stay.group, CostGroupState()), stay, book))
    return held


async def rows(db: asyncpg.Pool, psn_prefix: str) -> list[dict[str, Any]]:
    found = await db.fetch("SELECT * FROM judgement WHERE psn_no LIKE $1 ORDER BY jr_id", psn_prefix + "%")
    return [dict(r) for r in found]


async def until_rows(db: asyncpg.Pool, psn_prefix: str, done: Any, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        now = await rows(db, psn_prefix)
        if done(now):
            return now
        assert time.monotonic() < deadline, f"not in hub judgement within {WAIT_S} s: {what}"
        await asyncio.sleep(0.3)


def summary(found: Sequence[dict[str, Any]]) -> dict[str, tuple[str, str, tuple[str, ...], int]]:
    return {r["jr_id"]: (r["rule_id"], r["status"], tuple(r["setl_ids"]), r["suspect_amt"]) for r in found}


def summary_of(held: dict[str, Judgement]) -> dict[str, tuple[str, str, tuple[str, ...], int]]:
    return {k: (j.rule_id, "withdrawn" if j.withdrawn else "open", tuple(j.setl_ids), j.suspect_amt)
            for k, j in held.items()}


async def drained(s: Settings) -> None:
    """Until smartmon has committed everything on fsi.settlements and fsi.monitor.stays and the sink
    everything on fsi.judgements, twice in a row (faust commits every few seconds)."""
    admin = make_admin(s)
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        checks = ((s.topic_prefix + SMARTMON_APP, (SETTLEMENTS.name, MONITOR_STAYS.name)),
                  (s.topic_prefix + SINK_GROUP, (JUDGEMENTS.name,)))
        deadline = time.monotonic() + WAIT_S
        quiet = 0
        while quiet < 2:
            assert time.monotonic() < deadline, "the stream or the sink did not catch up"
            caught_up = True
            for group, topics in checks:
                committed = await admin.list_consumer_group_offsets(group)
                tps = [TopicPartition(t, p) for t in topics for p in range(s.partitions)]
                for tp, end in (await consumer.end_offsets(tps)).items():
                    done = committed.get(tp)
                    if end > 0 and (done is None or done.offset < end):
                        caught_up = False
            quiet = quiet + 1 if caught_up else 0
            await asyncio.sleep(1.0)
    finally:
        await consumer.stop()
        await admin.close()


def sample(port: int, name: str, labels: dict[str, str]) -> float:
    """One sample of a service's /metrics (0 when the series does not exist yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


@pytest.fixture(scope="module")
def book() -> RuleBook:
    return load_rules()


@pytest.fixture(scope="module", autouse=True)
def fresh_sink(services: Settings) -> None:
    """The clearing service (the judgements sink) freshly started: in a whole-suite run it went silent after
    the fault tests' Kafka restart (README, Smart monitoring, known open problem)."""
    stack_ctl.restart_service("clearing", services)


async def test_overlap_withdrawn_by_a_reversal_and_a_replay_adds_nothing(
        services: Settings, db: asyncpg.Pool, producer: AIOKafkaProducer, book: RuleBook) -> None:
    a = settle("mo1-a", "mon1001", hospital="H32050000001", begin="2026-03-01 09:00:00",
               end="2026-03-10 10:00:00", medfee=300_000)
    b = settle("mo1-b", "mon1001", hospital="H15040000001", begin="2026-03-05 09:00:00",
               end="2026-03-08 10:00:00", medfee=200_000)
    port = services.clearing_metrics_port
    new = ("xs_monitoring_judgements_total",
           {"rule": "OVERLAP_INPATIENT", "severity": "high", "insured_prov": "320000"})
    gone = ("xs_monitoring_withdrawn_total", {"rule": "OVERLAP_INPATIENT"})
    new_before, gone_before = sample(port, *new), sample(port, *gone)
    await send(producer, [a, b])
    [hit] = expected([a, b], book).values()
    [row] = await until_rows(db, "mon1001", lambda r: len(r) == 1, "the overlap")
    assert (row["jr_id"], row["rule_id"], row["status"], row["setl_ids"], row["mdtrt_ids"], row["suspect_amt"]) == (
        hit.jr_id, "OVERLAP_INPATIENT", "open", ["mo1-b", "mo1-a"], ["v-mo1-b", "v-mo1-a"], 200_000)
    assert (row["insured_prov"], row["treating_admdvs"], row["treating_prov"], row["fixmedins_code"]) == (
        "320000", "150400", "150000", "H15040000001")
    assert (str(row["window_begin"]), str(row["window_end"])) == ("2026-03-05", "2026-03-08")

    rev = reverse(b, "mo1-b-rev")
    await send(producer, [rev])
    [row] = await until_rows(db, "mon1001", lambda r: r and r[0]["status"] == "withdrawn", "the withdrawal")
    await drained(services)
    before = await rows(db, "mon1001")
    await send(producer, [a, b, rev, a])  # the person's whole stream again, and once more
    await drained(services)
    assert await rows(db, "mon1001") == before  # same rows, same content (updated_at included)
    # counted once each, replay or not (this module's persons alone are insured in 320000 with this rule
    # while it runs: tests run one at a time)
    assert (sample(port, *new) - new_before, sample(port, *gone) - gone_before) == (1, 1)


async def test_kill_9_mid_stream_ends_with_the_judgements_of_an_uninterrupted_run(
        services: Settings, db: asyncpg.Pool, producer: AIOKafkaProducer, book: RuleBook) -> None:
    events: list[SettlementEvent] = []
    for i in range(30):
        psn = f"mon2{i:03d}"
        first = settle(f"mo2-{i}-a", psn, begin="2026-03-01 09:00:00", end="2026-03-10 10:00:00", medfee=100_000 + i)
        events += [
            first,
            settle(f"mo2-{i}-b", psn, hospital="H15040000001", begin="2026-03-04 09:00:00",
                   end="2026-03-06 10:00:00", medfee=50_000 + i),
            settle(f"mo2-{i}-c", psn, hospital="H32050000002", visit_type="outpatient", begin="2026-03-07 09:00:00",
                   end="2026-03-07 10:00:00", medfee=2_000),
        ]
        if i % 3 == 0:
            events.append(reverse(first, f"mo2-{i}-a-rev"))
    want = summary_of(expected(events, book))
    assert {v[0] for v in want.values()} >= {"OVERLAP_INPATIENT", "OUTPATIENT_DURING_STAY"}
    assert any(v[1] == "withdrawn" for v in want.values()) and any(v[1] == "open" for v in want.values())

    half = len(events) // 2
    await send(producer, events[:half])
    await asyncio.sleep(0.5)  # some of the first half applied, some not yet committed
    assert await asyncio.to_thread(stack_ctl.stop_service, "smartmon", True, services)
    await send(producer, events[half:])
    await asyncio.to_thread(stack_ctl.start_service, "smartmon", services)
    await drained(services)
    assert summary(await rows(db, "mon2")) == want


async def test_cost_outlier_through_the_repartition_topic(
        services: Settings, db: asyncpg.Pool, producer: AIOKafkaProducer, book: RuleBook) -> None:
    peers = cost_stays("mon3", 50, medfee=100_000, main_dise="K40.900")
    outlier = settle("mo3-out", "mon3999", main_dise="K40.900", begin="2026-03-29 08:00:00",
                     end="2026-03-29 18:00:00", medfee=900_000)
    await send(producer, [*peers, outlier])
    [hit] = expected([*peers, outlier], book).values()
    [row] = await until_rows(db, "mon3", lambda r: len(r) == 1, "COST_OUTLIER")
    assert (row["jr_id"], row["rule_id"], row["psn_no"], row["setl_ids"], row["suspect_amt"], row["status"]) == (
        hit.jr_id, "COST_OUTLIER", "mon3999", ["mo3-out"], 800_000, "open")
    await send(producer, [reverse(outlier, "mo3-out-rev", at="2026-03-30 09:00:00")])
    await until_rows(db, "mon3", lambda r: r[0]["status"] == "withdrawn", "the outlier withdrawn")


async def test_an_undecodable_record_is_dead_lettered_and_later_events_are_judged(
        services: Settings, db: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
    garbage = b'{"setl_id": "mo4-x", "kind": "settle", not json'
    await send(producer, [garbage], key=b"mon4001")
    a = settle("mo4-a", "mon4001", begin="2026-03-01 09:00:00", end="2026-03-10 10:00:00")
    b = settle("mo4-b", "mon4001", hospital="H15040000001", begin="2026-03-02 09:00:00", end="2026-03-03 10:00:00")
    await send(producer, [a, b])
    [row] = await until_rows(db, "mon4001", lambda r: len(r) == 1, "a judgement after the bad record")
    assert (row["rule_id"], row["setl_ids"]) == ("OVERLAP_INPATIENT", ["mo4-b", "mo4-a"])
    consumer = AIOKafkaConsumer(bootstrap_servers=services.kafka_bootstrap, **client_auth(services, ADMIN),
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(DEADLETTER.name, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        letters: list[DeadLetter] = []
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                letters += [msgspec.json.decode(r.value, type=DeadLetter) for r in records]
    finally:
        await consumer.stop()
    [letter] = [d for d in letters if d.stage == "smartmon" and d.original == garbage]
    assert letter.err_code == "INTERNAL"
    assert letter.err_msg.startswith(f"INTERNAL: undecodable {SETTLEMENTS.name} record: ")
    assert "mon4001" not in letter.err_msg


def _row(jr_id: str, **changes: Any) -> store.JudgementRow:
    base = store.JudgementRow(
        jr_id=jr_id, rule_id="OVERLAP_INPATIENT", rule_version=1, severity="high", psn_no="mon5001",
        insured_admdvs="320100", insured_prov="320000", treating_admdvs="150400", treating_prov="150000",
        fixmedins_code="H15040000001", mdtrt_ids=["v-1"], setl_ids=["s-1"], items=[],
        window_begin=date(2026, 3, 5), window_end=date(2026, 3, 8), suspect_amt=1_000, detail="first")
    return dataclasses.replace(base, **changes)


async def test_the_sinks_upsert_rules(stack: Settings, db: asyncpg.Pool) -> None:
    """Insert counts once; new evidence updates an open row only; a withdrawal reaches open rows and
    confirmed rows whose deduction month is still open, never dismissed rows or closed months."""
    # months of their own, far from every other test's (removed at the end)
    ids = [f"mon5-{n}" for n in ("open", "confirmed", "closed", "dismissed")]
    async with db.acquire() as conn:
        await conn.execute("INSERT INTO clearing_month (clr_month, state, closed_at, stmt_version)"
                           " VALUES ('2031-04', 'closed', now(), 1), ('2031-05', 'open', NULL, NULL)"
                           " ON CONFLICT (clr_month) DO NOTHING")
        assert [await store.upsert_judgement(conn, _row(i)) for i in ids] == [True] * 4
        assert await store.upsert_judgement(conn, _row(ids[0])) is False  # a replay: no second count
        review = "UPDATE judgement SET status = $2, reviewed_by = 'rev', reviewed_at = now(), review_reason = 'r'," \
                 " deduct_month = $3 WHERE jr_id = $1"
        await conn.execute(review, ids[1], "confirmed", "203105")
        await conn.execute(review, ids[2], "confirmed", "203104")
        await conn.execute(review, ids[3], "dismissed", None)
        for i in ids:  # new evidence
            assert await store.upsert_judgement(conn, _row(i, suspect_amt=2_000, detail="grown")) is False
        got = {r["jr_id"]: (r["suspect_amt"], r["detail"]) for r in await conn.fetch(
            "SELECT * FROM judgement WHERE jr_id = ANY($1)", ids)}
        assert got == {ids[0]: (2_000, "grown"), ids[1]: (1_000, "first"), ids[2]: (1_000, "first"),
                       ids[3]: (1_000, "first")}
        assert [await store.withdraw_judgement(conn, i) for i in ids] == [
            "OVERLAP_INPATIENT", "OVERLAP_INPATIENT", None, None]
        assert await store.withdraw_judgement(conn, ids[0]) is None  # already withdrawn
        got_status = {r["jr_id"]: (r["status"], r["deduct_month"]) for r in await conn.fetch(
            "SELECT * FROM judgement WHERE jr_id = ANY($1)", ids)}
        assert got_status == {ids[0]: ("withdrawn", None), ids[1]: ("withdrawn", None),
                              ids[2]: ("confirmed", "203104"), ids[3]: ("dismissed", None)}
        await conn.execute("DELETE FROM judgement WHERE jr_id = ANY($1)", ids)
        await conn.execute("DELETE FROM clearing_month WHERE clr_month IN ('2031-04', '2031-05')")
