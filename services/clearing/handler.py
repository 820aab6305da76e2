"""Clearing service: three batch processors in the shared consumer shell, plus a ticker.

- `fsi.settlements` → `store.record_rows`: one transaction per poll (entries + positions), then
  offsets. Exactly once by setl_id (see services/clearing/store.py).
- `fsi.clearing` (32xx requests, forwarded by the router) → `requests.answer` inside a transaction
  that also stores the answer by msgid; then the reply on the requester's topic/partition; then
  offsets. A resend (same msgid) gets the stored bytes. Rejections are answered and dead-lettered.
- `fsi.manual_claims` → `manual_claim` rows (deduped by claim_id), counted in the metrics.
- `fsi.judgements` (the monitoring stream's, services/smartmon) → hub `judgement` (upsert by jr_id,
  store.upsert_judgement / withdraw_judgement), counted once by the insert that created the row.
- ticker: publishes the outbox (deposit events, alerts) and the operators' audit rows (fsi.audit,
  `services.common.audit.publish`), and refreshes the deposit and running
  position gauges.

Order of effects everywhere: database commit, then produce (and wait for acks), then offsets — the
shell's (`services/common/consumer.py`), with its retries and the isolation of a record that fails.
A crash anywhere replays safely. Bad input never stops a consumer: it is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import date, datetime
from typing import Any

import asyncpg
import msgspec

from schemas.clearing import ManualClaim
from schemas.codec import decode_body, decode_envelope
from schemas.envelope import RequestEnvelope
from schemas.errors import BrokerError
from schemas.event_views import ClearingEventView
from schemas.limits import set_clock_window
from schemas.money import to_fen
from schemas.monitoring import Judgement
from services.clearing import requests, store
from services.clearing.logic import FUNDS, VISIT_TYPES, ClearingError, month_of
from services.common import audit
from services.common.config import Settings
from services.common.consumer import (
    BatchConsumer,
    BatchProcessor,
    FailureKind,
    Outbox,
    Record,
    applying,
    classify,
    until_up,
)
from services.common.kafka import connect_pool, make_group_consumer, make_producer
from services.common.metrics import (
    REQUESTS,
    STAGE_SECONDS,
    record_judgement_stored,
    record_judgement_withdrawn,
    record_manual_claim,
    serve_metrics,
    set_clearing_position,
    set_deposit,
)
from services.common.response import SHANGHAI, received_from_ns, response_bytes
from services.common.shards import ShardPools
from services.common.watchdog import ProgressWatchdog
from services.refdata.regions import UnknownRegion, classify_scope, region_of
from services.smartmon.rules import load_rules
from topics.catalog import CLEARING, JUDGEMENTS, MANUAL_CLAIMS, REPLIES, SETTLEMENTS, TopicSpec

log = logging.getLogger("clearing")
STAGE = "clearing"
GROUP_REQUESTS = "xsettle-clearing-requests"
GROUP_POSITIONS = "xsettle-clearing-positions"
GROUP_CLAIMS = "xsettle-clearing-claims"
GROUP_JUDGEMENTS = "xsettle-clearing-judgements"


def is_background(group: str) -> bool:
    """32xx requests are answered to a waiting hospital; the other groups' output nobody waits for, so they
    fetch in batches (services/common/kafka.py, background_fetch)."""
    return group != GROUP_REQUESTS


OUTBOX_INTERVAL_S = 1.0
GAUGE_INTERVAL_S = 10.0
POOL_SIZE_MAX = 4


class ClearingService:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.producer = make_producer(s, "clearing")
        self.pool: asyncpg.Pool | None = None
        self.shards: ShardPools | None = None

    async def run(self, stop: asyncio.Event) -> None:
        set_clock_window(self.s.time_past_days, self.s.time_future_minutes)  # 32xx envelopes are decoded here too
        serve_metrics(self.s.clearing_metrics_port, STAGE)
        self.pool = await until_up("PostgreSQL", lambda: connect_pool(self.s, POOL_SIZE_MAX), stop)
        self.shards = await until_up("shard databases", lambda: ShardPools.connect(self.s, POOL_SIZE_MAX), stop)
        await until_up("Kafka producer", self.producer.start, stop)
        if stop.is_set() or self.pool is None or self.shards is None:
            await self.producer.stop()
            return
        log.info("clearing service ready")
        processors: list[tuple[str, TopicSpec, BatchProcessor[Any]]] = [
            (GROUP_POSITIONS, SETTLEMENTS, Positions(self.pool)),
            (GROUP_REQUESTS, CLEARING, Requests(self.pool, self.shards)),
            (GROUP_CLAIMS, MANUAL_CLAIMS, Claims(self.pool)),
            (GROUP_JUDGEMENTS, JUDGEMENTS, Judgements(self.pool, frozenset(load_rules().rules))),
        ]
        watchdog = ProgressWatchdog(self.s, "clearing")
        shells = [BatchConsumer(make_group_consumer(self.s, "clearing", group, spec.name,
                                                    background=is_background(group)),
                                group, spec, processor, self.producer, max_records=self.s.batch_size_max,
                                watchdog=watchdog)
                  for group, spec, processor in processors]
        tasks = [asyncio.create_task(shell.run(stop)) for shell in shells]
        tasks.append(asyncio.create_task(self._ticker(stop)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a loop only ends on stop, or by raising: surface it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await watchdog.close()
            await self.producer.stop()
            await self.shards.close()
            await self.pool.close()

    # Ticker: outbox and gauges ----------------------------------------------------------------------

    async def _ticker(self, stop: asyncio.Event) -> None:
        last_gauges = 0.0
        while not stop.is_set():
            try:
                await self.publish_outbox()
                await self.publish_audit()
                if time.monotonic() - last_gauges >= GAUGE_INTERVAL_S:
                    await self.refresh_gauges()
                    last_gauges = time.monotonic()
            except Exception as e:
                # The database or the broker is away (restarted): try again on the next tick. Anything
                # else is a bug, logged in full, and must not stop the service either.
                if classify(e) is FailureKind.INFRASTRUCTURE:
                    log.warning("ticker failed (%s); trying again", type(e).__name__)
                else:
                    log.exception("ticker failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), OUTBOX_INTERVAL_S)

    async def publish_outbox(self) -> int:
        assert self.pool is not None

        async def send(topic: str, key: bytes | None, value: bytes) -> None:
            await self.producer.send_and_wait(topic, value, key=key)

        return await store.publish_outbox(self.pool, send)

    async def publish_audit(self) -> int:
        """The operators' audit rows to fsi.audit (the command lines publish their own at once; this
        catches what they could not, e.g. a command killed after its commit)."""
        assert self.pool is not None
        topic = audit.audit_topic(self.s)

        async def send(key: bytes, value: bytes) -> None:
            await self.producer.send_and_wait(topic, value, key=key)

        async with self.pool.acquire() as conn:
            return await audit.publish(conn, topic, send)

    async def refresh_gauges(self) -> None:
        assert self.pool is not None
        month = month_of(datetime.now(SHANGHAI).replace(tzinfo=None))
        async with self.pool.acquire() as conn:
            for prov, balance, line in await store.deposits(conn):
                set_deposit(prov, balance, line)
            for r in await store.province_positions(conn, month):
                for fund in (*FUNDS, "fund_pay_sumamt"):
                    set_clearing_position(r["insured_prov"], r["treating_prov"], fund, r[fund])


class Positions(BatchProcessor[ClearingEventView]):
    """Settlement events → clearing entries and running positions, one transaction per poll."""

    stage = STAGE
    # Only the ledger row's fields: the visit's facts and fee items (most of an event's bytes) are skipped.
    decoder = staticmethod(msgspec.json.Decoder(ClearingEventView).decode)

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def process(self, records: list[Record[ClearingEventView]], outbox: Outbox) -> None:
        started = time.perf_counter()
        rows = []
        for rec in records:
            ev = rec.value
            if ev.scope == "local":
                continue
            try:
                rows.append(store.row_from_event(ev))
            except (UnknownRegion, ClearingError, ValueError) as e:
                outbox.dead_letter("INTERNAL", f"INTERNAL: settlement event refused by clearing: {e}",
                                   rec.raw.value, msgid=ev.msgid, fixmedins_code=ev.fixmedins_code)
        if not rows:  # a poll of local settlements only (most of them): nothing to record, no transaction
            STAGE_SECONDS.labels("clearing_positions_batch").observe(time.perf_counter() - started)
            return
        async with self.pool.acquire() as conn, conn.transaction():
            recorded = await store.record_rows(conn, rows, "stream")
        REQUESTS.labels(STAGE, "settlement_event", "ok").inc(len(recorded.rows))
        REQUESTS.labels(STAGE, "settlement_event", "duplicate").inc(recorded.duplicates)
        STAGE_SECONDS.labels("clearing_positions_batch").observe(time.perf_counter() - started)


def _reply_to(record: Record[Any]) -> tuple[str, int | None]:
    partition = record.header("reply_partition")
    return (record.header("reply_topic") or REPLIES.name.encode()).decode(), int(partition) if partition else None


class Requests(BatchProcessor[RequestEnvelope]):
    """32xx requests: each answered in its own transaction that stores the answer by msgid."""

    stage = STAGE
    decoder = staticmethod(decode_envelope)  # its BrokerError names the field and the code

    def __init__(self, pool: asyncpg.Pool, shards: ShardPools) -> None:
        self.pool = pool
        self.shards = shards

    async def process(self, records: list[Record[RequestEnvelope]], outbox: Outbox) -> None:
        for rec in records:
            # A retried batch finds the answers stored so far and resends them.
            with applying(rec, f"answering infno {rec.value.infno}"):
                await self._request(rec, outbox)

    async def _request(self, rec: Record[RequestEnvelope], outbox: Outbox) -> None:
        started = time.perf_counter()
        env = rec.value
        reply_topic, reply_partition = _reply_to(rec)
        received = received_from_ns(int(rec.header("received_ns") or time.time_ns()))
        admdvs = env.insuplc_admdvs or env.mdtrtarea_admvs
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await store.stored_response(conn, env.msgid)
            if stored is not None:
                outbox.add(reply_topic, stored, key=env.msgid.encode(), partition=reply_partition)
                REQUESTS.labels(STAGE, env.infno, "duplicate").inc()
                return
            outcome, infcode = "ok", 0
            try:
                body = decode_body(env)
                async with conn.transaction():  # a savepoint: a rejection leaves nothing behind
                    output, warn = await requests.answer(conn, self.shards, env, body)
                response = response_bytes(admdvs, received, output=output, warn_msg=warn)
            except BrokerError as e:
                outcome, infcode = e.code, -1
                outbox.dead_letter(e.code, e.err_msg, rec.raw.value, msgid=env.msgid, infno=env.infno,
                                   fixmedins_code=env.fixmedins_code)
                response = response_bytes(admdvs, received, err_msg=e.err_msg)
            # If another worker answered this msgid meanwhile, the unique violation fails this record;
            # done again on its own, it finds and resends that worker's answer.
            await store.store_response(conn, env.msgid, env.infno, env.fixmedins_code, infcode, response)
        outbox.add(reply_topic, response, key=env.msgid.encode(), partition=reply_partition)
        REQUESTS.labels(STAGE, env.infno, outcome).inc()
        STAGE_SECONDS.labels(f"clearing_{env.infno}").observe(time.perf_counter() - started)

    def reject(self, record: Record[RequestEnvelope | None], code: str, err_msg: str, outbox: Outbox) -> None:
        env = record.value
        if env is None:
            return  # the router validated it: a foreign record; nobody to answer
        reply_topic, reply_partition = _reply_to(record)
        received = received_from_ns(int(record.header("received_ns") or time.time_ns()))
        body = response_bytes(env.insuplc_admdvs or env.mdtrtarea_admvs, received, err_msg=err_msg)
        outbox.add(reply_topic, body, key=env.msgid.encode(), partition=reply_partition)
        REQUESTS.labels(STAGE, env.infno, code).inc()


class Claims(BatchProcessor[ManualClaim]):
    """Manual claims → `manual_claim` rows (deduped by claim_id), counted once."""

    stage = STAGE
    decode_error_code = "BODY_MALFORMED"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def process(self, records: list[Record[ManualClaim]], outbox: Outbox) -> None:
        rows: dict[str, tuple] = {}
        labels: dict[str, tuple[str, str, str, str]] = {}
        for rec in records:
            c = rec.value
            try:
                insured, treating = region_of(c.insuplc_admdvs), region_of(c.mdtrtarea_admvs)
            except UnknownRegion:
                outbox.dead_letter("REGION_UNKNOWN", "REGION_UNKNOWN: an admdvs code is not in the region table",
                                   rec.raw.value)
                continue
            scope = classify_scope(insured.admdvs, treating.admdvs)
            if scope == "local":
                outbox.dead_letter("CLAIM_LOCAL", "CLAIM_LOCAL: a manual claim for local care", rec.raw.value)
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
            async with self.pool.acquire() as conn, conn.transaction():
                inserted = await store.insert_manual_claims(conn, list(rows.values()))
        for claim_id in inserted:  # counted once: only the insert that created the row counts
            record_manual_claim(*labels[claim_id])
        REQUESTS.labels(STAGE, "manual_claim", "ok").inc(len(inserted))
        REQUESTS.labels(STAGE, "manual_claim", "duplicate").inc(len(rows) - len(inserted))


class Judgements(BatchProcessor[Judgement]):
    """The monitoring stream's judgements → hub `judgement`, one transaction per poll (store's upsert rules).
    Metrics count a judgement once: by the insert that created its row, and a withdrawal by the update."""

    stage = STAGE
    decode_error_code = "BODY_MALFORMED"

    def __init__(self, pool: asyncpg.Pool, known_rules: frozenset[str]) -> None:
        self.pool = pool
        self.known_rules = known_rules  # metric labels: the rule book's ids, anything else `other`

    def ids(self, record: Record[Judgement | None]) -> tuple[str | None, str | None, str | None]:
        j = record.value
        return (j.jr_id if j else None), None, (j.fixmedins_code if j else None)

    async def process(self, records: list[Record[Judgement]], outbox: Outbox) -> None:
        stored: list[Judgement] = []
        withdrawn: list[str] = []
        repeated = 0  # re-emitted: evidence updated, or nothing to change
        async with self.pool.acquire() as conn, conn.transaction():
            for rec in records:
                j = rec.value
                if j.withdrawn:
                    rule_id = await store.withdraw_judgement(conn, j.jr_id)
                    if rule_id is not None:
                        withdrawn.append(rule_id)
                    continue
                try:
                    insured, treating = region_of(j.insured_admdvs), region_of(j.treating_admdvs)
                except UnknownRegion:
                    outbox.dead_letter("REGION_UNKNOWN", "REGION_UNKNOWN: a judgement names an admdvs code not in "
                                       "the region table", rec.raw.value, msgid=j.jr_id)
                    continue
                with applying(rec, "storing a judgement"):
                    row = store.JudgementRow(
                        jr_id=j.jr_id, rule_id=j.rule_id, rule_version=j.rule_version, severity=j.severity,
                        psn_no=j.psn_no, insured_admdvs=insured.admdvs, insured_prov=insured.prov_admdvs,
                        treating_admdvs=treating.admdvs, treating_prov=treating.prov_admdvs,
                        fixmedins_code=j.fixmedins_code, mdtrt_ids=j.mdtrt_ids, setl_ids=j.setl_ids, items=j.items,
                        window_begin=date.fromisoformat(j.window_begin), window_end=date.fromisoformat(j.window_end),
                        suspect_amt=j.suspect_amt, detail=j.detail)
                    if await store.upsert_judgement(conn, row):
                        stored.append(j)
                    else:
                        repeated += 1
        # after the commit: a batch retried after a failure counts only what its successful attempt inserted
        for j in stored:
            record_judgement_stored(j.rule_id, j.severity, region_of(j.insured_admdvs).prov_admdvs, self.known_rules)
        for rule_id in withdrawn:
            record_judgement_withdrawn(rule_id, self.known_rules)
        REQUESTS.labels(STAGE, "judgement", "ok").inc(len(stored))
        REQUESTS.labels(STAGE, "judgement", "duplicate").inc(repeated)


def _time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
