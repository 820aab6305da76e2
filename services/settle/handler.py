"""The settlement engine: a batch of routed requests in, one PostgreSQL transaction per shard, replies out.

It runs inside the settlement stage (`stage.py`: fsi.ingress → router → engine → fsi.replies, one consumer
and one batch). Order of effects per batch (crash anywhere replays safely):
  1. per shard (the persons' insured provinces, `services/common/shards.py`), the shards' transactions
     at once: load the batch's rows and lock them; apply every request in memory (pure logic);
  2. write ledger rows, accumulators, accounts and each msgid's response, then answer the batch's queries
     (5201–5206, `queries.py`: plain reads that see those writes, not stored) — one commit per shard;
  3. produce replies and settlement events, wait for the broker's acks;
  4. commit the consumer offsets.
Steps 3 and 4, decoding, retries and the isolation of a failing request are the shared shell's
(`services/common/consumer.py`).
A crash before 2 commits leaves no trace; after 2, the replay finds the msgids in
`processed_request` and resends the stored responses — nothing is applied twice. A msgid always
lands in one shard (its person's), so its processed_request row sits with the ledger rows it wrote:
a batch whose second shard fails after the first committed replays the first as duplicates.
Two instances may hold the same shard (their partitions' persons insured in one province): a person's
rows are locked by the transaction that loads them, so the second waits for the first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable

import asyncpg
import msgspec

from schemas.codes import FUNDS
from schemas.errors import BrokerError
from schemas.internal import RoutedRequest, SettlementEvent
from services.common.config import Settings
from services.common.consumer import (
    BatchProcessor,
    FailureKind,
    Outbox,
    Record,
    applying,
    classify,
    until_up,
)
from services.common.metrics import (
    END_TO_END_SECONDS,
    REQUESTS,
    STAGE_SECONDS,
    record_ledger_row,
    record_settlement_request,
)
from services.common.response import received_from_ns, response_bytes
from services.common.shards import GENERIC_PLANS, ShardPools
from services.policy.policies import PolicyBook
from services.refdata.regions import province_of
from services.settle import ledger, monitoring, queries
from services.settle.facts import settled_items, visit_facts
from services.settle.logic import check_row_invariants, handle
from services.settle.state import BatchState, Fee, Settlement, Visit
from services.smartmon.rules import load_rules
from topics.catalog import SETTLEMENTS as SETTLEMENTS_TOPIC

log = logging.getLogger("settle")
POOL_SIZE_MAX = 2
_encoder = msgspec.json.Encoder(decimal_format="number")


class SettleEngine(BatchProcessor[RoutedRequest]):
    """The engine's batch processor: the settlement stage (`stage.py`) hands it each batch's routed requests;
    alone, the shared shell (`services/common/consumer.py`) can run it over a topic of routed requests."""

    stage = "settle"

    def __init__(self, s: Settings, policies: PolicyBook) -> None:
        self.s = s
        self.policies = policies
        self.shards: ShardPools | None = None
        self.rules = load_rules()  # monitoring rules for the in-event checks (a bad file stops the start)

    async def connect(self, stop: asyncio.Event) -> None:
        """The shard pools (waits for PostgreSQL). The engine keeps no session state: its connections go back
        to the pool without a reset statement; its statements are planned once per connection (GENERIC_PLANS)."""
        connect = functools.partial(ShardPools.connect, self.s, POOL_SIZE_MAX, session_reset=False,
                                    server_settings=GENERIC_PLANS)
        self.shards = await until_up("PostgreSQL shards", connect, stop)

    async def close(self) -> None:
        if self.shards is not None:
            await self.shards.close()

    async def process(self, records: list[Record[RoutedRequest]], outbox: Outbox) -> None:
        started = time.perf_counter()
        assert self.shards is not None
        by_shard: dict[str, list[Record[RoutedRequest]]] = {}
        for rec in records:
            by_shard.setdefault(self.shards.map.shard_of(rec.value.person.insured_admdvs), []).append(rec)
        # The shards are databases of their own: their transactions run at once (a batch takes its slowest
        # shard's time, not the sum), each into an outbox of its own, appended in shard order. A person's
        # records are all in one shard, so their order is kept.
        outboxes = [Outbox(outbox.stage) for _ in by_shard]
        results = await asyncio.gather(*(self._process_shard(self.shards.pools[shard], shard_records, shard_outbox)
                                         for (shard, shard_records), shard_outbox in zip(by_shard.items(), outboxes,
                                                                                          strict=True)),
                                       return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # A shard that committed is replayed as duplicates when the shell redoes the batch; an
            # infrastructure failure first, so the whole batch is retried rather than isolated.
            raise next((e for e in failures if not isinstance(e, Exception)
                        or classify(e) is FailureKind.INFRASTRUCTURE), failures[0])
        for shard_outbox in outboxes:
            outbox.records += shard_outbox.records
        STAGE_SECONDS.labels("settle_batch").observe(time.perf_counter() - started)

    async def _process_shard(self, pool: asyncpg.Pool, batch: list[Record[RoutedRequest]], outbox: Outbox) -> None:
        asked = [r for r in batch if queries.is_query(r.value)]
        records = [r for r in batch if not queries.is_query(r.value)]
        msgs = [r.value for r in records]
        committed: list[Settlement] = []
        async with pool.acquire() as conn, conn.transaction():
            st = await ledger.load_batch(conn, msgs, self.rules)
            for rec in records:
                msg = rec.value
                if msg.msgid in st.processed:
                    outbox.add(msg.reply_topic, st.processed[msg.msgid], key=msg.msgid.encode(),
                               partition=msg.reply_partition)
                    REQUESTS.labels("settle", msg.infno, "duplicate").inc()
                    record_settlement_request(msg.infno, msg.scope, "duplicate")
                    replayed = st.replayed.pop(msg.msgid, None)
                    if replayed is not None:
                        _attach_facts(replayed, msg, st.replayed_visits.get(replayed.mdtrt_id),
                                      st.replayed_fees.get(replayed.setl_id, []))
                        outbox.add(SETTLEMENTS_TOPIC.name, _encoder.encode(_event(replayed)),
                                   key=replayed.psn_no.encode())
                    continue
                body, row, outcome = self._apply(rec, st, outbox)
                st.responses[msg.msgid] = (msg.infno, msg.fixmedins_code, -1 if outcome != "ok" else 0, body)
                st.processed[msg.msgid] = body  # a repeat later in the same batch gets the same answer
                outbox.add(msg.reply_topic, body, key=msg.msgid.encode(), partition=msg.reply_partition)
                if row is not None:
                    committed.append(row)
                REQUESTS.labels("settle", msg.infno, outcome).inc()
                record_settlement_request(msg.infno, msg.scope, outcome, row.med_type if row else None)
            await ledger.write_batch(conn, st)
            await monitoring.write_warnings(conn, st)
            # Queries (5201–5206) last, in the same transaction: they see the batch's writes; plain reads,
            # nothing locked or stored.
            for rec in asked:
                self._reply(rec, await self._answer_query(conn, rec, outbox), outbox)
        now_ns = time.time_ns()
        for msg in [*(m for m in msgs if m.msgid in st.responses), *(r.value for r in asked)]:
            END_TO_END_SECONDS.labels(msg.infno).observe(max(0, now_ns - msg.received_ns) / 1e9)
        for row in committed:
            outbox.add(SETTLEMENTS_TOPIC.name, _encoder.encode(_event(row)), key=row.psn_no.encode())
            _count(row)

    def _apply(self, rec: Record[RoutedRequest], st: BatchState, outbox: Outbox
               ) -> tuple[bytes, Settlement | None, str]:
        msg = rec.value
        received = received_from_ns(msg.received_ns)
        admdvs = msg.person.insured_admdvs
        # A bug may leave this request half-applied in the batch state: `applying` makes it a failure of
        # this record, the transaction rolls back and the shell redoes the batch without it.
        with applying(rec, f"settling infno {msg.infno}"):
            try:
                effect = handle(msg, st, self.policies, self.rules)
                if effect.settlement is not None:
                    check_row_invariants(effect.settlement)
                    row = effect.settlement
                    _attach_facts(row, msg, st.visits.get(row.mdtrt_id), st.fees.get(row.mdtrt_id, {}).values())
                body = response_bytes(admdvs, received, output=effect.output, warn_msg=effect.warn_msg)
                return body, effect.settlement, "ok"
            except BrokerError as e:
                outbox.dead_letter(e.code, e.err_msg, rec.raw.value, msgid=msg.msgid, infno=msg.infno,
                                   fixmedins_code=msg.fixmedins_code)
                return response_bytes(admdvs, received, err_msg=e.err_msg), None, e.code

    async def _answer_query(self, conn: asyncpg.Connection, rec: Record[RoutedRequest], outbox: Outbox
                            ) -> tuple[bytes, str]:
        msg = rec.value
        received = received_from_ns(msg.received_ns)
        admdvs = msg.person.insured_admdvs
        with applying(rec, f"answering query {msg.infno}"):
            try:
                return response_bytes(admdvs, received, output=await queries.answer(conn, msg)), "ok"
            except BrokerError as e:
                outbox.dead_letter(e.code, e.err_msg, rec.raw.value, msgid=msg.msgid, infno=msg.infno,
                                   fixmedins_code=msg.fixmedins_code)
                return response_bytes(admdvs, received, err_msg=e.err_msg), e.code

    @staticmethod
    def _reply(rec: Record[RoutedRequest], answered: tuple[bytes, str], outbox: Outbox) -> None:
        msg = rec.value
        body, outcome = answered
        outbox.add(msg.reply_topic, body, key=msg.msgid.encode(), partition=msg.reply_partition)
        REQUESTS.labels("settle", msg.infno, outcome).inc()

    def reject(self, record: Record[RoutedRequest | None], code: str, err_msg: str, outbox: Outbox) -> None:
        msg = record.value
        if msg is None:
            return  # undecodable: nobody to answer
        body = response_bytes(msg.person.insured_admdvs, received_from_ns(msg.received_ns), err_msg=err_msg)
        outbox.add(msg.reply_topic, body, key=msg.msgid.encode(), partition=msg.reply_partition)
        REQUESTS.labels("settle", msg.infno, code).inc()
        record_settlement_request(msg.infno, msg.scope, code)


def _event(row: Settlement) -> SettlementEvent:
    a = row.amounts
    return SettlementEvent(
        setl_id=row.setl_id, kind=row.kind, orig_setl_id=row.orig_setl_id,  # type: ignore[arg-type]
        msgid=row.msgid, mdtrt_id=row.mdtrt_id, psn_no=row.psn_no, fixmedins_code=row.fixmedins_code,
        insutype=row.insutype, med_type=row.med_type, scope=row.scope,  # type: ignore[arg-type]
        filing_type=row.filing_type, insured_admdvs=row.insured_admdvs, treating_admdvs=row.treating_admdvs,
        setl_time=row.setl_time.strftime("%Y-%m-%d %H:%M:%S"), medfee_sumamt=a["medfee_sumamt"],
        hifp_pay=a["hifp_pay"], hifmi_pay=a["hifmi_pay"], hifob_pay=a["hifob_pay"], maf_pay=a["maf_pay"],
        fund_pay_sumamt=a["fund_pay_sumamt"], acct_pay=a["acct_pay"], psn_cash_pay=a["psn_cash_pay"],
        policy_version=row.policy_version, mid_setl=row.mid_setl, visit=row.visit,
    )


def _attach_facts(row: Settlement, msg: RoutedRequest, visit: Visit | None, fees: Iterable[Fee]) -> None:
    """A settle row's monitoring facts (reversals carry none): its visit, the items it settled, the hospital's
    level and the person's gender as routed."""
    if row.kind != "settle" or visit is None:
        return
    row.visit = visit_facts(visit, settled_items(fees, row.setl_id), gend=msg.person.gend,
                            hosp_lv=msg.hospital.hosp_lv, treating_prov=province_of(row.treating_admdvs))


def _count(row: Settlement) -> None:
    funds: dict[str, int] = {fund: row.amounts[fund] for fund in FUNDS}
    record_ledger_row(row.kind, row.scope, row.med_type, province_of(row.insured_admdvs),
                      province_of(row.treating_admdvs), funds, person_time=not row.mid_setl)
