"""Institution keys: issue, rotate, revoke, list — and read them for the router's view.

Secrets are 32 random bytes, shown once at issue (base64) and stored sealed
(`services.common.signing.seal`). Each change appends a `refdata_change` row so that every router
applies it without a restart, and an audit row (`services.common.audit`), in one transaction.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from services.common import audit
from services.common.signing import InstitutionKey, seal, unseal
from services.refdata.load import REFDATA_CHANNEL

ENTITY = "institution_key"


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    fixmedins_code: str
    secret: bytes

    @property
    def secret_b64(self) -> str:
        return base64.b64encode(self.secret).decode()


async def _changed(conn: asyncpg.Connection, fixmedins_code: str) -> None:
    await conn.execute("INSERT INTO refdata_change (entity, key) VALUES ($1, $2)", ENTITY, fixmedins_code)
    await conn.execute("SELECT pg_notify($1, (SELECT max(version) FROM refdata_change)::text)", REFDATA_CHANNEL)


async def issue_key(conn: asyncpg.Connection, kek: bytes, fixmedins_code: str, operator: str, *,
                    overlap: timedelta | None = None) -> IssuedKey:
    """A new key for the institution. With `overlap`, the institution's other live keys expire after it
    (a rotation); without, they stay live until revoked."""
    audit.check_operator(operator)
    secret = os.urandom(32)
    key_id = "K" + secrets.token_hex(8)
    async with conn.transaction():
        known = await conn.fetchval("SELECT count(*) FROM hospital WHERE fixmedins_code = $1", fixmedins_code)
        if not known:
            raise LookupError("no institution with that fixmedins_code in the reference data")
        await conn.execute(
            "INSERT INTO institution_key (key_id, fixmedins_code, secret_sealed, issued_by) VALUES ($1, $2, $3, $4)",
            key_id, fixmedins_code, seal(kek, secret, key_id), operator)
        expiring: list[str] = []
        if overlap is not None:
            expiring = [r["key_id"] for r in await conn.fetch(
                "UPDATE institution_key SET expires_at = now() + $3::interval"
                " WHERE fixmedins_code = $1 AND key_id <> $2 AND revoked_at IS NULL"
                "   AND (expires_at IS NULL OR expires_at > now() + $3::interval) RETURNING key_id",
                fixmedins_code, key_id, overlap)]
        await _changed(conn, fixmedins_code)
        before = {"expiring": expiring, "overlap_s": overlap.total_seconds()} if overlap and expiring else None
        await audit.record(conn, operator, "key.rotate" if overlap is not None else "key.issue", fixmedins_code,
                           before=before, after={"key_id": key_id})
    return IssuedKey(key_id, fixmedins_code, secret)


async def revoke_key(conn: asyncpg.Connection, key_id: str, operator: str) -> str:
    """Revoke a key at once; returns its institution."""
    audit.check_operator(operator)
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE institution_key SET revoked_at = now(), revoked_by = $2 WHERE key_id = $1 AND revoked_at IS NULL"
            " RETURNING fixmedins_code", key_id, operator)
        if row is None:
            raise LookupError("no live key with that key_id")
        await _changed(conn, row["fixmedins_code"])
        await audit.record(conn, operator, "key.revoke", row["fixmedins_code"], before={"key_id": key_id, "live": True},
                           after={"key_id": key_id, "live": False})
    return str(row["fixmedins_code"])


async def list_keys(conn: asyncpg.Connection | asyncpg.Pool, fixmedins_code: str | None = None) -> list[asyncpg.Record]:
    """Key ids and their state (never the secrets)."""
    return list(await conn.fetch(
        "SELECT key_id, fixmedins_code, issued_at, issued_by, expires_at, revoked_at, revoked_by FROM institution_key"
        " WHERE $1::text IS NULL OR fixmedins_code = $1 ORDER BY fixmedins_code, issued_at", fixmedins_code))


async def fetch_keys(conn: asyncpg.Connection | asyncpg.Pool, kek: bytes,
                     codes: list[str] | None = None) -> dict[str, tuple[InstitutionKey, ...]]:
    """Every key (of `codes`, or all) unsealed, by institution: live, expiring and revoked — a signature
    made with a revoked key is told apart from a wrong one."""
    keys: dict[str, list[InstitutionKey]] = {}
    for r in await conn.fetch(
            "SELECT key_id, fixmedins_code, secret_sealed, expires_at, revoked_at FROM institution_key"
            " WHERE $1::text[] IS NULL OR fixmedins_code = ANY($1) ORDER BY issued_at", codes):
        keys.setdefault(r["fixmedins_code"], []).append(InstitutionKey(
            r["key_id"], unseal(kek, r["secret_sealed"], r["key_id"]), r["expires_at"], r["revoked_at"] is not None))
    return {code: tuple(v) for code, v in keys.items()}

