"""topics.apply on the real broker: a group that took a topic over from another starts where that one left off.

The settlement stage (group xsettle-settle) replaced the router (xsettle-router) as the reader of fsi.ingress;
on a running deployment it must not start at the topic's beginning and replay a week of requests."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common.config import Settings
from services.common.kafka import make_admin
from topics.apply import adopt_predecessor_offsets, commit_offsets

pytestmark = pytest.mark.integration


@pytest.fixture
async def own(stack: Settings) -> AsyncIterator[tuple[Settings, AIOKafkaAdminClient]]:
    """Settings of a prefix of this test's own, with its fsi.ingress (2 partitions) on the real broker."""
    s = dataclasses.replace(stack, topic_prefix=f"adopt{time.time_ns() % 10**12}.")
    admin = make_admin(s)
    await admin.start()
    ingress = s.topic_prefix + "fsi.ingress"
    await admin.create_topics([NewTopic(ingress, 2, 1)], timeout_ms=15_000)
    try:
        yield s, admin
    finally:
        await admin.delete_topics([ingress], timeout_ms=15_000)
        await admin.close()


async def _commit(s: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    await commit_offsets(s, s.topic_prefix + group, offsets)


async def _offsets(admin: AIOKafkaAdminClient, s: Settings, group: str) -> dict[tuple[str, int], int]:
    return {(tp.topic, tp.partition): meta.offset
            for tp, meta in (await admin.list_consumer_group_offsets(s.topic_prefix + group)).items()}


async def test_the_stage_starts_where_the_router_left_off_once(own: tuple[Settings, AIOKafkaAdminClient]) -> None:
    s, admin = own
    ingress = s.topic_prefix + "fsi.ingress"
    router, stage = s.topic_prefix + "xsettle-router", s.topic_prefix + "xsettle-settle"
    assert await adopt_predecessor_offsets(admin, s) == []  # no predecessor: nothing to adopt or delete
    await _commit(s, "xsettle-router", {TopicPartition(ingress, 0): 41, TopicPartition(ingress, 1): 7})
    assert await adopt_predecessor_offsets(admin, s) == [
        f"{stage} starts on {ingress} where {router} left off (2 partitions)",
        f"deleted consumer group {router} (retired)"]
    assert await _offsets(admin, s, "xsettle-settle") == {(ingress, 0): 41, (ingress, 1): 7}
    # The retired group is gone: no lag of it grows on the topic, and a second start has nothing to do.
    assert await _offsets(admin, s, "xsettle-router") == {}
    assert router not in {g[0] for g in await admin.list_consumer_groups()}
    assert await adopt_predecessor_offsets(admin, s) == []
    # Once the stage has offsets of its own, the router's are never taken again (a router left running by
    # mistake and committing again is only deleted).
    await _commit(s, "xsettle-settle", {TopicPartition(ingress, 0): 50})
    await _commit(s, "xsettle-router", {TopicPartition(ingress, 0): 99})
    assert await adopt_predecessor_offsets(admin, s) == [f"deleted consumer group {router} (retired)"]
    assert (await _offsets(admin, s, "xsettle-settle"))[(ingress, 0)] == 50
