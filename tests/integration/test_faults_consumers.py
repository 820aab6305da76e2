"""Faults in the running pipeline (real Kafka, real PostgreSQL, the services as processes).

Record faults: records written straight to a consumer's topic (so no validation upstream can catch
them) — bytes that do not decode, data PostgreSQL refuses (a NUL in a text field) — are answered where
someone waits, dead-lettered with their reason, and the records after them on the same partition are
processed. Infrastructure faults: PostgreSQL restarted under load — every service waits, reconnects
and continues without exiting, and the ledger has nothing lost or doubled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from deploy import stack as stack_ctl
from loadtest.his import FeeLine, GatewayClient, Stay
from schemas.clearing import ManualClaim
from schemas.internal import DeadLetter
from services.common.config import Settings
from services.common.kafka import ADMIN, client_auth
from services.common.tls import client_session
from tests.integration.conftest import (
    HOSPITALS,
    ITEM_A,
    ITEM_B10,
    PERSONS,
    SIGNER,
    STAY_START,
    Ledger,
    wait_router_knows,
)
from tests.integration.dashboard_client import dashboard_session, make_user, sign_in
from topics.catalog import CLEARING, DEADLETTER, INGRESS, MANUAL_CLAIMS, REPLIES, SETTLEMENTS

pytestmark = pytest.mark.integration
TOKEN = f"{time.time_ns() % 10**11:011d}"
REPLY_PARTITION = 3  # no gateway of the test stack reads it: the test reads its replies itself
GARBAGE = b"\x00\xff not a record"
WAIT_S = 30
D = Decimal


class Taps:
    """Reads what the pipeline answers (fsi.replies, partition REPLY_PARTITION) and dead-letters,
    from the end offsets at the start of a test."""

    def __init__(self, s: Settings) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN),
                                         enable_auto_commit=False,
                                         isolation_level="read_committed")
        self.replies: dict[str, dict[str, Any]] = {}
        self.letters: list[DeadLetter] = []

    async def start(self) -> None:
        await self.consumer.start()
        tps = [TopicPartition(REPLIES.name, REPLY_PARTITION), TopicPartition(DEADLETTER.name, 0)]
        self.consumer.assign(tps)
        for tp, offset in (await self.consumer.end_offsets(tps)).items():
            self.consumer.seek(tp, offset)

    async def until(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert time.monotonic() < deadline, f"not seen within {WAIT_S} s: {what}"
            for tp, records in (await self.consumer.getmany(timeout_ms=200)).items():
                for rec in records:
                    if tp.topic == REPLIES.name:
                        self.replies[rec.key.decode()] = msgspec.json.decode(rec.value)
                    else:
                        self.letters.append(msgspec.json.decode(rec.value, type=DeadLetter))

    def letters_of(self, stage: str, original: bytes) -> list[DeadLetter]:
        return [d for d in self.letters if d.stage == stage and d.original == original]


@pytest.fixture
async def taps(services: Settings) -> AsyncIterator[Taps]:
    t = Taps(services)
    await t.start()
    yield t
    await t.consumer.stop()


@pytest.fixture
async def producer(services: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, **client_auth(services, ADMIN), acks="all")
    await p.start()
    yield p
    await p.stop()


async def test_engine_dead_letters_what_it_refuses_and_settles_what_follows(refdata: dict, services: Settings,
                                                                          ledger: Ledger, taps: Taps,
                                                                          producer: AIOKafkaProducer) -> None:
    """A settlement of a visit nobody registered passes routing and is refused by the engine: answered, and
    dead-lettered by the engine with the request's own bytes (what `deploy.ops replay` sends to fsi.ingress
    again); the person's requests that follow on the partition are settled, and the stage did not restart.
    (A request the database refuses can not arrive through fsi.ingress — validation refuses control characters —
    so test_settle_engine.py drives the engine with one directly.)"""
    p = PERSONS["plain"].person
    ghost = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype, STAY_START + timedelta(days=190),
                 mdtrt_id=f"NOVISIT{TOKEN}")
    stay = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype, STAY_START + timedelta(days=195))
    settle_pid = stack_ctl.service_pid("settle", services)
    headers = [("reply_topic", REPLIES.name.encode()), ("reply_partition", str(REPLY_PARTITION).encode())]
    refused, admit = SIGNER.sign(ghost.settle()), stay.admit()
    for value in (GARBAGE, refused, SIGNER.sign(admit)):  # one key: one partition, in order
        await producer.send_and_wait(INGRESS.name, value, key=p.psn_no.encode(), headers=headers)
    refused_msgid = msgspec.json.decode(refused)["msgid"]
    await taps.until(lambda: admit["msgid"] in taps.replies and refused_msgid in taps.replies, "both answers")
    assert taps.replies[admit["msgid"]]["infcode"] == 0, taps.replies[admit["msgid"]]["err_msg"]
    assert taps.replies[refused_msgid]["infcode"] == -1
    assert taps.replies[refused_msgid]["err_msg"].startswith("VISIT_UNKNOWN")
    await taps.until(lambda: taps.letters_of("settle", refused), "the refusal's dead letter")
    assert [(d.err_code, d.msgid, d.infno) for d in taps.letters_of("settle", refused)] == [
        ("VISIT_UNKNOWN", refused_msgid, "2304")]
    mdtrt_id = taps.replies[admit["msgid"]]["output"]["result"]["mdtrt_id"]
    assert await ledger.total("SELECT count(*) FROM visit WHERE mdtrt_id = $1", mdtrt_id) == 1
    assert stack_ctl.service_pid("settle", services) == settle_pid  # it did not exit and restart


async def test_router_dead_letters_garbage_and_routes_what_follows(refdata: dict, services: Settings,
                                                                   taps: Taps, producer: AIOKafkaProducer) -> None:
    p = PERSONS["plain"].person
    stay = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype, STAY_START + timedelta(days=180))
    admit = stay.admit()
    broken_body = {**admit, "msgid": admit["msgid"][:-4] + "9999", "input": {"mdtrtinfo": {"psn_no": p.psn_no}}}
    headers = [("reply_topic", REPLIES.name.encode()), ("reply_partition", str(REPLY_PARTITION).encode())]
    for value in (GARBAGE, SIGNER.sign(broken_body), SIGNER.sign(admit)):  # a HIS signs what it writes
        await producer.send_and_wait(INGRESS.name, value, key=p.psn_no.encode(), headers=headers)
    await taps.until(lambda: admit["msgid"] in taps.replies, "the admission's answer")
    assert taps.replies[admit["msgid"]]["infcode"] == 0, taps.replies[admit["msgid"]]["err_msg"]
    # The body that does not decode is answered (its envelope names the msgid) with the field.
    broken = taps.replies[broken_body["msgid"]]
    assert broken["infcode"] == -1 and broken["err_msg"].startswith("BODY_MALFORMED")
    await taps.until(lambda: taps.letters_of("router", GARBAGE), "the garbage's dead letter")
    assert [(d.err_code, d.msgid) for d in taps.letters_of("router", GARBAGE)] == [("ENVELOPE_MALFORMED", None)]


def _claim(n: int, **changes: Any) -> ManualClaim:
    claim = ManualClaim(
        claim_id=f"FC{TOKEN}{n}", psn_no=f"F{TOKEN}", insuplc_admdvs="510421", mdtrtarea_admvs="150400",
        med_type="21", begndate="2026-06-05 08:00:00", enddate="2026-06-09 08:00:00", medfee_sumamt=D("800.00"),
        fund_pay_sumamt=D("300.00"), reason="NOT_FILED", claim_time="2026-06-20 10:00:00")
    return msgspec.structs.replace(claim, **changes)


async def test_clearing_dead_letters_poison_and_goes_on(refdata: dict, services: Settings, db: asyncpg.Pool,
                                                        taps: Taps, producer: AIOKafkaProducer) -> None:
    key = f"F{TOKEN}".encode()
    refused = msgspec.json.encode(_claim(1, reason_dscr="a\u0000b"))  # PostgreSQL refuses NUL in text
    for topic in (SETTLEMENTS.name, CLEARING.name, MANUAL_CLAIMS.name):
        await producer.send_and_wait(topic, GARBAGE, key=key)
    for claim in (refused, msgspec.json.encode(_claim(2))):
        await producer.send_and_wait(MANUAL_CLAIMS.name, claim, key=key)
    await taps.until(lambda: len(taps.letters_of("clearing", GARBAGE)) == 3, "three dead letters of garbage")
    assert sorted(d.err_code for d in taps.letters_of("clearing", GARBAGE)) == [
        "BODY_MALFORMED", "ENVELOPE_MALFORMED", "INTERNAL"]
    await taps.until(lambda: taps.letters_of("clearing", refused), "the refused claim's dead letter")
    letter = taps.letters_of("clearing", refused)[0]
    # INTERNAL when PostgreSQL refuses it; BODY_MALFORMED if validation refuses control characters first.
    assert letter.err_code in ("INTERNAL", "BODY_MALFORMED"), letter.err_msg
    deadline = time.monotonic() + WAIT_S  # the good claim may come in the next poll
    while not (stored := await db.fetch("SELECT claim_id FROM manual_claim WHERE claim_id LIKE $1", f"FC{TOKEN}%")):
        assert time.monotonic() < deadline, "the claim after the refused one was not stored"
        await asyncio.sleep(0.2)
    assert [r["claim_id"] for r in stored] == [f"FC{TOKEN}2"]


# --- infrastructure: PostgreSQL restarted under load -------------------------------------------------

FAULT_PERSONS = [PERSONS[f"crash{i}"].person for i in range(20, 40)]
LONG_LIVED = ("settle", "clearing", "monitor", "dashboard")


async def _stays(s: Settings, day0: int) -> list[tuple[Stay, dict[str, Any], bool]]:
    """Two stays per person, persons in parallel, every third reversed; the HIS resends by msgid."""
    results: list[tuple[Stay, dict[str, Any], bool]] = []
    async with client_session(s) as session:
        client = GatewayClient(s.gateway_url, session, retry_for_s=120)

        async def person_stays(i: int) -> None:
            p = FAULT_PERSONS[i]
            for k in range(2):
                stay = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype,
                            STAY_START + timedelta(days=day0 + k * 5), use_account=True)
                reverse = (i + k) % 3 == 0
                lines = [FeeLine(ITEM_A, D(2), D("120.40")), FeeLine(ITEM_B10, D(1), D("77.70"))]
                results.append((stay, await client.run_stay(stay, lines, reverse=reverse), reverse))

        await asyncio.gather(*(person_stays(i) for i in range(len(FAULT_PERSONS))))
    return results


@pytest.mark.timeout(1200)  # infra_exclusive may wait for another test run to finish
async def test_services_wait_out_a_postgres_restart(refdata: dict, services: Settings, db: asyncpg.Pool, ledger: Ledger,
                                                    tmp_path: Any, infra_exclusive: None) -> None:
    pids = {name: stack_ctl.service_pid(name, services) for name in LONG_LIVED}
    drive = asyncio.create_task(_stays(services, day0=200))
    await asyncio.sleep(1.0)
    assert await asyncio.to_thread(stack_ctl.stop_postgres, services)
    await asyncio.sleep(3.0)
    await asyncio.to_thread(stack_ctl.start_postgres, services)
    postgres_back = time.time()
    results = await asyncio.wait_for(drive, timeout=240)
    await db.expire_connections()  # the test's own pools hold connections from before the restart
    for _, pool in ledger.shards:
        await pool.expire_connections()
    assert len(results) == 2 * len(FAULT_PERSONS)
    for stay, r, reverse in results:
        assert r["infcode"] == 0, r["err_msg"]
        kinds = await ledger.fetch("SELECT kind FROM settlement WHERE mdtrt_id = $1 ORDER BY kind", stay.mdtrt_id)
        assert [x["kind"] for x in kinds] == (["reverse", "settle"] if reverse else ["settle"])
    persons = [p.psn_no for p in FAULT_PERSONS]
    accounts = await ledger.fetch(
        "SELECT p.psn_no, p.acct_balc_fen - coalesce(sum(s.acct_pay), 0) AS expected, a.balc_fen"
        " FROM person p JOIN account a USING (psn_no) LEFT JOIN settlement s USING (psn_no)"
        " WHERE p.psn_no = ANY($1) GROUP BY p.psn_no, p.acct_balc_fen, a.balc_fen", persons)
    assert len(accounts) == len(persons) and all(a["expected"] == a["balc_fen"] for a in accounts)
    basic = await ledger.fetch(
        "SELECT a.psn_no FROM accumulator a LEFT JOIN (SELECT psn_no, acc_year, sum(hifp_pay) AS hifp"
        " FROM settlement GROUP BY 1, 2) s USING (psn_no, acc_year)"
        " WHERE a.psn_no = ANY($1) AND a.basic_paid <> coalesce(s.hifp, 0)", persons)
    assert basic == []
    # Every long-lived service waited the outage out in the same process.
    assert {name: stack_ctl.service_pid(name, services) for name in LONG_LIVED} == pids
    # The router's LISTEN came back: a person loaded now is known without a restart.
    await _load_new_person_and_wait(services, db, tmp_path)
    # The monitor polls the ledger again.
    deadline = time.monotonic() + WAIT_S
    while await _monitor_last_poll(services, "ledger") < postgres_back:
        assert time.monotonic() < deadline, "the monitor did not poll the ledger after the restart"
        await asyncio.sleep(0.5)
    # The dashboard answers from the ledger again.
    async with dashboard_session(services) as session:
        await sign_in(services, session, *await make_user(db, "viewer"))
        async with session.get(f"{services.dashboard_url}api/overview") as resp:
            assert resp.status == 200


async def _monitor_last_poll(s: Settings, source: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{s.monitor_metrics_port}/metrics") as resp:
        text = await resp.text()
    line = f'xs_monitor_last_poll_timestamp_seconds{{source="{source}"}} '
    return next((float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line)), 0.0)


async def _load_new_person_and_wait(s: Settings, db: asyncpg.Pool, directory: Any) -> None:
    from services.refdata.load import load_dir

    psn_no = f"F{TOKEN}R"
    (directory / "persons.jsonl").write_bytes(msgspec.json.encode(
        {"psn_no": psn_no, "insuplc_admdvs": "150400", "insutype": "310", "psn_type": "1101", "assistance": None,
         "acct_balc": "0.00", "chronic": [], "certno": None}) + b"\n")
    for name in ("hospitals", "filings", "catalog"):
        (directory / f"{name}.jsonl").write_bytes(b"")
    await load_dir(db, directory, operator="test.loader")
    await wait_router_knows(s, HOSPITALS["chifeng"], psn_no, "150400")


@pytest.mark.timeout(1200)  # infra_exclusive may wait for another test run to finish
async def test_services_wait_out_a_kafka_restart(refdata: dict, services: Settings, db: asyncpg.Pool, ledger: Ledger,
                                                 infra_exclusive: None) -> None:
    pids = {name: stack_ctl.service_pid(name, services) for name in LONG_LIVED}
    await db.expire_connections()  # an earlier test may have restarted PostgreSQL under these pools
    for _, pool in ledger.shards:
        await pool.expire_connections()
    assert await asyncio.to_thread(stack_ctl.stop_kafka, services)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(stack_ctl.start_kafka, services)
    p = FAULT_PERSONS[0]
    stay = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype, STAY_START + timedelta(days=250))
    async with client_session(services) as session:
        client = GatewayClient(services.gateway_url, session, retry_for_s=120)
        r = await client.run_stay(stay, [FeeLine(ITEM_A, D(1), D("99.90"))])
    assert r["infcode"] == 0, r["err_msg"]
    kinds = await ledger.fetch("SELECT kind FROM settlement WHERE mdtrt_id = $1", stay.mdtrt_id)
    assert [x["kind"] for x in kinds] == ["settle"]
    assert {name: stack_ctl.service_pid(name, services) for name in LONG_LIVED} == pids
