"""Consumers ask the broker less often while quiet, and a record after a quiet spell is not held up.

Real Kafka: a group consumer (make_group_consumer, as every service's) on a topic of its own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import NewTopic

from services.common import kafka
from services.common.config import Settings
from services.common.kafka import ADMIN, QuietAwareConsumer, client_auth, make_admin, make_group_consumer

QUIET_WAIT_MS = 5_000  # far longer than the bounds below: a held-up record could not pass them


@pytest.fixture
async def topic(stack: Settings) -> AsyncIterator[str]:
    name = stack.topic_prefix + "xsettle.test.quiet-fetch"
    admin = make_admin(stack)
    await admin.start()
    try:
        if name not in await admin.list_topics():
            await admin.create_topics([NewTopic(name, num_partitions=4, replication_factor=1)])
        yield name
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def at_the_end(stack: Settings, topic: str, group: str, *, background: bool = False
                     ) -> AsyncIterator[tuple[QuietAwareConsumer, AIOKafkaProducer]]:
    """A group consumer with its partitions assigned and positioned at their ends (records of an earlier run
    of these tests are not this run's), and a producer."""
    consumer = make_group_consumer(stack, ADMIN, group, topic, background=background)
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, **client_auth(stack, ADMIN), acks="all")
    await consumer.start()
    await producer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=200)
        ends = await consumer.end_offsets(list(consumer.assignment()))
        for tp, offset in ends.items():
            consumer.seek(tp, offset)
        yield consumer, producer
    finally:
        await producer.stop()
        await consumer.stop()


async def get_records(consumer: QuietAwareConsumer, want: int, timeout_s: float) -> list[bytes]:
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < want and time.monotonic() < deadline:
        for records in (await consumer.getmany(timeout_ms=50)).values():
            values += [r.value for r in records]
    return values


async def test_quiet_consumer_holds_fetches_longer_and_answers_at_once(
        stack: Settings, topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka, "QUIET_AFTER_S", 1.0)
    monkeypatch.setattr(kafka, "QUIET_FETCH_WAIT_MS", QUIET_WAIT_MS)
    at_once = dataclasses.replace(stack, request_gather_ms=0)  # the request path without a gather window
    async with at_the_end(at_once, topic, "xsettle-test-quiet-fetch") as (consumer, producer):
        assert consumer.fetch_wait_ms == kafka.IDLE_FETCH_WAIT_MS
        await get_records(consumer, 1, 1.5)  # nothing comes: quiet for longer than QUIET_AFTER_S
        assert consumer.fetch_wait_ms == QUIET_WAIT_MS

        # A quiet spell's held fetch covers every partition: the broker answers it when a record arrives.
        await asyncio.sleep(0.5)  # the 5 s fetch is held now
        sent = time.monotonic()
        await producer.send_and_wait(topic, b"after-quiet", key=b"visit-1")
        assert await get_records(consumer, 1, 4.0) == [b"after-quiet"]
        assert time.monotonic() - sent < 2.5
        assert consumer.fetch_wait_ms == kafka.IDLE_FETCH_WAIT_MS  # records flow: the short wait again

        # The visit's next request, same key and partition, right after: not held up either.
        sent = time.monotonic()
        await producer.send_and_wait(topic, b"next", key=b"visit-1")
        assert await get_records(consumer, 1, 4.0) == [b"next"]
        assert time.monotonic() - sent < 2.5


async def get_batches(consumer: QuietAwareConsumer, want: int, timeout_s: float) -> list[list[bytes]]:
    """The records as each getmany returned them (one fetch's records may come in one call or several)."""
    batches: list[list[bytes]] = []
    deadline = time.monotonic() + timeout_s
    while sum(map(len, batches)) < want and time.monotonic() < deadline:
        got = [r.value for records in (await consumer.getmany(timeout_ms=50)).values() for r in records]
        if got:
            batches.append(got)
    return batches


async def test_a_background_consumer_wakes_for_batches_and_still_sees_a_lone_record_within_its_bound(
        stack: Settings, topic: str) -> None:
    async with at_the_end(stack, topic, "xsettle-test-background-fetch", background=True) as (consumer, producer):
        await get_records(consumer, 1, 1.0)  # the first fetches from the new positions are out

        # Twenty records 20 ms apart, one partition: the broker holds the fetch for its minimum bytes or
        # the wait, so they come in a few batches (a request-path consumer takes most of them one by one).
        reading = asyncio.create_task(get_batches(consumer, 20, 5.0))
        for i in range(20):
            await producer.send_and_wait(topic, b"r%d" % i, key=b"visit-2")
            await asyncio.sleep(0.02)
        batches = await reading
        assert sorted(v for b in batches for v in b) == sorted(b"r%d" % i for i in range(20))
        assert len(batches) <= 4, [len(b) for b in batches]

        # A lone record after a quiet spell: within the quiet wait (1 s), with room for a busy machine.
        await get_records(consumer, 1, kafka.QUIET_AFTER_S + 0.5)
        assert consumer.fetch_wait_ms == kafka.QUIET_FETCH_WAIT_MS
        sent = time.monotonic()
        await producer.send_and_wait(topic, b"lone", key=b"visit-3")
        assert await get_records(consumer, 1, 4.0) == [b"lone"]
        assert time.monotonic() - sent < kafka.QUIET_FETCH_WAIT_MS / 1000 + 1.0


async def test_a_gathering_request_consumer_takes_batches_and_a_request_after_a_quiet_spell_at_once(
        stack: Settings, topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka, "QUIET_AFTER_S", 1.0)
    monkeypatch.setattr(kafka, "QUIET_FETCH_WAIT_MS", QUIET_WAIT_MS)
    gathering = dataclasses.replace(stack, request_gather_ms=100)
    async with at_the_end(gathering, topic, "xsettle-test-gathering-fetch") as (consumer, producer):
        assert (consumer.fetch_min_bytes, consumer.fetch_wait_ms) == (kafka.REQUEST_GATHER_MIN_BYTES, 100)
        await get_records(consumer, 1, 0.5)

        # Twenty records 10 ms apart on one partition: the broker holds each fetch for the window, so they
        # come in a few batches.
        reading = asyncio.create_task(get_batches(consumer, 20, 5.0))
        for i in range(20):
            await producer.send_and_wait(topic, b"g%d" % i, key=b"visit-4")
            await asyncio.sleep(0.01)
        batches = await reading
        assert [v for b in batches for v in b] == [b"g%d" % i for i in range(20)]
        assert len(batches) <= 6, [len(b) for b in batches]

        # Quiet: the held fetch asks for one byte, so a request after the spell does not wait out the 5 s.
        await get_records(consumer, 1, 1.5)
        assert (consumer.fetch_min_bytes, consumer.fetch_wait_ms) == (1, QUIET_WAIT_MS)
        await asyncio.sleep(0.5)  # the quiet fetch is held now
        sent = time.monotonic()
        await producer.send_and_wait(topic, b"after-quiet", key=b"visit-4")
        assert await get_records(consumer, 1, 4.0) == [b"after-quiet"]
        assert time.monotonic() - sent < 2.5
        assert (consumer.fetch_min_bytes, consumer.fetch_wait_ms) == (kafka.REQUEST_GATHER_MIN_BYTES, 100)
