"""Kafka's authentication and ACLs on the real broker (README "Security" / Kafka): who may connect, and
what each principal may read, write and join.

The test owns a topic prefix of its own (the run's prefix + "sec."), applied like any deployment's
(topics, users, ACLs by topics.apply) and deleted at the end, so nothing it writes reaches the run's
services.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.metadata import MetadataRequest

from deploy import ops
from deploy.common import Paths
from services.common.config import Settings
from services.common.kafka import ADMIN, SERVICE_PRINCIPALS, client_auth, make_admin
from topics.acls import CLEARING_GROUPS, SETTLE_GROUP, prefix_acls
from topics.apply import apply_topics
from topics.catalog import catalog
from topics.security import delete_acls

pytestmark = pytest.mark.integration

INGRESS, REPLIES, SETTLEMENTS, CLEARING, DEADLETTER, MANUAL_CLAIMS, DEPOSITS = (
    "fsi.ingress", "fsi.replies", "fsi.settlements", "fsi.clearing", "fsi.deadletter", "fsi.manual_claims",
    "fsi.deposits")
FORMER_ROUTER_GROUP = "xsettle-router"  # the router's, before router and engine were one stage: nobody's now
INSTITUTION = "H15040200001"  # a fixmedins_code of the reference hospitals
WAIT_S = 15.0  # a credential change reaches the broker's cache through the metadata log: not at once


@pytest.fixture(scope="module")
async def sec(stack: Settings) -> AsyncIterator[Settings]:
    s = dataclasses.replace(stack, topic_prefix=stack.topic_prefix + "sec.")
    assert await apply_topics(s) == []
    yield s
    admin = make_admin(s)
    await admin.start()
    try:
        await admin.delete_topics([t.name for t in catalog(s)], timeout_ms=15_000)
        await delete_acls(admin, prefix_acls(s))
    finally:
        await admin.close()


def _name(s: Settings, topic: str) -> str:
    return s.topic_prefix + topic


async def produce(s: Settings, auth: dict[str, Any], topic: str, idempotent: bool = True) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, **auth, acks="all",
                                enable_idempotence=idempotent, request_timeout_ms=10_000)
    await producer.start()
    try:
        async with asyncio.timeout(30):
            await producer.send_and_wait(_name(s, topic), b'{"test":"kafka security"}', key=b"kafka-security")
    finally:
        await producer.stop()


async def read(s: Settings, auth: dict[str, Any], topic: str) -> int:
    """Fetches partition 0 from its beginning until a record comes (or 10 s); the number of records.
    (aiokafka raises a refused fetch at the next poll after the broker's answer.)"""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **auth, enable_auto_commit=False,
                                request_timeout_ms=10_000)
    await consumer.start()
    try:
        tp = TopicPartition(_name(s, topic), 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=500)
            if n := sum(len(b) for b in batches.values()):
                return n
        return 0
    finally:
        await consumer.stop()


async def fetch_error(s: Settings, auth: dict[str, Any], topic: str) -> int:
    """The error code of one fetch of partition 0 (a consumer would only log a refused fetch, or not even
    fetch a topic it may not see)."""
    conn = await create_conn("127.0.0.1", s.kafka_port, **auth)
    try:
        resp = await conn.send(FetchRequest(100, 1, 1 << 20, 0, [(_name(s, topic), [(0, 0, 1 << 20)])]))
    finally:
        conn.close()
    [(name, [partition, *_])] = [(t[0], t[1]) for t in resp.topics]
    assert name == _name(s, topic)
    return int(partition[1])


def refused_read(s: Settings, code: int) -> None:
    assert code == TopicAuthorizationFailedError.errno == 29


async def join(s: Settings, principal: str, group: str, topic: str) -> None:
    consumer = AIOKafkaConsumer(_name(s, topic), bootstrap_servers=s.kafka_bootstrap, **client_auth(s, principal),
                                group_id=_name(s, group), enable_auto_commit=False, request_timeout_ms=10_000)
    try:
        async with asyncio.timeout(30):
            await consumer.start()
    finally:
        await consumer.stop()


def refused_topic(exc: pytest.ExceptionInfo[TopicAuthorizationFailedError], s: Settings, topic: str) -> None:
    assert str(exc.value) == f"[Error 29] TopicAuthorizationFailedError: {_name(s, topic)}"


async def _metadata_on_one_connection(s: Settings, **auth: Any) -> None:
    conn = await create_conn("127.0.0.1", s.kafka_port, **auth)
    try:
        await conn.send(MetadataRequest([]))
    finally:
        conn.close()


async def test_anonymous_and_wrong_password_are_refused(sec: Settings) -> None:
    log = Paths.of(sec).log("kafka")
    seen = log.read_text(errors="replace").count("during SASL handshake") if sec.kafka_brokers == 1 else 0
    with pytest.raises(KafkaConnectionError) as plaintext:
        await _metadata_on_one_connection(sec)  # PLAINTEXT: no SASL at all
    assert str(plaintext.value) == f"KafkaConnectionError: Connection at 127.0.0.1:{sec.kafka_port} closed"
    if sec.kafka_brokers == 1:  # the broker says why it closed it
        deadline = time.monotonic() + 5
        while log.read_text(errors="replace").count("during SASL handshake") == seen:
            assert time.monotonic() < deadline, "the broker logged no refused handshake"
            await asyncio.sleep(0.1)
        assert "Unexpected Kafka request of type METADATA during SASL handshake" in log.read_text(errors="replace")
    with pytest.raises(SaslAuthenticationFailed) as wrong:
        await _metadata_on_one_connection(sec, **{**client_auth(sec, "his"), "sasl_plain_password": "not-it"})
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in str(wrong.value)
    with pytest.raises(SaslAuthenticationFailed):
        await _metadata_on_one_connection(sec, **client_auth(sec, "nobody", "x"))
    # Only SCRAM-SHA-512 on the client listener (the controller's PLAIN user cannot come in this way)
    with pytest.raises(UnsupportedSaslMechanismError):
        await _metadata_on_one_connection(sec, **{**client_auth(sec, ADMIN), "sasl_mechanism": "PLAIN"})
    # the right password passes (the refusals above are about credentials, not a broken listener)
    await _metadata_on_one_connection(sec, **client_auth(sec, "his"))


async def test_his_may_only_write_requests(sec: Settings) -> None:
    his = client_auth(sec, "his")
    await produce(sec, his, INGRESS)
    for topic in (REPLIES, SETTLEMENTS, CLEARING, DEADLETTER):
        with pytest.raises(TopicAuthorizationFailedError) as exc:
            await produce(sec, his, topic)
        refused_topic(exc, sec, topic)
    for topic in (INGRESS, REPLIES, DEADLETTER):
        refused_read(sec, await fetch_error(sec, his, topic))


async def test_the_settlement_stage_reads_requests_and_writes_its_outputs_only(sec: Settings) -> None:
    settle = client_auth(sec, "settle")
    assert await fetch_error(sec, settle, INGRESS) == 0  # the requests it routes and settles (refusals below can fail)
    for topic in (REPLIES, CLEARING, SETTLEMENTS, DEADLETTER):  # answers, 32xx to clearing, ledger events, letters
        await produce(sec, settle, topic)
    # It never makes requests, manual claims or deposit movements (clearing's and the CLI's).
    for topic in (INGRESS, MANUAL_CLAIMS, DEPOSITS):
        with pytest.raises(TopicAuthorizationFailedError) as exc:
            await produce(sec, settle, topic)
        refused_topic(exc, sec, topic)
    # It reads nothing but the requests: not the answers, the ledger's events or the dead letters.
    for topic in (REPLIES, SETTLEMENTS, CLEARING, DEADLETTER):
        refused_read(sec, await fetch_error(sec, settle, topic))


async def test_the_gateway_can_not_write_settlements(sec: Settings) -> None:
    """Only the settlement stage (and the operator's tools) may put a ledger event in front of clearing."""
    gateway = client_auth(sec, "gateway")
    await produce(sec, gateway, INGRESS)
    for topic in (SETTLEMENTS, CLEARING):
        with pytest.raises(TopicAuthorizationFailedError) as exc:
            await produce(sec, gateway, topic)
        refused_topic(exc, sec, topic)


async def test_monitor_cannot_write_anything(sec: Settings) -> None:
    monitor = client_auth(sec, "monitor")
    # An idempotent producer (the project's kind) gets no producer id: WRITE on no topic at all.
    with pytest.raises(ClusterAuthorizationFailedError) as no_pid:
        await produce(sec, monitor, INGRESS)
    assert str(no_pid.value) == "[Error 31] ClusterAuthorizationFailedError"
    for spec in catalog(dataclasses.replace(sec, topic_prefix="")):
        with pytest.raises(TopicAuthorizationFailedError) as exc:
            await produce(sec, monitor, spec.name, idempotent=False)
        refused_topic(exc, sec, spec.name)


async def test_no_principal_joins_another_services_group(sec: Settings) -> None:
    await join(sec, "settle", SETTLE_GROUP, INGRESS)  # its own group: allowed
    # Each principal on a topic it may read, with a group not its own (the router's former group is nobody's).
    for principal, group, topic in (("settle", FORMER_ROUTER_GROUP, INGRESS), ("clearing", SETTLE_GROUP, SETTLEMENTS),
                                    ("settle", CLEARING_GROUPS[0], INGRESS), ("smartmon", SETTLE_GROUP, SETTLEMENTS)):
        with pytest.raises(GroupAuthorizationFailedError) as exc:
            await join(sec, principal, group, topic)
        assert str(exc.value) == f"[Error 30] GroupAuthorizationFailedError: {_name(sec, group)}"


async def test_dead_letters_are_readable_by_ops_and_admin_only(sec: Settings) -> None:
    await produce(sec, client_auth(sec, "gateway"), DEADLETTER)  # (the settlement stage's test may write one too)
    assert await read(sec, client_auth(sec, "ops"), DEADLETTER) >= 1
    assert await read(sec, client_auth(sec, ADMIN), DEADLETTER) >= 1
    assert await fetch_error(sec, client_auth(sec, "ops"), DEADLETTER) == 0  # the refusals below can fail
    for principal in SERVICE_PRINCIPALS:
        if principal == "ops":
            continue
        refused_read(sec, await fetch_error(sec, client_auth(sec, principal), DEADLETTER))


async def cli(*argv: str) -> int:
    """`python -m deploy.ops kafka-user ...` (in a thread: it runs its own event loop)."""
    return await asyncio.to_thread(ops.main, ["kafka-user", *argv])


async def _until_authenticated(s: Settings, auth: dict[str, Any], wanted: bool) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            await _metadata_on_one_connection(s, **auth)
            ok = True
        except SaslAuthenticationFailed:
            ok = False
        if ok == wanted:
            return
        assert time.monotonic() < deadline, f"authentication {'refused' if wanted else 'accepted'} after {WAIT_S} s"
        await asyncio.sleep(0.2)


async def test_an_institution_user_is_issued_produce_only_then_revoked(sec: Settings, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XS_TOPIC_PREFIX", sec.topic_prefix)  # the CLI acts on this test's own prefix
    out = tmp_path / "inst.password"
    assert await cli("issue", INSTITUTION, "--operator", "sec-test", "--out", str(out)) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert await cli("issue", INSTITUTION, "--operator", "sec-test", "--out", str(out)) == 1  # never overwritten
    # issued again (a new password) through the function the CLI calls:
    secret = await ops.issue_kafka_user(sec, INSTITUTION, "sec-test")
    inst = client_auth(sec, f"inst-{INSTITUTION}", secret)
    await _until_authenticated(sec, inst, True)
    await produce(sec, inst, INGRESS)
    for topic in (REPLIES, SETTLEMENTS, CLEARING):
        with pytest.raises(TopicAuthorizationFailedError) as exc:
            await produce(sec, inst, topic)
        refused_topic(exc, sec, topic)
    for topic in (INGRESS, REPLIES):
        refused_read(sec, await fetch_error(sec, inst, topic))
    # the first password (the CLI's) was replaced by the second issue
    with pytest.raises(SaslAuthenticationFailed):
        await _metadata_on_one_connection(sec, **client_auth(sec, f"inst-{INSTITUTION}", out.read_text().strip()))

    await ops.revoke_kafka_user(sec, INSTITUTION, "sec-test")
    await _until_authenticated(sec, inst, False)
    assert await cli("revoke", INSTITUTION, "--operator", "sec-test") == 1  # nothing left to revoke

    conn = await asyncpg.connect(sec.pg_dsn)
    try:
        rows = await conn.fetch("SELECT action, target, after FROM audit_log WHERE actor = 'sec-test'"
                                " ORDER BY audit_id")
    finally:
        await conn.close()
    assert [(r["action"], r["target"]) for r in rows] == [
        ("kafka_user.issue", f"inst-{INSTITUTION}"), ("kafka_user.issue", f"inst-{INSTITUTION}"),
        ("kafka_user.revoke", f"inst-{INSTITUTION}")]
    assert secret not in "".join(str(r["after"]) for r in rows)


async def test_kafka_user_needs_an_operator(sec: Settings, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XS_OPERATOR", raising=False)
    assert await cli("issue", INSTITUTION) == 1
    assert "an operator identity is required" in capsys.readouterr().err
