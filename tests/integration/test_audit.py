"""The operators' audit trail on the real stack: one audit row per operator action (who, what, on what,
before and after), rows append-only, and every row on fsi.audit in audit_id order — also when a
publisher is killed between the broker's ack and its watermark, and when a command dies before it
publishes (the clearing service's ticker does it).

Each test acts under an operator name of its own, so its rows are counted exactly.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from deploy import kafka as cluster
from deploy import ops
from schemas.audit import AuditRecord
from schemas.clearing import ManualClaim
from schemas.internal import DeadLetter
from schemas.refdata import FilingRow
from services.clearing import cli
from services.common import audit
from services.common.config import PROJECT_ROOT, Settings, settings_env
from services.common.kafka import ADMIN, client_auth
from services.common.shards import shard_dsns
from services.common.signing import key_encryption_key
from services.refdata import keys
from services.refdata.load import filing_id, load_dir
from tests.integration.conftest import RUN_TOKEN, psn
from topics.catalog import DEADLETTER

pytestmark = pytest.mark.integration

HOSPITAL = "H15040099971"  # this module's own institution (keys are issued to it)
PERSON = psn(971)
FILING = {"psn_no": PERSON, "filing_type": "TEMPORARY", "begndate": "2026-01-01", "enddate": "2026-12-31",
          "target_admdvs": "510000"}
DEPOSIT_PROV = "640000"  # 宁夏: no other test's deposits
CLOSE_MONTH = "2019-03"  # no traffic: closes with zero entries


@pytest.fixture(autouse=True)
async def _quiet_xs_operator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """The commands here name their operator explicitly: a developer's XS_OPERATOR must not leak in."""
    monkeypatch.delenv(audit.OPERATOR_ENV, raising=False)
    yield


def actor(what: str) -> str:
    return f"t{RUN_TOKEN}.{what}"


async def rows_of(db: asyncpg.Pool, who: str) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM audit_log WHERE actor = $1 ORDER BY audit_id", who))


def js(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def write_refdata(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    enc = msgspec.json.encode
    (directory / "hospitals.jsonl").write_bytes(enc({"fixmedins_code": HOSPITAL, "fixmedins_name": "审计测试医院",
                                                     "admdvs": "150400", "hosp_lv": 3}) + b"\n")
    (directory / "persons.jsonl").write_bytes(enc({
        "psn_no": PERSON, "insuplc_admdvs": "150400", "insutype": "310", "psn_type": "1101", "assistance": None,
        "acct_balc": "0.00", "chronic": [], "certno": None}) + b"\n")
    (directory / "filings.jsonl").write_bytes(enc(FILING) + b"\n")
    (directory / "catalog.jsonl").write_bytes(b"")
    return directory


@pytest.fixture(scope="module")
async def loaded(db: asyncpg.Pool, stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """This module's reference data, loaded once by the loader under an operator of its own."""
    directory = write_refdata(tmp_path_factory.mktemp("audit-refdata"))
    counts = await load_dir(db, directory, stack, operator=actor("load"))
    return {"dir": directory, "counts": counts}


async def audit_topic_records(s: Settings, topic: str | None = None) -> list[tuple[bytes, bytes]]:
    """(key, value) of every record on fsi.audit (or `topic`), in offset order."""
    tp = TopicPartition(topic or audit.audit_topic(s), 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[bytes, bytes]] = []
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])
        deadline = time.monotonic() + 30
        while await consumer.position(tp) < end and time.monotonic() < deadline:
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                out += [(r.key or b"", r.value or b"") for r in records if r.offset < end]
    finally:
        await consumer.stop()
    return out


async def assert_trail_on_topic(s: Settings, db: asyncpg.Pool, ids: list[int], topic: str | None = None
                                ) -> list[tuple[bytes, bytes]]:
    """Every row of `ids` is on fsi.audit with its exact body; first occurrences in audit_id order;
    a repeated key carries the same body. (Other hubs of this test run — the loader tests' — publish to
    the same topic: records that are not this hub's rows are left aside.)"""
    rows = {r["audit_id"]: r for r in await db.fetch("SELECT * FROM audit_log ORDER BY audit_id")}
    ours = {str(i).encode(): msgspec.json.encode(audit.audit_record(r)) for i, r in rows.items()}
    records = [(k, v) for k, v in await audit_topic_records(s, topic) if ours.get(k) == v]
    first: list[int] = []
    for k, _ in records:
        if int(k) not in first:
            first.append(int(k))
    assert first == sorted(first), "audit records out of audit_id order"
    assert set(ids) <= set(first), f"missing on the topic: {sorted(set(ids) - set(first))}"
    for _, v in records:
        msgspec.json.decode(v, type=AuditRecord)  # the declared schema
    return records


# --- one audit row per action -------------------------------------------------------------------------


async def test_a_reference_data_load_leaves_one_row_with_its_digest_and_counts(
        db: asyncpg.Pool, loaded: dict[str, Any]) -> None:
    [row] = await rows_of(db, actor("load"))
    assert row["action"] == "refdata.load" and row["target"].startswith("load ")
    load = await db.fetchrow("SELECT digest, counts FROM refdata_load WHERE load_id = $1",
                             int(row["target"].split()[1]))
    after = js(row["after"])
    assert after["digest"] == load["digest"] and after["resumed"] is False
    assert after["counts"] == json.loads(load["counts"]) == loaded["counts"]
    assert after["counts"]["hospital_changed"] == 1 and after["counts"]["person"] == 1
    assert PERSON not in row["after"] and PERSON not in (row["before"] or "")  # no personal identifier


async def test_the_load_command_refuses_without_an_operator_and_is_audited_with_one(
        db: asyncpg.Pool, stack: Settings, loaded: dict[str, Any]) -> None:
    env = {**os.environ, **settings_env(stack)}
    env.pop(audit.OPERATOR_ENV, None)
    loads = await db.fetchval("SELECT count(*) FROM refdata_load")
    cmd = [sys.executable, "-m", "services.refdata.load", str(loaded["dir"]), "--quiet"]
    res = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and "--operator" in res.stderr and "nothing was done" in res.stderr
    assert await db.fetchval("SELECT count(*) FROM refdata_load") == loads  # not even started
    res = subprocess.run(cmd, cwd=PROJECT_ROOT, env={**env, audit.OPERATOR_ENV: actor("reload")},
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "audit:" not in res.stderr, res.stderr
    [row] = await rows_of(db, actor("reload"))
    assert js(row["after"])["counts"]["hospital_changed"] == 0  # the same files: nothing changed
    assert js(row["before"])["digest"] == js(row["after"])["digest"]
    await assert_trail_on_topic(stack, db, [row["audit_id"]])  # the command published it


async def test_month_close_is_audited_once_per_command(db: asyncpg.Pool, stack: Settings) -> None:
    closed = await cli.close(stack, CLOSE_MONTH, operator=actor("close"))
    again = await cli.close(stack, CLOSE_MONTH, operator=actor("close"))
    assert not closed.already_closed and again.already_closed
    first, second = await rows_of(db, actor("close"))
    assert (first["action"], first["target"], js(first["before"])) == ("month.close", CLOSE_MONTH, {"state": "open"})
    assert js(first["after"]) == {"state": "closed", "stmt_version": 1, "digest": closed.digest, "entry_cnt": 0,
                                  "fund_pay_sumamt_fen": 0, "swept": 0, "drawdowns_fen": {}}
    assert js(second["before"]) == js(second["after"]) == {"state": "closed", "stmt_version": 1,
                                                            "digest": closed.digest}
    await assert_trail_on_topic(stack, db, [first["audit_id"], second["audit_id"]])


async def test_deposit_top_up_and_warning_line_commands_are_audited(db: asyncpg.Pool, stack: Settings) -> None:
    who = actor("deposit")
    base = ["--prov", DEPOSIT_PROV, "--operator", who]
    ref = f"AUD{RUN_TOKEN}"
    assert await asyncio.to_thread(cli.main, ["deposit", "line", "--yuan", "1000.00", *base]) == 0
    assert await asyncio.to_thread(cli.main, ["deposit", "topup", "--yuan", "2500.50", "--ref", ref, *base]) == 0
    assert await asyncio.to_thread(cli.main, ["deposit", "topup", "--yuan", "2500.50", "--ref", ref, *base]) == 0
    assert await asyncio.to_thread(cli.main, ["deposit", "line", "--default", *base]) == 0
    line, topup, repeat, default = await rows_of(db, who)
    assert (line["action"], line["target"]) == ("deposit.line", DEPOSIT_PROV)
    assert js(line["before"]) == {"override_fen": None, "line_fen": 0}
    assert js(line["after"]) == {"override_fen": 100_000, "line_fen": 100_000}
    assert (topup["action"], js(topup["before"])) == ("deposit.topup", {"balance_fen": 0})
    assert js(topup["after"]) == {"txn_id": f"topup-{ref}", "amount_fen": 250_050, "balance_fen": 250_050,
                                  "warning_line_fen": 100_000, "alert": False, "duplicate": False}
    assert repeat["before"] is None and js(repeat["after"])["duplicate"] is True
    assert js(default["before"]) == {"override_fen": 100_000, "line_fen": 100_000}
    assert js(default["after"]) == {"override_fen": None, "line_fen": 0}
    assert await db.fetchval("SELECT balance_fen FROM clearing_deposit WHERE insured_prov = $1",
                             DEPOSIT_PROV) == 250_050
    await assert_trail_on_topic(stack, db, [r["audit_id"] for r in (line, topup, repeat, default)])


async def test_manual_claims_are_queued_with_their_audit_row_in_one_transaction(
        db: asyncpg.Pool, stack: Settings, tmp_path: Path) -> None:
    claim_time = "2026-06-20 10:00:00"
    claims = [ManualClaim(claim_id=f"AUD{RUN_TOKEN}{i}", psn_no=PERSON, insuplc_admdvs="150400",
                          mdtrtarea_admvs="510421", med_type="21", begndate="2026-06-01 08:00:00",
                          enddate="2026-06-05 08:00:00", medfee_sumamt=Decimal("800.00"),
                          fund_pay_sumamt=Decimal("400.00"), reason="NOT_FILED", claim_time=claim_time)
              for i in range(2)]
    path = tmp_path / "claims.jsonl"
    path.write_bytes(b"".join(msgspec.json.encode(c) + b"\n" for c in claims))
    assert await asyncio.to_thread(cli.main, ["claims", "submit", str(path), "--operator", actor("claims")]) == 0
    [row] = await rows_of(db, actor("claims"))
    after = js(row["after"])
    assert (row["action"], row["target"], row["before"]) == ("claims.submit", "claims.jsonl", None)
    assert after["claims"] == 2 and after["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert PERSON not in row["after"]
    queued = await db.fetch("SELECT event_id, published_at FROM clearing_outbox WHERE event_id LIKE $1"
                            " ORDER BY event_id", f"claim-{after['submission']}-%")
    assert [r["event_id"] for r in queued] == [f"claim-{after['submission']}-{i}" for i in range(2)]
    assert all(r["published_at"] is not None for r in queued)  # sent to fsi.manual_claims, acknowledged


async def test_filing_revocation_by_an_operator(db: asyncpg.Pool, stack: Settings, loaded: dict[str, Any],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fid = filing_id(msgspec.json.decode(msgspec.json.encode(FILING), type=FilingRow))
    code = await asyncio.to_thread(ops.main, ["filing", "revoke", fid, "--operator", actor("filing")])
    assert code == 0, capsys.readouterr().err
    code = await asyncio.to_thread(ops.main, ["filing", "revoke", fid, "--operator", actor("filing")])
    assert code == 1 and "revoked already" in capsys.readouterr().err  # nothing to do: no second row
    [row] = await rows_of(db, actor("filing"))
    before = {"shard": "s1", "filing_type": "TEMPORARY", "source": "refdata", "revoked": False}
    assert (row["action"], row["target"], js(row["before"])) == ("filing.revoke", fid, before)
    assert js(row["after"]) == {**before, "revoked": True}
    shard = await asyncpg.connect(shard_dsns(stack)["s1"], timeout=10)
    try:
        assert await shard.fetchval("SELECT revoked FROM filing WHERE filing_id = $1", fid) is True
    finally:
        await shard.close()


async def test_the_keys_command_issues_rotates_revokes_and_lists_with_one_row_each(
        db: asyncpg.Pool, stack: Settings, loaded: dict[str, Any], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    who = actor("keys")
    secret_file = tmp_path / "key.b64"
    assert await asyncio.to_thread(keys.main, ["issue", HOSPITAL, "--out", str(secret_file), "--operator", who]) == 0
    out = capsys.readouterr().out
    first_id = out.split()[1]
    secret = secret_file.read_text().strip()
    assert secret_file.stat().st_mode & 0o777 == 0o600 and len(base64.b64decode(secret)) == 32
    assert secret not in out
    assert await asyncio.to_thread(keys.main, ["issue", HOSPITAL, "--out", str(secret_file), "--operator", who]) == 1
    assert "exists" in capsys.readouterr().err  # never overwritten; and no key issued

    assert await asyncio.to_thread(keys.main, ["rotate", HOSPITAL, "--overlap", "24h", "--operator", who]) == 0
    out = capsys.readouterr().out
    second_id = out.split()[1]
    shown = next(line.split()[1] for line in out.splitlines() if line.startswith("secret "))
    held = await keys.fetch_keys(db, key_encryption_key(stack), [HOSPITAL])
    sealed = {k.key_id: base64.b64encode(k.secret).decode() for k in held[HOSPITAL]}
    assert (sealed[first_id], sealed[second_id]) == (secret, shown)  # what was shown once is what is held
    expires = await db.fetchval("SELECT expires_at FROM institution_key WHERE key_id = $1", first_id)
    assert timedelta(hours=23, minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=24)

    assert await asyncio.to_thread(keys.main, ["revoke", first_id, "--operator", who]) == 0
    assert await asyncio.to_thread(keys.main, ["list", HOSPITAL]) == 0
    listing = capsys.readouterr().out
    assert f"{first_id}  issued" in listing and f"by {who}  revoked" in listing and f"{second_id}  issued" in listing
    assert secret not in listing and shown not in listing

    issue, rotate, revoke = await rows_of(db, who)
    assert (issue["action"], issue["target"], issue["before"]) == ("key.issue", HOSPITAL, None)
    assert js(issue["after"]) == {"key_id": first_id}
    assert (rotate["action"], js(rotate["after"])) == ("key.rotate", {"key_id": second_id})
    assert js(rotate["before"]) == {"expiring": [first_id], "overlap_s": 86400.0}
    assert (revoke["action"], js(revoke["before"]), js(revoke["after"])) == (
        "key.revoke", {"key_id": first_id, "live": True}, {"key_id": first_id, "live": False})
    for r in (issue, rotate, revoke):
        assert secret not in (r["after"] or "") and shown not in (r["after"] or "")
    await assert_trail_on_topic(stack, db, [r["audit_id"] for r in (issue, rotate, revoke)])

    # The operators' view of the trail: the same rows, oldest first.
    assert await asyncio.to_thread(ops.main, ["audit", "list", "--actor", who, "--json"]) == 0
    listed = [msgspec.json.decode(line, type=AuditRecord) for line in capsys.readouterr().out.splitlines()]
    assert [(a.audit_id, a.action, a.after) for a in listed] == [
        (r["audit_id"], r["action"], js(r["after"])) for r in (issue, rotate, revoke)]
    assert await asyncio.to_thread(ops.main, ["audit", "list", "--actor", who, "--action", "key.revoke"]) == 0
    out = capsys.readouterr().out
    assert f"{revoke['audit_id']}  " in out and f"{who}  key.revoke  {HOSPITAL}" in out and "1 audit row(s)" in out


async def _create_topic(s: Settings, topic: str) -> None:
    """A one-partition topic of the test's own (as admin: outside the services' ACLs)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, cluster.replication_factor(s))])
    finally:
        await admin.close()


async def test_group_reset_dead_letter_replay_and_retention_are_audited(
        db: asyncpg.Pool, stack: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    topic, group, who = f"{stack.topic_prefix}audit-reset", f"{stack.topic_prefix}audit-group", actor("ops")
    await _create_topic(stack, topic)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, **client_auth(stack, ADMIN),
                                acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, f"r{i}".encode(), partition=0)
        msgid = f"AUD{RUN_TOKEN}"
        letter = DeadLetter(stage="router", err_code="PERSON_UNKNOWN", err_msg="PERSON_UNKNOWN: test",
                            msgid=msgid, infno="2401", fixmedins_code=HOSPITAL, at_ns=time.time_ns(),
                            original=b'{"not": "an envelope"}')
        sent = await producer.send_and_wait(DEADLETTER.name, msgspec.json.encode(letter), key=msgid.encode())
    finally:
        await producer.stop()
    member = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, **client_auth(stack, ADMIN),
                              group_id=group, enable_auto_commit=False)
    await member.start()
    try:
        member.assign([TopicPartition(topic, 0)])
        await member.commit({TopicPartition(topic, 0): OffsetAndMetadata(5, "")})
    finally:
        await member.stop()

    reset = ["groups", "reset", group, "--topic", topic, "--to-offset", "2", "--execute", "--operator", who]
    assert await asyncio.to_thread(ops.main, reset) == 0, capsys.readouterr().err
    replay = ["deadletters", "replay", "--offset", str(sent.offset), "--execute", "--operator", who]
    assert await asyncio.to_thread(ops.main, replay) == 0, capsys.readouterr().err
    assert await asyncio.to_thread(ops.main, ["retention", "--execute", "--operator", who]) == 0
    capsys.readouterr()

    group_row, replay_row, retention_row = await rows_of(db, who)
    assert (group_row["action"], group_row["target"]) == ("group.reset", group)
    assert js(group_row["before"]) == {"offsets": {f"{topic}:0": 5}}
    assert js(group_row["after"]) == {"offsets": {f"{topic}:0": 2}, "topic": topic, "mode": "to_offset", "value": "2"}
    assert (replay_row["action"], replay_row["target"], replay_row["before"]) == (
        "deadletter.replay", DEADLETTER.name, None)
    assert js(replay_row["after"]) == {"offsets": [f"{sent.partition}:{sent.offset}"],
                                       "to": {f"{stack.topic_prefix}fsi.ingress": 1}, "forgot_refusals": 0}
    assert retention_row["action"] == "retention.prune" and set(js(retention_row["after"])) == {"s1", "s2", "hub"}
    await assert_trail_on_topic(stack, db, [r["audit_id"] for r in (group_row, replay_row, retention_row)])


async def test_every_state_changing_command_refuses_without_an_operator(
        db: asyncpg.Pool, stack: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.delenv(audit.OPERATOR_ENV, raising=False)
    rows = await db.fetchval("SELECT count(*) FROM audit_log")
    balance = await db.fetchval("SELECT balance_fen FROM clearing_deposit WHERE insured_prov = '650000'")
    claims = tmp_path / "claims.jsonl"
    claims.write_bytes(b"")
    commands: list[tuple[Any, list[str]]] = [
        (cli.main, ["close", "--month", "2019-04"]),
        (cli.main, ["sweep"]),
        (cli.main, ["deposit", "topup", "--prov", "650000", "--yuan", "1.00", "--ref", f"NOOP{RUN_TOKEN}"]),
        (cli.main, ["deposit", "line", "--prov", "650000", "--yuan", "1.00"]),
        (cli.main, ["claims", "submit", str(claims)]),
        (keys.main, ["issue", HOSPITAL]),
        (keys.main, ["rotate", HOSPITAL, "--overlap", "1h"]),
        (keys.main, ["revoke", "K0000000000000000"]),
        (ops.main, ["groups", "reset", "g", "--topic", "t", "--to-earliest", "--execute"]),
        (ops.main, ["deadletters", "replay", "--offset", "0", "--execute"]),
        (ops.main, ["retention", "--execute"]),
        (ops.main, ["filing", "revoke", "rd-0"]),
        (keys.main, ["issue", HOSPITAL, "--operator", "not a name"]),  # invalid: refused the same way
    ]
    for main, argv in commands:
        with pytest.raises(SystemExit) as exc:
            await asyncio.to_thread(main, argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert "an operator identity is required (--operator NAME or XS_OPERATOR)" in err, argv
    assert await db.fetchval("SELECT count(*) FROM audit_log") == rows
    assert await db.fetchval("SELECT balance_fen FROM clearing_deposit WHERE insured_prov = '650000'") == balance
    assert await db.fetchval("SELECT count(*) FROM clearing_month WHERE clr_month = '2019-04'") == 0


# --- the table is append-only --------------------------------------------------------------------------


async def test_audit_rows_cannot_be_updated_deleted_or_truncated(db: asyncpg.Pool) -> None:
    audit_id = await audit.record(db, actor("tamper"), "test.tamper", "x", after={"n": 1})
    for sql in ("UPDATE audit_log SET actor = 'someone.else' WHERE audit_id = $1",
                "DELETE FROM audit_log WHERE audit_id = $1"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await db.execute(sql, audit_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("TRUNCATE audit_log")
    [row] = await rows_of(db, actor("tamper"))
    assert (row["audit_id"], row["actor"], js(row["after"])) == (audit_id, actor("tamper"), {"n": 1})


# --- publishing: order, crashes ------------------------------------------------------------------------


async def test_ids_follow_commit_order_when_transactions_overlap(db: asyncpg.Pool) -> None:
    """A transaction that drew an audit id holds the others' inserts until it ends: a higher id is never
    visible before a lower one (the publisher's watermark would skip the late row)."""
    first = await db.acquire()
    second = await db.acquire()
    try:
        tx = first.transaction()
        await tx.start()
        low = await audit.record(first, actor("order"), "test.order", "first")
        waiting = asyncio.create_task(audit.record(second, actor("order"), "test.order", "second"))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # blocked until the first transaction ends
        await tx.commit()
        high = await asyncio.wait_for(waiting, 10)
        assert high > low
    finally:
        await db.release(first)
        await db.release(second)


PUBLISHER_KILLED_AFTER_ACK = """
import asyncio, os, signal, sys
import asyncpg
from services.common import audit
from services.common.config import load_settings
from services.common.kafka import ADMIN, make_producer

async def main() -> None:
    s = load_settings()
    conn = await asyncpg.connect(s.pg_dsn)
    producer = make_producer(s, ADMIN)
    await producer.start()
    sent = 0

    async def send(key: bytes, value: bytes) -> None:
        nonlocal sent
        await producer.send_and_wait(sys.argv[2], value, key=key)
        sent += 1
        if sent == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)  # acknowledged, watermark not moved

    await audit.publish(conn, sys.argv[2], send)

asyncio.run(main())
"""


async def publish_to(s: Settings, db: asyncpg.Pool, topic: str) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), acks="all",
                                enable_idempotence=True)
    await producer.start()
    try:
        async def send(key: bytes, value: bytes) -> None:
            await producer.send_and_wait(topic, value, key=key)

        async with db.acquire() as conn:
            return await audit.publish(conn, topic, send)
    finally:
        await producer.stop()


async def test_a_publisher_killed_after_the_ack_loses_nothing_and_repeats_only_same_keys(
        db: asyncpg.Pool, stack: Settings) -> None:
    # A topic (and so a watermark) of this test's own: the clearing service publishes only fsi.audit.
    topic = f"{stack.topic_prefix}audit-crash"
    await _create_topic(stack, topic)
    await publish_to(stack, db, topic)  # everything before this test
    mark = await db.fetchval("SELECT published_id FROM audit_publish WHERE topic = $1", topic)
    ids = [await audit.record(db, actor("crash"), "test.crash", f"row {i}", before={"i": i}, after={"i": i + 1})
           for i in range(6)]
    env = {**os.environ, **settings_env(stack)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PUBLISHER_KILLED_AFTER_ACK, "3", topic,
                                                cwd=PROJECT_ROOT, env=env)
    assert await asyncio.wait_for(proc.wait(), 60) == -signal.SIGKILL
    assert await db.fetchval("SELECT published_id FROM audit_publish WHERE topic = $1", topic) == mark
    assert await publish_to(stack, db, topic) == 6  # the next publisher sends the whole chunk again
    records = await assert_trail_on_topic(stack, db, ids, topic)
    # three repeated (same key and body: checked), none lost
    assert [int(k) for k, _ in records if int(k) in ids] == ids[:3] + ids
    assert await db.fetchval("SELECT published_id FROM audit_publish WHERE topic = $1", topic) == ids[-1]
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap, **client_auth(stack, ADMIN))
        await admin.start()
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def test_a_row_committed_by_a_command_that_died_is_published_by_the_clearing_service(
        db: asyncpg.Pool, services: Settings) -> None:
    audit_id = await audit.record(db, actor("orphan"), "test.orphan", "no publisher ran")  # nobody publishes
    deadline = time.monotonic() + 30
    while True:
        try:
            await assert_trail_on_topic(services, db, [audit_id])
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)

