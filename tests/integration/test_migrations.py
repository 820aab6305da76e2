"""Schema migrations (yoyo-migrations, deploy/migrations/): a fresh database gets every migration
once, a second apply is a no-op, the history is queryable, and a new migration applies alone."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from deploy.db import MIGRATIONS_DIR, SCHEMA_PATH, drop_database, ensure_role_and_database, history, migrate
from services.common.config import Settings

pytestmark = pytest.mark.integration

ALL_IDS = sorted(p.stem for p in MIGRATIONS_DIR.glob("*.sql") if not p.name.endswith(".rollback.sql"))


@pytest.fixture
async def scratch(stack: Settings) -> AsyncIterator[str]:
    """An empty database of this run's own, dropped afterwards."""
    admin = f"postgresql://postgres@127.0.0.1:{stack.pg_port}/postgres"
    name = stack.pg_database + "_m"
    await drop_database(admin, name)
    await ensure_role_and_database(admin, stack.pg_user, name)
    yield f"postgresql://{stack.pg_user}@127.0.0.1:{stack.pg_port}/{name}"
    await drop_database(admin, name)


async def _tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    finally:
        await conn.close()
    return {r["table_name"] for r in rows}


async def test_fresh_database_gets_every_migration_once(scratch: str) -> None:
    assert migrate(scratch) == ALL_IDS
    assert migrate(scratch) == []  # the second apply is a no-op
    assert [h.migration_id for h in await history(scratch)] == ALL_IDS
    expected = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA_PATH.read_text()))
    assert {"settlement", "visit", "processed_request", "clearing_entry", "clearing_statement"} <= expected
    yoyo = {"_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock"}
    assert await _tables(scratch) == expected | yoyo


async def test_the_runs_database_has_the_whole_history(stack: Settings) -> None:
    assert [h.migration_id for h in await history(stack.pg_dsn)] == ALL_IDS


async def test_a_new_migration_applies_alone_and_in_order(scratch: str, tmp_path: Path) -> None:
    for path in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copy(path, tmp_path / path.name)
    assert migrate(scratch, tmp_path) == ALL_IDS
    (tmp_path / "9999.test-note.sql").write_text(
        "CREATE TABLE test_note (id bigint PRIMARY KEY);\nINSERT INTO test_note VALUES (1);\n")
    assert migrate(scratch, tmp_path) == ["9999.test-note"]
    assert [h.migration_id for h in await history(scratch)] == [*ALL_IDS, "9999.test-note"]
    conn = await asyncpg.connect(scratch)
    try:
        assert await conn.fetchval("SELECT count(*) FROM test_note") == 1
    finally:
        await conn.close()
