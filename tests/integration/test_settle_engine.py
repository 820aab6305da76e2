"""The settlement engine's batch transaction on the real PostgreSQL: a request that fails unexpectedly
half-way through is rolled back with its whole batch, and the batch is redone with that request answered
INTERNAL — nothing half-applied is written, and the rest of the batch is settled."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import msgspec
import pytest
from aiokafka import ConsumerRecord, TopicPartition

from schemas.internal import PersonCtx, RoutedRequest
from services.common.config import Settings
from services.policy.policies import PolicyBook
from services.settle import handler as engine_module
from services.settle.handler import PoisonedRequest, SettleEngine
from tests.unit.test_settle_properties import Script

pytestmark = pytest.mark.integration
TOKEN = f"{time.time_ns() % 10**12:012d}"


def _person(n: int) -> PersonCtx:
    return PersonCtx(psn_no=f"E{TOKEN}{n}", insured_admdvs="150400", insured_prov="150000", insured_pool="150400",
                     insutype="310", psn_type="1101", assistance=None, acct_balc_fen=10_000)


def _records(msgs: list[RoutedRequest]) -> dict[TopicPartition, list[ConsumerRecord]]:
    tp = TopicPartition("fsi.routed", 0)
    enc = msgspec.json.Encoder(decimal_format="number")
    return {tp: [ConsumerRecord("fsi.routed", 0, i, 0, 0, None, enc.encode(m), None, 0, 0, [])
                 for i, m in enumerate(msgs)]}


async def test_poisoned_request_is_rolled_back_and_the_batch_redone(stack: Settings, db: asyncpg.Pool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    people = [_person(i) for i in range(3)]
    script = Script({p.psn_no: p for p in people})
    for p in people:
        script.purchase(p, [2_500])
    msgs = [msgspec.structs.replace(m, msgid=f"H{TOKEN}{i:017d}") for i, m in enumerate(script.messages)]
    victim = msgs[1].msgid

    real_handle = engine_module.handle

    def buggy_handle(msg: RoutedRequest, st: Any, policies: PolicyBook) -> Any:
        effect = real_handle(msg, st, policies)  # state changed ...
        if msg.msgid == victim:
            raise RuntimeError("a bug after the state was changed")  # ... then a bug
        return effect

    monkeypatch.setattr(engine_module, "handle", buggy_handle)
    engine = SettleEngine(stack, PolicyBook.load())
    engine.pool = await asyncpg.create_pool(stack.pg_dsn, min_size=1, max_size=2)
    try:
        with pytest.raises(PoisonedRequest):
            await engine.process(_records(msgs))
        assert await db.fetchval("SELECT count(*) FROM processed_request WHERE msgid = ANY($1)",
                                 [m.msgid for m in msgs]) == 0  # the whole attempt was rolled back
        outbox = await engine.process(_records(msgs))
    finally:
        await engine.pool.close()
        await engine.consumer.stop()  # created, never started: process() needs no Kafka
        await engine.producer.stop()
    replies = {key.decode(): msgspec.json.decode(value) for topic, _, key, value in outbox.records
               if topic == msgs[0].reply_topic and key}
    assert replies[victim]["infcode"] == -1 and replies[victim]["err_msg"].startswith("INTERNAL")
    assert all(replies[m.msgid]["infcode"] == 0 for m in msgs if m.msgid != victim)
    rows = await db.fetch("SELECT msgid FROM settlement WHERE msgid = ANY($1)", [m.msgid for m in msgs])
    assert {r["msgid"] for r in rows} == {m.msgid for m in msgs} - {victim}
    assert await db.fetchval("SELECT count(*) FROM visit WHERE created_msgid = $1", victim) == 0
    assert await db.fetchval("SELECT balc_fen FROM account WHERE psn_no = $1", msgs[1].person.psn_no) is None
    stored = await db.fetchrow("SELECT infcode FROM processed_request WHERE msgid = $1", victim)
    assert stored["infcode"] == -1  # a resend of the same msgid gets the same INTERNAL answer
