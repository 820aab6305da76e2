"""Database set-up: the role and databases, then the schema migrations.

The hub database (Settings.pg_dsn) takes deploy/migrations/hub/, every shard database
(services/common/shards.py) deploy/migrations/shard/.

Migrations are plain SQL files applied by yoyo-migrations, each in one transaction, under
yoyo's lock (concurrent applies wait for each other), and recorded in `_yoyo_migration`:
a second apply is a no-op, and the history is a query away.

    python -m deploy.db migrate               # hub and every shard: create if missing, apply what is new
    python -m deploy.db history [--dsn DSN]   # applied migrations, oldest first (default: the hub)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
from yoyo import get_backend, read_migrations

from services.common.config import Settings, load_settings
from services.common.shards import shard_dsns

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
HUB_MIGRATIONS = MIGRATIONS_DIR / "hub"
SHARD_MIGRATIONS = MIGRATIONS_DIR / "shard"


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


async def drop_database(admin_dsn: str, database: str) -> None:
    """Drop `database`, disconnecting whoever still uses it (a test run's own database at its end)."""
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_ident(database)} WITH (FORCE)")
    finally:
        await conn.close()


def _yoyo_uri(dsn: str) -> str:
    # yoyo picks its driver from the scheme: psycopg 3.
    return "postgresql+psycopg://" + dsn.split("://", 1)[1]


def migrate(dsn: str, directory: Path = HUB_MIGRATIONS) -> list[str]:
    """Apply the migrations not applied yet; returns their ids (empty: the database was up to date)."""
    backend = get_backend(_yoyo_uri(dsn))
    migrations = read_migrations(str(directory))
    try:
        with backend.lock():
            todo = backend.to_apply(migrations)
            backend.apply_migrations(todo)
    finally:
        backend.connection.close()
    return [m.id for m in todo]


def _database_of(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1].split("?", 1)[0]


def _local_shards(s: Settings) -> dict[str, str]:
    """Shard databases on the hub's server (the ones the local stack creates); name → database."""
    base = s.pg_dsn.rsplit("/", 1)[0] + "/"
    return {name: _database_of(dsn) for name, dsn in shard_dsns(s).items() if dsn.startswith(base)}


async def ensure_databases(admin_dsn: str, s: Settings) -> list[str]:
    """The role, the hub database and every shard database on this server, if missing."""
    done = await ensure_role_and_database(admin_dsn, s.pg_user, s.pg_database)
    for database in _local_shards(s).values():
        done += await ensure_role_and_database(admin_dsn, s.pg_user, database)
    return done


def migrate_all(s: Settings) -> list[str]:
    """The hub's migrations, then every shard's; returns "<database>: <migration id>" per applied one."""
    applied = [f"{s.pg_database}: {m}" for m in migrate(s.pg_dsn, HUB_MIGRATIONS)]
    for dsn in shard_dsns(s).values():
        applied += [f"{_database_of(dsn)}: {m}" for m in migrate(dsn, SHARD_MIGRATIONS)]
    return applied


async def drop_databases(admin_dsn: str, s: Settings) -> None:
    """Drop the hub database and this server's shard databases (a test run's, at its end)."""
    for database in [*_local_shards(s).values(), s.pg_database]:
        await drop_database(admin_dsn, database)


@dataclass(frozen=True)
class Applied:
    migration_id: str
    applied_at_utc: datetime


async def history(dsn: str) -> list[Applied]:
    """The applied migrations, oldest first (yoyo's own table)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch("SELECT migration_id, applied_at_utc FROM _yoyo_migration ORDER BY applied_at_utc")
    finally:
        await conn.close()
    return [Applied(r["migration_id"], r["applied_at_utc"]) for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.db", description=__doc__.splitlines()[0])
    parser.add_argument("cmd", choices=("migrate", "history"))
    parser.add_argument("--dsn", default=None, help="default: Settings.pg_dsn (XS_PG_* env vars)")
    args = parser.parse_args(argv)
    s = load_settings()
    dsn = args.dsn or s.pg_dsn
    try:
        if args.cmd == "migrate":
            applied = migrate_all(s) if args.dsn is None else migrate(dsn)
            print(f"applied {', '.join(applied)}" if applied else "databases up to date")
        else:
            for row in asyncio.run(history(dsn)):
                print(f"{row.applied_at_utc:%Y-%m-%d %H:%M:%S}  {row.migration_id}")
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"{args.cmd} failed on {dsn}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
