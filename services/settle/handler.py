"""Settlement engine shell: Kafka batch in, one PostgreSQL transaction, replies out, offsets last.

Order of effects per batch (crash anywhere replays safely):
  1. load the batch's rows and lock them; apply every request in memory (pure logic);
  2. write ledger rows, accumulators, accounts and each msgid's response — one commit;
  3. produce replies and settlement events, wait for the broker's acks;
  4. commit the consumer offsets.
A crash before 2 commits leaves no trace; after 2, the replay finds the msgids in
`processed_request` and resends the stored responses — nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import msgspec
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from schemas.errors import BrokerError
from schemas.internal import DeadLetter, RoutedRequest, SettlementEvent
from services.common.config import Settings
from services.common.kafka import make_group_consumer, make_producer
from services.common.metrics import (
    DEAD_LETTERS,
    END_TO_END_SECONDS,
    REQUESTS,
    STAGE_SECONDS,
    record_ledger_row,
    record_produce_error,
    record_settlement_request,
    serve_metrics,
)
from services.common.response import received_from_ns, response_bytes
from services.policy.policies import PolicyBook
from services.refdata.regions import province_of
from services.settle import ledger
from services.settle.logic import check_row_invariants, handle
from services.settle.state import BatchState, Settlement
from topics.catalog import DEADLETTER, ROUTED
from topics.catalog import SETTLEMENTS as SETTLEMENTS_TOPIC

log = logging.getLogger("settle")
GROUP_ID = "xsettle-settle"
RETRY_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
_decoder = msgspec.json.Decoder(RoutedRequest)
_encoder = msgspec.json.Encoder(decimal_format="number")


class PoisonedRequest(Exception):
    """A request failed unexpectedly inside a batch; the batch's transaction is rolled back."""


class Outbox:
    """What a committed batch must publish: (topic, partition, key, value)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int | None, bytes | None, bytes]] = []

    def add(self, topic: str, partition: int | None, key: bytes | None, value: bytes) -> None:
        self.records.append((topic, partition, key, value))


class SettleEngine:
    def __init__(self, s: Settings, policies: PolicyBook) -> None:
        self.s = s
        self.policies = policies
        self.consumer = make_group_consumer(s, GROUP_ID, ROUTED.name)
        self.producer = make_producer(s)
        self.pool: asyncpg.Pool | None = None
        self._poisoned: set[str] = set()  # msgids to answer INTERNAL without applying (bounded by a batch)

    async def run(self, stop: asyncio.Event) -> None:
        self.pool = await asyncpg.create_pool(self.s.pg_dsn, min_size=1, max_size=2)
        await self.producer.start()
        await self.consumer.start()
        serve_metrics(self.s.settle_metrics_port, stage="settle")
        log.info("settlement engine ready")
        try:
            while not stop.is_set():
                batches = await self.consumer.getmany(timeout_ms=100, max_records=self.s.batch_size_max)
                if batches:
                    await self._process_with_retry(batches)
        finally:
            await self.consumer.stop()
            await self.producer.stop()
            await self.pool.close()

    async def _process_with_retry(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Until the batch is committed: redo at once after a poisoned request (each redo answers one more
        request INTERNAL, so this ends), back off after an infrastructure error, give up (raise) after the
        last backoff — the consumer then stops and the records are delivered again after a restart."""
        failures = 0
        while True:
            try:
                outbox = await self.process(batches)
                await self._publish(outbox)
            except PoisonedRequest:
                continue
            except (asyncpg.PostgresError, OSError, TimeoutError, KafkaError) as e:
                if failures == len(RETRY_BACKOFF_S):
                    raise
                log.warning("batch failed (attempt %d: %s); retrying", failures + 1, type(e).__name__)
                await asyncio.sleep(RETRY_BACKOFF_S[failures])
                failures += 1
                continue
            try:
                await self.consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batches.items()})
            except (CommitFailedError, KafkaError) as e:
                # Partitions moved: the new owner replays these records and finds them processed.
                log.warning("offset commit failed (%s); the new owner will replay", type(e).__name__)
            self._poisoned.clear()
            return

    async def process(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> Outbox:
        started = time.perf_counter()
        outbox = Outbox()
        msgs: list[RoutedRequest] = []
        for records in batches.values():
            for rec in records:
                try:
                    msgs.append(_decoder.decode(rec.value))
                except msgspec.ValidationError as e:  # a foreign record on an internal topic
                    self._dead_letter(outbox, "INTERNAL", f"INTERNAL: undecodable routed record: {e}", None,
                                      rec.value)
        assert self.pool is not None
        committed: list[Settlement] = []
        async with self.pool.acquire() as conn, conn.transaction():
            st = await ledger.load_batch(conn, msgs)
            for msg in msgs:
                if msg.msgid in st.processed:
                    outbox.add(msg.reply_topic, msg.reply_partition, msg.msgid.encode(), st.processed[msg.msgid])
                    REQUESTS.labels("settle", msg.infno, "duplicate").inc()
                    record_settlement_request(msg.infno, msg.scope, "duplicate")
                    replayed = st.replayed.pop(msg.msgid, None)
                    if replayed is not None:
                        outbox.add(SETTLEMENTS_TOPIC.name, None, replayed.psn_no.encode(),
                                   _encoder.encode(_event(replayed)))
                    continue
                body, row, outcome = self._apply(msg, st, outbox)
                st.responses[msg.msgid] = (msg.infno, msg.fixmedins_code, -1 if outcome != "ok" else 0, body)
                st.processed[msg.msgid] = body  # a repeat later in the same batch gets the same answer
                outbox.add(msg.reply_topic, msg.reply_partition, msg.msgid.encode(), body)
                if row is not None:
                    committed.append(row)
                REQUESTS.labels("settle", msg.infno, outcome).inc()
                record_settlement_request(msg.infno, msg.scope, outcome, row.med_type if row else None)
            await ledger.write_batch(conn, st)
        now_ns = time.time_ns()
        for msg in msgs:
            if msg.msgid in st.responses:
                END_TO_END_SECONDS.labels(msg.infno).observe(max(0, now_ns - msg.received_ns) / 1e9)
        for row in committed:
            outbox.add(SETTLEMENTS_TOPIC.name, None, row.psn_no.encode(), _encoder.encode(_event(row)))
            _count(row)
        STAGE_SECONDS.labels("settle_batch").observe(time.perf_counter() - started)
        return outbox

    def _apply(self, msg: RoutedRequest, st: BatchState, outbox: Outbox) -> tuple[bytes, Settlement | None, str]:
        received = received_from_ns(msg.received_ns)
        admdvs = msg.person.insured_admdvs
        if msg.msgid in self._poisoned:
            # It failed unexpectedly in an earlier attempt of this batch: answer INTERNAL, keep it for analysis.
            err = "INTERNAL: unexpected error; the request was not applied"
            self._dead_letter(outbox, "INTERNAL", err, msg, _encoder.encode(msg))
            return response_bytes(admdvs, received, err_msg=err), None, "INTERNAL"
        try:
            effect = handle(msg, st, self.policies)
            if effect.settlement is not None:
                check_row_invariants(effect.settlement)
            return response_bytes(admdvs, received, output=effect.output), effect.settlement, "ok"
        except BrokerError as e:
            self._dead_letter(outbox, e.code, e.err_msg, msg, _encoder.encode(msg))
            return response_bytes(admdvs, received, err_msg=e.err_msg), None, e.code
        except Exception as e:
            # A bug may have left this request half-applied in the batch state: the whole batch is rolled
            # back and done again with this request answered INTERNAL — nothing wrong is written, and the
            # partition does not stop.
            log.exception("unexpected error settling infno %s; the batch is redone without it", msg.infno)
            self._poisoned.add(msg.msgid)
            raise PoisonedRequest(msg.msgid) from e

    def _dead_letter(self, outbox: Outbox, code: str, err_msg: str, msg: RoutedRequest | None, raw: bytes) -> None:
        DEAD_LETTERS.labels("settle", code).inc()
        letter = DeadLetter(
            stage="settle", err_code=code, err_msg=err_msg, msgid=msg.msgid if msg else None,
            infno=msg.infno if msg else None, fixmedins_code=msg.fixmedins_code if msg else None,
            at_ns=time.time_ns(), original=raw,
        )
        outbox.add(DEADLETTER.name, None, msg.msgid.encode() if msg else None, _encoder.encode(letter))

    async def _publish(self, outbox: Outbox) -> None:
        futures = []
        for topic, partition, key, value in outbox.records:
            try:
                futures.append(await self.producer.send(topic, value, key=key, partition=partition))
            except KafkaError:
                record_produce_error(topic)
                raise
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [(rec[0], r) for rec, r in zip(outbox.records, results, strict=True) if isinstance(r, BaseException)]
        for topic, _ in failed:
            record_produce_error(topic)
        if failed:
            raise failed[0][1]


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
    )


def _count(row: Settlement) -> None:
    funds = {fund: row.amounts[fund] for fund in ("hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay")}
    record_ledger_row(row.kind, row.scope, row.med_type, province_of(row.insured_admdvs),
                      province_of(row.treating_admdvs), funds)
