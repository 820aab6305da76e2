"""The consumer shell's pure parts: which failures are the record's and which the infrastructure's,
and the isolation of the records that fail (named, or found by halving) with the rest kept in order."""

from __future__ import annotations

import asyncio

import asyncpg
import msgspec
import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaConnectionError, NotCoordinatorForGroupError
from asyncpg.exceptions import _base as asyncpg_base

from schemas.errors import BrokerError
from services.common.consumer import Backoff, FailureKind, Outbox, Record, RecordFailed, classify, isolate


def _pg(cls: type[asyncpg.PostgresError], sqlstate: str) -> asyncpg.PostgresError:
    e = cls("refused")
    e.sqlstate = sqlstate  # type: ignore[attr-defined]
    return e


@pytest.mark.parametrize("exc", [
    _pg(asyncpg.CharacterNotInRepertoireError, "22021"),
    _pg(asyncpg.NumericValueOutOfRangeError, "22003"),
    _pg(asyncpg.StringDataRightTruncationError, "22001"),
    _pg(asyncpg.UniqueViolationError, "23505"),
    _pg(asyncpg.CheckViolationError, "23514"),
    asyncpg_base.DataError("invalid input for query argument $1"),
    UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    msgspec.DecodeError("JSON is malformed"),
    msgspec.ValidationError("Expected `str`, got `int`"),
    BrokerError("BODY_MALFORMED", "BODY_MALFORMED: x"),
    KeyError("a bug"),
    ZeroDivisionError(),
])
def test_record_failures(exc: BaseException) -> None:
    assert classify(exc) is FailureKind.RECORD


@pytest.mark.parametrize("exc", [
    ConnectionRefusedError(111, "refused"),
    ConnectionResetError(),
    TimeoutError(),
    TimeoutError(),
    _pg(asyncpg.CannotConnectNowError, "57P03"),
    _pg(asyncpg.AdminShutdownError, "57P01"),
    _pg(asyncpg.ConnectionDoesNotExistError, "08003"),
    _pg(asyncpg.DeadlockDetectedError, "40P01"),
    _pg(asyncpg.SerializationError, "40001"),
    _pg(asyncpg.TooManyConnectionsError, "53300"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg_base.InternalClientError("protocol state"),
    KafkaConnectionError(),
    NotCoordinatorForGroupError(),
])
def test_infrastructure_failures(exc: BaseException) -> None:
    assert classify(exc) is FailureKind.INFRASTRUCTURE


def _records(*values: str) -> list[Record[str]]:
    return [Record(ConsumerRecord("t", 0, i, 0, 0, None, v.encode(), None, 0, 0, []), v)
            for i, v in enumerate(values)]


class Ledger:
    """A stand-in database for a batch: refuses (DataError) any batch containing a value starting with
    'x', applies a batch all or nothing, and counts the attempts."""

    def __init__(self, named: set[str] = frozenset(), infra_on: str | None = None) -> None:  # type: ignore[assignment]
        self.applied: list[str] = []
        self.attempts = 0
        self.named = named
        self.infra_on = infra_on

    async def process(self, records: list[Record[str]], outbox: Outbox) -> None:
        self.attempts += 1
        for r in records:
            if r.value == self.infra_on:
                raise ConnectionResetError()
            if r.value in self.named:
                raise RecordFailed(r, "INTERNAL", f"INTERNAL: {r.value}")
            outbox.add("replies", r.value.encode())
        if any(r.value.startswith("x") for r in records):
            raise _pg(asyncpg.CharacterNotInRepertoireError, "22021")
        self.applied += [r.value for r in records]


def _run(ledger: Ledger, records: list[Record[str]]) -> tuple[Outbox, list[tuple[str, str]]]:
    rejected: list[tuple[str, str]] = []
    outbox = Outbox("test")

    def reject(rec: Record[str], code: str, err_msg: str, exc: Exception, out: Outbox) -> None:
        rejected.append((rec.value, code))
        out.add("rejections", rec.value.encode())

    asyncio.run(isolate(records, ledger.process, reject, outbox))
    return outbox, rejected


def test_refused_records_are_found_by_halving_and_the_rest_applied_in_order() -> None:
    ledger = Ledger()
    outbox, rejected = _run(ledger, _records("a", "b", "x1", "c", "d", "e", "x2", "f"))
    assert rejected == [("x1", "INTERNAL"), ("x2", "INTERNAL")]
    assert ledger.applied == ["a", "b", "c", "d", "e", "f"]
    # Only what was applied is published (the failed attempts' outboxes are dropped), in order.
    assert [(o.topic, o.value.decode()) for o in outbox.records] == [
        ("replies", "a"), ("replies", "b"), ("rejections", "x1"), ("replies", "c"), ("replies", "d"),
        ("replies", "e"), ("rejections", "x2"), ("replies", "f")]
    assert ledger.attempts <= 1 + 2 * 2 * 3  # log2(8) levels, two culprits


def test_a_named_culprit_is_left_out_without_halving() -> None:
    ledger = Ledger(named={"b"})
    _, rejected = _run(ledger, _records("a", "b", "c"))
    assert rejected == [("b", "INTERNAL")]
    assert ledger.applied == ["a", "c"]
    assert ledger.attempts == 2


def test_a_batch_without_failures_is_one_attempt() -> None:
    ledger = Ledger()
    outbox, rejected = _run(ledger, _records("a", "b"))
    assert (rejected, ledger.applied, ledger.attempts, len(outbox.records)) == ([], ["a", "b"], 1, 2)


def test_an_infrastructure_failure_is_not_isolated_but_raised() -> None:
    ledger = Ledger(infra_on="b")
    with pytest.raises(ConnectionResetError):
        _run(ledger, _records("a", "x", "b"))  # raised at once: not the records' fault
    assert ledger.applied == []


def test_backoff_is_exponential_and_capped() -> None:
    b = Backoff(0.1, 2.0)
    assert [round(b.next_delay(), 3) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]


def test_client_log_throttle_passes_one_of_each_message_per_period_as_warning() -> None:
    import logging

    from services.common.lifecycle import ClientLogThrottle

    throttle = ClientLogThrottle(period_s=60)

    def rec(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, (1,), None)

    first = rec("aiokafka.conn", "Unable connect to node with id %s")
    assert throttle.filter(first) and first.levelname == "WARNING"
    assert not throttle.filter(rec("aiokafka.conn", "Unable connect to node with id %s"))
    assert throttle.filter(rec("aiokafka.cluster", "Unable to update metadata from %s"))
    assert throttle.filter(rec("settle", "our own line")) and throttle.filter(rec("settle", "our own line"))
    # INFO by its text: each group's join passes once per period, a repeat of the same one does not
    joined = "Joined group %s (generation %s)"
    assert throttle.filter(logging.LogRecord("aiokafka.consumer", logging.INFO, __file__, 1, joined, ("a", 1), None))
    assert throttle.filter(logging.LogRecord("aiokafka.consumer", logging.INFO, __file__, 1, joined, ("b", 1), None))
    assert not throttle.filter(logging.LogRecord("aiokafka.consumer", logging.INFO, __file__, 1, joined, ("b", 1),
                                                 None))
