"""The operators' audit trail (hub table `audit_log`, append-only): who did what, when, before and after.

`record` writes one row inside the caller's transaction, so an action and its audit row commit
together or not at all. `before`/`after` are small JSON-able values describing what changed — never a
secret, never a personal identifier (use ids of rows, digests or counts instead). Record the row last
in the transaction: hub migration 0006 makes each insert take a lock held until the transaction ends,
so that audit ids become visible in the order they are numbered.

Every state-changing command line names its operator: `--operator NAME` or `XS_OPERATOR`
(`add_operator_argument`, `operator_or_exit`: without one, a clear error and exit status 2, nothing done).

`publish` copies the rows above the stored watermark (`audit_publish`) to `fsi.audit`, in audit_id order,
key audit_id; the watermark moves only after the broker acknowledged them, so a publisher killed at any
point loses nothing and repeats at most the rows of its last chunk (same key, same bytes). The command
lines publish after their action (`publish_after_action`) and the clearing service every second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import msgspec

from schemas.audit import AuditRecord
from services.common.config import Settings
from services.common.kafka import make_producer

OPERATOR = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
OPERATOR_ENV = "XS_OPERATOR"
PUBLISH_CHUNK_ROWS = 500
PUBLISH_TIMEOUT_S = 30.0

Send = Callable[[bytes, bytes], Awaitable[None]]
_encoder = msgspec.json.Encoder()


class OperatorRequired(ValueError):
    pass


def check_operator(operator: str | None) -> str:
    """The operator identity an action is recorded under (letters, digits, . _ @ -; 1–64)."""
    if not operator or not OPERATOR.match(operator):
        raise OperatorRequired("an operator identity is required (--operator NAME or XS_OPERATOR): "
                               "1-64 of letters, digits, '.', '_', '@', '-'")
    return operator


async def record(conn: asyncpg.Connection | asyncpg.Pool, actor: str, action: str, target: str = "",
                 before: Any = None, after: Any = None) -> int:
    """Append one audit row; returns its id."""
    check_operator(actor)
    return int(await conn.fetchval(
        "INSERT INTO audit_log (actor, action, target, before, after) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)"
        " RETURNING audit_id",
        actor, action, target,
        None if before is None else json.dumps(before, default=str),
        None if after is None else json.dumps(after, default=str)))


# Operator identity on the command line -----------------------------------------------------------


def add_operator_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--operator", metavar="NAME",
                        help=f"who does this, for the audit trail (default: ${OPERATOR_ENV}; required)")


def operator_or_exit(parser: argparse.ArgumentParser, given: str | None,
                     environ: Mapping[str, str] = os.environ) -> str:
    """`--operator`, else XS_OPERATOR, validated; otherwise the parser's error (exit status 2)."""
    try:
        return check_operator(given or environ.get(OPERATOR_ENV))
    except OperatorRequired as exc:
        parser.error(f"{exc}; nothing was done")


# Publishing to fsi.audit --------------------------------------------------------------------------


def audit_record(row: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord(
        audit_id=row["audit_id"], at=row["at"].isoformat(), actor=row["actor"], action=row["action"],
        target=row["target"],
        before=None if row["before"] is None else json.loads(row["before"]),
        after=None if row["after"] is None else json.loads(row["after"]))


async def publish(conn: asyncpg.Connection, topic: str, send: Send) -> int:
    """Send every audit row above `topic`'s watermark, in audit_id order (`send(key, value)` returns once
    the broker acknowledged), moving the watermark after each chunk. Publishers of one topic take turns
    (the watermark row is locked while a chunk is sent). Returns the rows sent."""
    sent = 0
    while True:
        async with conn.transaction():
            await conn.execute("INSERT INTO audit_publish (topic) VALUES ($1) ON CONFLICT DO NOTHING", topic)
            mark = await conn.fetchval("SELECT published_id FROM audit_publish WHERE topic = $1 FOR UPDATE", topic)
            rows = await conn.fetch(
                "SELECT audit_id, at, actor, action, target, before, after FROM audit_log WHERE audit_id > $1"
                " ORDER BY audit_id LIMIT $2", mark, PUBLISH_CHUNK_ROWS)
            for row in rows:
                await send(str(row["audit_id"]).encode(), _encoder.encode(audit_record(row)))
            if rows:
                await conn.execute("UPDATE audit_publish SET published_id = $2, updated_at = now() WHERE topic = $1",
                                   topic, rows[-1]["audit_id"])
        sent += len(rows)
        if len(rows) < PUBLISH_CHUNK_ROWS:
            return sent


def audit_topic(s: Settings) -> str:
    """fsi.audit as `s` names it (a test run's prefix)."""
    # Imported here: the catalog's module constants take the settings of the moment it is first imported,
    # and this module is imported early (by the loader, by tests' conftest before a run sets its prefix).
    from topics.catalog import catalog

    return next(t.name for t in catalog(s) if t.value is AuditRecord)


async def publish_pending(s: Settings, dsn: str | None = None) -> int:
    """Publish what is pending in the hub (`dsn`, default the settings') with a connection and a producer
    of its own (the command lines)."""
    topic = audit_topic(s)
    conn = await asyncpg.connect(dsn or s.pg_dsn, timeout=10)
    producer = make_producer(s, "ops")  # the command lines act as ops
    try:
        await producer.start()

        async def send(key: bytes, value: bytes) -> None:
            await producer.send_and_wait(topic, value, key=key)

        return await publish(conn, topic, send)
    finally:
        await producer.stop()
        await conn.close()


async def publish_after_action(s: Settings, dsn: str | None = None) -> None:
    """After a command's action committed: publish its audit row now. If Kafka is away, say so and carry
    on — the row is committed, and the clearing service publishes it once Kafka is back."""
    try:
        await asyncio.wait_for(publish_pending(s, dsn), PUBLISH_TIMEOUT_S)
    except Exception as exc:  # the action is done; the clearing service publishes the row later
        print(f"audit: row recorded; publishing to fsi.audit failed ({type(exc).__name__}), "
              "the clearing service publishes it later", file=sys.stderr)
