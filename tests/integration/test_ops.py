"""Operator tools on the real stack: consumer-group offsets through Kafka's own
ConsumerGroupCommand, and dead letters listed and replayed after a fix (the settlement stage's letters,
router's or engine's, back to fsi.ingress; a letter from before router and engine were one stage refused)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.structs import OffsetAndMetadata

from deploy import kafka as cluster
from deploy import ops
from loadtest.his import GatewayClient, Stay, next_msgid
from schemas.codec import decode_request
from schemas.internal import DeadLetter, HospitalCtx, PersonCtx, RoutedRequest
from schemas.transactions import BODY_TYPES
from services.common.config import Settings, load_settings
from services.common.kafka import ADMIN, client_auth, make_admin
from services.refdata.load import load_dir
from tests.integration.conftest import HOSPITALS, RUN_TOKEN, STAY_START, Ledger, psn, wait_router_knows
from topics.catalog import DEADLETTER, INGRESS

pytestmark = pytest.mark.integration
# Under the run's prefix: the principal ops may inspect and reset that prefix's groups (topics/acls.py).
TOPIC = f"{load_settings().topic_prefix}xsettle.test.ops.{RUN_TOKEN}"
GROUP = f"{load_settings().topic_prefix}xsettle-test-ops-{RUN_TOKEN}"


async def _committed(s: Settings, group: str, tp: TopicPartition) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(tp)
    finally:
        await consumer.stop()


def _ops(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ops.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_group_offsets_inspected_and_reset_with_kafkas_own_tool(stack: Settings,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    admin = make_admin(stack)
    await admin.start()
    await admin.create_topics([NewTopic(TOPIC, 1, cluster.replication_factor(stack))])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, **client_auth(stack, ADMIN), acks="all",
                                enable_idempotence=True)
    await producer.start()
    for i in range(10):
        await producer.send_and_wait(TOPIC, f"r{i}".encode(), partition=0)
    await producer.stop()
    tp = TopicPartition(TOPIC, 0)
    member = AIOKafkaConsumer(TOPIC, bootstrap_servers=stack.kafka_bootstrap, **client_auth(stack, ADMIN),
                              group_id=GROUP,
                              enable_auto_commit=False, auto_offset_reset="earliest")
    await member.start()
    try:
        while sum(len(r) for r in (await member.getmany(timeout_ms=1000)).values()) == 0:
            pass
        await member.commit({tp: OffsetAndMetadata(10, "")})
        # A live member: Kafka refuses the reset, and the tool says what to do.
        code, _, err = await asyncio.to_thread(_ops, capsys, "groups", "reset", GROUP, "--topic", TOPIC,
                                               "--to-offset", "3", "--execute", "--operator", "test.ops")
        assert code == 1 and "stop the group's service first" in err
    finally:
        await member.stop()

    code, out, _ = await asyncio.to_thread(_ops, capsys, "groups", "list")
    assert code == 0 and GROUP in out.split()
    code, out, _ = await asyncio.to_thread(_ops, capsys, "groups", "describe", GROUP)
    row = next(line.split() for line in out.splitlines() if line.startswith(GROUP))
    assert row[1:6] == [TOPIC, "0", "10", "10", "0"]  # topic, partition, current, log end, lag

    code, out, _ = await asyncio.to_thread(_ops, capsys, "groups", "reset", GROUP, "--topic", TOPIC,
                                           "--to-offset", "3")
    assert code == 0 and "dry run" in out
    assert await _committed(stack, GROUP, tp) == 10
    for argv, expected in ((("--to-offset", "3"), 3), (("--shift-by", "4"), 7), (("--to-earliest",), 0),
                           (("--to-latest",), 10)):
        code, out, err = await asyncio.to_thread(_ops, capsys, "groups", "reset", GROUP, "--topic", TOPIC, *argv,
                                                 "--execute", "--operator", "test.ops")
        assert code == 0, err
        assert await _committed(stack, GROUP, tp) == expected, argv


def _write_person(directory: Path, psn_no: str) -> None:
    person: dict[str, object] = {"psn_no": psn_no, "insuplc_admdvs": "150400", "insutype": "310", "psn_type": "1101",
              "assistance": None, "acct_balc": "0.00", "chronic": [], "certno": None}
    (directory / "persons.jsonl").write_bytes(msgspec.json.encode(person) + b"\n")
    h = HOSPITALS["chifeng"]  # unchanged: reloading it is a no-op
    hospital = {"fixmedins_code": h.fixmedins_code, "fixmedins_name": h.fixmedins_name, "admdvs": h.admdvs,
                "hosp_lv": 3}
    (directory / "hospitals.jsonl").write_bytes(msgspec.json.encode(hospital) + b"\n")
    for name in ("filings", "catalog"):
        (directory / f"{name}.jsonl").write_bytes(b"")


async def _wait_visit(shard: asyncpg.Pool, mdtrt_id: str, state: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await shard.fetchval("SELECT state FROM visit WHERE mdtrt_id = $1", mdtrt_id) == state:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"visit {mdtrt_id} not {state} within {timeout_s} s")


async def test_router_rejection_replayed_after_the_fix(refdata: dict, services: Settings, db: asyncpg.Pool,
                                                       ledger: Ledger, gateway: GatewayClient, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    shard = ledger.of("150400")  # the person's insured province's shard holds its visits and requests
    psn_no = psn(900)  # not loaded yet: the router refuses the admission
    stay = Stay(HOSPITALS["chifeng"], psn_no, "150400", "310", STAY_START)
    admission = stay.admit()
    msgid = admission["msgid"]
    r = await gateway.call(admission)
    assert r["err_msg"].startswith("PERSON_UNKNOWN")

    code, out, _ = await asyncio.to_thread(_ops, capsys, "deadletters", "list", "--msgid", msgid)
    assert code == 0 and out.splitlines()[0] == "1 dead letter(s)"
    row = out.splitlines()[1]
    assert "router" in row and "PERSON_UNKNOWN" in row and "2401" in row
    assert psn_no not in out  # never a personal value unless asked
    code, out, _ = await asyncio.to_thread(_ops, capsys, "deadletters", "list", "--msgid", msgid, "--json",
                                           "--show-original")
    assert psn_no in msgspec.json.decode(out.splitlines()[0])["original"]

    # The fix: the insured region's person file arrives.
    _write_person(tmp_path, psn_no)
    await load_dir(db, tmp_path, operator="test.loader")
    await wait_router_knows(services, HOSPITALS["chifeng"], psn_no, "150400")

    code, out, _ = await asyncio.to_thread(_ops, capsys, "deadletters", "replay", "--msgid", msgid)
    assert code == 0 and "dry run" in out and f"-> {INGRESS.name}" in out
    assert await shard.fetchval("SELECT count(*) FROM visit WHERE mdtrt_id = $1", "M" + msgid) == 0
    for _ in range(2):  # a second replay is harmless: the engine answers a known msgid from its record
        code, out, err = await asyncio.to_thread(_ops, capsys, "deadletters", "replay", "--msgid", msgid,
                                                 "--stage", "router", "--execute", "--operator", "test.ops")
        assert code == 0, err
        await _wait_visit(shard, "M" + msgid, "admitted")
    await asyncio.sleep(2)
    assert await shard.fetchval("SELECT count(*) FROM processed_request WHERE msgid = $1", msgid) == 1
    assert await shard.fetchval("SELECT count(*) FROM visit WHERE psn_no = $1", psn_no) == 1


async def test_engine_refusal_replayed_only_when_its_stored_refusal_is_forgotten(
    refdata: dict, services: Settings, db: asyncpg.Pool, ledger: Ledger, gateway: GatewayClient, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shard = ledger.of("150400")  # the person's insured province's shard holds its visits and requests
    psn_no = psn(901)
    _write_person(tmp_path, psn_no)
    await load_dir(db, tmp_path, operator="test.loader")
    await wait_router_knows(services, HOSPITALS["chifeng"], psn_no, "150400")
    stay = Stay(HOSPITALS["chifeng"], psn_no, "150400", "310", STAY_START)
    admit_msgid = next_msgid(stay.hospital.fixmedins_code)
    stay.mdtrt_id = "M" + admit_msgid  # the discharge arrives before the admission it names
    discharge = stay.discharge()
    r = await gateway.call(discharge)
    assert r["err_msg"].startswith("VISIT_UNKNOWN")
    admission = stay.admit()
    admission["msgid"] = admit_msgid
    assert (await gateway.call(admission))["infcode"] == 0
    await _wait_visit(shard, stay.mdtrt_id, "admitted")

    dl_msgid = discharge["msgid"]
    # The engine's letter names stage settle and holds the request as it came in on fsi.ingress.
    code, out, _ = await asyncio.to_thread(_ops, capsys, "deadletters", "list", "--msgid", dl_msgid, "--json",
                                           "--show-original")
    [listed] = [msgspec.json.decode(line) for line in out.splitlines()]
    assert code == 0 and (listed["stage"], listed["err_code"]) == ("settle", "VISIT_UNKNOWN")
    request = decode_request(listed["original"].encode())
    assert (request.envelope.msgid, request.envelope.infno, request.psn_no) == (dl_msgid, "2402", psn_no)
    code, out, err = await asyncio.to_thread(_ops, capsys, "deadletters", "replay", "--msgid", dl_msgid,
                                             "--stage", "settle", "--execute", "--operator", "test.ops")
    assert code == 0 and f"settle/VISIT_UNKNOWN msgid={dl_msgid} -> {INGRESS.name}" in out, err
    await asyncio.sleep(3)  # the engine answers from its stored refusal and changes nothing
    assert await shard.fetchval("SELECT state FROM visit WHERE mdtrt_id = $1", stay.mdtrt_id) == "admitted"
    assert await shard.fetchval("SELECT infcode FROM processed_request WHERE msgid = $1", dl_msgid) == -1

    code, out, err = await asyncio.to_thread(_ops, capsys, "deadletters", "replay", "--msgid", dl_msgid,
                                             "--stage", "settle", "--forget-refusal", "--execute",
                                             "--operator", "test.ops")
    assert code == 0 and "forgot 1 stored refusal(s)" in out, err
    await _wait_visit(shard, stay.mdtrt_id, "discharged")
    assert await shard.fetchval("SELECT infcode FROM processed_request WHERE msgid = $1", dl_msgid) == 0
    assert await ledger.total("SELECT count(*) FROM processed_request WHERE msgid = $1", dl_msgid) == 1


async def test_a_settle_letter_from_before_the_merged_stage_is_refused(
    stack: Settings, db: asyncpg.Pool, capsys: pytest.CaptureFixture[str],
) -> None:
    """A settle letter written before router and engine were one stage holds a routed request (the record of the
    former fsi.routed): nothing reads those any more and fsi.ingress would refuse it as malformed, so the replay
    refuses it, sends nothing and records no replay; the hospital resends the request."""
    h = HOSPITALS["chifeng"]
    msgid = next_msgid(h.fixmedins_code)
    routed = RoutedRequest(
        msgid=msgid, infno="2401", fixmedins_code=h.fixmedins_code, inf_time="2026-06-01 09:00:00", received_ns=0,
        reply_topic="fsi.replies", reply_partition=None,
        hospital=HospitalCtx(fixmedins_code=h.fixmedins_code, admdvs=h.admdvs, prov_admdvs="150000",
                             pool_admdvs="150400", hosp_lv=3),
        person=PersonCtx(psn_no=psn(902), insured_admdvs="150400", insured_prov="150000", insured_pool="150400",
                         insutype="310", psn_type="1101", assistance=None, acct_balc_fen=0),
        scope="local", filing_type=None, body=msgspec.convert(
            {"mdtrtinfo": {"psn_no": psn(902), "insutype": "310", "mdtrt_cert_type": "02", "mdtrt_cert_no": "-",
                           "med_type": "21", "ipt_otp_no": "ZY902", "begntime": "2026-06-01 09:00:00",
                           "atddr_no": "D001", "dise_codg": "I10.x00"}}, BODY_TYPES["2401"]))
    letter = DeadLetter(stage="settle", err_code="INTERNAL", err_msg="INTERNAL: before the merge", msgid=msgid,
                        infno="2401", fixmedins_code=h.fixmedins_code, at_ns=time.time_ns(),
                        original=msgspec.json.encode(routed))
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, **client_auth(stack, ADMIN), acks="all",
                                enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(DEADLETTER.name, msgspec.json.encode(letter))
    finally:
        await producer.stop()
    operator = f"test.ops.premerge.{RUN_TOKEN}"
    for execute in ((), ("--execute", "--operator", operator)):  # a dry run says so too
        code, out, err = await asyncio.to_thread(_ops, capsys, "deadletters", "replay", "--msgid", msgid, *execute)
        assert (code, out) == (1, ""), out
        assert err.startswith(f"[ops] ERROR: settle dead letter {msgid} is a routed request of the old fsi.routed"
                              " topic"), err
        assert "the hospital resends the request" in err
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE actor = $1", operator) == 0


# Retention and partitions ----------------------------------------------------------------------------


async def test_retention_prunes_only_answers_older_than_the_window_and_creates_partitions_ahead(
    stack: Settings, ledger: Ledger, capsys: pytest.CaptureFixture[str],
) -> None:
    # A clock 200 days ahead (its months ahead have no partition yet: the migration made them up to 3 months
    # from today); the window is the run's clock window (XS_TIME_PAST_DAYS) + 31 days before that clock.
    now = datetime.now(UTC) + timedelta(days=200)
    window_start = now - timedelta(days=stack.time_past_days + ops.RETENTION_MARGIN_DAYS)
    shard = ledger.of("150400")
    old, young = f"{RUN_TOKEN}RETOLD", f"{RUN_TOKEN}RETYOUNG"
    await shard.executemany(
        "INSERT INTO processed_request (msgid, infno, fixmedins_code, infcode, response, processed_at)"
        " VALUES ($1, '2401', 'H15040099901', 0, '\\x7b7d', $2)",
        [(old, window_start - timedelta(days=1)), (young, window_start + timedelta(days=1))])
    # Corrections (2601) go with the same cutoff.
    await shard.executemany(
        "INSERT INTO correction (omsgid, msgid, oinfno, fixmedins_code, undone, err_msg, corrected_at)"
        " VALUES ($1, $2, '2401', 'H15040099901', 'unknown', 'ORIGINAL_UNKNOWN: test', $3)",
        [(old, old + "C", window_start - timedelta(days=1)), (young, young + "C", window_start + timedelta(days=1))])
    ledger_rows = await ledger.total("SELECT count(*) FROM settlement")
    try:
        with pytest.raises(ops.OpsError, match="inside the clock window"):
            await ops.retention(stack, execute=True, keep_days=stack.time_past_days, now=now)
        dry = {r.shard: r for r in await ops.retention(stack, execute=False, now=now)}
        ahead = [f"settlement_{m:%Y_%m}" for m in ops.months_ahead(now)]
        assert dry["s1"].responses_due == 1 and dry["s2"].responses_due == 0
        assert (dry["s1"].corrections_due, dry["s2"].corrections_due) == (1, 0)
        assert dry["s1"].partitions_missing == dry["s2"].partitions_missing == ahead
        assert await shard.fetchval("SELECT count(*) FROM processed_request WHERE msgid = $1", old) == 1  # dry run

        done = {r.shard: r for r in await ops.retention(stack, execute=True, now=now)}
        assert (done["s1"].responses_deleted, done["s2"].responses_deleted) == (1, 0)
        assert (done["s1"].corrections_deleted, done["s2"].corrections_deleted) == (1, 0)
        assert [r[0] for r in await shard.fetch("SELECT omsgid FROM correction WHERE omsgid = ANY($1)",
                                                [old, young])] == [young]
        assert done["s1"].partitions_created == done["s2"].partitions_created == ahead
        assert [r[0] for r in await shard.fetch("SELECT msgid FROM processed_request WHERE msgid = ANY($1)",
                                                [old, young])] == [young]
        again = await ops.retention(stack, execute=True, now=now)
        assert [(r.responses_deleted, r.corrections_deleted, r.partitions_created) for r in again] == [
            (0, 0, []), (0, 0, [])]
        assert await ledger.total("SELECT count(*) FROM settlement") == ledger_rows  # the ledger is never pruned

        code, out, _ = await asyncio.to_thread(_ops, capsys, "retention")
        assert code == 0 and "s1: would delete 0 stored response(s) and 0 correction(s)" in out and "dry run" in out
    finally:
        await shard.execute("DELETE FROM processed_request WHERE msgid = ANY($1)", [old, young])
        await shard.execute("DELETE FROM correction WHERE omsgid = ANY($1)", [old, young])


async def test_a_hospital_day_reads_one_monthly_partition_through_its_index(ledger: Ledger) -> None:
    """However many months accumulate, a hospital's day (3201/3202) and a month's non-local rows (clearing)
    are planned on that month's partition alone, through an index."""
    month = datetime.now(UTC).replace(day=1)
    partition = f"settlement_{month:%Y_%m}"
    shard = ledger.of("150400")
    async with shard.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # tiny test tables: show the index the plan can use
        day = f"{month:%Y-%m}-05"
        for sql in (
            f"SELECT * FROM settlement WHERE fixmedins_code = 'H15040099901' AND setl_time >= '{day}'"
            f" AND setl_time < '{day}'::timestamp + interval '1 day'",
            f"SELECT * FROM settlement WHERE scope <> 'local' AND setl_time >= '{month:%Y-%m}-01'"
            f" AND setl_time < '{month:%Y-%m}-01'::timestamp + interval '1 month'",
        ):
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql))
            scanned = set(re.findall(r"on (settlement_(?:\d{4}_\d{2}|default))\b", plan))
            assert scanned == {partition}, plan
            assert "Index" in plan, plan


class _Rollback(Exception):
    pass


async def test_partitioned_ledger_keeps_its_global_unique_keys(ledger: Ledger) -> None:
    """settlement's unique keys cannot span its monthly partitions; settlement_key keeps them: a setl_id or a
    msgid twice (in other months) and a second reversal of one settlement are refused like before."""
    cols = ("setl_id, msgid, kind, orig_setl_id, mdtrt_id, psn_no, fixmedins_code, insutype, med_type, scope,"
            " insured_admdvs, insured_pool, treating_admdvs, treating_pool, clr_optins, setl_time, acc_year,"
            " medfee_sumamt, fulamt_ownpay_amt, overlmt_selfpay, preselfpay_amt, inscp_scp_amt, act_pay_dedc,"
            " hifp_pay, pool_prop_selfpay, hifmi_pay, hifob_pay, maf_pay, fund_pay_sumamt, psn_part_amt, acct_pay,"
            " psn_cash_pay, balc, accum_delta")
    insert = (f"INSERT INTO settlement ({cols}) VALUES ($1, $2, $3, $4, $5, 'P1', 'H15040099901', '390', '21',"
              " 'local', '150400', '150400', '150400', '150400', '150400', $6, 2026, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,"
              " 0, 0, 0, 0, 0, 0, '{}')")
    mdtrt_id = f"MKEY{RUN_TOKEN}"
    may, june = datetime(2026, 5, 10, 9), datetime(2026, 6, 10, 9)
    async with ledger.of("150400").acquire() as conn:
        with pytest.raises(_Rollback):  # nothing of this test stays
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO visit (mdtrt_id, psn_no, fixmedins_code, med_type, insutype, scope, insured_admdvs,"
                    " treating_admdvs, ipt_otp_no, begntime, state, created_msgid) VALUES ($1, 'P1', 'H15040099901',"
                    " '21', '390', 'local', '150400', '150400', $1, $2, 'settled', $1)", mdtrt_id, may)
                await conn.execute(insert, "SKEY1", "MSGKEY1", "settle", None, mdtrt_id, may)
                await conn.execute(insert, "RKEY1", "MSGKEY2", "reverse", "SKEY1", mdtrt_id, june)
                for setl_id, msgid, kind, orig in (("SKEY1", "MSGKEY9", "settle", None),  # same setl_id, June
                                                   ("SKEY9", "MSGKEY1", "settle", None),  # same msgid, June
                                                   ("RKEY9", "MSGKEY8", "reverse", "SKEY1")):  # second reversal
                    with pytest.raises(asyncpg.UniqueViolationError):
                        async with conn.transaction():
                            await conn.execute(insert, setl_id, msgid, kind, orig, mdtrt_id, june)
                with pytest.raises(asyncpg.ForeignKeyViolationError):  # a reversal of no settlement
                    async with conn.transaction():
                        await conn.execute(insert, "RKEY8", "MSGKEY7", "reverse", "SNONE", mdtrt_id, june)
                assert await conn.fetchval("SELECT count(*) FROM settlement WHERE mdtrt_id = $1", mdtrt_id) == 2
                raise _Rollback
