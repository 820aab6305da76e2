"""The progress watchdog against the real broker: a group with records waiting and a committed offset that
does not move is reported once `stall_s` has passed; a group that moves, one that is caught up, and one that
waits on purpose are left alone. (When a group counts as stuck: tests/unit/test_watchdog.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.structs import OffsetAndMetadata

from deploy import kafka as cluster
from services.common.config import Settings
from services.common.kafka import ADMIN, client_auth, make_admin
from services.common.watchdog import ProgressWatchdog

pytestmark = pytest.mark.integration

TOPIC = "watchdog.records"  # under the run's prefix
RECORDS_PER_PARTITION = 5
STALL_S = 3.0
CHECK_S = 0.5


@pytest.fixture(scope="module")
async def topic(stack: Settings) -> AsyncIterator[str]:
    """A two-partition topic of this module with five records on each partition."""
    name = stack.topic_prefix + TOPIC
    admin = make_admin(stack, request_timeout_ms=10_000)
    await admin.start()
    if name not in await admin.list_topics():
        await admin.create_topics([NewTopic(name, 2, cluster.replication_factor(stack))])
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap, **client_auth(stack, ADMIN), acks="all")
    await producer.start()
    for p in (0, 1):
        for i in range(RECORDS_PER_PARTITION):
            await producer.send_and_wait(name, f"r{i}".encode(), partition=p)
    await producer.stop()
    yield name
    await admin.delete_topics([name])
    await admin.close()


async def _commit(s: Settings, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit offsets for `group` (its full name) as a member-less group does (no subscription, no join)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in offsets]
        consumer.assign(tps)
        await consumer.commit({tp: OffsetAndMetadata(offsets[tp.partition], "") for tp in tps})
    finally:
        await consumer.stop()


async def _guard(s: Settings, group: str, topic: str, seconds: float, exempt: bool = False) -> list[str]:
    """What the watchdog reports on `group` within `seconds` (it stops at its first report)."""
    reports: list[str] = []
    watchdog = ProgressWatchdog(s, ADMIN, stall_s=STALL_S, check_every_s=CHECK_S, on_stall=reports.append)
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog.guard(group, [topic], stop, exempt=lambda: exempt))
    try:
        await asyncio.wait_for(asyncio.shield(task), seconds)
    except TimeoutError:
        stop.set()
        await task
    finally:
        await watchdog.close()
    return reports


async def test_a_group_that_does_not_move_is_reported_with_what_waits(stack: Settings, topic: str) -> None:
    group = "watchdog-stuck"
    await _commit(stack, stack.topic_prefix + group, topic, {0: 2, 1: RECORDS_PER_PARTITION})
    reports = await _guard(stack, group, topic, seconds=STALL_S + 15)
    assert reports == [f"consumer group {group}: 1 partition(s) with 3 record(s) waiting and no committed "
                       f"progress for {STALL_S:.0f} s"]


async def test_a_group_never_committed_on_a_topic_with_records_is_reported(stack: Settings, topic: str) -> None:
    reports = await _guard(stack, "watchdog-never", topic, seconds=STALL_S + 15)
    assert reports == [f"consumer group watchdog-never: 2 partition(s) with {2 * RECORDS_PER_PARTITION} "
                       f"record(s) waiting and no committed progress for {STALL_S:.0f} s"]


async def test_a_caught_up_group_is_left_alone(stack: Settings, topic: str) -> None:
    group = "watchdog-caught-up"
    await _commit(stack, stack.topic_prefix + group, topic, {0: RECORDS_PER_PARTITION, 1: RECORDS_PER_PARTITION})
    assert await _guard(stack, group, topic, seconds=3 * STALL_S) == []


async def test_a_group_that_moves_is_left_alone(stack: Settings, topic: str) -> None:
    group = "watchdog-moving"
    full = stack.topic_prefix + group
    await _commit(stack, full, topic, {0: 0, 1: RECORDS_PER_PARTITION})

    async def creep() -> None:  # one record of partition 0 every stall_s / 2: slow, never stuck
        for offset in range(1, RECORDS_PER_PARTITION + 1):
            await asyncio.sleep(STALL_S / 2)
            await _commit(stack, full, topic, {0: offset})

    mover = asyncio.create_task(creep())
    reports = await _guard(stack, group, topic, seconds=(RECORDS_PER_PARTITION + 1) * STALL_S / 2)
    await mover
    assert reports == []


async def test_a_group_that_waits_on_purpose_is_left_alone(stack: Settings, topic: str) -> None:
    group = "watchdog-waiting"
    await _commit(stack, stack.topic_prefix + group, topic, {0: 0, 1: 0})
    assert await _guard(stack, group, topic, seconds=3 * STALL_S, exempt=True) == []
