"""A bug hit by one request (an unexpected exception) in the settlement stage's parts (router, engine) and
the clearing service's batch processor, inside the shared shell: that request is answered INTERNAL and
dead-lettered, every other request of the batch is handled, and the clearing service stores only the
others' answers (a resend of the failed msgid is tried again). No Kafka client is started: `process_batch`
is the shell's part between the poll and the publish."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import pytest
from aiokafka import ConsumerRecord

from loadtest.his import Hospital
from schemas.codec import Request
from schemas.internal import DeadLetter
from services.clearing import handler as clearing_handler
from services.clearing.handler import GROUP_REQUESTS, Requests
from services.common.config import Settings
from services.common.consumer import BatchConsumer, BatchProcessor, Outbox, Record, RecordFailed
from services.common.kafka import ADMIN, make_group_consumer, make_producer
from services.common.shards import ShardPools
from services.policy.policies import PolicyBook
from services.router.core import RouterCore
from services.settle.handler import SettleEngine
from services.settle.stage import GROUP_ID as STAGE_GROUP
from services.settle.stage import SettlementStage
from topics.catalog import CLEARING, DEADLETTER, INGRESS, REPLIES, TopicSpec

pytestmark = pytest.mark.integration
HOSPITAL = Hospital("H15040099901", "赤峰测试医院", "150400")
AT = datetime(2026, 6, 3, 10, 0, 0)
REPLY_HEADERS = [("reply_topic", REPLIES.name.encode()), ("reply_partition", b"2"),
                 ("received_ns", b"1780000000000000000")]


def _envelopes(infno: str, n: int, tag: str) -> list[dict[str, Any]]:
    stamp = f"{datetime.now():%Y%m%d%H%M%S}"
    return [HOSPITAL.envelope(infno, {"data": {"mdtrt_id": "M1", "psn_no": "P1"}}, insuplc="150400",
                              msgid=f"{HOSPITAL.fixmedins_code}{stamp}{tag}{i:03d}", inf_time=AT) for i in range(n)]


async def _process(s: Settings, group: str, spec: TopicSpec, processor: BatchProcessor[Any],
                   values: list[bytes]) -> Outbox:
    consumer, producer = make_group_consumer(s, ADMIN, group, spec.name), make_producer(s, ADMIN)
    try:
        shell = BatchConsumer(consumer, group, spec, processor, producer, max_records=10)
        return await shell.process_batch([ConsumerRecord(spec.name, 0, i, 0, 0, None, v, None, 0, 0, REPLY_HEADERS)
                                          for i, v in enumerate(values)])
    finally:
        await consumer.stop()  # created, never started
        await producer.stop()


def _answers(outbox: Outbox) -> dict[str, tuple[int, int | None, str]]:
    return {out.key.decode(): (msgspec.json.decode(out.value)["infcode"], out.partition,
                               msgspec.json.decode(out.value)["err_msg"])
            for out in outbox.records if out.topic == REPLIES.name and out.key}


def _letters(outbox: Outbox) -> list[DeadLetter]:
    return [msgspec.json.decode(o.value, type=DeadLetter) for o in outbox.records if o.topic == DEADLETTER.name]


async def test_router_answers_a_request_that_hits_a_bug_internal(stack: Settings,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    envs = _envelopes("2404", 3, "1")
    victim = envs[1]["msgid"]
    core = RouterCore(stack)

    async def handle(req: Request, raw: bytes, headers: Mapping[str, bytes], outbox: Outbox) -> None:
        if req.envelope.msgid == victim:
            raise KeyError("a bug")
        outbox.add(CLEARING.name, raw, key=b"P1")  # routed on, nothing for the engine

    monkeypatch.setattr(core, "handle", handle)
    stage = SettlementStage(core, SettleEngine(stack, PolicyBook.load()))
    outbox = await _process(stack, STAGE_GROUP, INGRESS, stage, [msgspec.json.encode(e) for e in envs])
    # The named culprit is answered first, then the batch is redone without it (the others keep their order).
    assert [(o.topic, o.key) for o in outbox.records] == [
        (REPLIES.name, victim.encode()), (DEADLETTER.name, victim.encode()),
        (CLEARING.name, b"P1"), (CLEARING.name, b"P1")]
    assert _answers(outbox) == {victim: (-1, 2, "INTERNAL: unexpected error; resend with the same msgid")}
    assert [(d.stage, d.err_code, d.msgid, d.infno) for d in _letters(outbox)] == [("router", "INTERNAL", victim,
                                                                                   "2404")]


async def test_the_stage_isolates_the_ingress_record_of_an_engine_culprit(stack: Settings,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine names its culprit by the routed request it was handed; the stage turns that into the
    ingress record the shell redoes the batch without, and the letter names the engine."""
    envs = _envelopes("2404", 3, "3")
    victim = envs[2]["msgid"]
    core, engine = RouterCore(stack), SettleEngine(stack, PolicyBook.load())
    handed: list[list[str]] = []

    async def handle(req: Request, raw: bytes, headers: Mapping[str, bytes], outbox: Outbox) -> Any:
        return msgspec.structs.replace(req.envelope)  # a stand-in for the routed request (it has a msgid)

    async def process(records: list[Record[Any]], outbox: Outbox) -> None:
        handed.append([rec.value.msgid for rec in records])
        for rec in records:
            if rec.value.msgid == victim:
                raise RecordFailed(rec, "INTERNAL", "INTERNAL: unexpected error; resend with the same msgid")
            outbox.add(REPLIES.name, b"{}", key=rec.value.msgid.encode())

    monkeypatch.setattr(core, "handle", handle)
    monkeypatch.setattr(engine, "process", process)
    outbox = await _process(stack, STAGE_GROUP, INGRESS, SettlementStage(core, engine),
                            [msgspec.json.encode(e) for e in envs])
    others = [e["msgid"] for e in envs if e["msgid"] != victim]
    assert handed == [[e["msgid"] for e in envs], others]  # redone once, without the culprit
    assert [(o.topic, o.key) for o in outbox.records] == [
        (REPLIES.name, victim.encode()), (DEADLETTER.name, victim.encode()),
        *((REPLIES.name, m.encode()) for m in others)]
    assert [(d.stage, d.err_code, d.msgid, d.infno) for d in _letters(outbox)] == [("settle", "INTERNAL", victim,
                                                                                   "2404")]
    assert _letters(outbox)[0].original == msgspec.json.encode(envs[2])  # the ingress bytes, as received


async def test_clearing_answers_a_request_that_hits_a_bug_internal(stack: Settings, db: asyncpg.Pool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    envs = _envelopes("3201", 3, "2")
    victim = envs[0]["msgid"]

    def decode_body(env: Any) -> Any:
        if env.msgid == victim:
            raise KeyError("a bug")
        return None

    async def answer(conn: asyncpg.Connection, shards: Any, env: Any, body: Any) -> tuple[dict[str, Any], str]:
        return {"ok": env.msgid[-1]}, ""

    monkeypatch.setattr(clearing_handler, "decode_body", decode_body)
    monkeypatch.setattr(clearing_handler.requests, "answer", answer)
    pool = await asyncpg.create_pool(stack.pg_dsn, min_size=0, max_size=2)
    shards = await ShardPools.connect(stack, 1)
    try:
        outbox = await _process(stack, GROUP_REQUESTS, CLEARING, Requests(pool, shards),
                                [msgspec.json.encode(e) for e in envs])
    finally:
        await shards.close()
        await pool.close()
    answers = _answers(outbox)
    assert answers[victim] == (-1, 2, "INTERNAL: unexpected error; resend with the same msgid")
    assert [answers[e["msgid"]][0] for e in envs[1:]] == [0, 0]
    assert [(d.err_code, d.msgid) for d in _letters(outbox)] == [("INTERNAL", victim)]
    stored = await db.fetch("SELECT msgid FROM clearing_request WHERE msgid = ANY($1) ORDER BY msgid",
                            [e["msgid"] for e in envs])
    assert [r["msgid"] for r in stored] == sorted(e["msgid"] for e in envs[1:])
