"""Database set-up: the role and database, then the schema (deploy/sql/schema.sql).

`python -m deploy.db [--dsn DSN]` applies the schema (idempotent: CREATE ... IF NOT EXISTS).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import asyncpg

from services.common.config import load_settings

SCHEMA_PATH = Path(__file__).resolve().parent / "sql" / "schema.sql"
# Applied right after schema.sql, in this order and in the same transaction: one service's own tables.
EXTRA_SCHEMA_PATHS = (SCHEMA_PATH.parent / "clearing.sql",)

# Serialises concurrent schema applications (CREATE ... IF NOT EXISTS can race).
_SCHEMA_LOCK_KEY = 0x78736574  # "xset"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_role_and_database(admin_dsn: str, user: str, database: str) -> list[str]:
    """Create `user` (superuser, login) and `database` (owned by it) if missing. Returns what it did."""
    done: list[str] = []
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user):
            await conn.execute(f"CREATE ROLE {_ident(user)} LOGIN SUPERUSER")
            done.append(f"created role {user}")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f"CREATE DATABASE {_ident(database)} OWNER {_ident(user)} ENCODING 'UTF8'")
            done.append(f"created database {database}")
    finally:
        await conn.close()
    return done


async def apply_schema(dsn: str, schema_path: Path = SCHEMA_PATH) -> None:
    """Apply the schema file in one transaction, under an advisory lock."""
    sql = schema_path.read_text(encoding="utf-8")
    if schema_path.resolve() == SCHEMA_PATH:
        sql += "".join("\n" + p.read_text(encoding="utf-8") for p in EXTRA_SCHEMA_PATHS)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await conn.execute(sql)
    finally:
        await conn.close()


async def table_names(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    finally:
        await conn.close()
    return {r["table_name"] for r in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.db", description="Apply deploy/sql/schema.sql")
    parser.add_argument("--dsn", default=None, help="default: Settings.pg_dsn (XS_PG_* env vars)")
    args = parser.parse_args(argv)
    dsn = args.dsn or load_settings().pg_dsn
    try:
        asyncio.run(apply_schema(dsn))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"schema apply failed on {dsn}: {exc}", file=sys.stderr)
        return 1
    print(f"schema applied: {SCHEMA_PATH} -> {dsn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
