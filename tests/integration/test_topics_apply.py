"""topics.apply on the real broker: a group that took a topic over from another starts where that one left off,
and what the code retired leaves the broker.

The settlement stage (group xsettle-settle) replaced the router (xsettle-router) as the reader of fsi.ingress;
on a running deployment it must not start at the topic's beginning and replay a week of requests, and the
router's credential, rules, password file and fsi.routed must not stay behind."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common.config import Settings
from services.common.kafka import ADMIN, make_admin, make_group_consumer
from services.common.secrets import password, secrets_dir
from topics.acls import user
from topics.apply import adopt_predecessor_offsets, commit_offsets, retire
from topics.security import (
    LITERAL,
    OP_READ,
    OP_WRITE,
    TOPIC,
    Acl,
    acls_on,
    create_acls,
    set_passwords,
    users_with_credentials,
    wait_for_acls,
)

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


async def test_a_group_whose_static_member_lingers_is_taken_over_once_the_member_is_gone(
        own: tuple[Settings, AIOKafkaAdminClient]) -> None:
    """As after an upgrade's restart: the broker brings the stopped engine's static member back into the stage's
    group until its session times out, and a commit from outside the group is refused meanwhile — the
    adoption waits for it instead of failing the stack's start."""
    s, admin = own
    ingress = s.topic_prefix + "fsi.ingress"
    member = make_group_consumer(s, ADMIN, "xsettle-settle", ingress)  # static: group_instance_id set
    await member.start()
    try:
        deadline = time.monotonic() + 30
        while not member.assignment():
            assert time.monotonic() < deadline, "the static member got no partitions"
            await member.getmany(timeout_ms=200)
    finally:
        await member.stop()  # a static member does not leave: it stays until its session times out
    await _commit(s, "xsettle-router", {TopicPartition(ingress, 0): 12, TopicPartition(ingress, 1): 3})
    started = time.monotonic()
    assert await adopt_predecessor_offsets(admin, s) == [
        f"{s.topic_prefix}xsettle-settle starts on {ingress} where {s.topic_prefix}xsettle-router left off "
        "(2 partitions)", f"deleted consumer group {s.topic_prefix}xsettle-router (retired)"]
    assert await _offsets(admin, s, "xsettle-settle") == {(ingress, 0): 12, (ingress, 1): 3}
    assert time.monotonic() - started > 2, "the member was gone at once: the wait was not exercised"


async def test_the_retired_router_leaves_no_credential_rule_password_or_topic(
        own: tuple[Settings, AIOKafkaAdminClient], tmp_path: Path) -> None:
    """A deployment upgraded from the two-stage design still has the router's SCRAM user, its rules, its
    password file and fsi.routed: one apply removes them all, a second finds nothing to do."""
    s, admin = own
    s = dataclasses.replace(s, state_dir=tmp_path)  # the password file of this test's own
    routed = s.topic_prefix + "fsi.routed"
    await admin.create_topics([NewTopic(routed, 1, 1)], timeout_ms=15_000)
    rules = [Acl(user("router"), TOPIC, s.topic_prefix + "fsi.ingress", LITERAL, OP_READ),
             Acl(user("router"), TOPIC, routed, LITERAL, OP_WRITE)]
    await set_passwords(admin, {"router": password(s, "kafka-router")})
    await create_acls(admin, rules)
    await wait_for_acls(admin, rules)

    done = await retire(admin, s, set(await admin.list_topics()))
    assert done == ["deleted 2 ACLs of retired principals", "deleted retired Kafka users router",
                    f"deleted {secrets_dir(s) / 'kafka-router.password'}", f"deleted retired topics {routed}"]
    assert not await users_with_credentials(admin, ["router"])
    assert not {a for a in await acls_on(admin) if a.principal == user("router")}
    assert not (secrets_dir(s) / "kafka-router.password").exists()
    for _ in range(100):  # the controller deletes the topic a moment after it answered
        if routed not in await admin.list_topics():
            break
        await asyncio.sleep(0.1)
    assert routed not in await admin.list_topics()
    assert await retire(admin, s, set(await admin.list_topics())) == []
