"""Database set-up: the role and databases, then the schema migrations.

The hub database (Settings.pg_dsn) takes deploy/migrations/hub/, every shard database
(services/common/shards.py) deploy/migrations/shard/.

Migrations are plain SQL files applied by yoyo-migrations, each in one transaction, under
yoyo's lock (concurrent applies wait for each other), and recorded in `_yoyo_migration`:
a second apply is a no-op, and the history is a query away.

    python -m deploy.db migrate               # hub and every shard: create if missing, apply what is new
    python -m deploy.db history [--dsn DSN]   # applied migrations, oldest first (default: the hub)

Roles (README "Security"): the cluster's roles are shared by every database on it; the owner `xsettle`
owns the databases and runs the migrations, each service connects as its own role, whose grants are
migrations (hub 0007.roles.sql, shard 0003.roles.sql: grants are per database). `ensure_roles` creates
them and sets each one's password to its generated secret (`<state_dir>/secrets/pg-<role>.password`) on
every start: deleting that file and starting again rotates it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import asyncpg
import psycopg
from psycopg import sql
from yoyo import get_backend, read_migrations

from deploy.common import Paths
from services.common.config import PG_PASSFILE, Settings, load_settings
from services.common.secrets import create_once, password
from services.common.shards import shard_dsns

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
HUB_MIGRATIONS = MIGRATIONS_DIR / "hub"
SHARD_MIGRATIONS = MIGRATIONS_DIR / "shard"


PG_ADMIN_ROLE = "postgres"  # the cluster's superuser (initdb's): creates roles and databases, nothing else
OWNER_ROLE = "xsettle"  # owns the databases: migrations, loaders, operator CLIs, tests' inspection
# The role each service connects as (deploy/services.py sets its XS_PG_USER).
SERVICE_ROLES = {
    "settle": "xs_settle",
    "clearing": "xs_clearing",
    "monitor": "xs_monitor",
    "dashboard": "xs_dashboard",
}
# The router's grants (hub 0007, shard 0003): the settlement stage routes, so its role is a member of this one
# (role membership belongs to the cluster: ensure_roles grants it). A group role: nobody logs in as it, it has
# no password (before 2026-12-01 the router process did; ensure_roles takes its login and password away).
ROUTER_ROLE = "xs_router"
LOGIN_ROLES = (OWNER_ROLE, *SERVICE_ROLES.values())
GROUP_ROLES = (ROUTER_ROLE,)
ROLES = (*LOGIN_ROLES, *GROUP_ROLES)
MEMBERSHIPS = ((ROUTER_ROLE, SERVICE_ROLES["settle"]),)  # (role, member)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def role_password(s: Settings, role: str) -> str:
    return password(s, f"pg-{role}")


def write_passfile(s: Settings) -> Path:
    """`<state_dir>/secrets/pgpass` (0600, libpq's format) with every role's password, generated on first
    use; rewritten when one changed (a rotation). Loopback TCP and the cluster's unix socket only."""
    path = s.state_dir / PG_PASSFILE
    hosts = ("127.0.0.1", "localhost", str(Paths.of(s).pg_sock))
    text = "".join(f"{host}:*:*:{role}:{role_password(s, role)}\n"
                   for role in (PG_ADMIN_ROLE, *LOGIN_ROLES) for host in hosts)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.new")  # one per writer: concurrent starts
        tmp.unlink(missing_ok=True)
        create_once(tmp, text.encode())  # 0600 from the start
        tmp.replace(path)
    return path


def set_password(conn: psycopg.Connection, role: str, secret: str) -> None:
    """The role's password as a SCRAM verifier computed here: the password itself never reaches the
    server, its statement log or an error text."""
    verifier = conn.pgconn.encrypt_password(secret.encode(), role.encode(), b"scram-sha-256").decode()
    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier)))


def ensure_roles(admin_dsn: str, s: Settings) -> list[str]:
    """The owner and the service roles: created if missing (login, no superuser, no CREATEDB/CREATEROLE;
    the owner of a cluster made before was a superuser), each with its current generated password; the group
    roles without login or password, granted to their members."""
    done: list[str] = []
    write_passfile(s)
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
        for role in ROLES:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                try:
                    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
                    done.append(f"created role {role}")
                except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                    pass  # a concurrent migrate created it
            login = role in LOGIN_ROLES
            conn.execute(sql.SQL("ALTER ROLE {} {} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS")
                         .format(sql.Identifier(role), sql.SQL("LOGIN" if login else "NOLOGIN")))
            if login:
                set_password(conn, role, role_password(s, role))
            else:
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD NULL").format(sql.Identifier(role)))
        for role, member in MEMBERSHIPS:  # granting again changes nothing
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(member)))
    return done


def admin_dsn(s: Settings) -> str:
    return f"postgresql://{PG_ADMIN_ROLE}@127.0.0.1:{s.pg_port}/postgres"


def owner_settings(s: Settings) -> Settings:
    """`s` as the owner: migrations and database set-up run as it whatever XS_PG_USER says."""
    return replace(s, pg_user=OWNER_ROLE)


async def ensure_role_and_database(admin_dsn: str, user: str, database: str) -> list[str]:
    """Create `user` (login, no superuser) and `database` (owned by it) if missing. Returns what it did."""
    done: list[str] = []
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user):
            await conn.execute(f"CREATE ROLE {_ident(user)} LOGIN")
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
    """The roles (each with its password), the hub database and every shard database on this server
    (owned by the owner role), if missing."""
    done = await asyncio.to_thread(ensure_roles, admin_dsn, s)
    done += await ensure_role_and_database(admin_dsn, OWNER_ROLE, s.pg_database)
    for database in _local_shards(s).values():
        done += await ensure_role_and_database(admin_dsn, OWNER_ROLE, database)
    return done


def migrate_all(s: Settings) -> list[str]:
    """The hub's migrations, then every shard's, as the owner; returns "<database>: <migration id>" per
    applied one."""
    s = owner_settings(s)
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
    dsn = args.dsn or owner_settings(s).pg_dsn
    try:
        if args.cmd == "migrate":
            if args.dsn is None:
                for done in asyncio.run(ensure_databases(admin_dsn(s), s)):
                    print(done)
            applied = migrate_all(s) if args.dsn is None else migrate(dsn)
            print(f"applied {', '.join(applied)}" if applied else "databases up to date")
        else:
            for row in asyncio.run(history(dsn)):
                print(f"{row.applied_at_utc:%Y-%m-%d %H:%M:%S}  {row.migration_id}")
    except (OSError, asyncpg.PostgresError, psycopg.Error) as exc:
        print(f"{args.cmd} failed on {dsn}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
