"""The operators' audit trail on `fsi.audit`: one record per `audit_log` row, in audit_id order.

`before` and `after` are the row's JSON values as recorded (small descriptions of what changed: ids,
counts, amounts — never a secret or a personal identifier). The record key is the audit_id (decimal
text): a record seen twice (a publisher that died after the broker's ack) has the same key and body.

Imports nothing from services.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec


class AuditRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    audit_id: Annotated[int, msgspec.Meta(ge=1)]
    at: str  # ISO 8601 with offset (UTC), as the database recorded it
    actor: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._@-]{1,64}$")]
    action: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    target: Annotated[str, msgspec.Meta(max_length=200)] = ""
    before: Any = None
    after: Any = None
