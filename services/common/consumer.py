"""The one batch-consumer shell every service uses: decode, process, publish, commit — in that order.

Per poll of a consumer group:
  1. decode every record with its topic's declared value type (`topics/catalog.py`), or the
     processor's own decoder; a record that does not decode is a *record failure*;
  2. hand the decoded records to the service's processor, which does its work (usually one
     PostgreSQL transaction) and fills an `Outbox` with what must be published;
  3. publish the outbox and wait for the broker's acknowledgements;
  4. commit the offsets — last, so a crash anywhere replays the batch (every service is idempotent).
     The commit runs in the background (`OffsetCommitter`): the next poll does not wait for the
     coordinator's round trip, one commit is in flight at a time and at most one goes out per
     `COMMIT_MIN_INTERVAL_S`, and the offsets of batches acknowledged meanwhile go out together in the
     next one. Only acknowledged batches' offsets are handed over, so a commit never runs ahead of the
     output.

Two kinds of failure (`classify`):
- *record*: caused by the data (does not decode, the database refuses it — SQLSTATE class 22/23 —,
  an unexpected exception while applying it). The batch is redone without the culprit: a processor
  that knows the culprit raises `RecordFailed`; otherwise the batch is split in halves until the
  record that fails on its own is found. The culprit is answered (if someone waits for an answer)
  and dead-lettered with its reason; the partition moves on at once.
- *infrastructure*: database or broker unreachable, connection lost, timeouts, deadlocks. The whole
  batch is retried with capped exponential backoff, indefinitely; the service never exits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from asyncpg.exceptions import _base as asyncpg_base
from prometheus_client import Counter, Histogram

from schemas.errors import BrokerError
from schemas.internal import DeadLetter
from services.common.metrics import DEAD_LETTERS, record_produce_error
from topics.catalog import DEADLETTER, TopicSpec

if TYPE_CHECKING:
    from services.common.watchdog import ProgressWatchdog

log = logging.getLogger("consumer")
T = TypeVar("T")

BACKOFF_FIRST_S: Final = 0.1
BACKOFF_MAX_S: Final = 2.0  # at most this long between an outage's end and the next attempt
POLL_TIMEOUT_MS: Final = 100
# Each offset commit costs the consumer's client and the broker a request (and the group coordinator a write
# to __consumer_offsets); a batch's offsets may wait this long to go out with the next batches'. A crash
# replays at most this much more, which every service takes as duplicates.
COMMIT_MIN_INTERVAL_S: Final = 0.1
# SQLSTATE classes that say the database (not the record) is in trouble: connection (08), transaction
# rollback — deadlock, serialization — (40), resources (53), lock not available (55), operator
# intervention — shutdown, starting up — (57), system error (58), internal (XX).
INFRA_SQLSTATE_CLASSES: Final = frozenset({"08", "40", "53", "55", "57", "58", "XX"})

FAILURES = Counter(
    "xs_consumer_failures_total",
    "Failed batch attempts by consumer group and failure kind (record: isolated and dead-lettered; "
    "infrastructure: retried with backoff), with the exception class",
    ["group", "failure", "error"],
)

# Where a batch's time goes, per consumer group: `wait` — the oldest record's age when the poll returned
# it (the producer's linger, the produce, the broker and the fetch); then the shell's steps in order.
STEP_SECONDS = Histogram(
    "xs_consumer_step_seconds",
    "Per batch and consumer group: the oldest record's age at the poll (wait), processing (process), "
    "sending and awaiting the acknowledgements (publish), the offset commit (commit)",
    ["group", "step"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)

_encoder = msgspec.json.Encoder(decimal_format="number")


class FailureKind(Enum):
    RECORD = "record"
    INFRASTRUCTURE = "infrastructure"


def classify(exc: BaseException) -> FailureKind:
    """Record failures are isolated and dead-lettered; infrastructure failures are retried forever."""
    if isinstance(exc, RecordFailed | msgspec.DecodeError | msgspec.ValidationError | BrokerError):
        return FailureKind.RECORD
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return FailureKind.INFRASTRUCTURE if sqlstate[:2] in INFRA_SQLSTATE_CLASSES else FailureKind.RECORD
    if isinstance(exc, asyncpg_base.DataError):  # a query argument asyncpg cannot encode: the record's data
        return FailureKind.RECORD
    if isinstance(exc, asyncpg.InterfaceError | asyncpg_base.InternalClientError | KafkaError | OSError
                  | TimeoutError | ConnectionError):
        return FailureKind.INFRASTRUCTURE
    return FailureKind.RECORD  # an unexpected exception while applying a record (a bug it triggers)


class RecordFailed(Exception):
    """Raised by a processor that knows which record failed: the batch is redone without it."""

    def __init__(self, record: Record[Any], code: str, err_msg: str, stage: str | None = None) -> None:
        super().__init__(code)
        self.record = record
        self.code = code
        self.err_msg = err_msg
        self.stage = stage  # the part of the processor that failed, for the dead letter (None: the processor's)


@contextlib.contextmanager
def applying(record: Record[Any], what: str) -> Iterator[None]:
    """Around the work on one record: an unexpected exception becomes `RecordFailed` for that record
    (answered INTERNAL, not stored — a resend with the same msgid tries again); infrastructure
    failures pass through to the shell's retry."""
    try:
        yield
    except Exception as e:
        if isinstance(e, RecordFailed) or classify(e) is FailureKind.INFRASTRUCTURE:
            raise
        log.exception("unexpected error %s; redone without this record", what)
        raise RecordFailed(record, "INTERNAL", "INTERNAL: unexpected error; resend with the same msgid") from e


@dataclass(slots=True)
class Record(Generic[T]):
    """A consumed record with its decoded value."""

    raw: ConsumerRecord
    value: T

    def header(self, name: str) -> bytes | None:
        for key, value in self.raw.headers or ():
            if key == name:
                return bytes(value)
        return None


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    value: bytes
    key: bytes | None = None
    partition: int | None = None
    headers: list[tuple[str, bytes]] | None = None


@dataclass
class Outbox:
    """What a processed batch must publish, in order, before its offsets are committed."""

    stage: str
    records: list[Outgoing] = field(default_factory=list)

    def add(self, topic: str, value: bytes, *, key: bytes | None = None, partition: int | None = None,
            headers: list[tuple[str, bytes]] | None = None) -> None:
        self.records.append(Outgoing(topic, value, key, partition, headers))

    def dead_letter(self, code: str, err_msg: str, original: bytes, *, msgid: str | None = None,
                    infno: str | None = None, fixmedins_code: str | None = None, stage: str | None = None) -> None:
        stage = stage or self.stage
        DEAD_LETTERS.labels(stage, code).inc()
        letter = DeadLetter(stage=stage, err_code=code, err_msg=err_msg, msgid=msgid, infno=infno,
                            fixmedins_code=fixmedins_code, at_ns=time.time_ns(), original=original)
        self.add(DEADLETTER.name, _encoder.encode(letter), key=msgid.encode() if msgid else None)


class BatchProcessor(Generic[T]):
    """What a service plugs into the shell. `process` does the work of a batch and fills the outbox;
    `reject` answers a failed record's requester, if it has one (the shell dead-letters it)."""

    stage: str = "unknown"
    decode_error_code: str = "INTERNAL"  # the code of a record that does not decode (BrokerError says its own)
    # A decoder of the topic's value type with the service's error codes; None: the catalog's type.
    decoder: Callable[[bytes], T] | None = None

    async def process(self, records: list[Record[T]], outbox: Outbox) -> None:
        raise NotImplementedError

    def ids(self, record: Record[T | None]) -> tuple[str | None, str | None, str | None]:
        """(msgid, infno, fixmedins_code) of a record for its dead letter; None where unknown
        (by default the decoded value's fields of those names)."""
        return tuple(getattr(record.value, name, None) for name in ("msgid", "infno", "fixmedins_code"))  # type: ignore[return-value]

    def reject(self, record: Record[T | None], code: str, err_msg: str, outbox: Outbox) -> None:
        """Answer the requester of a failed record (default: nobody waits for an answer)."""


def catalog_decoder(spec: TopicSpec) -> Callable[[bytes], Any]:
    """The decoder of the topic's declared value type."""
    return msgspec.json.Decoder(spec.value).decode


class Backoff:
    """Capped exponential backoff: 0.1 s, 0.2 s, 0.4 s … 2 s, 2 s …"""

    def __init__(self, first_s: float = BACKOFF_FIRST_S, max_s: float = BACKOFF_MAX_S) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.attempts = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.first_s * 2 ** min(self.attempts, 16))
        self.attempts += 1
        return delay

    async def wait(self, stop: asyncio.Event) -> None:
        await sleep_or_stop(stop, self.next_delay())


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def until_up(what: str, start: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T | None:
    """Retry an infrastructure step (connect a pool, start a client) until it works; None if stopped."""
    backoff = Backoff()
    while not stop.is_set():
        try:
            return await start()
        except Exception as e:
            if classify(e) is FailureKind.RECORD and not isinstance(e, asyncpg.PostgresError):
                raise
            log.warning("%s not available (%s); retrying", what, type(e).__name__)
            await backoff.wait(stop)
    return None


def error_text(exc: BaseException) -> str:
    """The class of an error and the database's own message — no record values (asyncpg's detail,
    which may quote the row, is left out)."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})"
    return type(exc).__name__


async def isolate(records: list[Record[T]], process: Callable[[list[Record[T]], Outbox], Awaitable[None]],
                  reject: Callable[[Record[T], str, str, Exception, Outbox], None], outbox: Outbox,
                  on_record_failure: Callable[[BaseException], None] = lambda e: None) -> None:
    """Process `records` into `outbox`; on a record failure redo without the culprit — named by
    `RecordFailed`, else found by halving. Infrastructure failures propagate (the caller retries)."""
    pending = list(records)
    while pending:
        attempt = Outbox(outbox.stage)
        try:
            await process(pending, attempt)
        except Exception as e:
            if classify(e) is FailureKind.INFRASTRUCTURE:
                raise
            on_record_failure(e)
            if isinstance(e, RecordFailed) and any(r is e.record for r in pending):
                reject(e.record, e.code, e.err_msg, e, outbox)
                pending = [r for r in pending if r is not e.record]
                continue
            if len(pending) == 1:
                text = f"INTERNAL: the record could not be applied ({error_text(e)})"
                reject(pending[0], "INTERNAL", text, e, outbox)
                return
            middle = len(pending) // 2
            # In order: a person's records stay in the order of their partition.
            await isolate(pending[:middle], process, reject, outbox, on_record_failure)
            await isolate(pending[middle:], process, reject, outbox, on_record_failure)
            return
        outbox.records += attempt.records
        return


class BatchConsumer(Generic[T]):
    """One consumer group over one topic, around a `BatchProcessor`; the producer may be shared."""

    def __init__(self, consumer: AIOKafkaConsumer, group_id: str, spec: TopicSpec, processor: BatchProcessor[T],
                 producer: AIOKafkaProducer, *, max_records: int, watchdog: ProgressWatchdog | None = None) -> None:
        self.consumer = consumer
        self.group_id = group_id
        self.spec = spec
        self.processor = processor
        self.producer = producer
        self.max_records = max_records
        self.decode: Callable[[bytes], T] = processor.decoder or catalog_decoder(spec)
        self.watchdog = watchdog
        # True while a poll's processing waits for the database or the broker to come back, and while a batch
        # is being processed (a month's close may take long): the watchdog leaves a shell at work alone and
        # judges only what waits on Kafka's clients — the poll, the acks, the commit.
        self.retrying = False
        self.processing = False
        self.committer = OffsetCommitter(consumer, group_id)

    async def run(self, stop: asyncio.Event) -> None:
        await until_up(f"{self.group_id} consumer", self.consumer.start, stop)
        if stop.is_set():
            return
        guard = None if self.watchdog is None else asyncio.create_task(
            self.watchdog.guard(self.group_id, [self.spec.name], stop,
                                exempt=lambda: self.retrying or self.processing))
        try:
            backoff = Backoff()
            while not stop.is_set():
                try:
                    batches = await self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=self.max_records)
                except KafkaError as e:
                    self._infrastructure(e)
                    await backoff.wait(stop)
                    continue
                backoff = Backoff()
                if batches:
                    self._observe_wait(batches)
                    await self.handle(batches, stop)
        finally:
            if guard is not None:
                guard.cancel()
            await self.committer.flush()
            await self.consumer.stop()

    async def handle(self, batches: dict[TopicPartition, list[ConsumerRecord]], stop: asyncio.Event) -> bool:
        """Process, publish and commit one poll; True when done (False: stopped while retrying)."""
        backoff = Backoff()
        while True:
            try:
                started = time.perf_counter()
                self.processing = True
                try:
                    outbox = await self.process_batch([rec for recs in batches.values() for rec in recs])
                finally:
                    self.processing = False
                processed = time.perf_counter()
                await publish(self.producer, outbox)
                self.retrying = False
                self._step("process", processed - started)
                self._step("publish", time.perf_counter() - processed)
                break
            except Exception as e:
                # `process_batch` isolates record failures: what is left is the database or the broker
                # (or a bug of publishing, which is retried too rather than stopping the service).
                self._infrastructure(e)
                self.retrying = True
                if stop.is_set():
                    return False  # not committed: the next owner replays
                await backoff.wait(stop)
        self.committer.add({tp: recs[-1].offset + 1 for tp, recs in batches.items()})
        return True

    async def process_batch(self, raws: list[ConsumerRecord]) -> Outbox:
        """Decode, then process with culprits isolated; raises only infrastructure failures."""
        outbox = Outbox(self.processor.stage)
        decoded: list[Record[T]] = []
        for raw in raws:
            try:
                decoded.append(Record(raw, self.decode(raw.value)))
            except Exception as e:
                self._record_failure(e)
                if isinstance(e, BrokerError):
                    code, text = e.code, e.err_msg
                else:
                    code = self.processor.decode_error_code
                    text = f"{code}: undecodable {self.spec.name} record: {_decode_reason(e)}"
                self._reject(Record(raw, None), code, text, e, outbox)
        await isolate(decoded, self.processor.process, self._reject, outbox, self._record_failure)
        return outbox

    def _reject(self, record: Record[Any], code: str, err_msg: str, exc: Exception, outbox: Outbox) -> None:
        if not isinstance(exc, RecordFailed | BrokerError | msgspec.DecodeError | msgspec.ValidationError):
            log.warning("%s: record at %s-%d offset %d failed (%s); answered %s and dead-lettered",
                        self.group_id, record.raw.topic, record.raw.partition, record.raw.offset,
                        error_text(exc), code)
        msgid, infno, fixmedins_code = self.processor.ids(record)
        self.processor.reject(record, code, err_msg, outbox)
        outbox.dead_letter(code, err_msg, record.raw.value, msgid=msgid, infno=infno, fixmedins_code=fixmedins_code,
                           stage=exc.stage if isinstance(exc, RecordFailed) else None)

    def _observe_wait(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        oldest_ms = min(recs[0].timestamp for recs in batches.values())  # the producer's CreateTime
        self._step("wait", max(0.0, time.time() - oldest_ms / 1000))

    def _step(self, step: str, seconds: float) -> None:
        STEP_SECONDS.labels(self.group_id, step).observe(seconds)

    def _record_failure(self, e: BaseException) -> None:
        FAILURES.labels(self.group_id, FailureKind.RECORD.value, type(e).__name__).inc()

    def _infrastructure(self, e: BaseException) -> None:
        FAILURES.labels(self.group_id, FailureKind.INFRASTRUCTURE.value, type(e).__name__).inc()
        log.warning("%s: infrastructure failure (%s); retrying", self.group_id, type(e).__name__)


class OffsetCommitter:
    """Commits acknowledged batches' offsets in the background, one commit at a time and at most one per
    `min_interval_s`: the next batch does not wait for the coordinator's round trip, and the offsets of
    batches acknowledged meanwhile go out together in the next commit. Only offsets whose output was
    acknowledged are ever handed to it."""

    def __init__(self, consumer: AIOKafkaConsumer, group_id: str,
                 min_interval_s: float = COMMIT_MIN_INTERVAL_S) -> None:
        self.consumer = consumer
        self.group_id = group_id
        self.min_interval_s = min_interval_s
        self.pending: dict[TopicPartition, int] = {}
        self.task: asyncio.Task[None] | None = None
        self.hurry = asyncio.Event()  # set by flush(): the last offsets go out without waiting

    def add(self, offsets: dict[TopicPartition, int]) -> None:
        self.pending.update(offsets)  # a partition's latest batch: acknowledged, as every earlier one
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._commit())

    async def _commit(self) -> None:
        while self.pending:
            offsets, self.pending = self.pending, {}
            started = time.perf_counter()
            try:
                await self.consumer.commit(offsets)
                STEP_SECONDS.labels(self.group_id, "commit").observe(time.perf_counter() - started)
            except (CommitFailedError, KafkaError) as e:
                # Partitions moved: the new owner replays these records; every service is idempotent.
                log.warning("%s: offset commit failed (%s); the new owner will replay", self.group_id,
                            type(e).__name__)
            rest = self.min_interval_s - (time.perf_counter() - started)
            if rest > 0 and not self.hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.hurry.wait(), rest)

    async def flush(self) -> None:
        """Wait until every offset handed over is committed (or its commit failed)."""
        self.hurry.set()
        while self.task is not None and not self.task.done():
            await self.task
        self.hurry.clear()  # the commits after a flush keep the interval


def _decode_reason(e: Exception) -> str:
    return str(e) if isinstance(e, msgspec.DecodeError | msgspec.ValidationError) else type(e).__name__


async def publish(producer: AIOKafkaProducer, outbox: Outbox) -> None:
    """Hand every record to the producer, then wait for all acknowledgements."""
    futures = []
    for out in outbox.records:
        try:
            futures.append(await producer.send(out.topic, out.value, key=out.key, partition=out.partition,
                                               headers=out.headers))
        except KafkaError:
            record_produce_error(out.topic)
            raise
    results = await asyncio.gather(*futures, return_exceptions=True)
    failed = [(out.topic, r) for out, r in zip(outbox.records, results, strict=True) if isinstance(r, BaseException)]
    for topic, _ in failed:
        record_produce_error(topic)
    if failed:
        raise failed[0][1]
