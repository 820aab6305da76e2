"""Apply the topic catalog to the broker: create what is missing, align configs; create the SCRAM
users of the services that have none yet and the ACLs of the topic prefix (topics/acls.py); remove the
principals and topics the code retired (`retire`).

Idempotent. Never shrinks or grows partitions of an existing topic silently:
changing a keyed topic's partition count moves persons between partitions and
would break per-person ordering for records in flight, so it is reported.

    python -m topics.apply [--bootstrap 127.0.0.1:19092]   # the topics of Settings (XS_TOPIC_PREFIX ...)

It authenticates as `admin` (the stack's super user).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
    for_code,
)
from aiokafka.errors import NonEmptyGroup as NonEmptyGroupError
from aiokafka.protocol.admin import DeleteGroupsRequest
from aiokafka.structs import OffsetAndMetadata

from services.common.config import Settings, load_settings
from services.common.kafka import ADMIN, SERVICE_PRINCIPALS, SESSION_TIMEOUT_MS, client_auth, make_admin
from services.common.secrets import password, secrets_dir
from topics.acls import INGRESS as INGRESS_NAME
from topics.acls import SETTLE_GROUP, prefix_acls, user
from topics.catalog import TopicSpec, catalog
from topics.security import (
    acls_on,
    create_acls,
    delete_acls,
    delete_users,
    set_passwords,
    users_with_credentials,
    wait_for_acls,
)


async def ensure_users(admin: AIOKafkaAdminClient, s: Settings) -> list[str]:
    """Gives each service principal without a SCRAM credential its generated password; returns them."""
    missing = sorted(set(SERVICE_PRINCIPALS) - await users_with_credentials(admin, SERVICE_PRINCIPALS))
    await set_passwords(admin, {name: password(s, f"kafka-{name}") for name in missing})
    return missing


T = TypeVar("T")

# A group that took over a topic from another (without prefix): (group, topic) -> the group it succeeds. The
# settlement stage reads fsi.ingress where the router, which it replaced on 2026-12-01, had got to.
SUCCESSORS = {(SETTLE_GROUP, INGRESS_NAME): "xsettle-router"}


# What the code no longer has, removed at the next apply of a deployment that still holds it: the router's
# principal and fsi.routed, whose work the settlement stage took over on 2026-12-01. A credential nothing uses
# may still read every request of fsi.ingress: its SCRAM credential, its rules (of any prefix: a principal is
# the broker's) and its password file go.
RETIRED_PRINCIPALS = ("router",)
RETIRED_TOPICS = ("fsi.routed",)


async def retire(admin: AIOKafkaAdminClient, s: Settings, existing: set[str]) -> list[str]:
    """Removes the retired principals' rules, credentials and password files, and the retired topics of the
    prefix of `s` among `existing`; returns what was done."""
    done = []
    principals = {user(name) for name in RETIRED_PRINCIPALS}
    rules = sorted(a for a in await acls_on(admin) if a.principal in principals)
    if rules:
        await delete_acls(admin, rules)
        await wait_for_acls(admin, rules, present=False)
        done.append(f"deleted {len(rules)} ACLs of retired principals")
    users = sorted(await users_with_credentials(admin, RETIRED_PRINCIPALS))
    if users:
        await delete_users(admin, users)
        done.append(f"deleted retired Kafka users {', '.join(users)}")
    for name in RETIRED_PRINCIPALS:
        secret = secrets_dir(s) / f"kafka-{name}.password"
        if secret.exists():
            secret.unlink()
            done.append(f"deleted {secret}")
    topics = sorted(s.topic_prefix + t for t in RETIRED_TOPICS if s.topic_prefix + t in existing)
    if topics:
        await admin.delete_topics(topics, timeout_ms=15_000)
        done.append(f"deleted retired topics {', '.join(topics)}")
    return done


async def adopt_predecessor_offsets(admin: AIOKafkaAdminClient, s: Settings) -> list[str]:
    """A successor group with no offsets on its topic starts where its predecessor left off, instead of at the
    topic's beginning (which would replay a week of requests): the predecessor's committed offsets are
    committed for it, once. Then the predecessor is deleted: nothing reads for it any more, and its lag on the
    topic would grow for ever (the monitor's ConsumerLagGrowing alert). Returns what was done."""
    done = []
    for (group, topic), predecessor in SUCCESSORS.items():
        group, old, topic = s.topic_prefix + group, s.topic_prefix + predecessor, s.topic_prefix + topic
        left = {tp: meta.offset for tp, meta in (await _group_offsets(admin, old)).items()}
        if not left:
            continue  # no predecessor (a new deployment), or it is gone already
        if not any(tp.topic == topic for tp in await _group_offsets(admin, group)):
            offsets = {tp: offset for tp, offset in left.items() if tp.topic == topic and offset >= 0}
            if offsets:
                await _when_members_gone(functools.partial(commit_offsets, s, group, offsets))
                done.append(f"{group} starts on {topic} where {old} left off ({len(offsets)} partitions)")
        done.append(await _when_members_gone(functools.partial(_delete_group, admin, old)))
    return done


# A broker restarted with the stack brings its groups' static members back (KIP-345: they never leave) until
# their sessions time out, so a group whose services were stopped has members for its first seconds.
MEMBERS_GONE_WAIT_S = SESSION_TIMEOUT_MS / 1000 + 20


_MEMBERS_STILL_THERE = (CommitFailedError, UnknownMemberIdError, IllegalGenerationError, RebalanceInProgressError,
                        NonEmptyGroupError)


async def _when_members_gone(act: Callable[[], Awaitable[T]]) -> T:
    """Run `act` (a commit from outside the group, or its deletion) once the group has no members."""
    return await _retrying(act, lambda e: isinstance(e, _MEMBERS_STILL_THERE), MEMBERS_GONE_WAIT_S, 1.0)


async def _retrying(act: Callable[[], Awaitable[T]], retry: Callable[[Exception], bool], within_s: float,
                    pause_s: float) -> T:
    """`act`, tried again after `pause_s` while it fails with an error `retry` accepts, for at most `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await act()
        except Exception as e:
            if not retry(e) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(pause_s)


GROUP_ID_NOT_FOUND = 69  # Kafka's error code


async def _delete_group(admin: AIOKafkaAdminClient, group: str) -> str:
    """Delete a consumer group with no members (Kafka's DeleteGroups, which aiokafka's admin client does not
    wrap: sent to the group's coordinator through the client's request method)."""
    coordinator = await admin.find_coordinator(group)
    response = await admin._send_request_to_node(coordinator, DeleteGroupsRequest([group]))
    code = dict(response.results).get(group, 0)
    if code in (0, GROUP_ID_NOT_FOUND):
        return f"deleted consumer group {group} (retired)"
    raise for_code(code)(f"deleting consumer group {group}")  # NonEmptyGroupError while it has members


async def commit_offsets(s: Settings, group: str, offsets: dict[TopicPartition, int]) -> None:
    """Commit `offsets` for `group` (its full name) as admin, from outside the group: Kafka allows it while
    the group has no members (the stack starts its services after topics.apply)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=group, enable_auto_commit=False,
                                **client_auth(s, ADMIN))
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


COORDINATOR_WAIT_S = 60.0


async def _group_offsets(admin: AIOKafkaAdminClient, group: str) -> dict[TopicPartition, OffsetAndMetadata]:
    """The group's committed offsets; waits for its coordinator, which a broker just started (or a new
    cluster creating __consumer_offsets) does not have yet."""
    async def offsets() -> dict[TopicPartition, OffsetAndMetadata]:
        return dict(await admin.list_consumer_group_offsets(group))

    return await _retrying(offsets, lambda e: isinstance(e, KafkaError) and e.retriable, COORDINATOR_WAIT_S, 0.5)


async def apply_topics(s: Settings, specs: tuple[TopicSpec, ...] | None = None,
                       bootstrap: str | None = None) -> list[str]:
    """Topics, users and ACLs of `s`; returns a list of problems (empty when the broker matches)."""
    specs = catalog(s) if specs is None else specs
    admin = make_admin(s, bootstrap=bootstrap)
    await admin.start()
    problems: list[str] = []
    try:
        created = await ensure_users(admin, s)
        if created:
            print(f"created Kafka users {', '.join(created)}")
        existing = set(await admin.list_topics())
        missing = [t for t in specs if t.name not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(t.name, t.partitions, t.replication_factor, topic_configs=t.configs)
                    for t in missing
                ],
                timeout_ms=15_000,
            )
            for t in missing:
                print(f"created topic {t.name} ({t.partitions} partitions)")
        present = [t for t in specs if t.name in existing]
        if present:
            described = {d["topic"]: d for d in await admin.describe_topics([t.name for t in present])}
            for t in present:
                count = len(described[t.name]["partitions"])
                if count != t.partitions:
                    problems.append(f"{t.name} has {count} partitions, the catalog says {t.partitions}")
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, t.name, configs=t.configs) for t in present]
            )
            print(f"{len(present)} topics already present; configs aligned")
        acls = prefix_acls(s)
        await create_acls(admin, acls)
        await wait_for_acls(admin, acls)
        print(f"{len(acls)} ACLs of prefix {s.topic_prefix or '(none)'} in place")
        for line in await adopt_predecessor_offsets(admin, s):
            print(line)
        for line in await retire(admin, s, existing):
            print(line)
    finally:
        await admin.close()
    return problems


def main() -> int:
    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default=settings.kafka_bootstrap)
    args = parser.parse_args()
    problems = asyncio.run(apply_topics(settings, bootstrap=args.bootstrap))
    for p in problems:
        print(f"WARNING: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
