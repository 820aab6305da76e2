"""The router's batch processor in the shared consumer shell (`services/common/consumer.py`).

Per poll: read the batch's persons (one query per shard), route every record in order (a
person's records stay in order: one partition, one key), then the shell produces what was routed,
waits for all acknowledgements and
commits the offsets. At-least-once; downstream is idempotent by msgid. A request that
fails unexpectedly is answered INTERNAL and dead-lettered; a database outage is waited out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from schemas.codec import Request, decode_envelope, decode_request
from schemas.envelope import RequestEnvelope
from schemas.errors import BrokerError
from services.common.config import Settings
from services.common.consumer import BatchConsumer, BatchProcessor, Outbox, Record, applying, until_up
from services.common.kafka import make_group_consumer, make_producer
from services.common.metrics import REQUESTS, record_settlement_request, serve_metrics
from services.common.response import received_from_ns, response_bytes
from services.common.watchdog import ProgressWatchdog
from services.router.core import RouterCore, ingress_meta, scope_of
from topics.catalog import INGRESS, ROUTED

log = logging.getLogger("router")
GROUP_ID = "xsettle-router"


def _headers(record: Record[Any]) -> dict[str, bytes]:
    return {k: bytes(v) for k, v in record.raw.headers or ()}


class Router(BatchProcessor[Request]):
    stage = "router"
    decoder = staticmethod(decode_request)  # envelope (the topic's type) and body; errors name the field

    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def process(self, records: list[Record[Request]], outbox: Outbox) -> None:
        await self.core.begin_batch([(rec.value, rec.raw.value) for rec in records])  # a few reads per batch
        for rec in records:
            with applying(rec, f"routing infno {rec.value.envelope.infno}"):
                await self.core.handle(rec.value, rec.raw.value, _headers(rec), outbox)

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
        REQUESTS.labels("router", infno, code).inc()
        record_settlement_request(infno, scope_of(record.value), code)
        if env is None:
            return  # no msgid: nobody to answer
        meta = ingress_meta(_headers(record))
        admdvs = env.insuplc_admdvs or env.mdtrtarea_admvs
        body = response_bytes(admdvs, received_from_ns(meta.received_ns), err_msg=err_msg)
        outbox.add(meta.reply_topic, body, key=env.msgid.encode(), partition=meta.reply_partition)


async def run(s: Settings, stop: asyncio.Event) -> None:
    serve_metrics(s.router_metrics_port, stage="router")
    core = RouterCore(s)
    # No linger: the shell hands a batch's whole outbox over without yielding (one request anyway).
    producer = make_producer(s, "router", linger_ms=0)
    watchdog = ProgressWatchdog(s, "router")
    try:
        await core.state.start(stop)
        await until_up("Kafka producer", producer.start, stop)
        if stop.is_set():
            return
        core.routed_partitions = len(await producer.partitions_for(ROUTED.name))
        log.info("router ready")
        consumer = make_group_consumer(s, "router", GROUP_ID, INGRESS.name)
        await BatchConsumer(consumer, GROUP_ID, INGRESS, Router(core), producer,
                            max_records=s.batch_size_max, watchdog=watchdog).run(stop)
    finally:
        await watchdog.close()
        await producer.stop()
        await core.state.close()
