"""Router: a faust-streaming agent over `fsi.ingress`.

For each request: decode (records may come straight from a HIS, not only from
the gateway), route with `services.router.logic`, then either forward to
`fsi.routed` (key psn_no), answer directly (1101), or reject (reply with the
error + dead letter). At-least-once: faust flushes the producer before it
commits offsets, and everything downstream is idempotent by msgid.

Reference data is held in memory and reloaded when the loader NOTIFYs
`refdata_changed`; filings created on the spot (promise / emergency) are written
to PostgreSQL first, so they survive a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
import faust
import msgspec

from schemas.codec import decode_request
from schemas.errors import BrokerError
from schemas.internal import DeadLetter
from services.common.config import Settings
from services.common.metrics import DEAD_LETTERS, REQUESTS, STAGE_SECONDS, serve_metrics
from services.common.response import received_from_ns, response_bytes
from services.refdata.store import RefData, fetch_refdata
from services.router.logic import Answer, ForwardClearing, IngressMeta, NewFiling, route
from topics.catalog import CLEARING, DEADLETTER, INGRESS, PARTITIONS, REPLIES, ROUTED

log = logging.getLogger("router")
REFDATA_CHANNEL = "refdata_changed"
_encoder = msgspec.json.Encoder(decimal_format="number")


class RouterState:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.ref: RefData | None = None
        self.ready = asyncio.Event()
        self.pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.s.pg_dsn, min_size=1, max_size=4)
        await self.reload()
        self._listener = await asyncpg.connect(self.s.pg_dsn)
        await self._listener.add_listener(REFDATA_CHANNEL, self._on_notify)
        self.ready.set()

    def _on_notify(self, *_: Any) -> None:
        asyncio.get_running_loop().create_task(self.reload())

    async def reload(self) -> None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            self.ref = await fetch_refdata(conn)
        log.info(
            "reference data loaded: %d hospitals, %d persons", len(self.ref.hospitals), len(self.ref.persons)
        )

    async def save_filing(self, new: NewFiling) -> None:
        """Durable before the request that relies on it moves on; idempotent by filing_id."""
        assert self.pool is not None and self.ref is not None
        f = new.filing
        await self.pool.execute(
            "INSERT INTO filing (filing_id, psn_no, filing_type, begndate, enddate, target_admdvs, source)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (filing_id) DO NOTHING",
            f.filing_id, new.psn_no, f.filing_type, f.begndate, f.enddate, f.target_admdvs, f.source,
        )
        existing = self.ref.filings.setdefault(new.psn_no, [])
        if all(x.filing_id != f.filing_id for x in existing):
            existing.append(f)


def _headers(event: Any) -> dict[str, bytes]:
    raw = event.message.headers or {}
    items = raw.items() if isinstance(raw, dict) else raw
    return {k: bytes(v) for k, v in items}


def create_app(s: Settings) -> faust.App:
    app = faust.App(
        "xsettle-router",
        broker=f"kafka://{s.kafka_bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_partitions=PARTITIONS,
        producer_acks=-1,
        producer_linger_ms=1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5,
        # A killed worker's partitions move after this; faust's default (60 s) stalls routing that long.
        broker_session_timeout=10,
        broker_heartbeat_interval=3,
        stream_wait_empty=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
    )
    state = RouterState(s)
    ingress = app.topic(INGRESS.name, key_type=bytes, value_type=bytes, key_serializer="raw",
                        value_serializer="raw")
    routed = app.topic(ROUTED.name, key_serializer="raw", value_serializer="raw")
    deadletter = app.topic(DEADLETTER.name, key_serializer="raw", value_serializer="raw")
    clearing = app.topic(CLEARING.name, key_serializer="raw", value_serializer="raw")

    async def reply(topic: str, partition: int | None, msgid: str, body: bytes) -> None:
        await app.topic(topic, key_serializer="raw", value_serializer="raw").send(
            key=msgid.encode(), value=body, partition=partition
        )

    async def handle(raw: bytes, headers: dict[str, bytes]) -> None:
        started = time.perf_counter()
        reply_partition = headers.get("reply_partition")
        meta = IngressMeta(
            reply_topic=(headers.get("reply_topic") or REPLIES.name.encode()).decode(),
            reply_partition=int(reply_partition) if reply_partition else None,
            received_ns=int(headers.get("received_ns") or time.time_ns()),
        )
        infno, msgid, admdvs = "unknown", None, ""
        try:
            req = decode_request(raw)
            infno, msgid = req.envelope.infno, req.envelope.msgid
            admdvs = req.envelope.insuplc_admdvs or req.envelope.mdtrtarea_admvs
            assert state.ref is not None
            decision = route(req, state.ref, meta, s.fee_items_per_upload_max)
            if isinstance(decision, ForwardClearing):
                await clearing.send(key=decision.fixmedins_code.encode(), value=raw, headers=[
                    ("reply_topic", meta.reply_topic.encode()),
                    ("reply_partition", str(meta.reply_partition).encode() if meta.reply_partition is not None
                     else b""),
                    ("received_ns", str(meta.received_ns).encode()),
                ])
            elif isinstance(decision, Answer):
                await reply(meta.reply_topic, meta.reply_partition, msgid,
                            response_bytes(admdvs, received_from_ns(meta.received_ns), output=decision.output))
            else:
                if decision.new_filing is not None:
                    await state.save_filing(decision.new_filing)
                key = decision.request.person.psn_no.encode()
                await routed.send(key=key, value=_encoder.encode(decision.request))
            outcome = "ok"
        except BrokerError as e:
            outcome = e.code
            DEAD_LETTERS.labels("router", e.code).inc()
            letter = DeadLetter(stage="router", err_code=e.code, err_msg=e.err_msg, msgid=msgid, infno=infno,
                                fixmedins_code=None, at_ns=time.time_ns(), original=raw)
            await deadletter.send(key=(msgid or "").encode() or None, value=_encoder.encode(letter))
            if msgid is not None:
                await reply(meta.reply_topic, meta.reply_partition, msgid,
                            response_bytes(admdvs, received_from_ns(meta.received_ns), err_msg=e.err_msg))
        REQUESTS.labels("router", infno, outcome).inc()
        STAGE_SECONDS.labels("router").observe(time.perf_counter() - started)

    @app.agent(ingress)
    async def process(stream: faust.StreamT) -> None:
        await state.ready.wait()
        async for event in stream.events():
            try:
                await handle(event.value, _headers(event))
            except Exception:  # never stop the pipeline on one record
                log.exception("unexpected error routing a record; sent to dead letters")
                DEAD_LETTERS.labels("router", "INTERNAL").inc()
                letter = DeadLetter(stage="router", err_code="INTERNAL", err_msg="INTERNAL: unexpected error",
                                    msgid=None, infno=None, fixmedins_code=None, at_ns=time.time_ns(),
                                    original=event.value)
                await deadletter.send(key=None, value=_encoder.encode(letter))

    @app.task
    async def startup() -> None:
        await state.start()
        serve_metrics(s.router_metrics_port)
        log.info("router ready")

    return app
