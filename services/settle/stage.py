"""The settlement stage: one consumer of fsi.ingress that routes and settles each batch.

Per poll (the shared shell, `services/common/consumer.py`, decodes, publishes and commits):
  1. the router (`services/router/core.py`) authenticates the batch's requests, reads their persons and
     routes each in order: answers (1101, sign-in, filings, refusals) and forwards to fsi.clearing go into
     the outbox, requests to settle are kept;
  2. the engine (`handler.py`) settles those in one transaction per shard;
  3. the shell produces the outbox (replies, settlement events, clearing requests, dead letters), waits for
     the acknowledgements and commits the offsets.
A request crosses Kafka twice (in, and its answer out) and wakes one consumer: routing and settling in one
process spare it a hop through a topic between them, a second consumer and a second offset commit
(README "The floor" measured what each hop costs). Ingress is keyed by psn_no, so a person's requests stay
in order on one partition; the router's writes (msgids seen, filings, sessions) are idempotent, and the
engine's exactly-once rests on `processed_request`, so a redone batch changes nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from schemas.codec import Request, decode_envelope, decode_request
from schemas.envelope import RequestEnvelope
from schemas.errors import BrokerError
from schemas.internal import RoutedRequest
from services.common.config import Settings
from services.common.consumer import BatchConsumer, BatchProcessor, Outbox, Record, RecordFailed, applying, until_up
from services.common.kafka import make_group_consumer, make_producer
from services.common.metrics import REQUESTS, record_settlement_request, serve_metrics
from services.common.response import received_from_ns, response_bytes
from services.common.watchdog import ProgressWatchdog
from services.router.core import RouterCore, ingress_meta, scope_of
from services.settle.handler import SettleEngine
from topics.catalog import INGRESS

log = logging.getLogger("settle")
GROUP_ID = "xsettle-settle"


def _headers(record: Record[Any]) -> dict[str, bytes]:
    return {k: bytes(v) for k, v in record.raw.headers or ()}


class SettlementStage(BatchProcessor[Request]):
    # The stage its dead letters name: the router's for what it refuses and for records that do not decode
    # (it reads fsi.ingress), the engine's for what the engine refuses or fails on.
    stage = "router"
    decoder = staticmethod(decode_request)  # envelope (the topic's type) and body; errors name the field

    def __init__(self, router: RouterCore, engine: SettleEngine) -> None:
        self.router = router
        self.engine = engine

    async def process(self, records: list[Record[Request]], outbox: Outbox) -> None:
        # Each part's own outbox: its dead letters name the part (router or settle) that refused.
        routed_out, settled_out = Outbox(self.stage), Outbox(self.engine.stage)
        await self.router.begin_batch([(rec.value, rec.raw.value) for rec in records])  # a few reads per batch
        to_settle: list[Record[RoutedRequest]] = []
        origin: dict[int, Record[Request]] = {}  # id(routed record) → its ingress record
        for rec in records:
            with applying(rec, f"routing infno {rec.value.envelope.infno}"):
                routed = await self.router.handle(rec.value, rec.raw.value, _headers(rec), routed_out)
            if routed is not None:
                to_settle.append(Record(rec.raw, routed))  # the same consumed record: dead letters keep its bytes
                origin[id(to_settle[-1])] = rec
        if to_settle:
            try:
                await self.engine.process(to_settle, settled_out)
            except RecordFailed as e:  # the shell isolates by ingress record: name the culprit's
                raise RecordFailed(origin.get(id(e.record), e.record), e.code, e.err_msg, self.engine.stage) from e
        outbox.records += routed_out.records
        outbox.records += settled_out.records

    def _envelope(self, record: Record[Request | None]) -> RequestEnvelope | None:
        if record.value is not None:
            return record.value.envelope
        try:  # the body did not decode: the envelope may have (then the hospital gets an answer)
            return decode_envelope(record.raw.value)
        except BrokerError:
            return None

    def ids(self, record: Record[Request | None]) -> tuple[str | None, str | None, str | None]:
        env = self._envelope(record)
        return (env.msgid, env.infno, None) if env is not None else (None, None, None)

    def reject(self, record: Record[Request | None], code: str, err_msg: str, outbox: Outbox) -> None:
        env = self._envelope(record)
        infno = env.infno if env is not None else "unknown"
        REQUESTS.labels(self.stage, infno, code).inc()
        record_settlement_request(infno, scope_of(record.value), code)
        if env is None:
            return  # no msgid: nobody to answer
        meta = ingress_meta(_headers(record))
        admdvs = env.insuplc_admdvs or env.mdtrtarea_admvs
        body = response_bytes(admdvs, received_from_ns(meta.received_ns), err_msg=err_msg)
        outbox.add(meta.reply_topic, body, key=env.msgid.encode(), partition=meta.reply_partition)


async def run(s: Settings, engine: SettleEngine, stop: asyncio.Event) -> None:
    serve_metrics(s.settle_metrics_port, stage="settle")
    router = RouterCore(s)
    # No linger: the shell hands a batch's whole outbox to the producer without yielding, so it goes out in one
    # request anyway; a linger would only hold every batch's replies back (2 ms measured).
    producer = make_producer(s, "settle", linger_ms=0)
    watchdog = ProgressWatchdog(s, "settle")
    try:
        await router.state.start(stop)
        await engine.connect(stop)
        await until_up("Kafka producer", producer.start, stop)
        if stop.is_set():
            return
        log.info("settlement stage ready")
        consumer = make_group_consumer(s, "settle", GROUP_ID, INGRESS.name)
        await BatchConsumer(consumer, GROUP_ID, INGRESS, SettlementStage(router, engine), producer,
                            max_records=s.batch_size_max, watchdog=watchdog).run(stop)
    finally:
        await watchdog.close()
        await producer.stop()
        await engine.close()
        await router.state.close()
