"""HTTP gateway: the national platform's endpoint, in front of Kafka.

POST the envelope → validate → publish to `fsi.ingress` (key psn_no) → wait for
the answer on our partition of `fsi.replies` (key msgid) → return it.
A request that times out answers TIMEOUT; the transaction may still complete,
and resending the same msgid returns the stored result. The time limit counts
from the request's arrival and covers the produce too (a broker outage answers
TIMEOUT in time). Every answer is the national envelope with HTTP 200, whatever
the input: a bug answers INTERNAL, never HTTP 500.

`GET /health/ready` answers 200 when the producer and the reply consumer reach
the broker and the reply reader runs, 503 otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback
from datetime import datetime
from typing import Final

import msgspec
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import Counter, Histogram

from schemas.codec import decode_request, peek_ids
from schemas.errors import BrokerError
from schemas.internal import DeadLetter
from schemas.limits import set_clock_window
from services.common.config import GATEWAY_PATH, Settings
from services.common.kafka import client_auth, make_producer
from services.common.metrics import DEAD_LETTERS, GATEWAY_SECONDS, REQUESTS, record_produce_error
from services.common.response import SHANGHAI, response_bytes
from topics.catalog import DEADLETTER, INGRESS, REPLIES

log = logging.getLogger("gateway")
JSON = "application/json; charset=utf-8"
READY_PATH = "/health/ready"
READY_PROBE_S = 1.0  # each broker probe of the readiness check
DEAD_LETTER_WAIT_S = 30.0  # a dead letter waits this long for the broker, in the background
METRIC_CHILDREN_MAX: Final = 512  # (infno, outcome) pairs whose metric children are kept at hand
# The reply consumer's fetch waits at most this long at the broker when no reply comes: a reply ends the wait at
# once whatever its length, so it bounds only the idle polling (100 ms meant ten empty fetches a second).
REPLY_FETCH_WAIT_MS: Final = 1000
_dl_encoder = msgspec.json.Encoder()
_partitioner = DefaultPartitioner()

# What a msgid stands for (the fields of services.common.signing.content_digest), compared exactly:
# one msgid in flight stands for one content, and an equality test is cheaper than hashing the body.
Content = tuple[str, str, str, str, bytes]
NO_CONTENT: Final[Content] = ("", "", "", "", b"")


@functools.lru_cache(maxsize=65536)
def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition aiokafka's (and Kafka's) default partitioner picks for `key` among `partitions`
    (murmur2 in pure Python): computed once per person, not per request."""
    every = list(range(partitions))
    return int(_partitioner(key, every, every))


class Gateway:
    def __init__(self, s: Settings) -> None:
        if s.gateway_instance >= REPLIES.partitions:
            raise ValueError(f"XS_GATEWAY_INSTANCE must be < {REPLIES.partitions} (reply partitions)")
        self.s = s
        self.reply_partition = s.gateway_instance
        # No linger: aiokafka keeps one produce request in flight per broker, so under load the requests that
        # arrive meanwhile go out together in the next one anyway; a linger only adds a timer wake-up (and its
        # wait) to every request at low rates.
        self.producer = make_producer(s, "gateway", linger_ms=0)
        self.replies = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            **client_auth(s, "gateway"),
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=REPLY_FETCH_WAIT_MS,
            isolation_level="read_committed",
        )
        # msgid → (content, waiters): answers are matched by msgid, so one msgid in flight stands for
        # one content; a resend of it waits for the same answer, other content is MSGID_CONFLICT at once.
        self.pending: dict[str, tuple[Content, list[asyncio.Future[bytes]]]] = {}
        self._ingress_partitions = 0  # fsi.ingress's partition count, read at the first request
        self._metric_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        set_clock_window(self.s.time_past_days, self.s.time_future_minutes)
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
        for task in list(self._background):
            task.cancel()
        await self.replies.stop()
        await self.producer.stop()

    async def _read_replies(self) -> None:
        while True:
            try:
                batches = await self.replies.getmany(timeout_ms=REPLY_FETCH_WAIT_MS, max_records=1000)
            except KafkaError as e:  # the consumer reconnects by itself; keep reading
                log.warning("reading replies failed: %s; retrying", type(e).__name__)
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for rec in records:
                    _, waiters = self.pending.pop(rec.key.decode(errors="replace") if rec.key else "", (NO_CONTENT, []))
                    for fut in waiters:
                        if not fut.done():
                            fut.set_result(rec.value)

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        received = datetime.now(SHANGHAI)
        deadline = asyncio.get_running_loop().time() + self.s.gateway_timeout_ms / 1000
        infno = "unknown"
        raw = b""
        try:
            raw = await self._read_body(request)
            req = decode_request(raw)
            env = req.envelope
            infno = env.infno
            certified = client_cert_institution(request)
            if certified is not None and certified != env.fixmedins_code:
                raise BrokerError("CLIENT_CERT_MISMATCH", "the client certificate belongs to another institution "
                                  "than fixmedins_code names")
            content = (env.infno, env.fixmedins_code, env.insuplc_admdvs, env.mdtrtarea_admvs, bytes(env.input))
            body = await self._forward(raw, env.msgid, content, req.psn_no, received, deadline)
            outcome = "ok"
        except BrokerError as e:
            outcome = e.code
            body = response_bytes("", received, err_msg=e.err_msg)
            if e.code != "TIMEOUT":
                self._dead_letter(e, raw)
        except Exception as e:  # a bug: the hospital still gets an envelope, the request a dead letter
            # The exception's text may quote request values (personal): log its type and frames only.
            log.error("unexpected %s handling a request (infno %s):\n%s", type(e).__name__, infno,
                      "".join(traceback.format_tb(e.__traceback__)))
            err = BrokerError("INTERNAL", "unexpected error in the gateway; resend with the same msgid")
            outcome = err.code
            body = response_bytes("", received, err_msg=err.err_msg)
            self._dead_letter(err, raw)
        requests, seconds = self._metrics(infno, outcome)
        requests.inc()
        seconds.observe(time.perf_counter() - started)
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    def _metrics(self, infno: str, outcome: str) -> tuple[Counter, Histogram]:
        """The request counter's and the latency histogram's children for this infno and outcome, looked up
        once (labels() costs a lock and a dict per call); a bounded number kept, the rest looked up each time."""
        children = self._metric_children.get((infno, outcome))
        if children is None:
            children = REQUESTS.labels("gateway", infno, outcome), GATEWAY_SECONDS.labels(infno)
            if len(self._metric_children) < METRIC_CHILDREN_MAX:
                self._metric_children[infno, outcome] = children
        return children

    async def ready(self, _request: web.Request) -> web.Response:
        problems = await self.readiness_problems()
        return web.json_response({"ready": not problems, "problems": problems}, status=503 if problems else 200)

    async def readiness_problems(self) -> list[str]:
        """What keeps this gateway from answering: empty when the producer and the reply consumer each
        get the broker's metadata within READY_PROBE_S and the reply reader runs."""
        problems = []
        if self._reader is None or self._reader.done():
            problems.append("reply reader not running")
        probes = {"producer": self.producer.client.fetch_all_metadata(), "reply consumer": self.replies.topics()}
        for name, probe in probes.items():
            try:
                await asyncio.wait_for(probe, READY_PROBE_S)
            except (KafkaError, TimeoutError, OSError) as e:
                problems.append(f"{name}: broker unreachable ({type(e).__name__})")
        return problems

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.s.request_body_bytes_max
        if request.content_length is not None:
            if request.content_length > limit:
                raise BrokerError("BODY_TOO_LARGE", f"body exceeds {limit} bytes")
            return await request.read()  # the parser stops at Content-Length: at most `limit` bytes
        # read(n) returns what has arrived, not n bytes: collect chunks up to the limit.
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise BrokerError("BODY_TOO_LARGE", f"body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _forward(
        self, raw: bytes, msgid: str, content: Content, psn_no: str | None, received: datetime, deadline: float
    ) -> bytes:
        """Produce to ingress and wait for the reply, both within the time limit (`deadline`, loop time)."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        in_flight, waiters = self.pending.setdefault(msgid, (content, []))
        if in_flight != content:
            raise BrokerError("MSGID_CONFLICT", "this msgid is in flight for a different request")
        waiters.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                if not self._ingress_partitions:
                    self._ingress_partitions = len(await self.producer.partitions_for(INGRESS.name))
                key = (psn_no or msgid).encode()
                await self.producer.send_and_wait(
                    INGRESS.name,
                    raw,
                    key=key,
                    partition=partition_for_key(key, self._ingress_partitions),
                    headers=[
                        ("reply_topic", REPLIES.name.encode()),
                        ("reply_partition", str(self.reply_partition).encode()),
                        ("received_ns", str(time.time_ns()).encode()),
                    ],
                )
                return await fut  # a timeout cancels only this request's own future
        except KafkaError as e:
            record_produce_error(INGRESS.name)
            log.warning("produce to %s failed: %s", INGRESS.name, type(e).__name__)
            raise BrokerError(
                "TIMEOUT", "the broker did not accept the request in time; resend the same msgid"
            ) from None
        except TimeoutError:
            raise BrokerError(
                "TIMEOUT",
                f"no answer within {self.s.gateway_timeout_ms} ms; resend the same msgid for the result",
            ) from None
        finally:
            _, waiters = self.pending.get(msgid, (NO_CONTENT, []))
            if fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self.pending[msgid]

    def _dead_letter(self, err: BrokerError, raw: bytes) -> None:
        """Record the refusal on fsi.deadletter in the background: the answer never waits for the broker,
        and hostile bytes (invalid UTF-8, deep nesting) are stored as they came."""
        msgid, infno, fixmedins = peek_ids(raw)
        letter = DeadLetter(
            stage="gateway", err_code=err.code, err_msg=err.err_msg, msgid=msgid, infno=infno,
            fixmedins_code=fixmedins, at_ns=time.time_ns(), original=raw,
        )
        DEAD_LETTERS.labels("gateway", err.code).inc()
        task = asyncio.get_running_loop().create_task(
            self._send_dead_letter(_dl_encoder.encode(letter), (msgid or "").encode() or None)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_dead_letter(self, value: bytes, key: bytes | None) -> None:
        try:
            await asyncio.wait_for(self.producer.send_and_wait(DEADLETTER.name, value, key=key), DEAD_LETTER_WAIT_S)
        except (KafkaError, TimeoutError) as e:
            record_produce_error(DEADLETTER.name)
            log.warning("dead letter not recorded: %s", type(e).__name__)


def client_cert_institution(request: web.Request) -> str | None:
    """The institution (CN) of the client certificate of this connection (mutual TLS), if it showed one —
    the TLS layer already verified it against the deployment's CA."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def build_app(gw: Gateway) -> web.Application:
    app = web.Application(client_max_size=gw.s.request_body_bytes_max + 1024)
    app.router.add_post(GATEWAY_PATH, gw.handle)
    app.router.add_get(READY_PATH, gw.ready)
    return app
