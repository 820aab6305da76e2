"""Load a reference-data directory into PostgreSQL.

    python -m services.refdata.load DIR [--dsn DSN]

Reads hospitals.jsonl, persons.jsonl, filings.jsonl and catalog.jsonl (all four
are required), validates every line with the strict structs of
`schemas.refdata`, checks references (known regions, filings of persons in the
same persons.jsonl, catalog and filing targets are provinces, no duplicate
keys), and only then writes, in one transaction: the region table of
`services.refdata.regions` (plus any county a row uses that the table derives),
then the four files.

Writes are upserts that never delete: a row whose content is unchanged is not
touched, so loading the same directory twice changes nothing (the `_changed`
counts of the second load are all 0). A load that changed anything NOTIFYs
`refdata_changed` on commit, so routers reload their snapshot. Filings are
keyed by a hash of their content (`filing_id`); an existing filing is never
updated, so a revocation recorded by the router survives a reload. The
`account` table is not touched: accounts start from `person.acct_balc_fen` on
first use.

Errors name the file, the line and the field, never a personal identifier (the
only values quoted are code-table values of a bad enum field):
``persons.jsonl:12: Invalid enum value '311' - at `$.insutype```.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncpg
import msgspec

from schemas.refdata import (
    CATALOG_FILE,
    FILINGS_FILE,
    HOSPITALS_FILE,
    PERSONS_FILE,
    CatalogRow,
    FilingRow,
    HospitalRow,
    PersonRow,
    RefDataSet,
    yuan_to_fen,
)
from services.common.config import Settings, load_settings
from services.common.shards import ShardPools, certno_digest, person_index_key
from services.refdata.regions import REGIONS, Region, UnknownRegion, region_of

log = logging.getLogger(__name__)

LINE_BYTES_MAX: Final = 64 * 1024
ROWS_PER_FILE_MAX: Final = 10_000_000
ERRORS_REPORTED_MAX: Final = 20
REFDATA_CHANNEL: Final = "refdata_changed"  # NOTIFYed when a load changed anything

T = TypeVar("T", bound=msgspec.Struct)


class RefDataError(ValueError):
    """One or more invalid lines; `errors` holds 'file:line: problem - at `$.field`' strings."""

    def __init__(self, errors: Sequence[str], total: int | None = None) -> None:
        self.errors = list(errors)
        total = len(self.errors) if total is None else total
        more = f"\n... and {total - len(self.errors)} more" if total > len(self.errors) else ""
        super().__init__("\n".join(self.errors) + more)


class _Errors:
    def __init__(self) -> None:
        self.shown: list[str] = []
        self.total = 0

    def add(self, file: str, line: int, problem: str) -> None:
        self.total += 1
        if len(self.shown) < ERRORS_REPORTED_MAX:
            self.shown.append(f"{file}:{line}: {problem}")

    def raise_if_any(self) -> None:
        if self.total:
            raise RefDataError(self.shown, self.total)


def _read_file(directory: Path, name: str, row_type: type[T], errors: _Errors) -> list[tuple[int, T]]:
    path = directory / name
    if not path.is_file():
        errors.add(name, 0, "file is missing")
        return []
    decoder = msgspec.json.Decoder(row_type)
    rows: list[tuple[int, T]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > LINE_BYTES_MAX:
                errors.add(name, lineno, f"line longer than {LINE_BYTES_MAX} bytes")
                continue
            if not raw.strip():
                continue
            if len(rows) >= ROWS_PER_FILE_MAX:
                errors.add(name, lineno, f"more than {ROWS_PER_FILE_MAX} rows")
                break
            try:
                rows.append((lineno, decoder.decode(raw)))
            except msgspec.ValidationError as exc:
                errors.add(name, lineno, str(exc) if "- at `$" in str(exc) else f"{exc} - at `$`")
            except msgspec.DecodeError:
                errors.add(name, lineno, "line is not a valid JSON object")
    return rows


def _unique(
    file: str, rows: list[tuple[int, T]], key: Callable[[T], object], field: str, what: str, errors: _Errors
) -> None:
    first: dict[object, int] = {}
    at = f"$.{field}" if field else "$"
    for lineno, row in rows:
        k = key(row)
        if k in first:
            errors.add(file, lineno, f"duplicate {what} (first at line {first[k]}) - at `{at}`")
        else:
            first[k] = lineno


def _known_region(file: str, lineno: int, admdvs: str, field: str, errors: _Errors) -> Region | None:
    try:
        return region_of(admdvs)
    except UnknownRegion:
        errors.add(file, lineno, f"unknown region - at `$.{field}`")
        return None


def _province(file: str, lineno: int, admdvs: str, field: str, errors: _Errors) -> None:
    region = REGIONS.get(admdvs)
    if region is None or not region.is_province:
        errors.add(file, lineno, f"not a province in the region table - at `$.{field}`")


def read_dir(directory: str | Path) -> RefDataSet:
    """Decode and check the four files; raises RefDataError listing the bad lines. No database."""
    d = Path(directory)
    errors = _Errors()
    hospitals = _read_file(d, HOSPITALS_FILE, HospitalRow, errors)
    persons = _read_file(d, PERSONS_FILE, PersonRow, errors)
    filings = _read_file(d, FILINGS_FILE, FilingRow, errors)
    catalog = _read_file(d, CATALOG_FILE, CatalogRow, errors)
    # References are checked only once every line decodes: a bad line would make others look orphaned.
    errors.raise_if_any()

    _unique(HOSPITALS_FILE, hospitals, lambda r: r.fixmedins_code, "fixmedins_code", "hospital code", errors)
    for lineno, h in hospitals:
        _known_region(HOSPITALS_FILE, lineno, h.admdvs, "admdvs", errors)

    _unique(PERSONS_FILE, persons, lambda r: r.psn_no, "psn_no", "psn_no", errors)
    certified = [(lineno, p) for lineno, p in persons if p.certno is not None]
    _unique(PERSONS_FILE, certified, lambda r: r.certno, "certno", "certno", errors)
    for lineno, p in persons:
        _known_region(PERSONS_FILE, lineno, p.insuplc_admdvs, "insuplc_admdvs", errors)

    _unique(FILINGS_FILE, filings, filing_id, "", "filing", errors)
    psn_nos = {p.psn_no for _, p in persons}
    for lineno, f in filings:
        if f.psn_no not in psn_nos:
            errors.add(FILINGS_FILE, lineno, f"person not in {PERSONS_FILE} - at `$.psn_no`")
        if f.target_admdvs is not None:
            _province(FILINGS_FILE, lineno, f.target_admdvs, "target_admdvs", errors)

    _unique(CATALOG_FILE, catalog, lambda r: (r.admdvs, r.med_list_codg), "med_list_codg", "catalog item", errors)
    for lineno, c in catalog:
        _province(CATALOG_FILE, lineno, c.admdvs, "admdvs", errors)

    errors.raise_if_any()

    catalog_provinces = {c.admdvs for _, c in catalog}
    uncovered = sorted({region_of(h.admdvs).prov_admdvs for _, h in hospitals} - catalog_provinces)
    if uncovered:
        log.warning("hospitals in provinces without catalog items: %s", ", ".join(uncovered))
    return RefDataSet(
        hospitals=[r for _, r in hospitals],
        persons=[r for _, r in persons],
        filings=[r for _, r in filings],
        catalog=[r for _, r in catalog],
    )


def filing_id(row: FilingRow) -> str:
    """Deterministic id from the filing's content: the same row always gets the same id."""
    content = "|".join(
        (row.psn_no, row.filing_type, row.begndate.isoformat(), row.enddate.isoformat(), row.target_admdvs or "")
    )
    return "rd-" + hashlib.sha256(content.encode()).hexdigest()[:32]


# Writing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    name: str
    key: tuple[str, ...]
    values: tuple[str, ...]
    update: bool = True  # False: an existing row is never changed (filings)
    also_set: str = ""  # extra assignments on insert and update (derived columns)
    returning: str = ""  # the key expression of each changed row, for the change log

    @property
    def columns(self) -> tuple[str, ...]:
        return self.key + self.values

    def upsert_sql(self, source: str) -> str:
        cols = ", ".join(self.columns)
        head = f"INSERT INTO {self.name} AS t ({cols}) SELECT {cols} FROM {source} ON CONFLICT ({', '.join(self.key)})"
        tail = f" RETURNING {self.returning}" if self.returning else ""
        if not self.update:
            return head + " DO NOTHING" + tail
        sets = ", ".join([f"{c} = EXCLUDED.{c}" for c in self.values] + ([self.also_set] if self.also_set else []))
        old = ", ".join(f"t.{c}" for c in self.values)
        new = ", ".join(f"EXCLUDED.{c}" for c in self.values)
        return f"{head} DO UPDATE SET {sets} WHERE ({old}) IS DISTINCT FROM ({new}){tail}"


_REGION = _Table("region", ("admdvs",), ("name", "prov_admdvs", "pool_admdvs"))
_HOSPITAL = _Table("hospital", ("fixmedins_code",), ("fixmedins_name", "admdvs", "hosp_lv"),
                   returning="fixmedins_code")
# The file sets chronic_file; the effective `chronic` keeps what was registered online (2503/2504).
_PERSON = _Table(
    "person",
    ("psn_no",),
    ("insuplc_admdvs", "insutype", "psn_type", "assistance", "acct_balc_fen", "chronic_file", "certno", "psn_name"),
    also_set="chronic = person_chronic(EXCLUDED.chronic_file, t.chronic_online)",
)
_FILING = _Table(
    "filing", ("filing_id",), ("psn_no", "filing_type", "begndate", "enddate", "target_admdvs"), update=False
)
_CATALOG = _Table("catalog_item", ("admdvs", "med_list_codg"), ("name", "chrgitm_lv", "selfpay_prop", "pric_uplmt_fen"),
                  returning="admdvs || ':' || med_list_codg")
_HUB_TABLES = (_REGION, _HOSPITAL, _CATALOG)
_SHARD_TABLES = (_PERSON, _FILING)


def _records(dataset: RefDataSet) -> list[tuple[_Table, list[tuple[Any, ...]]]]:
    regions = dict(REGIONS)
    for code in [h.admdvs for h in dataset.hospitals] + [p.insuplc_admdvs for p in dataset.persons]:
        if code not in regions:
            regions[code] = region_of(code)
    return [
        (_REGION, [(r.admdvs, r.name, r.prov_admdvs, r.pool_admdvs) for r in regions.values()]),
        (_HOSPITAL, [(h.fixmedins_code, h.fixmedins_name, h.admdvs, h.hosp_lv) for h in dataset.hospitals]),
        (
            _PERSON,
            [
                (
                    p.psn_no,
                    p.insuplc_admdvs,
                    p.insutype,
                    p.psn_type,
                    p.assistance,
                    yuan_to_fen(p.acct_balc),
                    list(p.chronic),
                    p.certno,
                    p.psn_name,
                )
                for p in dataset.persons
            ],
        ),
        (
            _FILING,
            [(filing_id(f), f.psn_no, f.filing_type, f.begndate, f.enddate, f.target_admdvs) for f in dataset.filings],
        ),
        (
            _CATALOG,
            [
                (
                    c.admdvs,
                    c.med_list_codg,
                    c.name,
                    c.chrgitm_lv,
                    c.selfpay_prop,
                    None if c.pric_uplmt_amt is None else yuan_to_fen(c.pric_uplmt_amt),
                )
                for c in dataset.catalog
            ],
        ),
    ]


def _affected(status: str) -> int:
    # "INSERT 0 <n>": n counts inserted and updated rows.
    return int(status.rsplit(" ", 1)[-1])


async def _upsert(conn: asyncpg.Connection, table: _Table, records: list[tuple[Any, ...]],
                  counts: dict[str, int]) -> list[str]:
    temp = f"_load_{table.name}"
    await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {temp} (LIKE {table.name} INCLUDING DEFAULTS)"
                       " ON COMMIT DELETE ROWS")
    await conn.copy_records_to_table(temp, records=records, columns=list(table.columns))
    changed = await conn.fetch(table.upsert_sql(temp)) if table.returning else None
    n = _affected(await conn.execute(table.upsert_sql(temp))) if changed is None else len(changed)
    counts[table.name] = counts.get(table.name, 0) + len(records)
    counts[f"{table.name}_changed"] = counts.get(f"{table.name}_changed", 0) + n
    return [r[0] for r in changed or ()]


async def load_dataset(conn: asyncpg.Connection, dataset: RefDataSet, s: Settings | None = None) -> dict[str, int]:
    """Upsert a checked dataset: the hub's tables and the person index in one transaction on `conn`
    (the hub), persons and filings in one transaction per shard. Returns per table rows given and
    rows changed. Changed hospitals and catalog items go to the ordered change log."""
    s = s or load_settings()
    counts: dict[str, int] = {}
    tables = dict(_records(dataset))
    shards = await ShardPools.connect(s, 1)
    try:
        smap = shards.map
        by_shard: dict[str, dict[_Table, list[tuple[Any, ...]]]] = {}
        shard_of_person: dict[str, str] = {}
        for rec in tables[_PERSON]:
            shard_of_person[rec[0]] = shard = smap.shard_of(rec[1])
            by_shard.setdefault(shard, {}).setdefault(_PERSON, []).append(rec)
        for rec in tables[_FILING]:
            by_shard.setdefault(shard_of_person[rec[1]], {}).setdefault(_FILING, []).append(rec)
        for shard, pool in shards:
            async with pool.acquire() as sconn, sconn.transaction():
                for table in _SHARD_TABLES:
                    await _upsert(sconn, table, by_shard.get(shard, {}).get(table, []), counts)
        key = person_index_key(s)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(refdata_lock_id())")
            changes: list[tuple[str, str]] = []
            for table in _HUB_TABLES:
                changes += [(table.name, k) for k in await _upsert(conn, table, tables[table], counts)]
            await conn.executemany(
                "INSERT INTO person_index (certno_digest, psn_no, insuplc_admdvs) VALUES ($1, $2, $3)"
                " ON CONFLICT (certno_digest) DO UPDATE SET psn_no = EXCLUDED.psn_no,"
                " insuplc_admdvs = EXCLUDED.insuplc_admdvs",
                [(certno_digest(key, p.certno), p.psn_no, p.insuplc_admdvs) for p in dataset.persons if p.certno],
            )
            if changes:
                await conn.executemany("INSERT INTO refdata_change (entity, key) VALUES ($1, $2)", changes)
                await conn.execute("SELECT pg_notify($1, (SELECT max(version) FROM refdata_change)::text)",
                                   REFDATA_CHANNEL)
    finally:
        await shards.close()
    return counts


async def load_dir(db: asyncpg.Pool | asyncpg.Connection, directory: str | Path,
                   s: Settings | None = None) -> dict[str, int]:
    """Validate `directory` (RefDataError on any bad line, before any write) and load it."""
    dataset = read_dir(directory)
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await load_dataset(conn, dataset, s)
    return await load_dataset(db, dataset, s)


async def _main_async(directory: Path, dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await load_dir(conn, directory)
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load reference data (four .jsonl files) into PostgreSQL.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: from the XS_PG_* settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dsn = args.dsn or load_settings().pg_dsn
    try:
        counts = asyncio.run(_main_async(args.directory, dsn))
    except RefDataError as exc:
        print(f"refdata load refused, nothing written:\n{exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"refdata load failed, nothing written: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for name in (t.name for t in (_REGION, _HOSPITAL, _PERSON, _FILING, _CATALOG)):
        print(f"{name}: {counts[name]} rows, {counts[name + '_changed']} inserted or updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
