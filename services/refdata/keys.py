"""Institution keys: issue, rotate, revoke, list — and read them for the router's view.

Secrets are 32 random bytes, shown once at issue (base64) and stored sealed
(`services.common.signing.seal`). Each change appends a `refdata_change` row so that every router
applies it without a restart, and an audit row (`services.common.audit`), in one transaction.

The operators' command line (each change names its operator: `--operator NAME` or XS_OPERATOR):

    python -m services.refdata.keys issue H15040099901 --operator li.ming [--out FILE]
    python -m services.refdata.keys rotate H15040099901 --overlap 24h --operator li.ming [--out FILE]
    python -m services.refdata.keys revoke K0123456789abcdef --operator li.ming
    python -m services.refdata.keys list [H15040099901]

An institution is a hospital or pharmacy of the reference data, or the treating region's agency
(`A` + pooling admdvs + `00000`, e.g. A15040000000; services/refdata/agency.py), which has no hospital row.

`issue` and `rotate` print the new key id and its secret (base64) once — or, with `--out FILE`, write the
secret to FILE (created, mode 0600; an existing file is refused) and print only the key id. `rotate`
issues a key and lets the institution's other live keys expire after the overlap (`90s`, `30m`, `24h`,
`7d`). `list` shows ids, dates and states, never a secret. Exit status: 0 done, 1 refused, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from services.common import audit
from services.common.config import Settings, load_settings
from services.common.secrets import write_new_secret
from services.common.signing import InstitutionKey, key_encryption_key, seal, unseal
from services.refdata.agency import agency_pool
from services.refdata.load import REFDATA_CHANNEL
from services.refdata.regions import UnknownRegion

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
        if not known and not _is_agency(fixmedins_code):
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


def _is_agency(code: str) -> bool:
    """A treating region's agency (A + pooling admdvs + 00000): no hospital row, its region from the code."""
    try:
        return agency_pool(code) is not None
    except UnknownRegion:
        return False


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


# Command line ---------------------------------------------------------------------------------------

_DURATION = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
OVERLAP_MAX = timedelta(days=90)


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `24h`, `7d` (at most 90 days)."""
    m = _DURATION.match(text)
    if m is None:
        raise argparse.ArgumentTypeError("a duration is a number and a unit: 90s, 30m, 24h, 7d")
    value = timedelta(seconds=int(m.group(1)) * _UNIT_S[m.group(2)])
    if value > OVERLAP_MAX:
        raise argparse.ArgumentTypeError(f"at most {OVERLAP_MAX.days} days")
    return value


def key_state(r: asyncpg.Record, now: datetime) -> str:
    if r["revoked_at"] is not None:
        return f"revoked {r['revoked_at']:%Y-%m-%dT%H:%M:%SZ} by {r['revoked_by']}"
    if r["expires_at"] is not None:
        return ("expired " if r["expires_at"] <= now else "live, expires ") + f"{r['expires_at']:%Y-%m-%dT%H:%M:%SZ}"
    return "live"


async def _cli(args: argparse.Namespace, s: Settings) -> int:
    conn = await asyncpg.connect(s.pg_dsn, timeout=10)
    try:
        if args.cmd == "list":
            now = datetime.now(UTC)
            rows = await list_keys(conn, args.code)
            for r in rows:
                print(f"{r['fixmedins_code']}  {r['key_id']}  issued {r['issued_at']:%Y-%m-%dT%H:%M:%SZ}"
                      f" by {r['issued_by']}  {key_state(r, now)}")
            print(f"{len(rows)} key(s)")
            return 0
        if args.cmd == "revoke":
            code = await revoke_key(conn, args.key_id, args.operator)
            print(f"revoked {args.key_id} of {code}")
        else:
            if args.out is not None and args.out.exists():
                raise FileExistsError(f"{args.out} exists: the secret goes only into a new file")
            key = await issue_key(conn, key_encryption_key(s), args.code, args.operator,
                                  overlap=args.overlap if args.cmd == "rotate" else None)
            if args.out is not None:
                write_new_secret(args.out, key.secret_b64)
                print(f"issued {key.key_id} for {key.fixmedins_code}; secret written to {args.out} (0600)")
            else:
                print(f"issued {key.key_id} for {key.fixmedins_code}\nsecret {key.secret_b64}\n"
                      "(shown once: give it to the institution over a safe channel)")
            if args.cmd == "rotate":
                print(f"the institution's other live keys expire in {args.overlap}")
    finally:
        await conn.close()
    await audit.publish_after_action(s)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.refdata.keys", description="Institution keys.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("issue", "rotate"):
        sp = sub.add_parser(name, help="a new key for an institution" + (", the others expiring" if name == "rotate"
                                                                          else ""))
        sp.add_argument("code", metavar="FIXMEDINS_CODE")
        sp.add_argument("--out", type=Path, help="write the secret to this new file (0600) instead of stdout")
        if name == "rotate":
            sp.add_argument("--overlap", type=parse_duration, required=True,
                            help="how long the other live keys stay valid: 90s, 30m, 24h, 7d")
        audit.add_operator_argument(sp)
    revoke = sub.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id")
    audit.add_operator_argument(revoke)
    sub.add_parser("list", help="keys and their state, never secrets").add_argument(
        "code", metavar="FIXMEDINS_CODE", nargs="?")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.cmd != "list":
        args.operator = audit.operator_or_exit(p, args.operator)
    try:
        return asyncio.run(_cli(args, load_settings()))
    except (LookupError, FileExistsError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
