"""Schema migrations (yoyo-migrations, deploy/migrations/hub and shard/): a fresh database gets every
migration once, a second apply is a no-op, the history is queryable, a new migration applies alone, and
settlement state is only in the shards, clearing and reference data only in the hub."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from deploy.db import (
    HUB_MIGRATIONS,
    SHARD_MIGRATIONS,
    drop_database,
    ensure_role_and_database,
    history,
    migrate,
)
from services.common.config import Settings
from services.common.shards import shard_dsns

pytestmark = pytest.mark.integration


def _ids(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.sql") if not p.name.endswith(".rollback.sql"))


ALL_IDS = _ids(HUB_MIGRATIONS)
SHARD_IDS = _ids(SHARD_MIGRATIONS)
SHARD_STATE = {"person", "filing", "processed_request", "visit", "fee_item", "settlement", "accumulator", "account"}
HUB_STATE = {"region", "hospital", "catalog_item", "person_index", "refdata_change", "clearing_entry",
             "clearing_position", "clearing_statement", "clearing_month", "manual_claim"}
YOYO = {"_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock"}


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


async def test_fresh_hub_gets_every_migration_once(scratch: str) -> None:
    assert migrate(scratch) == ALL_IDS
    assert migrate(scratch) == []  # the second apply is a no-op
    assert [h.migration_id for h in await history(scratch)] == ALL_IDS
    tables = await _tables(scratch)
    assert tables >= HUB_STATE | YOYO
    assert not tables & SHARD_STATE


async def test_fresh_shard_gets_the_shard_schema(scratch: str) -> None:
    assert migrate(scratch, SHARD_MIGRATIONS) == SHARD_IDS
    assert migrate(scratch, SHARD_MIGRATIONS) == []
    tables = await _tables(scratch)
    assert tables >= SHARD_STATE | YOYO
    assert not tables & HUB_STATE


async def test_the_runs_databases_have_the_whole_history(stack: Settings) -> None:
    assert [h.migration_id for h in await history(stack.pg_dsn)] == ALL_IDS
    dsns = shard_dsns(stack)
    assert len(dsns) >= 2
    for dsn in dsns.values():
        assert [h.migration_id for h in await history(dsn)] == SHARD_IDS
        assert await _tables(dsn) >= SHARD_STATE


async def test_chronic_eligibility_online_wins_over_the_file(scratch: str) -> None:
    """person_chronic(file, online): a 2504 withdrawal hides the file's disease, a 2503 grant adds one
    the file lacks, diseases online never mentioned follow the file."""
    migrate(scratch, SHARD_MIGRATIONS)
    conn = await asyncpg.connect(scratch)
    try:
        got = await conn.fetchval("SELECT person_chronic($1, $2::jsonb)", ["DM", "HTN", "COPD"],
                                  '{"HTN": false, "CKD": true, "DM": true}')
    finally:
        await conn.close()
    assert got == ["CKD", "COPD", "DM"]


async def test_a_new_migration_applies_alone_and_in_order(scratch: str, tmp_path: Path) -> None:
    for path in HUB_MIGRATIONS.glob("*.sql"):
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
