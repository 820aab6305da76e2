"""The settlement engine's batch transaction inside the shared shell, on the real PostgreSQL: a request
that fails unexpectedly half-way through, or that the database refuses, is rolled back with its whole
batch, and the batch is redone without it (answered INTERNAL and dead-lettered) — nothing half-applied
is written, and the rest of the batch is settled. A batch's shards run their transactions at once; a
failure in one shard while the other commits settles nothing twice. A load that waits for another
transaction's locks reads what that transaction committed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
from aiokafka import ConsumerRecord

from schemas.internal import DeadLetter, PersonCtx, RoutedRequest
from schemas.pharmacy import Input2102
from services.common.config import Settings
from services.common.consumer import BatchConsumer, Outbox
from services.common.kafka import make_group_consumer, make_producer
from services.common.shards import ShardPools
from services.policy.policies import PolicyBook
from services.settle import handler as engine_module
from services.settle import ledger as ledger_module
from services.settle.handler import SettleEngine
from services.settle.stage import GROUP_ID
from services.smartmon.rules import load_rules
from tests.integration.conftest import Ledger
from tests.unit.test_settle_properties import Script
from topics.catalog import DEADLETTER, SETTLEMENTS, TopicSpec

pytestmark = pytest.mark.integration
TOKEN = f"{time.time_ns() % 10**12:012d}"
# The engine alone in the shell, over a topic of routed requests (in the stack the settlement stage hands them
# over in memory: services/settle/stage.py). No Kafka client is started: the name only labels errors.
ROUTED = TopicSpec("test.routed", 1, 0, "delete", "psn_no", RoutedRequest, "routed requests of these tests")


def _person(n: int, insured: tuple[str, str, str] = ("150400", "150000", "150400")) -> PersonCtx:
    admdvs, prov, pool = insured
    return PersonCtx(psn_no=f"E{TOKEN}{n}", insured_admdvs=admdvs, insured_prov=prov, insured_pool=pool,
                     insutype="310", psn_type="1101", assistance=None, acct_balc_fen=10_000)


def _records(values: list[bytes]) -> list[ConsumerRecord]:
    return [ConsumerRecord(ROUTED.name, 0, i, 0, 0, None, v, None, 0, 0, []) for i, v in enumerate(values)]


def _encode(msgs: list[RoutedRequest]) -> list[bytes]:
    return [msgspec.json.Encoder(decimal_format="number").encode(m) for m in msgs]


@asynccontextmanager
async def _engine(stack: Settings) -> AsyncIterator[BatchConsumer[RoutedRequest]]:
    """The engine inside the shared shell, with a database pool; no Kafka client is started."""
    engine = SettleEngine(stack, PolicyBook.load())
    engine.shards = await ShardPools.connect(stack, 2)
    producer = make_producer(stack, "settle")
    consumer = make_group_consumer(stack, "settle", GROUP_ID, ROUTED.name)
    try:
        yield BatchConsumer(consumer, GROUP_ID, ROUTED, engine, producer, max_records=500)
    finally:
        await engine.shards.close()
        await consumer.stop()  # created, never started: process_batch() needs no Kafka
        await producer.stop()


def _replies(outbox: Outbox, reply_topic: str) -> dict[str, dict]:
    return {out.key.decode(): msgspec.json.decode(out.value) for out in outbox.records
            if out.topic == reply_topic and out.key}


def _dead_letters(outbox: Outbox) -> list[DeadLetter]:
    return [msgspec.json.decode(out.value, type=DeadLetter) for out in outbox.records if out.topic == DEADLETTER.name]


# 赤峰 (province 15: shard s1) and 米易 (province 51, pooling at 攀枝花: shard s2).
CHIFENG, MIYI = ("150400", "150000", "150400"), ("510421", "510000", "510400")


def _purchases(n: int, tag: str, insured: list[tuple[str, str, str]] | None = None) -> list[RoutedRequest]:
    """n pharmacy purchases of n persons of their own (tag names them and the msgids)."""
    people = [_person(int(tag) * 100 + i, insured[i] if insured else CHIFENG) for i in range(n)]
    script = Script({p.psn_no: p for p in people})
    for p in people:
        script.purchase(p, [2_500])
    return [msgspec.structs.replace(m, msgid=f"H{TOKEN}{tag}{i:016d}") for i, m in enumerate(script.messages)]


async def test_poisoned_request_is_rolled_back_and_the_batch_redone(stack: Settings, ledger: Ledger,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    msgs = _purchases(3, "1")
    victim = msgs[1].msgid

    real_handle = engine_module.handle

    def buggy_handle(msg: RoutedRequest, st: Any, policies: PolicyBook, book: Any = None) -> Any:
        effect = real_handle(msg, st, policies, book)  # state changed ...
        if msg.msgid == victim:
            raise RuntimeError("a bug after the state was changed")  # ... then a bug
        return effect

    monkeypatch.setattr(engine_module, "handle", buggy_handle)
    async with _engine(stack) as shell:
        outbox = await shell.process_batch(_records(_encode(msgs)))
    replies = _replies(outbox, msgs[0].reply_topic)
    assert replies[victim]["infcode"] == -1 and replies[victim]["err_msg"].startswith("INTERNAL")
    assert all(replies[m.msgid]["infcode"] == 0 for m in msgs if m.msgid != victim)
    assert [(d.msgid, d.err_code) for d in _dead_letters(outbox)] == [(victim, "INTERNAL")]
    rows = await ledger.fetch("SELECT msgid FROM settlement WHERE msgid = ANY($1)", [m.msgid for m in msgs])
    assert {r["msgid"] for r in rows} == {m.msgid for m in msgs} - {victim}
    assert await ledger.total("SELECT count(*) FROM visit WHERE created_msgid = $1", victim) == 0
    assert await ledger.fetchval("SELECT balc_fen FROM account WHERE psn_no = $1", msgs[1].person.psn_no) is None
    # Not stored: a resend of the msgid is tried again (INTERNAL tells the hospital to resend).
    assert await ledger.total("SELECT count(*) FROM processed_request WHERE msgid = $1", victim) == 0


async def test_a_request_the_database_refuses_is_isolated(stack: Settings, ledger: Ledger) -> None:
    """A NUL in a drug code passes msgspec but PostgreSQL refuses it at the batch's write (the rows' JSON
    reader: UntranslatableCharacter): the batch is halved until the culprit is alone, the others settle."""
    msgs = _purchases(5, "2")
    victim = msgs[3]
    assert isinstance(victim.body, Input2102)
    drug = msgspec.structs.replace(victim.body.drugdetail[0], medins_list_codg="a\u0000b")
    msgs[3] = msgspec.structs.replace(victim, body=msgspec.structs.replace(victim.body, drugdetail=[drug]))
    async with _engine(stack) as shell:
        outbox = await shell.process_batch(_records([b"\x00 not json", *_encode(msgs)]))
    replies = _replies(outbox, msgs[0].reply_topic)
    assert replies[victim.msgid]["infcode"] == -1
    assert replies[victim.msgid]["err_msg"] == (
        "INTERNAL: the record could not be applied (UntranslatableCharacterError (SQLSTATE 22P05))")
    assert {m.msgid for m in msgs if replies[m.msgid]["infcode"] == 0} == {m.msgid for m in msgs} - {victim.msgid}
    letters = _dead_letters(outbox)
    assert [(d.msgid, d.err_code) for d in letters] == [(None, "INTERNAL"), (victim.msgid, "INTERNAL")]
    assert letters[0].err_msg.startswith(f"INTERNAL: undecodable {ROUTED.name} record: JSON is malformed")
    assert letters[0].original == b"\x00 not json"
    rows = await ledger.fetch("SELECT msgid FROM settlement WHERE msgid = ANY($1)", [m.msgid for m in msgs])
    assert {r["msgid"] for r in rows} == {m.msgid for m in msgs} - {victim.msgid}


async def test_a_batch_of_two_shards_lands_each_person_in_their_insured_provinces_shard(
        stack: Settings, ledger: Ledger) -> None:
    """One batch with persons of both shards: each shard gets exactly its persons' ledger rows, accounts
    and processed requests; the batch replayed (a crash after the commits) changes nothing."""
    msgs = _purchases(4, "3", [CHIFENG, MIYI, CHIFENG, MIYI])
    async with _engine(stack) as shell:
        outbox = await shell.process_batch(_records(_encode(msgs)))
        assert all(r["infcode"] == 0 for r in _replies(outbox, msgs[0].reply_topic).values())
        replay = await shell.process_batch(_records(_encode(msgs)))
    assert _replies(replay, msgs[0].reply_topic) == _replies(outbox, msgs[0].reply_topic)
    msgids = [m.msgid for m in msgs]
    for insured, expected in ((CHIFENG, {msgs[0].msgid, msgs[2].msgid}), (MIYI, {msgs[1].msgid, msgs[3].msgid})):
        shard = ledger.of(insured[0])
        assert {r["msgid"] for r in await shard.fetch(
            "SELECT msgid FROM settlement WHERE msgid = ANY($1)", msgids)} == expected
        assert {r["msgid"] for r in await shard.fetch(
            "SELECT msgid FROM processed_request WHERE msgid = ANY($1)", msgids)} == expected
        persons = {m.person.psn_no for m in msgs if m.msgid in expected}
        assert {r["psn_no"] for r in await shard.fetch(
            "SELECT psn_no FROM account WHERE psn_no = ANY($1)", [m.person.psn_no for m in msgs])} == persons
    assert await ledger.total("SELECT count(*) FROM settlement WHERE msgid = ANY($1)", msgids) == 4


async def test_a_batchs_shards_run_their_transactions_at_once(stack: Settings, ledger: Ledger,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shard's load waits until the other shard's transaction has begun too: one after the other,
    the first would wait in vain (and the test time out)."""
    msgs = _purchases(2, "4", [CHIFENG, MIYI])
    real_load = engine_module.ledger.load_batch
    entered: list[str] = []
    both = asyncio.Event()

    async def load_batch(conn: Any, batch: list[RoutedRequest], book: Any) -> Any:
        entered.append(batch[0].person.insured_admdvs)
        if len(entered) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 10)
        return await real_load(conn, batch, book)

    monkeypatch.setattr(engine_module.ledger, "load_batch", load_batch)
    async with _engine(stack) as shell:
        outbox = await shell.process_batch(_records(_encode(msgs)))
    assert sorted(entered) == sorted([CHIFENG[0], MIYI[0]])
    assert all(r["infcode"] == 0 for r in _replies(outbox, msgs[0].reply_topic).values())
    assert await ledger.total("SELECT count(*) FROM settlement WHERE msgid = ANY($1)", [m.msgid for m in msgs]) == 2


async def test_a_bug_in_one_shard_while_the_other_commits_settles_nothing_twice(
        stack: Settings, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug on a request of shard s2 while shard s1's transaction commits at the same time: the batch is
    redone without the culprit, s1's requests come back as duplicates (their stored answers), each
    settled request has one ledger row and one settlement event in what is published."""
    msgs = _purchases(4, "5", [CHIFENG, MIYI, CHIFENG, MIYI])
    victim = msgs[3].msgid
    real_handle = engine_module.handle

    def buggy_handle(msg: RoutedRequest, st: Any, policies: PolicyBook, book: Any = None) -> Any:
        if msg.msgid == victim:
            raise RuntimeError("a bug")
        return real_handle(msg, st, policies, book)

    monkeypatch.setattr(engine_module, "handle", buggy_handle)
    async with _engine(stack) as shell:
        outbox = await shell.process_batch(_records(_encode(msgs)))
    replies = _replies(outbox, msgs[0].reply_topic)
    assert replies[victim]["infcode"] == -1 and replies[victim]["err_msg"].startswith("INTERNAL")
    settled = [m.msgid for m in msgs if m.msgid != victim]
    assert all(replies[m]["infcode"] == 0 for m in settled)
    assert [(d.msgid, d.err_code) for d in _dead_letters(outbox)] == [(victim, "INTERNAL")]
    rows = await ledger.fetch("SELECT msgid FROM settlement WHERE msgid = ANY($1)", [m.msgid for m in msgs])
    assert sorted(r["msgid"] for r in rows) == sorted(settled)
    events = [msgspec.json.decode(out.value)["msgid"] for out in outbox.records if out.topic == SETTLEMENTS.name]
    assert sorted(events) == sorted(settled)


async def test_a_load_that_waited_for_the_locks_reads_what_their_holder_committed(stack: Settings) -> None:
    """Two instances briefly hold the same partition during a rebalance: the second's load waits for the
    first's locks on the person's account, then reads the msgid the first committed meanwhile as processed
    (the stored answer goes out again, nothing is applied twice) — its reads come after its locks."""
    person = _person(800)
    script = Script({person.psn_no: person})
    script.purchase(person, [1_200])
    script.purchase(person, [3_400])
    first, second = (msgspec.structs.replace(m, msgid=f"H{TOKEN}8{i:016d}") for i, m in enumerate(script.messages))
    rules = load_rules()
    async with _engine(stack) as shell:
        await shell.process_batch(_records(_encode([first])))  # the person's account and accumulator rows exist
        assert isinstance(shell.processor, SettleEngine) and shell.processor.shards is not None
        pool = shell.processor.shards.pools[shell.processor.shards.map.shard_of(CHIFENG[0])]
        async with pool.acquire() as holder, pool.acquire() as waiter:
            holding = holder.transaction()
            await holding.start()
            assert (await ledger_module.load_batch(holder, [second], rules)).accounts  # locked
            await holder.execute("INSERT INTO processed_request (msgid, infno, fixmedins_code, infcode, response)"
                                 " VALUES ($1, '2102', $2, 0, '\\x7b7d')", second.msgid, second.fixmedins_code)
            async with waiter.transaction():
                waiting = asyncio.create_task(ledger_module.load_batch(waiter, [second], rules))
                await asyncio.sleep(0.5)
                assert not waiting.done()  # the account is locked
                await holding.commit()
                st = await asyncio.wait_for(waiting, 10)
            assert st.processed == {second.msgid: b"{}"} and st.accounts  # read after the lock was granted
