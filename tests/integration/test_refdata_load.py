"""The reference-data loader against the real PostgreSQL: a hub and its shard databases of this
module's own (`<run database>_ld`, `_ld_s1`, `_ld_s2`), created and migrated here, emptied before
each test and dropped at the end, so the run's other tests and their data are not touched."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from deploy.db import drop_databases, ensure_databases, migrate_all
from deploy.postgres import _pg_admin_dsn
from schemas.refdata import CATALOG_FILE, FILINGS_FILE, PERSONS_FILE, PersonRow, RefDataSet
from services.common.config import PROJECT_ROOT, Settings
from services.common.shards import ShardPools, certno_digest, person_index_key
from services.refdata.changes import effective_chronic
from services.refdata.generate import ITEM_CLASS_B, ITEM_WITH_CEILING, generate, write_jsonl, write_national
from services.refdata.load import LOAD_LOCK_ID, RefDataError, filing_id, load_dir
from services.refdata.regions import REGIONS

pytestmark = pytest.mark.integration

HUB_TABLES = ("region", "hospital", "catalog_item", "person_index")
SHARD_TABLES = ("person", "filing")
FILES = ("hospitals.jsonl", "persons.jsonl", "filings.jsonl", "catalog.jsonl")


@pytest.fixture(scope="module")
async def own(stack: Settings) -> AsyncIterator[Settings]:
    s = dataclasses.replace(stack, pg_database=f"{stack.pg_database}_ld")
    await ensure_databases(_pg_admin_dsn(stack), s)
    await asyncio.to_thread(migrate_all, s)
    yield s
    await drop_databases(_pg_admin_dsn(stack), s)


@pytest.fixture
async def hub(own: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(own.pg_dsn, timeout=10)
    shards = await ShardPools.connect(own, 1)
    try:
        await conn.execute("TRUNCATE region, hospital, catalog_item, person_index, refdata_change,"
                           " refdata_load CASCADE")
        for _, pool in shards:
            await pool.execute("TRUNCATE person, filing")
        yield conn
    finally:
        await shards.close()
        await conn.close()


@pytest.fixture
async def shards(own: Settings) -> AsyncIterator[ShardPools]:
    pools = await ShardPools.connect(own, 2)
    yield pools
    await pools.close()


@pytest.fixture(scope="module")
def dataset() -> RefDataSet:
    return generate(seed=11, persons_per_region=40)


@pytest.fixture(scope="module")
def refdir(dataset: RefDataSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refdata")
    write_jsonl(dataset, out)
    return out


@pytest.fixture(scope="module")
def national(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("national")
    write_national(out, seed=3, scale=0.002)  # 26,482 persons, ~9,000 filings
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


async def _snapshot(hub: asyncpg.Connection, shards: ShardPools) -> dict[str, list[Any]]:
    # xmin changes whenever a row is rewritten: equal snapshots mean untouched rows.
    snap = {t: [tuple(r) for r in await hub.fetch(f"SELECT xmin::text, * FROM {t} ORDER BY 2, 3")]
            for t in (*HUB_TABLES, "refdata_change")}
    for name, pool in shards:
        for t in SHARD_TABLES:
            snap[f"{name}.{t}"] = [tuple(r) for r in await pool.fetch(f"SELECT xmin::text, * FROM {t} ORDER BY 2")]
    return snap


async def _count(shards: ShardPools, table: str) -> int:
    return sum([await pool.fetchval(f"SELECT count(*) FROM {table}") for _, pool in shards])


def _changed(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if k.endswith("_changed")}


ZERO = {f"{t}_changed": 0 for t in ("region", "hospital", "catalog_item", "person", "filing", "person_index")}


async def test_load_twice_changes_nothing(hub: asyncpg.Connection, shards: ShardPools, own: Settings,
                                          refdir: Path, dataset: RefDataSet) -> None:
    first = await load_dir(hub, refdir, own, operator="test.loader")
    expected = {"hospital": len(dataset.hospitals), "person": len(dataset.persons),
                "filing": len(dataset.filings), "catalog_item": len(dataset.catalog),
                "person_index": len(dataset.persons), "region": len(REGIONS)}
    assert {k: first[k] for k in expected} == expected
    assert _changed(first) == {f"{k}_changed": v for k, v in expected.items()}
    assert await _count(shards, "person") == len(dataset.persons)
    assert await _count(shards, "filing") == len(dataset.filings)
    # Each person in its insured province's shard; the index points at it by the certificate's digest.
    p = dataset.persons[0]
    assert await shards.of(p.insuplc_admdvs).fetchval("SELECT acct_balc_fen FROM person WHERE psn_no = $1",
                                                      p.psn_no) == int(p.acct_balc * 100)
    assert p.certno is not None
    digest = certno_digest(person_index_key(own), p.certno)
    assert tuple(await hub.fetchrow("SELECT psn_no, insuplc_admdvs FROM person_index WHERE certno_digest = $1",
                                    digest)) == (p.psn_no, p.insuplc_admdvs)
    # One change-log row per hub row, in one load.
    assert await hub.fetchval("SELECT count(*) FROM refdata_change") == (
        len(REGIONS) + len(dataset.hospitals) + len(dataset.catalog))
    rows = await hub.fetch("SELECT admdvs, med_list_codg, selfpay_prop, pric_uplmt_fen FROM catalog_item")
    db = {(r["admdvs"], r["med_list_codg"]): (r["selfpay_prop"], r["pric_uplmt_fen"]) for r in rows}
    assert db[("510000", ITEM_WITH_CEILING)] == (Decimal("0.0000"), 6000)
    assert db[("150000", ITEM_CLASS_B)] == (Decimal("0.1000"), None)

    before = await _snapshot(hub, shards)
    second = await load_dir(hub, refdir, own, operator="test.loader")
    assert _changed(second) == ZERO
    assert await _snapshot(hub, shards) == before
    assert [r["state"] for r in await hub.fetch("SELECT state FROM refdata_load ORDER BY load_id")] == ["done", "done"]
    # Staging tables are dropped at the end of a load.
    assert await hub.fetchval("SELECT to_regclass('refdata_stage_person_key')") is None


async def test_changes_and_what_arrived_online_survive(hub: asyncpg.Connection, shards: ShardPools, own: Settings,
                                                      refdir: Path, tmp_path: Path, dataset: RefDataSet) -> None:
    await load_dir(hub, refdir, own, operator="test.loader")
    # Online state, written as the router writes it: a revoked file filing (2502), an online
    # filing (2501), chronic eligibility granted and withdrawn (2503/2504), an account in use.
    revoked = dataset.filings[0]
    fpool = shards.of(next(p.insuplc_admdvs for p in dataset.persons if p.psn_no == revoked.psn_no))
    await fpool.execute("UPDATE filing SET revoked = true WHERE filing_id = $1", filing_id(revoked))
    chronic_p = next(p for p in dataset.persons if p.chronic)
    cpool = shards.of(chronic_p.insuplc_admdvs)
    await cpool.execute(
        "INSERT INTO filing (filing_id, psn_no, filing_type, begndate, enddate, source)"
        " VALUES ('ol-1', $1, 'TEMPORARY', '2026-01-01', '2026-12-31', 'online')", chronic_p.psn_no)
    granted = next(d for d in ("TRANSPLANT_AR", "ESRD_DIALYSIS", "CANCER_TX") if d not in chronic_p.chronic)
    added = next(d for d in ("CANCER_TX", "ESRD_DIALYSIS", "DM") if d not in chronic_p.chronic and d != granted)
    online: dict[str, bool] = {chronic_p.chronic[0]: False, granted: True}
    await cpool.execute(
        "UPDATE person SET chronic_online = $2::jsonb, chronic = person_chronic(chronic_file, $2::jsonb)"
        " WHERE psn_no = $1", chronic_p.psn_no, json.dumps(online))
    balance_p = next(p for p in dataset.persons if not p.chronic)
    await shards.of(balance_p.insuplc_admdvs).execute(
        "INSERT INTO account (psn_no, balc_fen) VALUES ($1, 1)", balance_p.psn_no)

    # New files: one person's balance one fen more; the chronic person's file adds a disease
    # (the file also still lists the one withdrawn online).
    new_chronic = sorted({*chronic_p.chronic, added})
    changed = {balance_p.psn_no: msgspec.structs.replace(balance_p, acct_balc=balance_p.acct_balc + Decimal("0.01")),
               chronic_p.psn_no: msgspec.structs.replace(chronic_p, chronic=new_chronic)}
    d = _copy(refdir, tmp_path / "v2")
    _write_lines(d / PERSONS_FILE, [msgspec.json.encode(changed.get(p.psn_no, p)) for p in dataset.persons])
    counts = await load_dir(hub, d, own, operator="test.loader")
    assert _changed(counts) == {**ZERO, "person_changed": 2}

    row = await cpool.fetchrow("SELECT chronic, chronic_file, chronic_online FROM person WHERE psn_no = $1",
                               chronic_p.psn_no)
    assert row["chronic_file"] == new_chronic
    assert json.loads(row["chronic_online"]) == online
    assert row["chronic"] == effective_chronic(new_chronic, online)
    assert chronic_p.chronic[0] not in row["chronic"] and granted in row["chronic"] and added in row["chronic"]
    assert await shards.of(balance_p.insuplc_admdvs).fetchval(
        "SELECT acct_balc_fen FROM person WHERE psn_no = $1", balance_p.psn_no) == int(balance_p.acct_balc * 100) + 1
    assert await shards.of(balance_p.insuplc_admdvs).fetchval(
        "SELECT balc_fen FROM account WHERE psn_no = $1", balance_p.psn_no) == 1
    assert await cpool.fetchval("SELECT source FROM filing WHERE filing_id = 'ol-1'") == "online"

    # Back to the first files: the revocation and the online chronic changes still stand.
    counts = await load_dir(hub, refdir, own, operator="test.loader")
    assert counts["person_changed"] == 2 and counts["filing_changed"] == 0
    assert await fpool.fetchval("SELECT revoked FROM filing WHERE filing_id = $1", filing_id(revoked)) is True
    row = await cpool.fetchrow("SELECT chronic, chronic_online FROM person WHERE psn_no = $1", chronic_p.psn_no)
    assert json.loads(row["chronic_online"]) == online
    assert row["chronic"] == effective_chronic(sorted(chronic_p.chronic), online)
    await shards.of(balance_p.insuplc_admdvs).execute("DELETE FROM account WHERE psn_no = $1", balance_p.psn_no)


async def test_a_bad_line_near_the_end_of_a_large_file_writes_nothing(
        hub: asyncpg.Connection, shards: ShardPools, own: Settings, refdir: Path, national: Path, tmp_path: Path
) -> None:
    await load_dir(hub, refdir, own, operator="test.loader")
    before = await _snapshot(hub, shards)
    d = _copy(national, tmp_path / "bad")
    lines = _lines(d / PERSONS_FILE)
    n = len(lines)
    row = msgspec.to_builtins(msgspec.json.decode(lines[n - 2], type=PersonRow))
    lines[n - 2] = msgspec.json.encode({**row, "acct_balc": "12.345"})
    _write_lines(d / PERSONS_FILE, lines)

    with pytest.raises(RefDataError) as exc:
        await load_dir(hub, d, own, operator="test.loader")
    assert exc.value.errors == [f"persons.jsonl:{n - 1}: amount has more than 2 decimal places - at `$.acct_balc`"]
    assert row["psn_no"] not in str(exc.value) and row["certno"] not in str(exc.value)
    assert await _snapshot(hub, shards) == before
    assert await hub.fetchval("SELECT to_regclass('refdata_stage_person_key')") is None
    for _, pool in shards:
        assert await pool.fetchval("SELECT to_regclass('refdata_stage_person')") is None
    assert await hub.fetchval("SELECT state FROM refdata_load ORDER BY load_id DESC LIMIT 1") == "abandoned"


async def test_duplicates_and_unknown_persons_are_found_in_sql(
        hub: asyncpg.Connection, shards: ShardPools, own: Settings, refdir: Path, national: Path, tmp_path: Path
) -> None:
    await load_dir(hub, refdir, own, operator="test.loader")
    before = await _snapshot(hub, shards)
    d = _copy(national, tmp_path / "dup")
    persons = _lines(d / PERSONS_FILE)
    first = msgspec.json.decode(persons[9], type=PersonRow)
    other = msgspec.json.decode(persons[20_000], type=PersonRow)
    persons.append(msgspec.json.encode(msgspec.structs.replace(first, certno=None)))  # same psn_no
    persons.append(msgspec.json.encode(msgspec.structs.replace(other, psn_no="PX1")))  # same certno
    _write_lines(d / PERSONS_FILE, persons)
    filings = _lines(d / FILINGS_FILE)
    filings.append(b'{"psn_no":"PNOBODY","filing_type":"TEMPORARY","begndate":"2026-01-01","enddate":"2026-12-31"}')
    _write_lines(d / FILINGS_FILE, filings)

    with pytest.raises(RefDataError) as exc:
        await load_dir(hub, d, own, operator="test.loader")
    n = len(persons)
    assert exc.value.errors == [
        f"persons.jsonl:{n - 1}: duplicate psn_no (first at line 10) - at `$.psn_no`",
        f"persons.jsonl:{n}: duplicate certno (first at line 20001) - at `$.certno`",
    ]
    assert await _snapshot(hub, shards) == before

    # Without the duplicates, the filing of an unknown person is the one error.
    _write_lines(d / PERSONS_FILE, persons[:-2])
    with pytest.raises(RefDataError) as exc:
        await load_dir(hub, d, own, operator="test.loader")
    assert exc.value.errors == [f"filings.jsonl:{len(filings)}: person not in persons.jsonl - at `$.psn_no`"]
    assert await _snapshot(hub, shards) == before


MONITORING_FIELDS = ("once_per_day", "gender_only", "supply_days")


async def test_catalog_monitoring_fields_load_and_files_without_them_load_unchanged(
        hub: asyncpg.Connection, shards: ShardPools, own: Settings, refdir: Path, dataset: RefDataSet,
        tmp_path: Path) -> None:
    # A catalog written before issue 13: no monitoring fields at all. It loads, with the column defaults.
    old = _copy(refdir, tmp_path / "old")
    rows = [json.loads(line) for line in _lines(old / CATALOG_FILE)]
    _write_lines(old / CATALOG_FILE, [json.dumps({k: v for k, v in r.items() if k not in MONITORING_FIELDS},
                                                 ensure_ascii=False).encode() for r in rows])
    assert b"supply_days" not in (old / CATALOG_FILE).read_bytes()
    await load_dir(hub, old, own, operator="test.loader")
    got = await hub.fetch("SELECT once_per_day, gender_only, supply_days, count(*) AS n FROM catalog_item"
                          " GROUP BY 1, 2, 3")
    assert [tuple(r) for r in got] == [(False, None, Decimal("1.00"), len(dataset.catalog))]
    # The same catalog with the fields at their defaults (what the generator writes) changes nothing.
    assert _changed(await load_dir(hub, refdir, own, operator="test.loader")) == ZERO

    # Three items flagged: a once-per-day service, an obstetric item, a drug of 30 days per box.
    flagged: dict[int, dict[str, Any]] = {0: {"once_per_day": True}, 1: {"gender_only": "2"},
                                          2: {"supply_days": "30.5"}}
    new = _copy(refdir, tmp_path / "new")
    _write_lines(new / CATALOG_FILE, [json.dumps({**r, **flagged.get(i, {})}, ensure_ascii=False).encode()
                                      for i, r in enumerate(rows)])
    counts = await load_dir(hub, new, own, operator="test.loader")
    assert _changed(counts) == {**ZERO, "catalog_item_changed": 3}
    for i, want in ((0, (True, None, Decimal("1.00"))), (1, (False, "2", Decimal("1.00"))),
                    (2, (False, None, Decimal("30.50")))):
        row = await hub.fetchrow("SELECT once_per_day, gender_only, supply_days FROM catalog_item"
                                 " WHERE admdvs = $1 AND med_list_codg = $2", rows[i]["admdvs"],
                                 rows[i]["med_list_codg"])
        assert tuple(row) == want
    assert _changed(await load_dir(hub, new, own, operator="test.loader")) == ZERO

    # A bad value is refused with the line and the field, and nothing is written.
    before = await _snapshot(hub, shards)
    bad = _copy(new, tmp_path / "bad")
    _write_lines(bad / CATALOG_FILE, [json.dumps({**r, "supply_days": "0"} if i == 4 else
                                                 {**r, "gender_only": "F"} if i == 6 else r,
                                                 ensure_ascii=False).encode() for i, r in enumerate(rows)])
    with pytest.raises(RefDataError) as exc:
        await load_dir(hub, bad, own, operator="test.loader")
    assert exc.value.errors == [
        "catalog.jsonl:5: supply_days must be > 0 and <= 99999.99 - at `$.supply_days`",
        "catalog.jsonl:7: Invalid enum value 'F' - at `$.gender_only`",
    ]
    assert await _snapshot(hub, shards) == before


def _load_command(s: Settings, directory: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services.refdata.load", str(directory), "--dsn", s.pg_dsn,
            "--operator", "test.loader", *extra]


def _env(s: Settings) -> dict[str, str]:
    return {**os.environ, "XS_PG_DATABASE": s.pg_database}


async def test_a_killed_load_resumes_and_ends_in_the_same_state(
        hub: asyncpg.Connection, shards: ShardPools, own: Settings, national: Path) -> None:
    proc = subprocess.Popen(_load_command(own, national, "--chunk-lines", "1000", "--quiet"), cwd=PROJECT_ROOT,
                            env=_env(own), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            merged = await hub.fetchval("SELECT count(*) FROM refdata_load_step WHERE step LIKE 'person:%'")
            if merged >= 3:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    load_id, done_before = await hub.fetchrow(
        "SELECT l.load_id, count(*) FROM refdata_load l JOIN refdata_load_step s USING (load_id)"
        " WHERE l.state = 'running' GROUP BY l.load_id")
    persons_before = await _count(shards, "person")
    assert 0 < persons_before < len(_lines(national / PERSONS_FILE))  # killed midway
    steps_before = {r["step"]: r["done_at"] for r in
                    await hub.fetch("SELECT step, done_at FROM refdata_load_step WHERE load_id = $1", load_id)}

    res = subprocess.run(_load_command(own, national, "--chunk-lines", "1000"), cwd=PROJECT_ROOT, env=_env(own),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    # The same load went on: its earlier steps were not redone, and it is done.
    assert await hub.fetchval("SELECT state FROM refdata_load WHERE load_id = $1", load_id) == "done"
    assert await hub.fetchval("SELECT count(*) FROM refdata_load") == 1
    after = {r["step"]: r["done_at"] for r in
             await hub.fetch("SELECT step, done_at FROM refdata_load_step WHERE load_id = $1", load_id)}
    assert {k: after[k] for k in steps_before} == steps_before and len(after) > done_before
    n_persons = len(_lines(national / PERSONS_FILE))
    assert await _count(shards, "person") == n_persons
    assert await _count(shards, "filing") == len(_lines(national / FILINGS_FILE))
    assert await hub.fetchval("SELECT count(*) FROM person_index") == n_persons
    counts = json.loads(await hub.fetchval("SELECT counts FROM refdata_load WHERE load_id = $1", load_id))
    # Summed over the steps of both runs; a chunk that committed in its shard just before the kill,
    # before its step was recorded in the hub, is merged again and then finds nothing to change.
    assert n_persons - 1000 <= counts["person_changed"] <= n_persons
    # The same state as one uninterrupted load: loading the files again changes nothing.
    assert _changed(await load_dir(hub, national, own, operator="test.loader")) == ZERO


async def test_two_concurrent_loads_run_one_after_the_other(
        hub: asyncpg.Connection, shards: ShardPools, own: Settings, national: Path, tmp_path: Path) -> None:
    # v2: one person's balance and one hospital's name changed.
    v2 = _copy(national, tmp_path / "v2")
    persons = _lines(v2 / PERSONS_FILE)
    person = msgspec.json.decode(persons[4], type=PersonRow)
    persons[4] = msgspec.json.encode(msgspec.structs.replace(person, acct_balc=person.acct_balc + 1))
    _write_lines(v2 / PERSONS_FILE, persons)
    hospitals = _lines(v2 / "hospitals.jsonl")
    hospitals[0] = hospitals[0].replace(b'"fixmedins_name":"', b'"fixmedins_name":"New ')
    _write_lines(v2 / "hospitals.jsonl", hospitals)
    code = msgspec.json.decode(hospitals[0])["fixmedins_code"]

    first = subprocess.Popen(_load_command(own, national, "--quiet"), cwd=PROJECT_ROOT, env=_env(own),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not await hub.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                                     " AND (classid::bigint << 32) + objid::bigint = $1", LOAD_LOCK_ID):
            assert time.monotonic() < deadline and first.poll() is None
            await asyncio.sleep(0.01)
        second = subprocess.run(_load_command(own, v2, "--quiet"), cwd=PROJECT_ROOT, env=_env(own),
                                capture_output=True, text=True, timeout=300, check=False)
    finally:
        first.wait(300)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    loads = await hub.fetch("SELECT load_id, state, started_at, finished_at FROM refdata_load ORDER BY load_id")
    assert [r["state"] for r in loads] == ["done", "done"]
    assert loads[1]["started_at"] >= loads[0]["finished_at"]  # the second waited for the first
    # The newer files' view, not a mix nor the older one.
    assert await shards.of(person.insuplc_admdvs).fetchval(
        "SELECT acct_balc_fen FROM person WHERE psn_no = $1", person.psn_no) == int(person.acct_balc * 100) + 100
    name = await hub.fetchval("SELECT fixmedins_name FROM hospital WHERE fixmedins_code = $1", code)
    assert name.startswith("New ")
    last = await hub.fetchval("SELECT max(version) FROM refdata_change WHERE entity = 'hospital' AND key = $1", code)
    assert last == await hub.fetchval("SELECT max(version) FROM refdata_change")


def test_command_line_reports_counts_and_progress(own: Settings, refdir: Path) -> None:
    res = subprocess.run(_load_command(own, refdir), cwd=PROJECT_ROOT, env=_env(own),
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "person: " in res.stdout and "rows/s" in res.stdout
    assert "merge: " in res.stderr and " rows/s, 100.0%, ETA" in res.stderr
