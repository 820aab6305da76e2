"""HTTP gateway: the national platform's endpoint, in front of Kafka.

POST the envelope → validate → publish to `fsi.ingress` (key psn_no) → wait for
the answer on our partition of `fsi.replies` (key msgid) → return it.
A request that times out answers TIMEOUT; the transaction may still complete,
and resending the same msgid returns the stored result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

import msgspec
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from schemas.codec import decode_request
from schemas.errors import BrokerError
from schemas.internal import DeadLetter
from schemas.person import Input9001
from services.common.config import GATEWAY_PATH, Settings
from services.common.kafka import IDLE_FETCH_WAIT_MS, make_producer
from services.common.metrics import DEAD_LETTERS, GATEWAY_SECONDS, REQUESTS, record_produce_error
from services.common.response import SHANGHAI, response_bytes
from topics.catalog import DEADLETTER, INGRESS, REPLIES

log = logging.getLogger("gateway")
JSON = "application/json; charset=utf-8"
_dl_encoder = msgspec.json.Encoder()


class Gateway:
    def __init__(self, s: Settings) -> None:
        if s.gateway_instance >= REPLIES.partitions:
            raise ValueError(f"XS_GATEWAY_INSTANCE must be < {REPLIES.partitions} (reply partitions)")
        self.s = s
        self.reply_partition = s.gateway_instance
        self.producer = make_producer(s, linger_ms=1)
        self.replies = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=IDLE_FETCH_WAIT_MS,
            isolation_level="read_committed",
        )
        self.pending: dict[str, list[asyncio.Future[bytes]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._sign_seq = 0

    async def start(self) -> None:
        await self.producer.start()
        await self.replies.start()
        tp = TopicPartition(REPLIES.name, self.reply_partition)
        self.replies.assign([tp])
        await self.replies.seek_to_end(tp)
        await self.replies.position(tp)  # resolve now, so no reply produced after start is missed
        self._reader = asyncio.create_task(self._read_replies())

    async def stop(self) -> None:
        if self._reader:
            self._reader.cancel()
        await self.replies.stop()
        await self.producer.stop()

    async def _read_replies(self) -> None:
        while True:
            batches = await self.replies.getmany(timeout_ms=100, max_records=1000)
            for records in batches.values():
                for rec in records:
                    waiters = self.pending.pop(rec.key.decode() if rec.key else "", None)
                    for fut in waiters or ():
                        if not fut.done():
                            fut.set_result(rec.value)

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        received = datetime.now(SHANGHAI)
        infno = "unknown"
        raw = b""
        try:
            raw = await self._read_body(request)
            req = decode_request(raw)
            env = req.envelope
            infno = env.infno
            if isinstance(req.body, Input9001):
                body = self._sign_in(env.mdtrtarea_admvs, received)
            else:
                body = await self._forward(raw, env.msgid, req.psn_no, env.insuplc_admdvs, received)
            outcome = "ok"
        except BrokerError as e:
            outcome = e.code
            body = response_bytes("", received, err_msg=e.err_msg)
            if e.code not in ("TIMEOUT",):
                await self._dead_letter(e, raw)
        REQUESTS.labels("gateway", infno, outcome).inc()
        GATEWAY_SECONDS.labels(infno).observe(time.perf_counter() - started)
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.s.request_body_bytes_max
        if request.content_length is not None and request.content_length > limit:
            raise BrokerError("BODY_TOO_LARGE", f"body exceeds {limit} bytes")
        raw = await request.content.read(limit + 1)
        if len(raw) > limit:
            raise BrokerError("BODY_TOO_LARGE", f"body exceeds {limit} bytes")
        return raw

    def _sign_in(self, admdvs: str, received: datetime) -> bytes:
        self._sign_seq += 1
        sign_no = f"{received.strftime('%Y%m%d%H%M%S')}{self.s.gateway_instance:02d}{self._sign_seq:08d}"
        output = {"signinoutb": {"sign_time": received.strftime("%Y-%m-%d %H:%M:%S"), "sign_no": sign_no}}
        return response_bytes(admdvs, received, output=output)

    async def _forward(
        self, raw: bytes, msgid: str, psn_no: str | None, insuplc: str, received: datetime
    ) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending.setdefault(msgid, []).append(fut)
        try:
            await self.producer.send_and_wait(
                INGRESS.name,
                raw,
                key=(psn_no or msgid).encode(),
                headers=[
                    ("reply_topic", REPLIES.name.encode()),
                    ("reply_partition", str(self.reply_partition).encode()),
                    ("received_ns", str(time.time_ns()).encode()),
                ],
            )
            return await asyncio.wait_for(asyncio.shield(fut), self.s.gateway_timeout_ms / 1000)
        except KafkaError:
            record_produce_error(INGRESS.name)
            raise
        except TimeoutError:
            raise BrokerError(
                "TIMEOUT",
                f"no answer within {self.s.gateway_timeout_ms} ms; resend the same msgid for the result",
            ) from None
        finally:
            waiters = self.pending.get(msgid)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self.pending[msgid]

    async def _dead_letter(self, err: BrokerError, raw: bytes) -> None:
        msgid = infno = fixmedins = None
        try:
            partial = msgspec.json.decode(raw)
            if isinstance(partial, dict):
                msgid, infno, fixmedins = (
                    _str_or_none(partial.get(k)) for k in ("msgid", "infno", "fixmedins_code")
                )
        except (msgspec.DecodeError, ValueError):
            pass
        letter = DeadLetter(
            stage="gateway", err_code=err.code, err_msg=err.err_msg, msgid=msgid, infno=infno,
            fixmedins_code=fixmedins, at_ns=time.time_ns(), original=raw,
        )
        DEAD_LETTERS.labels("gateway", err.code).inc()
        await self.producer.send(
            DEADLETTER.name, _dl_encoder.encode(letter), key=(msgid or "").encode() or None
        )


def _str_or_none(v: object) -> str | None:
    return v[:64] if isinstance(v, str) else None


def build_app(gw: Gateway) -> web.Application:
    app = web.Application(client_max_size=gw.s.request_body_bytes_max + 1024)
    app.router.add_post(GATEWAY_PATH, gw.handle)
    return app
