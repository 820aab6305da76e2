"""The dashboard's users (hub table `dashboard_user`), and their command line. Every change is audited.

    python -m services.dashboard.users list
    python -m services.dashboard.users add NAME --role viewer|operator --operator OP [--generate]
    python -m services.dashboard.users passwd NAME --operator OP [--generate]
    python -m services.dashboard.users disable NAME --operator OP
    python -m services.dashboard.users enable NAME --operator OP

A password is read from stdin (one line) or asked for twice on a terminal — never from the command line;
`--generate` makes one and prints it once. A disabled user's sessions end within USER_RECHECK_S.
The first start of the dashboard creates the operator `admin`, its password generated into
`<state_dir>/secrets/dashboard-admin.password`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import asyncpg

from services.common import audit
from services.common.config import Settings, load_settings
from services.common.secrets import password as generated_password
from services.common.secrets import secrets_dir
from services.dashboard.auth import check_password, check_role, check_username, hash_password

ADMIN: Final = "admin"
ADMIN_SECRET: Final = "dashboard-admin"
SYSTEM_ACTOR: Final = "dashboard"  # the audit actor of what the dashboard does by itself


@dataclass(frozen=True)
class User:
    username: str
    role: str
    password_hash: str
    disabled: bool


class UserError(ValueError):
    pass


async def fetch_user(conn: asyncpg.Connection | asyncpg.Pool, username: str) -> User | None:
    row = await conn.fetchrow(
        "SELECT username, role, password_hash, disabled FROM dashboard_user WHERE username = $1", username)
    return None if row is None else User(row["username"], row["role"], row["password_hash"], row["disabled"])


async def list_users(conn: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT username, role, disabled, created_at, updated_at FROM dashboard_user"
                                 " ORDER BY username"))


async def add_user(conn: asyncpg.Connection, username: str, role: str, password: str, operator: str) -> None:
    audit.check_operator(operator)
    check_username(username)
    check_role(role)
    hashed = await asyncio.to_thread(hash_password, check_password(password))
    async with conn.transaction():
        done = await conn.fetchval(
            "INSERT INTO dashboard_user (username, role, password_hash) VALUES ($1, $2, $3)"
            " ON CONFLICT (username) DO NOTHING RETURNING true", username, role, hashed)
        if not done:
            raise UserError(f"user {username} exists")
        await audit.record(conn, operator, "dashboard.user.add", username, None, {"role": role})


async def _update(conn: asyncpg.Connection, operator: str, action: str, username: str, assignment: str,
                  value: object, before: object, after: object) -> None:
    audit.check_operator(operator)
    async with conn.transaction():
        done = await conn.fetchval(
            f"UPDATE dashboard_user SET {assignment}, updated_at = now() WHERE username = $1 RETURNING true",
            username, value)
        if not done:
            raise UserError(f"no user {username}")
        await audit.record(conn, operator, action, username, before, after)


async def set_password(conn: asyncpg.Connection, username: str, password: str, operator: str) -> None:
    hashed = await asyncio.to_thread(hash_password, check_password(password))
    await _update(conn, operator, "dashboard.user.passwd", username, "password_hash = $2", hashed, None,
                  {"password": "changed"})


async def set_disabled(conn: asyncpg.Connection, username: str, disabled: bool, operator: str) -> None:
    await _update(conn, operator, "dashboard.user.disable" if disabled else "dashboard.user.enable", username,
                  "disabled = $2", disabled, {"disabled": not disabled}, {"disabled": disabled})


async def ensure_admin(conn: asyncpg.Connection, s: Settings) -> bool:
    """First start: create the operator `admin` with the generated password (True when created now)."""
    if await conn.fetchval("SELECT true FROM dashboard_user WHERE username = $1", ADMIN):
        return False
    hashed = await asyncio.to_thread(hash_password, generated_password(s, ADMIN_SECRET))
    async with conn.transaction():
        created = await conn.fetchval(
            "INSERT INTO dashboard_user (username, role, password_hash) VALUES ($1, 'operator', $2)"
            " ON CONFLICT (username) DO NOTHING RETURNING true", ADMIN, hashed)
        if created:
            await audit.record(conn, SYSTEM_ACTOR, "dashboard.user.add", ADMIN, None, {"role": "operator"})
    return bool(created)


def admin_password_file(s: Settings) -> str:
    return str(secrets_dir(s) / f"{ADMIN_SECRET}.password")


def _read_password(generate: bool) -> str:
    if generate:
        pw = secrets.token_urlsafe(18)
        print(f"generated password (shown once): {pw}")
        return pw
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise UserError("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


async def _run(args: argparse.Namespace, s: Settings) -> None:
    conn = await asyncpg.connect(s.pg_dsn)
    try:
        if args.command == "list":
            for r in await list_users(conn):
                state = "disabled" if r["disabled"] else "active"
                print(f"{r['username']:<32} {r['role']:<9} {state:<9} updated {r['updated_at']:%Y-%m-%d %H:%M}")
            return
        operator = audit.check_operator(args.operator)
        if args.command == "add":
            await add_user(conn, args.username, args.role, _read_password(args.generate), operator)
        elif args.command == "passwd":
            await set_password(conn, args.username, _read_password(args.generate), operator)
        else:
            await set_disabled(conn, args.username, args.command == "disable", operator)
        print(f"{args.command} {args.username}: done")
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.dashboard.users", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    for name in ("add", "passwd", "disable", "enable"):
        p = sub.add_parser(name)
        p.add_argument("username")
        p.add_argument("--operator", default=os.environ.get("XS_OPERATOR"))
        if name == "add":
            p.add_argument("--role", required=True, choices=("viewer", "operator"))
        if name in ("add", "passwd"):
            p.add_argument("--generate", action="store_true", help="generate the password and print it once")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_run(args, load_settings()))
    except (ValueError, audit.OperatorRequired) as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
