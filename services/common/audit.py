"""The operators' audit trail (hub table `audit_log`, append-only): who did what, when, before and after.

`record` writes one row inside the caller's transaction, so an action and its audit row commit
together or not at all. `before`/`after` are small JSON-able values describing what changed — never a
secret, never a personal identifier (use psn_no digests or counts instead).
"""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg

OPERATOR = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


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
