"""The attack suite, request side (README "Security"): impersonation, tampering, replay, revoked keys,
sign-in sessions, msgid reuse and 1101 enumeration — each refused with its stable code and the ledger
unchanged; a key rotation without a restart. Runs through the real gateway, router and engine."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from deploy import stack as stack_ctl
from loadtest.his import FeeLine, GatewayClient, Hospital, Signer, Stay, next_msgid
from schemas.codec import encode
from services.common.config import PROJECT_ROOT, Settings
from services.common.kafka import ADMIN, client_auth, make_producer
from services.common.response import SHANGHAI
from services.common.signing import key_encryption_key, sign
from services.refdata.keys import issue_key, revoke_key
from tests.integration.conftest import HOSPITALS, ITEM_A, PERSONS, SIGNER, STAY_START, Ledger, issue_keys
from topics.catalog import INGRESS, REPLIES

pytestmark = pytest.mark.integration
A, B = HOSPITALS["trust_a"], HOSPITALS["trust_b"]


def _person(i: int) -> Any:
    return PERSONS[f"trust{i}"].person


def _stay(hospital: Hospital, i: int, day: int = 0) -> Stay:
    p = _person(i)
    return Stay(hospital, p.psn_no, p.insuplc, p.insutype, STAY_START + timedelta(days=day, hours=i))


async def _ledger_rows(ledger: Ledger, psn_no: str) -> int:
    return await ledger.total("SELECT count(*) FROM settlement WHERE psn_no = $1", psn_no)


def _code(answer: dict[str, Any]) -> str:
    return "ok" if answer["infcode"] == 0 else answer["err_msg"].split(":")[0]


async def test_impersonation_and_tampering_are_refused_and_change_nothing(
        refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    stay = _stay(A, 0)
    settled = await gateway.run_stay(stay, [FeeLine(ITEM_A, Decimal(2), Decimal("150.00"))])
    assert settled["infcode"] == 0, settled["err_msg"]
    rows = await _ledger_rows(ledger, stay.psn_no)
    assert rows == 1
    reverse = stay.reverse()

    # An anonymous script writing A's code into the envelope (the finding of issue 11): no signature.
    assert _code(await gateway.call(encode(reverse))) == "SIGNATURE_MISSING"
    # B signs a reversal of A's settlement with B's own key, naming A.
    b_only = Signer({A.fixmedins_code: SIGNER.keys[B.fixmedins_code]})
    b_only.sessions[A.fixmedins_code] = SIGNER.sessions[A.fixmedins_code]
    assert _code(await gateway.call(b_only.sign({**reverse, "msgid": next_msgid(A.fixmedins_code)}))) \
        == "SIGNATURE_INVALID"
    # A's own signed reversal with one byte changed after signing (the setl_id's last character).
    signed = SIGNER.sign({**reverse, "msgid": next_msgid(A.fixmedins_code)})
    at = signed.index(stay.setl_id.encode()) + len(stay.setl_id) - 1
    tampered = signed[:at] + (b"0" if signed[at:at + 1] != b"0" else b"1") + signed[at + 1:]
    assert _code(await gateway.call(tampered)) == "SIGNATURE_INVALID"
    assert await _ledger_rows(ledger, stay.psn_no) == rows
    assert await ledger.total("SELECT count(*) FROM settlement WHERE psn_no = $1 AND kind = 'reverse'",
                              stay.psn_no) == 0


async def test_msgid_reuse_with_other_content_is_a_conflict_even_concurrently(
        refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    first, second = _stay(A, 1, day=1), _stay(A, 2, day=1)
    msgid = next_msgid(A.fixmedins_code)
    admissions = [{**s.admit(), "msgid": msgid} for s in (first, second)]
    answers = await asyncio.gather(*(gateway.call(a) for a in admissions))
    assert sorted(_code(a) for a in answers) == ["MSGID_CONFLICT", "ok"]
    winner = next(i for i, a in enumerate(answers) if a["infcode"] == 0)
    # The same request again (same msgid, same content — a careful resend): the stored answer.
    again = await gateway.call(admissions[winner])
    assert again["infcode"] == 0 and again["output"] == answers[winner]["output"]
    # ... even with a new inf_time and signature; but never with the other content.
    resend = {**admissions[winner], "inf_time": (STAY_START + timedelta(days=1, hours=5)).strftime("%Y-%m-%d %H:%M:%S")}
    assert (await gateway.call(resend))["output"] == answers[winner]["output"]
    assert _code(await gateway.call(admissions[1 - winner])) == "MSGID_CONFLICT"
    loser = (first, second)[1 - winner]
    assert await ledger.total("SELECT count(*) FROM visit WHERE psn_no = $1", loser.psn_no) == 0


async def test_sign_no_must_be_a_live_session_of_the_sender(refdata: dict, gateway: GatewayClient) -> None:
    stay = _stay(B, 3, day=2)
    await gateway.call(_stay(B, 4, day=2).admit())  # B signs in
    assert B.fixmedins_code in SIGNER.sessions and A.fixmedins_code in SIGNER.sessions

    def envelope(sign_no: str) -> dict[str, Any]:
        return {**stay.admit(), "msgid": next_msgid(B.fixmedins_code), "sign_no": sign_no}

    assert _code(await gateway.call(SIGNER.sign(envelope("NOSUCHSESSION")))) == "SIGN_NO_INVALID"
    assert _code(await gateway.call(SIGNER.sign(envelope(SIGNER.sessions[A.fixmedins_code])))) == "SIGN_NO_INVALID"
    # 9002 ends a session: the next request with it is refused; a new 9001 opens another.
    own = Signer({B.fixmedins_code: SIGNER.keys[B.fixmedins_code]})
    opened = await gateway.call(own.sign(B.envelope("9001", {"signIn": {"opter_no": "OP9"}})))
    sign_no = opened["output"]["signinoutb"]["sign_no"]
    assert _code(await gateway.call(own.sign(envelope(sign_no)))) == "ok"
    out = B.envelope("9002", {"signOut": {"sign_no": sign_no, "opter_no": "OP9"}})
    assert _code(await gateway.call(own.sign({**out, "sign_no": sign_no}))) == "ok"
    assert _code(await gateway.call(own.sign(envelope(sign_no)))) == "SIGN_NO_INVALID"
    assert _code(await gateway.call(own.sign({**out, "msgid": next_msgid(B.fixmedins_code)}))) == "SIGN_NO_INVALID"


async def test_rotation_and_revocation_without_a_restart(refdata: dict, services: Settings, db: asyncpg.Pool,
                                                         gateway: GatewayClient) -> None:
    old = SIGNER.keys[B.fixmedins_code]
    kek = key_encryption_key(services)
    async with db.acquire() as conn:
        new = await issue_key(conn, kek, B.fixmedins_code, "pytest", overlap=timedelta(hours=1))
    with_old = Signer({B.fixmedins_code: old})
    with_old.sessions.update(SIGNER.sessions)
    with_new = Signer({B.fixmedins_code: new.secret})
    with_new.sessions.update(SIGNER.sessions)

    def probe(signer: Signer) -> bytes:  # a signed request refused only after authentication
        env = B.envelope("2404", {"data": {"mdtrt_id": "NONE", "psn_no": _person(5).psn_no}}, insuplc="150400")
        return signer.sign(env)

    deadline = time.monotonic() + 10
    while _code(await gateway.call(probe(with_new))) != "VISIT_UNKNOWN":
        assert time.monotonic() < deadline, "the router did not apply the new key within 10 s"
        await asyncio.sleep(0.2)
    assert _code(await gateway.call(probe(with_old))) == "VISIT_UNKNOWN"  # both live during the overlap
    async with db.acquire() as conn:
        old_id = await conn.fetchval(
            "SELECT key_id FROM institution_key WHERE fixmedins_code = $1 AND key_id <> $2 AND revoked_at IS NULL"
            " ORDER BY issued_at LIMIT 1", B.fixmedins_code, new.key_id)
        await revoke_key(conn, old_id, "pytest")
    deadline = time.monotonic() + 10
    while (code := _code(await gateway.call(probe(with_old)))) != "KEY_REVOKED":
        assert time.monotonic() < deadline, f"the revocation was not applied within 10 s ({code})"
        await asyncio.sleep(0.2)
    assert _code(await gateway.call(probe(with_new))) == "VISIT_UNKNOWN"
    SIGNER.keys[B.fixmedins_code] = new.secret


async def test_person_lookups_beyond_the_limit_are_refused_and_counted(refdata: dict, services: Settings,
                                                                      gateway: GatewayClient) -> None:
    h = HOSPITALS["trust_rate"]
    per_minute = services.person_queries_per_minute

    def lookup(n: int) -> dict[str, Any]:  # enumerating certificate numbers
        return h.envelope("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": f"15040019000101{n:04d}"}})

    codes: list[str] = []
    for start in range(0, per_minute + 30, 30):
        codes += [_code(a) for a in await asyncio.gather(*(gateway.call(lookup(n)) for n in range(start, start + 30)))]
    assert set(codes) == {"PERSON_UNKNOWN", "RATE_LIMITED"}
    assert codes.count("RATE_LIMITED") >= 20
    with urllib.request.urlopen(f"http://127.0.0.1:{services.settle_metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    series = 'xs_person_queries_refused_total{treating_prov="150000"}'
    refused = [line for line in text.splitlines() if line.startswith(series)]
    assert refused and float(refused[0].split()[-1]) >= codes.count("RATE_LIMITED")


async def test_a_record_written_straight_into_kafka_is_trusted_only_with_a_signature(
        refdata: dict, services: Settings, gateway: GatewayClient, ledger: Ledger) -> None:
    """The router, not the gateway, authenticates: a forged record on fsi.ingress is refused (answer and dead
    letter), a signed one from the same producer is served."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    stay = _stay(A, 6, day=3)
    await gateway.call(_stay(A, 7, day=3).admit())  # A has a session
    forged = encode({**stay.admit(), "sign_no": SIGNER.sessions[A.fixmedins_code]})
    signed = SIGNER.sign(stay.admit())
    replies = AIOKafkaConsumer(bootstrap_servers=services.kafka_bootstrap, enable_auto_commit=False,
                               isolation_level="read_committed", **client_auth(services, ADMIN))
    await replies.start()
    producer = make_producer(services, "his")  # what an institution writing straight into Kafka may do
    await producer.start()
    try:
        tp = TopicPartition(REPLIES.name, 3)
        replies.assign([tp])
        await replies.seek_to_end(tp)
        await replies.position(tp)
        msgids = {}
        for raw in (forged, signed):
            msgid = msgspec.json.decode(raw)["msgid"]
            msgids[msgid] = raw
            await producer.send_and_wait(INGRESS.name, raw, key=stay.psn_no.encode(),
                                         headers=[("reply_topic", REPLIES.name.encode()), ("reply_partition", b"3")])
        answers: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(answers) < 2 and time.monotonic() < deadline:
            for records in (await replies.getmany(timeout_ms=500)).values():
                for rec in records:
                    if rec.key and rec.key.decode() in msgids:
                        answers[rec.key.decode()] = _code(msgspec.json.decode(rec.value))
    finally:
        await replies.stop()
        await producer.stop()
    forged_id, signed_id = list(msgids)
    assert answers == {forged_id: "SIGNATURE_MISSING", signed_id: "ok"}
    assert await ledger.total("SELECT count(*) FROM visit WHERE psn_no = $1", stay.psn_no) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def router_with_clock_window(services: Settings, tmp_path: Path) -> Iterator[None]:
    """The run's settlement stage (it routes) replaced by one with the default ±300 s window (the suite's is
    off: fixed dates)."""
    metrics_port = _free_port()
    env = {**os.environ, "XS_INF_TIME_WINDOW_S": "300", "XS_SETTLE_METRICS_PORT": str(metrics_port)}
    stack_ctl.stop_service("settle", settings=services)
    log = open(tmp_path / "settle.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "services.settle"], cwd=PROJECT_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "settle.log").read_text()
                time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        stack_ctl.start_service("settle", services)


async def test_inf_time_outside_the_window_is_refused(refdata: dict, gateway: GatewayClient,
                                                      router_with_clock_window: None) -> None:
    p = _person(8)

    def probe(at: datetime) -> dict[str, Any]:
        return A.envelope("2404", {"data": {"mdtrt_id": "NONE", "psn_no": p.psn_no}}, insuplc=p.insuplc, inf_time=at)

    now = datetime.now(SHANGHAI).replace(tzinfo=None, microsecond=0)
    deadline = time.monotonic() + 30
    while (code := _code(await gateway.call(probe(now)))) == "TIMEOUT":  # the new router joins the group
        assert time.monotonic() < deadline
    assert code == "VISIT_UNKNOWN"
    assert _code(await gateway.call(probe(now - timedelta(minutes=10)))) == "INF_TIME_OUT_OF_WINDOW"
    assert _code(await gateway.call(probe(now + timedelta(minutes=6)))) == "INF_TIME_OUT_OF_WINDOW"
    assert _code(await gateway.call(probe(now - timedelta(seconds=200)))) == "VISIT_UNKNOWN"


async def test_new_institutions_get_keys(refdata: dict, services: Settings, db: asyncpg.Pool) -> None:
    """issue_keys (the harness's) stores sealed secrets only."""
    await issue_keys(services, db, [HOSPITALS["trust_rate"].fixmedins_code])
    secret = SIGNER.keys[HOSPITALS["trust_rate"].fixmedins_code]
    sealed = await db.fetch("SELECT secret_sealed FROM institution_key")
    assert sealed and all(secret not in bytes(r["secret_sealed"]) for r in sealed)
    assert sign(b'{"cainfo":""}', secret) != b'{"cainfo":""}'


async def test_retention_prunes_the_msgid_registry_and_ended_sessions(refdata: dict, services: Settings,
                                                                      db: asyncpg.Pool) -> None:
    """deploy.ops retention keeps a msgid as long as its stored answer (same cutoff), and drops sessions
    that ended before it; live sessions and younger msgids stay."""
    from deploy import ops

    cutoff = datetime(2026, 1, 1, tzinfo=UTC)
    old, young = "H15040099906" + "2025" + "0" * 14, "H15040099906" + "2026" + "1" * 14
    await db.executemany("INSERT INTO msgid_seen (msgid, digest, seen_at) VALUES ($1, '\\x00', $2)",
                         [(old, cutoff - timedelta(days=1)), (young, cutoff + timedelta(days=1))])
    await db.executemany(
        "INSERT INTO sign_session (sign_no, fixmedins_code, opter, signed_in_at, signed_out_at)"
        " VALUES ($1, $2, 'O', $3, $4)",
        [("RETENDED", A.fixmedins_code, cutoff - timedelta(days=2), cutoff - timedelta(days=2)),
         ("RETEXPIRED", A.fixmedins_code, cutoff - timedelta(days=3), None),
         ("RETYOUNG", A.fixmedins_code, cutoff + timedelta(days=1), None)])
    try:
        dry = await ops.trust_retention(services, cutoff, execute=False)
        assert (dry.msgids_due, dry.sessions_due, dry.msgids_deleted) == (1, 2, 0)
        done = await ops.trust_retention(services, cutoff, execute=True)
        assert (done.msgids_deleted, done.sessions_deleted) == (1, 2)
        assert [r[0] for r in await db.fetch("SELECT msgid FROM msgid_seen WHERE msgid = ANY($1)", [old, young])] \
            == [young]
        assert [r[0] for r in await db.fetch("SELECT sign_no FROM sign_session WHERE sign_no LIKE 'RET%'")] \
            == ["RETYOUNG"]
    finally:
        await db.execute("DELETE FROM msgid_seen WHERE msgid = ANY($1)", [old, young])
        await db.execute("DELETE FROM sign_session WHERE sign_no LIKE 'RET%'")
