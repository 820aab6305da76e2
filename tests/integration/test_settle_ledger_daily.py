"""The engine's `ledger_daily` sums (services/settle/daily.py, from the rows in memory) are exactly what the
shard's definition, the SQL function `ledger_daily_add`, computes from the same ledger rows: settlements,
a mid-stay part, reversals of a final settlement and of a pharmacy purchase, an original reversed in its
own batch and one reversed in a later batch — on the real PostgreSQL, through the shared shell."""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta

import asyncpg
import msgspec
import pytest
from aiokafka import ConsumerRecord

from schemas.internal import PersonCtx, RoutedRequest
from services.common.config import Settings
from services.common.consumer import BatchConsumer
from services.common.kafka import make_group_consumer, make_producer
from services.common.shards import ShardPools
from services.policy.policies import PolicyBook
from services.settle.handler import SettleEngine
from services.settle.stage import GROUP_ID
from tests.integration.conftest import Ledger
from tests.integration.test_settle_engine import ROUTED
from tests.unit.test_settle_properties import Script

pytestmark = pytest.mark.integration
TOKEN = f"{time.time_ns() % 10**11:011d}"
# A day of its own, far from the other tests' (inside the ledger's default partition).
DAY = date(2019, 1, 1) + timedelta(days=int(TOKEN) % 700)
KEY = "day, insured_prov, treating_prov, scope, med_type"
SUMS = "settled, reversed, direct, medfee_sumamt, fund_pay_sumamt, hifp_pay, hifmi_pay, hifob_pay, maf_pay"


def _person(n: int) -> PersonCtx:
    return PersonCtx(psn_no=f"D{TOKEN}{n}", insured_admdvs="150400", insured_prov="150000", insured_pool="150400",
                     insutype="310", psn_type="1101", assistance=None, acct_balc_fen=20_000)


def _records(msgs: list[RoutedRequest]) -> list[ConsumerRecord]:
    encoder = msgspec.json.Encoder(decimal_format="number")
    return [ConsumerRecord("fsi.routed", 0, i, 0, 0, None, encoder.encode(m), None, 0, 0, [])
            for i, m in enumerate(msgs)]


async def _daily(conn: asyncpg.Connection, day: date) -> dict[tuple, tuple]:
    rows = await conn.fetch(f"SELECT {KEY}, {SUMS} FROM ledger_daily WHERE day = $1", day)
    return {tuple(r)[:5]: tuple(r)[5:] for r in rows}


def _minus(after: dict[tuple, tuple], before: dict[tuple, tuple]) -> dict[tuple, tuple]:
    zero = (0,) * 9
    delta = {k: tuple(a - b for a, b in zip(v, before.get(k, zero), strict=True)) for k, v in after.items()}
    return {k: v for k, v in delta.items() if v != zero}


async def test_the_engines_daily_sums_are_ledger_daily_adds(stack: Settings, ledger: Ledger) -> None:
    people = [_person(i) for i in range(4)]
    script = Script({p.psn_no: p for p in people}, clock=datetime.combine(DAY, datetime.min.time()))
    script.stay(people[0], [("01", 40_000), ("01", 25_000)], parts=1)  # a mid-stay part, then the final one
    script.stay(people[1], [("01", 90_000)])
    script.purchase(people[2], [3_000, 1_500])
    script.purchase(people[3], [2_000])
    script.reverse(1)  # people[0]'s final settlement, in the same batch
    first = list(script.messages)
    script.reverse(3)  # people[2]'s purchase, reversed in a later batch
    script.reverse(0)  # then people[0]'s mid-stay part, now the latest not reversed
    second = script.messages[len(first):]
    assert script.clock.date() == DAY

    pool = ledger.of("150400")
    async with pool.acquire() as conn:
        before = await _daily(conn, DAY)
    engine = SettleEngine(stack, PolicyBook.load())
    engine.shards = await ShardPools.connect(stack, 2)
    producer = make_producer(stack, "settle")
    consumer = make_group_consumer(stack, "settle", GROUP_ID, ROUTED.name)
    try:
        shell = BatchConsumer(consumer, GROUP_ID, ROUTED, engine, producer, max_records=500)
        for batch in (first, second):
            outbox = await shell.process_batch(_records(batch))
            answers = [msgspec.json.decode(o.value) for o in outbox.records if o.topic == "r"]
            assert [a["infcode"] for a in answers] == [0] * len(batch), answers
    finally:
        await engine.shards.close()
        await consumer.stop()
        await producer.stop()

    setl_ids = [r["setl_id"] for r in await ledger.fetch(
        "SELECT setl_id FROM settlement WHERE psn_no = ANY($1) ORDER BY setl_time", [p.psn_no for p in people])]
    assert len(setl_ids) == 8  # 5 settlements, 3 reversals
    async with pool.acquire() as conn:
        by_engine = _minus(await _daily(conn, DAY), before)
        tr = conn.transaction()
        await tr.start()
        try:  # the definition over the same rows, on the day emptied of them: then undone
            await conn.execute("DELETE FROM ledger_daily WHERE day = $1", DAY)
            await conn.execute("SELECT ledger_daily_add($1::text[])", setl_ids)
            by_definition = await _daily(conn, DAY)
        finally:
            await tr.rollback()
    assert by_engine == _minus(by_definition, {})
    # and what that is: people[1]'s stay and people[3]'s purchase stand; the others were reversed
    direct = sum(v[2] for v in by_engine.values())
    settled, reversed_ = sum(v[0] for v in by_engine.values()), sum(v[1] for v in by_engine.values())
    assert (settled, reversed_, direct) == (5, 3, 2)
