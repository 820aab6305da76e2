"""Clearing service shell: three plain aiokafka batch consumers around PostgreSQL, plus a ticker.

- `fsi.settlements` → `store.record_rows`: one transaction per poll (entries + positions), then
  offsets. Exactly once by setl_id (see services/clearing/store.py).
- `fsi.clearing` (32xx requests, forwarded by the router) → `requests.answer` inside a transaction
  that also stores the answer by msgid; then the reply on the requester's topic/partition; then
  offsets. A resend (same msgid) gets the stored bytes. Rejections are answered and dead-lettered.
- `fsi.manual_claims` → `manual_claim` rows (deduped by claim_id), counted in the metrics.
- ticker: publishes the outbox (deposit events, alerts) and refreshes the deposit and running
  position gauges.

Order of effects everywhere: database commit, then produce (and wait for acks), then offsets.
A crash anywhere replays safely. Bad input never stops a consumer: it is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from schemas.clearing import ManualClaim
from schemas.codec import decode_body, decode_envelope
from schemas.errors import BrokerError
from schemas.internal import DeadLetter, SettlementEvent
from schemas.money import to_fen
from services.clearing import requests, store
from services.clearing.logic import FUNDS, VISIT_TYPES, ClearingError, month_of
from services.common.config import Settings
from services.common.kafka import header, make_group_consumer, make_producer
from services.common.metrics import (
    DEAD_LETTERS,
    REQUESTS,
    STAGE_SECONDS,
    record_manual_claim,
    serve_metrics,
    set_clearing_position,
    set_deposit,
)
from services.common.response import SHANGHAI, received_from_ns, response_bytes
from services.refdata.regions import UnknownRegion, classify_scope, region_of
from topics.catalog import CLEARING, DEADLETTER, MANUAL_CLAIMS, REPLIES, SETTLEMENTS

log = logging.getLogger("clearing")
STAGE = "clearing"
GROUP_REQUESTS = "xsettle-clearing-requests"
GROUP_POSITIONS = "xsettle-clearing-positions"
GROUP_CLAIMS = "xsettle-clearing-claims"
RETRY_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # then every 5 s: every step is idempotent
OUTBOX_INTERVAL_S = 1.0
GAUGE_INTERVAL_S = 10.0
POOL_SIZE_MAX = 4
_event_decoder = msgspec.json.Decoder(SettlementEvent)
_claim_decoder = msgspec.json.Decoder(ManualClaim)
_encoder = msgspec.json.Encoder(decimal_format="number")

Records = dict[TopicPartition, list[ConsumerRecord]]


class Outbox:
    """What a committed batch must publish: (topic, partition, key, value)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int | None, bytes | None, bytes]] = []

    def add(self, topic: str, partition: int | None, key: bytes | None, value: bytes) -> None:
        self.records.append((topic, partition, key, value))

    def dead_letter(self, code: str, err_msg: str, raw: bytes, *, msgid: str | None = None,
                    infno: str | None = None, fixmedins_code: str | None = None) -> None:
        DEAD_LETTERS.labels(STAGE, code).inc()
        letter = DeadLetter(stage=STAGE, err_code=code, err_msg=err_msg, msgid=msgid, infno=infno,
                            fixmedins_code=fixmedins_code, at_ns=time.time_ns(), original=raw)
        self.add(DEADLETTER.name, None, msgid.encode() if msgid else None, _encoder.encode(letter))


class ClearingService:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.producer = make_producer(s)
        self.consumers = {
            GROUP_REQUESTS: make_group_consumer(s, GROUP_REQUESTS, CLEARING.name),
            GROUP_POSITIONS: make_group_consumer(s, GROUP_POSITIONS, SETTLEMENTS.name),
            GROUP_CLAIMS: make_group_consumer(s, GROUP_CLAIMS, MANUAL_CLAIMS.name),
        }
        self.pool: asyncpg.Pool | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self.pool = await asyncpg.create_pool(self.s.pg_dsn, min_size=1, max_size=POOL_SIZE_MAX)
        await self.producer.start()
        for consumer in self.consumers.values():
            await consumer.start()
        serve_metrics(self.s.clearing_metrics_port, STAGE)
        log.info("clearing service ready")
        loops = [
            self._loop(self.consumers[GROUP_POSITIONS], self.process_settlements, stop),
            self._loop(self.consumers[GROUP_REQUESTS], self.process_requests, stop),
            self._loop(self.consumers[GROUP_CLAIMS], self.process_claims, stop),
            self._ticker(stop),
        ]
        tasks = [asyncio.create_task(loop) for loop in loops]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a loop only ends on stop, or by raising: surface it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for consumer in self.consumers.values():
                await consumer.stop()
            await self.producer.stop()
            await self.pool.close()

    # Loop and retry ---------------------------------------------------------------------------

    async def _loop(self, consumer: AIOKafkaConsumer, process: Callable[[Records], Awaitable[Outbox]],
                    stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=self.s.batch_size_max)
            if batches:
                await self._process_with_retry(consumer, batches, process, stop)

    async def _process_with_retry(self, consumer: AIOKafkaConsumer, batches: Records,
                                  process: Callable[[Records], Awaitable[Outbox]], stop: asyncio.Event) -> None:
        attempt = 0
        while True:
            try:
                outbox = await process(batches)
                await self._publish(outbox)
                break
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, KafkaError) as e:
                # Transient (a deadlock victim, a restarted broker): every step is idempotent, so redo the batch.
                backoff = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                attempt += 1
                log.warning("batch failed (attempt %d: %s); retrying in %.1f s", attempt, type(e).__name__, backoff)
                if stop.is_set():
                    return  # offsets not committed: the next owner replays
                await asyncio.sleep(backoff)
        try:
            await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batches.items()})
        except (CommitFailedError, KafkaError) as e:
            log.warning("offset commit failed (%s); the new owner will replay", type(e).__name__)

    async def _publish(self, outbox: Outbox) -> None:
        futures = [await self.producer.send(topic, value, key=key, partition=partition)
                   for topic, partition, key, value in outbox.records]
        if futures:
            await asyncio.gather(*futures)

    # Settlement events → positions ------------------------------------------------------------

    async def process_settlements(self, batches: Records) -> Outbox:
        started = time.perf_counter()
        outbox = Outbox()
        rows = []
        local = 0
        for records in batches.values():
            for rec in records:
                try:
                    ev = _event_decoder.decode(rec.value)
                except (msgspec.ValidationError, msgspec.DecodeError) as e:
                    outbox.dead_letter("INTERNAL", f"INTERNAL: undecodable settlement event: {e}", rec.value)
                    continue
                if ev.scope == "local":
                    local += 1
                    continue
                try:
                    rows.append(store.row_from_event(ev))
                except (UnknownRegion, ClearingError, ValueError) as e:
                    outbox.dead_letter("INTERNAL", f"INTERNAL: settlement event refused by clearing: {e}",
                                       rec.value, msgid=ev.msgid, fixmedins_code=ev.fixmedins_code)
        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            recorded = await store.record_rows(conn, rows, "stream")
        REQUESTS.labels(STAGE, "settlement_event", "ok").inc(len(recorded.rows))
        REQUESTS.labels(STAGE, "settlement_event", "duplicate").inc(recorded.duplicates)
        STAGE_SECONDS.labels("clearing_positions_batch").observe(time.perf_counter() - started)
        return outbox

    # 32xx requests -------------------------------------------------------------------------------

    async def process_requests(self, batches: Records) -> Outbox:
        outbox = Outbox()
        for records in batches.values():
            for rec in records:
                await self._request(rec, outbox)
        return outbox

    async def _request(self, rec: ConsumerRecord, outbox: Outbox) -> None:
        started = time.perf_counter()
        reply_topic = (header(rec.headers, "reply_topic") or REPLIES.name.encode()).decode()
        partition = header(rec.headers, "reply_partition")
        reply_partition = int(partition) if partition else None
        received = received_from_ns(int(header(rec.headers, "received_ns") or time.time_ns()))
        raw: bytes = rec.value
        try:
            env = decode_envelope(raw)
        except BrokerError as e:  # the router validated it: a foreign record; nobody to answer
            outbox.dead_letter(e.code, e.err_msg, raw)
            return
        admdvs = env.insuplc_admdvs or env.mdtrtarea_admvs
        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchval("SELECT response FROM clearing_request WHERE msgid = $1", env.msgid)
            if stored is not None:
                outbox.add(reply_topic, reply_partition, env.msgid.encode(), bytes(stored))
                REQUESTS.labels(STAGE, env.infno, "duplicate").inc()
                return
            outcome, infcode = "ok", 0
            try:
                body = decode_body(env)
                async with conn.transaction():  # a savepoint: a rejection leaves nothing behind
                    output, warn = await requests.answer(conn, env, body)
                response = response_bytes(admdvs, received, output=output, warn_msg=warn)
            except BrokerError as e:
                outcome, infcode = e.code, -1
                outbox.dead_letter(e.code, e.err_msg, raw, msgid=env.msgid, infno=env.infno,
                                   fixmedins_code=env.fixmedins_code)
                response = response_bytes(admdvs, received, err_msg=e.err_msg)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                raise  # transient: the batch is retried
            except Exception:
                # A bug must not stop the partition: answer INTERNAL (not stored: a resend tries again).
                log.exception("unexpected error answering infno %s", env.infno)
                err = "INTERNAL: unexpected error; resend with the same msgid"
                outbox.dead_letter("INTERNAL", err, raw, msgid=env.msgid, infno=env.infno,
                                   fixmedins_code=env.fixmedins_code)
                outbox.add(reply_topic, reply_partition, env.msgid.encode(),
                           response_bytes(admdvs, received, err_msg=err))
                REQUESTS.labels(STAGE, env.infno, "INTERNAL").inc()
                return
            # A plain INSERT: if another worker answered this msgid meanwhile, the unique violation
            # retries the batch, which then finds and resends that worker's answer.
            await conn.execute(
                "INSERT INTO clearing_request (msgid, infno, fixmedins_code, infcode, response)"
                " VALUES ($1, $2, $3, $4, $5)",
                env.msgid, env.infno, env.fixmedins_code, infcode, response,
            )
        outbox.add(reply_topic, reply_partition, env.msgid.encode(), response)
        REQUESTS.labels(STAGE, env.infno, outcome).inc()
        STAGE_SECONDS.labels(f"clearing_{env.infno}").observe(time.perf_counter() - started)

    # Manual claims ----------------------------------------------------------------------------------

    async def process_claims(self, batches: Records) -> Outbox:
        outbox = Outbox()
        rows: dict[str, tuple] = {}
        labels: dict[str, tuple[str, str, str, str]] = {}
        for records in batches.values():
            for rec in records:
                try:
                    c = _claim_decoder.decode(rec.value)
                except (msgspec.ValidationError, msgspec.DecodeError) as e:
                    outbox.dead_letter("BODY_MALFORMED", f"BODY_MALFORMED: {e}", rec.value)
                    continue
                try:
                    insured, treating = region_of(c.insuplc_admdvs), region_of(c.mdtrtarea_admvs)
                except UnknownRegion:
                    outbox.dead_letter("REGION_UNKNOWN", "REGION_UNKNOWN: an admdvs code is not in the region table",
                                       rec.value)
                    continue
                scope = classify_scope(insured.admdvs, treating.admdvs)
                if scope == "local":
                    outbox.dead_letter("CLAIM_LOCAL", "CLAIM_LOCAL: a manual claim for local care", rec.value)
                    continue
                visit_type = VISIT_TYPES[c.med_type]
                rows[c.claim_id] = (
                    c.claim_id, c.psn_no, insured.admdvs, treating.admdvs, insured.prov_admdvs, treating.prov_admdvs,
                    scope, c.fixmedins_code, c.med_type, visit_type, _time(c.begndate), _time(c.enddate),
                    to_fen(c.medfee_sumamt), to_fen(c.fund_pay_sumamt), c.reason, c.reason_dscr, _time(c.claim_time),
                )
                labels[c.claim_id] = (insured.prov_admdvs, treating.prov_admdvs, scope, visit_type)
        inserted: list[str] = []
        if rows:
            assert self.pool is not None
            async with self.pool.acquire() as conn, conn.transaction():
                inserted = [r[0] for r in await conn.fetch(
                    "INSERT INTO manual_claim (claim_id, psn_no, insured_admdvs, treating_admdvs, insured_prov,"
                    " treating_prov, scope, fixmedins_code, med_type, visit_type, begntime, endtime, medfee_sumamt,"
                    " fund_pay_sumamt, reason, reason_dscr, claim_time)"
                    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
                    " $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamp[], $12::timestamp[],"
                    " $13::bigint[], $14::bigint[], $15::text[], $16::text[], $17::timestamp[])"
                    " ON CONFLICT (claim_id) DO NOTHING RETURNING claim_id",
                    *(list(col) for col in zip(*rows.values(), strict=True)),
                )]
        for claim_id in inserted:  # counted once: only the insert that created the row counts
            record_manual_claim(*labels[claim_id])
        REQUESTS.labels(STAGE, "manual_claim", "ok").inc(len(inserted))
        REQUESTS.labels(STAGE, "manual_claim", "duplicate").inc(len(rows) - len(inserted))
        return outbox

    # Ticker: outbox and gauges ----------------------------------------------------------------------

    async def _ticker(self, stop: asyncio.Event) -> None:
        last_gauges = 0.0
        while not stop.is_set():
            try:
                await self.publish_outbox()
                if time.monotonic() - last_gauges >= GAUGE_INTERVAL_S:
                    await self.refresh_gauges()
                    last_gauges = time.monotonic()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, KafkaError) as e:
                log.warning("ticker failed (%s); trying again", type(e).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), OUTBOX_INTERVAL_S)

    async def publish_outbox(self) -> int:
        assert self.pool is not None

        async def send(topic: str, key: bytes | None, value: bytes) -> None:
            await self.producer.send_and_wait(topic, value, key=key)

        return await store.publish_outbox(self.pool, send)

    async def refresh_gauges(self) -> None:
        assert self.pool is not None
        month = month_of(datetime.now(SHANGHAI).replace(tzinfo=None))
        async with self.pool.acquire() as conn:
            for prov, balance, line in await store.deposits(conn):
                set_deposit(prov, balance, line)
            for r in await store.province_positions(conn, month):
                for fund in (*FUNDS, "fund_pay_sumamt"):
                    set_clearing_position(r["insured_prov"], r["treating_prov"], fund, r[fund])


def _time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
