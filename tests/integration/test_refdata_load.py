"""The reference-data loader against the real PostgreSQL.

Each test module run gets its own schema (search_path), with the initial migration (deploy/migrations/0001)
applied in it, so the shared database's data is not touched; it is dropped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from deploy.db import SCHEMA_PATH
from schemas.refdata import PersonRow, RefDataSet
from services.common.config import PROJECT_ROOT, Settings
from services.refdata.generate import ITEM_CLASS_B, ITEM_WITH_CEILING, generate, write_jsonl
from services.refdata.load import RefDataError, filing_id, load_dir
from services.refdata.regions import REGIONS, SEED_REGIONS
from services.refdata.store import fetch_refdata, filing_in_force

pytestmark = pytest.mark.integration

TABLES = ("region", "hospital", "person", "filing", "catalog_item")


@pytest.fixture(scope="module")
def dataset() -> RefDataSet:
    return generate(seed=11, persons_per_region=40)


@pytest.fixture(scope="module")
def refdir(dataset: RefDataSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refdata")
    write_jsonl(dataset, out)
    return out


@pytest.fixture(scope="module")
async def schema(stack: Settings) -> AsyncIterator[str]:
    name = f"refdata_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(stack.pg_dsn, timeout=10)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
        await conn.execute(f"SET search_path TO {name}")
        await conn.execute(SCHEMA_PATH.read_text(encoding="utf-8"))
        yield name
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await conn.close()


@pytest.fixture
async def conn(stack: Settings, schema: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(stack.pg_dsn, timeout=10, server_settings={"search_path": schema})
    try:
        yield c
    finally:
        await c.close()


async def _counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


async def _snapshot(conn: asyncpg.Connection) -> dict[str, list[Any]]:
    # xmin changes whenever a row is rewritten: equal snapshots mean untouched rows.
    return {t: [tuple(r) for r in await conn.fetch(f"SELECT xmin::text, * FROM {t} ORDER BY 2, 3")] for t in TABLES}


async def test_load_twice_changes_nothing(conn: asyncpg.Connection, refdir: Path, dataset: RefDataSet) -> None:
    first = await load_dir(conn, refdir)
    expected = {
        "hospital": len(dataset.hospitals),
        "person": len(dataset.persons),
        "filing": len(dataset.filings),
        "catalog_item": len(dataset.catalog),
    }
    for table, n in expected.items():
        assert first[table] == n
        assert first[f"{table}_changed"] == n
    assert first["region"] == len(REGIONS)
    assert await _counts(conn) == {"region": len(REGIONS), **expected}

    before = await _snapshot(conn)
    second = await load_dir(conn, refdir)
    assert {k: v for k, v in second.items() if k.endswith("_changed")} == {f"{t}_changed": 0 for t in TABLES}
    assert await _counts(conn) == {"region": len(REGIONS), **expected}
    assert await _snapshot(conn) == before


async def test_amounts_are_exact_fen(conn: asyncpg.Connection, refdir: Path, dataset: RefDataSet) -> None:
    await load_dir(conn, refdir)
    fen = dict(await conn.fetch("SELECT psn_no, acct_balc_fen FROM person"))
    for p in dataset.persons:
        assert fen[p.psn_no] == int(p.acct_balc * 100)
        assert Decimal(fen[p.psn_no]) / 100 == p.acct_balc
    rows = await conn.fetch("SELECT admdvs, med_list_codg, selfpay_prop, pric_uplmt_fen FROM catalog_item")
    db = {(r["admdvs"], r["med_list_codg"]): (r["selfpay_prop"], r["pric_uplmt_fen"]) for r in rows}
    for c in dataset.catalog:
        prop, ceiling = db[(c.admdvs, c.med_list_codg)]
        assert prop == c.selfpay_prop
        assert ceiling == (None if c.pric_uplmt_amt is None else int(c.pric_uplmt_amt * 100))
    assert db[("510000", ITEM_WITH_CEILING)] == (Decimal("0.0000"), 6000)
    assert db[("150000", ITEM_CLASS_B)] == (Decimal("0.1000"), None)


async def test_changed_row_is_updated_alone_and_db_state_is_kept(
    conn: asyncpg.Connection, refdir: Path, tmp_path: Path, dataset: RefDataSet
) -> None:
    await load_dir(conn, refdir)
    # Router-side state: a revoked filing and an account in use.
    some = dataset.filings[0]
    await conn.execute("UPDATE filing SET revoked = true WHERE filing_id = $1", filing_id(some))
    psn = dataset.persons[1]
    await conn.execute(
        "INSERT INTO account (psn_no, balc_fen) VALUES ($1, 1) ON CONFLICT (psn_no) DO UPDATE SET balc_fen = 1",
        psn.psn_no,
    )
    # A new file set where one person's balance changed by one fen.
    for name in ("hospitals.jsonl", "filings.jsonl", "catalog.jsonl"):
        (tmp_path / name).write_bytes((refdir / name).read_bytes())
    changed = msgspec.structs.replace(psn, acct_balc=psn.acct_balc + Decimal("0.01"))
    persons = [changed if p.psn_no == psn.psn_no else p for p in dataset.persons]
    (tmp_path / "persons.jsonl").write_bytes(b"".join(msgspec.json.encode(p) + b"\n" for p in persons))

    counts = await load_dir(conn, tmp_path)
    assert {k: v for k, v in counts.items() if k.endswith("_changed")} == {
        "region_changed": 0,
        "hospital_changed": 0,
        "person_changed": 1,
        "filing_changed": 0,
        "catalog_item_changed": 0,
    }
    fen = await conn.fetchval("SELECT acct_balc_fen FROM person WHERE psn_no = $1", psn.psn_no)
    assert fen == int(psn.acct_balc * 100) + 1
    assert await conn.fetchval("SELECT balc_fen FROM account WHERE psn_no = $1", psn.psn_no) == 1
    assert await conn.fetchval("SELECT revoked FROM filing WHERE filing_id = $1", filing_id(some)) is True
    # Back to the original files; the revocation still stands.
    await load_dir(conn, refdir)
    assert await conn.fetchval("SELECT revoked FROM filing WHERE filing_id = $1", filing_id(some)) is True
    await conn.execute("UPDATE filing SET revoked = false WHERE filing_id = $1", filing_id(some))
    await conn.execute("DELETE FROM account WHERE psn_no = $1", psn.psn_no)


async def test_malformed_line_is_rejected_and_nothing_written(
    conn: asyncpg.Connection, refdir: Path, tmp_path: Path, dataset: RefDataSet
) -> None:
    await load_dir(conn, refdir)
    before = await _snapshot(conn)
    for name in ("hospitals.jsonl", "filings.jsonl", "catalog.jsonl"):
        (tmp_path / name).write_bytes((refdir / name).read_bytes())
    lines = (refdir / "persons.jsonl").read_bytes().splitlines()
    row = msgspec.to_builtins(msgspec.json.decode(lines[6], type=PersonRow))
    lines[6] = msgspec.json.encode({**row, "acct_balc": "12.345"})
    lines.append(msgspec.json.encode({**row, "psn_no": "PNEW1", "certno": None}))  # valid, would be new
    (tmp_path / "persons.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    with pytest.raises(RefDataError) as exc:
        await load_dir(conn, tmp_path)
    assert exc.value.errors == ["persons.jsonl:7: amount has more than 2 decimal places - at `$.acct_balc`"]
    assert row["psn_no"] not in str(exc.value) and str(row["certno"]) not in str(exc.value)
    assert await _snapshot(conn) == before


async def test_pool_and_snapshot(stack: Settings, schema: str, refdir: Path, dataset: RefDataSet) -> None:
    pool = await asyncpg.create_pool(
        stack.pg_dsn, min_size=1, max_size=2, timeout=10, server_settings={"search_path": schema}
    )
    assert pool is not None
    try:
        counts = await load_dir(pool, refdir)
        assert counts["person"] == len(dataset.persons)
        async with pool.acquire() as c:
            ref = await fetch_refdata(c)
    finally:
        await pool.close()
    assert len(ref.hospitals) == len(dataset.hospitals)
    assert len(ref.persons) == len(dataset.persons) == len(ref.persons_by_cert)
    assert sum(len(v) for v in ref.filings.values()) == len(dataset.filings)
    assert len(ref.catalog) == len(dataset.catalog)
    p = dataset.persons[0]
    person = ref.persons[p.psn_no]
    assert person.acct_balc_fen == int(p.acct_balc * 100)
    assert person.chronic == frozenset(p.chronic)
    assert ref.persons_by_cert[p.certno or ""] == p.psn_no
    h = dataset.hospitals[0]
    assert (ref.hospitals[h.fixmedins_code].hosp_lv, ref.hospitals[h.fixmedins_code].name) == (
        h.hosp_lv,
        h.fixmedins_name,
    )
    # The first person of each seed region has a filing; at least one is in force in 2026 somewhere.
    firsts = [next(x for x in dataset.persons if x.insuplc_admdvs == code) for code in SEED_REGIONS]
    assert all(ref.filings.get(x.psn_no) for x in firsts)
    assert any(
        filing_in_force(ref.filings.get(x.psn_no, []), date(2026, 6, 1), prov) is not None
        for x in dataset.persons
        for prov in ("110000", "440000", "510000")
    )


def test_command_line(stack: Settings, schema: str, refdir: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "services.refdata.load", str(refdir), "--dsn", f"{stack.pg_dsn}?search_path={schema}"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "person: " in res.stdout and "0 inserted or updated" in res.stdout
