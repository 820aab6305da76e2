"""Load a reference-data directory into the hub and the shard databases, streaming.

    python -m services.refdata.load DIR --operator NAME [--dsn HUB_DSN] [--quiet] [--chunk-lines N]

Reads hospitals.jsonl, persons.jsonl, filings.jsonl and catalog.jsonl (all four are required).
Sized for a country: persons and filings are never held in memory.

1. **Lock.** A session advisory lock on the hub (`LOAD_LOCK_ID`) for the whole load: two loads run
   one after the other, the later one last, so the result is never a mix and never the older files.
2. **Resume.** The load is recorded in the hub's `refdata_load` (keyed by the sha256 of the four
   files) and every committed unit of work in `refdata_load_step`; a load of the same files that
   was killed midway is continued: its recorded steps are skipped.
3. **Validate and stage.** Every line is decoded with the strict structs of `schemas.refdata`
   (file:line and field of each bad line, never a value) and region codes are checked; valid rows
   are COPYed into UNLOGGED staging tables (`refdata_stage_*`, not the real tables): persons into
   their shard's (`ShardMap` by insured province), person keys (psn_no, shard, the certificate's
   keyed digest) and filings into the hub's. Hospitals and catalog items (bounded by institutions,
   not persons) are checked in memory. Set-based checks run in SQL on the staging tables: duplicate
   psn_no, certno (by digest) and filings, filings of persons not in persons.jsonl. Any bad line:
   `RefDataError`, and nothing is written to a real table.
4. **Merge what changed**, staging against current rows: inserts of new keys, updates only where
   a value is distinct; one transaction per chunk of `CHUNK_LINES` lines per shard. Hub tables
   (regions, hospitals, catalog) in one transaction under `pg_advisory_xact_lock(refdata_lock_id())`
   with one `refdata_change` row per changed key and `NOTIFY refdata_changed`; the person index by
   `certno_digest`. Nothing is ever deleted.

A kill between a chunk's commit in its shard and the record of its step in the hub makes the resumed
load merge that chunk again: it then finds nothing to change (same final state), so only that
chunk's `_changed` count is missing from the totals.

Precedence (`services.refdata.changes`): an existing filing is never updated (a revocation stays,
online and promise filings are never touched); the file sets `chronic_file`, and the effective
`chronic` = person_chronic(chronic_file, chronic_online) keeps what 2503/2504 registered online.
The `account` table is not touched: accounts start from `person.acct_balc_fen` on first use.

Audit: a finished load writes one `refdata.load` audit row (services.common.audit) in the transaction
that marks it done — the operator (`--operator NAME` or XS_OPERATOR, required), the files' digest and
the rows changed per table, and the digest of the load in force before; the command then publishes it
to fsi.audit. A refused load changes nothing and leaves no row.

Progress (rows, rows/s, %, ETA) goes to stderr at most every `PROGRESS_EVERY_S` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Final, TypeVar

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
from services.common import audit
from services.common.config import Settings, load_settings
from services.common.shards import ShardMap, ShardPools, certno_digest, person_index_key
from services.refdata.changes import change_log, chunks, diff_rows, progress_line, remaining_steps
from services.refdata.regions import REGIONS, Region, UnknownRegion, region_of

log = logging.getLogger(__name__)

LINE_BYTES_MAX: Final = 64 * 1024
ROWS_PER_FILE_MAX: Final = 100_000_000  # line numbers are int4 in staging; the country is 1.33 billion in many files
IN_MEMORY_ROWS_MAX: Final = 1_000_000  # read_dir (tests, demo) holds the rows
ERRORS_REPORTED_MAX: Final = 20
REFDATA_CHANNEL: Final = "refdata_changed"  # NOTIFYed when a load changed a hub table
LOAD_LOCK_ID: Final = 7170510002  # session lock: one load at a time (refdata_lock_id() is 7170510001)
BATCH_LINES: Final = 20_000  # lines decoded and COPYed at a time
CHUNK_LINES: Final = 1_000_000  # lines merged per transaction (default)
CHUNK_LINES_MIN: Final = 1_000
PROGRESS_EVERY_S: Final = 3.0

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
            if len(rows) >= IN_MEMORY_ROWS_MAX:
                errors.add(name, lineno, f"more than {IN_MEMORY_ROWS_MAX} rows")
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


# Streaming load -----------------------------------------------------------------------------


class _Progress:
    """At most one stderr line every PROGRESS_EVERY_S seconds; rate and ETA per phase (staging, merge)."""

    def __init__(self, out: IO[str] | None) -> None:
        self.out = out
        self.phase = "stage"
        self.started = self.last = time.monotonic()

    def __call__(self, phase: str, rows: int, done: int, total: int, *, force: bool = False) -> None:
        now = time.monotonic()
        kind = "merge" if phase == "merge" else "stage"
        if kind != self.phase:
            self.phase, self.started = kind, now
        if self.out is None or (not force and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        print(progress_line(phase, rows, done, total, now - self.started), file=self.out, flush=True)


def files_digest(directory: Path) -> str:
    """sha256 over the four files' names and contents: the identity of a load."""
    h = hashlib.sha256()
    for name in (HOSPITALS_FILE, PERSONS_FILE, FILINGS_FILE, CATALOG_FILE):
        h.update(name.encode() + b"\0")
        with (directory / name).open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


# Staging tables: UNLOGGED, recreated for each staging pass (no index while COPYing).
_PERSON_COLS: Final = ("line", "psn_no", "insuplc_admdvs", "insutype", "psn_type", "assistance", "acct_balc_fen",
                       "chronic_file", "certno", "psn_name")
_KEY_COLS: Final = ("line", "psn_no", "insuplc_admdvs", "certno_digest", "shard")
_FILING_COLS: Final = ("line", "filing_id", "psn_no", "filing_type", "begndate", "enddate", "target_admdvs")
_STAGE_FILING_DDL: Final = (
    "CREATE UNLOGGED TABLE refdata_stage_filing (line integer NOT NULL, filing_id text NOT NULL,"
    " psn_no text NOT NULL, filing_type text NOT NULL, begndate date NOT NULL, enddate date NOT NULL,"
    " target_admdvs char(6))"
)
_HUB_STAGE_DDL: Final = (
    "DROP TABLE IF EXISTS refdata_stage_person_key, refdata_stage_filing",
    "CREATE UNLOGGED TABLE refdata_stage_person_key (line integer NOT NULL, psn_no text NOT NULL,"
    " insuplc_admdvs char(6) NOT NULL, certno_digest bytea, shard text NOT NULL)",
    _STAGE_FILING_DDL,
)
_SHARD_STAGE_DDL: Final = (
    "DROP TABLE IF EXISTS refdata_stage_person, refdata_stage_filing",
    "CREATE UNLOGGED TABLE refdata_stage_person (line integer NOT NULL, psn_no text NOT NULL,"
    " insuplc_admdvs char(6) NOT NULL, insutype text NOT NULL, psn_type text NOT NULL, assistance text,"
    " acct_balc_fen bigint NOT NULL, chronic_file text[] NOT NULL, certno text, psn_name text)",
    _STAGE_FILING_DDL,
)
_HUB_STAGE_TABLES: Final = ("refdata_stage_person_key", "refdata_stage_filing")
_SHARD_STAGE_TABLES: Final = ("refdata_stage_person", "refdata_stage_filing")
_SESSION: Final = ("SET work_mem = '256MB'", "SET maintenance_work_mem = '512MB'")


@lru_cache(maxsize=4096)
def _region_problem(admdvs: str, province: bool) -> str | None:
    if province:
        region = REGIONS.get(admdvs)
        return None if region is not None and region.is_province else "not a province in the region table"
    try:
        region_of(admdvs)
    except UnknownRegion:
        return "unknown region"
    return None


@dataclass
class _Staged:
    """What the staging pass produced (recorded in the 'staged' step, checked on resume)."""

    persons: int = 0
    filings: int = 0
    person_lines: int = 0
    filing_lines: int = 0
    by_shard: dict[str, dict[str, int]] = field(default_factory=dict)  # shard -> {person, filing}

    def to_json(self) -> dict[str, Any]:
        return {"person": self.persons, "filing": self.filings, "person_lines": self.person_lines,
                "filing_lines": self.filing_lines, "by_shard": self.by_shard}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Staged:
        return cls(d["person"], d["filing"], d["person_lines"], d["filing_lines"], d["by_shard"])


def _lines(path: Path, errors: _Errors, name: str) -> Iterator[list[tuple[int, bytes]]]:
    """Batches of (line number, raw line); blank lines skipped; over-long lines reported."""
    batch: list[tuple[int, bytes]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > LINE_BYTES_MAX:
                errors.add(name, lineno, f"line longer than {LINE_BYTES_MAX} bytes")
                continue
            if lineno > ROWS_PER_FILE_MAX:
                errors.add(name, lineno, f"more than {ROWS_PER_FILE_MAX} lines")
                break
            if raw.strip():
                batch.append((lineno, raw))
            if len(batch) >= BATCH_LINES:
                yield batch
                batch = []
    if batch:
        yield batch


def _decode_error(exc: Exception) -> str:
    if isinstance(exc, msgspec.ValidationError):
        return str(exc) if "- at `$" in str(exc) else f"{exc} - at `$`"
    return "line is not a valid JSON object"


def _decode_persons(batch: list[tuple[int, bytes]], smap: ShardMap, key: bytes
                    ) -> tuple[dict[str, list[tuple[Any, ...]]], list[tuple[Any, ...]], list[tuple[int, str]]]:
    """Rows per shard, key rows for the hub, and (line, problem) of the bad lines. Pure, no I/O."""
    decoder = _PERSON_DECODER
    by_shard: dict[str, list[tuple[Any, ...]]] = {}
    keys: list[tuple[Any, ...]] = []
    bad: list[tuple[int, str]] = []
    for lineno, raw in batch:
        try:
            p = decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            bad.append((lineno, _decode_error(exc)))
            continue
        problem = _region_problem(p.insuplc_admdvs, False)
        if problem:
            bad.append((lineno, f"{problem} - at `$.insuplc_admdvs`"))
            continue
        shard = smap.shard_of(p.insuplc_admdvs)
        # chronic_file sorted: then it equals person_chronic(file, '{}') and inserts need no function call.
        by_shard.setdefault(shard, []).append((lineno, p.psn_no, p.insuplc_admdvs, p.insutype, p.psn_type,
                                               p.assistance, yuan_to_fen(p.acct_balc), sorted(p.chronic),
                                               p.certno, p.psn_name))
        digest = None if p.certno is None else certno_digest(key, p.certno)
        keys.append((lineno, p.psn_no, p.insuplc_admdvs, digest, shard))
    return by_shard, keys, bad


def _decode_filings(batch: list[tuple[int, bytes]]) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]]]:
    decoder = _FILING_DECODER
    rows: list[tuple[Any, ...]] = []
    bad: list[tuple[int, str]] = []
    for lineno, raw in batch:
        try:
            f = decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            bad.append((lineno, _decode_error(exc)))
            continue
        if f.target_admdvs is not None and (problem := _region_problem(f.target_admdvs, True)):
            bad.append((lineno, f"{problem} - at `$.target_admdvs`"))
            continue
        rows.append((lineno, filing_id(f), f.psn_no, f.filing_type, f.begndate, f.enddate, f.target_admdvs))
    return rows, bad


_PERSON_DECODER: Final = msgspec.json.Decoder(PersonRow)
_FILING_DECODER: Final = msgspec.json.Decoder(FilingRow)


@dataclass
class _Hub:
    """The hub's small tables, checked in memory (bounded by institutions and items, not persons)."""

    hospitals: list[HospitalRow]
    catalog: list[CatalogRow]


def _read_hub_files(d: Path, errors: _Errors) -> _Hub:
    hospitals = _read_file(d, HOSPITALS_FILE, HospitalRow, errors)
    catalog = _read_file(d, CATALOG_FILE, CatalogRow, errors)
    _unique(HOSPITALS_FILE, hospitals, lambda r: r.fixmedins_code, "fixmedins_code", "hospital code", errors)
    for lineno, h in hospitals:
        _known_region(HOSPITALS_FILE, lineno, h.admdvs, "admdvs", errors)
    _unique(CATALOG_FILE, catalog, lambda r: (r.admdvs, r.med_list_codg), "med_list_codg", "catalog item", errors)
    for lineno, c in catalog:
        _province(CATALOG_FILE, lineno, c.admdvs, "admdvs", errors)
    return _Hub([r for _, r in hospitals], [r for _, r in catalog])


class _Loader:
    def __init__(self, hub: asyncpg.Connection, shards: dict[str, asyncpg.Connection], smap: ShardMap,
                 directory: Path, key: bytes, progress: _Progress, chunk_lines: int) -> None:
        self.hub = hub
        self.shards = shards
        self.smap = smap
        self.dir = directory
        self.key = key
        self.progress = progress
        self.chunk_lines = chunk_lines
        self.load_id = 0

    # -- staging -------------------------------------------------------------------------

    async def stage(self, errors: _Errors) -> _Staged:
        for ddl in _HUB_STAGE_DDL:
            await self.hub.execute(ddl)
        for conn in self.shards.values():
            for ddl in _SHARD_STAGE_DDL:
                await conn.execute(ddl)
        staged = _Staged(by_shard={name: {"person": 0, "filing": 0} for name in self.shards})
        total = sum((self.dir / n).stat().st_size for n in (PERSONS_FILE, FILINGS_FILE))
        done_bytes = 0
        pending: asyncio.Future[Any] | None = None

        async def flush() -> None:
            nonlocal pending
            if pending is not None:
                await pending
                pending = None

        for batch in _lines(self.dir / PERSONS_FILE, errors, PERSONS_FILE):
            by_shard, keys, bad = await asyncio.to_thread(_decode_persons, batch, self.smap, self.key)
            for lineno, problem in bad:
                errors.add(PERSONS_FILE, lineno, problem)
            await flush()
            if not errors.total:  # after a bad line only decoding goes on, to report every bad line
                copies = [self.hub.copy_records_to_table("refdata_stage_person_key", records=keys,
                                                         columns=list(_KEY_COLS))]
                for shard, rows in by_shard.items():
                    staged.by_shard[shard]["person"] += len(rows)
                    copies.append(self.shards[shard].copy_records_to_table(
                        "refdata_stage_person", records=rows, columns=list(_PERSON_COLS)))
                pending = asyncio.gather(*copies)
            staged.persons += len(keys)
            staged.person_lines = batch[-1][0]
            done_bytes += sum(len(raw) for _, raw in batch)
            self.progress(PERSONS_FILE, staged.persons, done_bytes, total)
        await flush()
        for batch in _lines(self.dir / FILINGS_FILE, errors, FILINGS_FILE):
            rows, bad = await asyncio.to_thread(_decode_filings, batch)
            for lineno, problem in bad:
                errors.add(FILINGS_FILE, lineno, problem)
            await flush()
            if not errors.total:
                pending = asyncio.ensure_future(self.hub.copy_records_to_table(
                    "refdata_stage_filing", records=rows, columns=list(_FILING_COLS)))
            staged.filings += len(rows)
            staged.filing_lines = batch[-1][0]
            done_bytes += sum(len(raw) for _, raw in batch)
            self.progress(FILINGS_FILE, staged.persons + staged.filings, done_bytes, total)
        await flush()
        return staged

    async def _duplicates(self, table: str, column: str, file: str, what: str, at: str, errors: _Errors,
                          where: str = "") -> None:
        """Unique index on the staging table; when it fails, name every duplicate line (and the first)."""
        cond = f" WHERE {where}" if where else ""
        try:
            await self.hub.execute(f"CREATE UNIQUE INDEX ON {table} ({column}){cond}")
            return
        except asyncpg.UniqueViolationError:
            pass
        rows = await self.hub.fetch(
            f"SELECT line, first FROM (SELECT line, min(line) OVER (PARTITION BY {column}) AS first"
            f" FROM {table}{cond}) AS d WHERE line <> first ORDER BY line")
        for r in rows:
            errors.add(file, r["line"], f"duplicate {what} (first at line {r['first']}) - at `{at}`")

    async def check(self, errors: _Errors) -> None:
        """The set-based checks, in SQL on the hub's staging tables."""
        await self._duplicates("refdata_stage_person_key", "psn_no", PERSONS_FILE, "psn_no", "$.psn_no", errors)
        await self._duplicates("refdata_stage_person_key", "certno_digest", PERSONS_FILE, "certno", "$.certno",
                               errors, where="certno_digest IS NOT NULL")
        await self._duplicates("refdata_stage_filing", "filing_id", FILINGS_FILE, "filing", "$", errors)
        if errors.total:
            return
        orphans = await self.hub.fetch(
            "SELECT line FROM refdata_stage_filing f WHERE NOT EXISTS"
            " (SELECT 1 FROM refdata_stage_person_key k WHERE k.psn_no = f.psn_no) ORDER BY line")
        for r in orphans:
            errors.add(FILINGS_FILE, r["line"], f"person not in {PERSONS_FILE} - at `$.psn_no`")

    async def route_filings(self, staged: _Staged) -> None:
        """Each filing into its person's shard's staging table (hub COPY out, shard COPY in)."""
        for shard, conn in self.shards.items():
            query = ("SELECT f.line, f.filing_id, f.psn_no, f.filing_type, f.begndate, f.enddate, f.target_admdvs"
                     " FROM refdata_stage_filing f JOIN refdata_stage_person_key k USING (psn_no)"
                     " WHERE k.shard = $1 ORDER BY f.line")
            await _pipe(self.hub, query, shard, conn, "refdata_stage_filing", _FILING_COLS)
            staged.by_shard[shard]["filing"] = await conn.fetchval("SELECT count(*) FROM refdata_stage_filing")

    async def index_staging(self) -> None:
        for conn in self.shards.values():
            for table in _SHARD_STAGE_TABLES:
                await conn.execute(f"CREATE INDEX ON {table} USING brin (line)")
                await conn.execute(f"ANALYZE {table}")
        await self.hub.execute("CREATE INDEX ON refdata_stage_person_key USING brin (line)")
        for table in _HUB_STAGE_TABLES:
            await self.hub.execute(f"ANALYZE {table}")

    async def staging_intact(self, staged: _Staged) -> bool:
        """Unlogged tables are emptied by a server crash: resume from staging only if it is whole."""
        try:
            if await self.hub.fetchval("SELECT count(*) FROM refdata_stage_person_key") != staged.persons:
                return False
            for shard, conn in self.shards.items():
                for table, what in zip(_SHARD_STAGE_TABLES, ("person", "filing"), strict=True):
                    if await conn.fetchval(f"SELECT count(*) FROM {table}") != staged.by_shard[shard][what]:
                        return False
        except asyncpg.UndefinedTableError:
            return False
        return True

    async def drop_staging(self) -> None:
        await self.hub.execute("DROP TABLE IF EXISTS refdata_stage_person_key, refdata_stage_filing")
        for conn in self.shards.values():
            await conn.execute("DROP TABLE IF EXISTS refdata_stage_person, refdata_stage_filing")

    # -- merging -------------------------------------------------------------------------

    async def record(self, step: str, counts: dict[str, int]) -> None:
        await self.hub.execute(
            "INSERT INTO refdata_load_step (load_id, step, counts) VALUES ($1, $2, $3::jsonb)"
            " ON CONFLICT DO NOTHING", self.load_id, step, json.dumps(counts))
        await self.hub.execute("UPDATE refdata_load SET updated_at = now() WHERE load_id = $1", self.load_id)

    async def merge_hub(self, hub_rows: _Hub) -> dict[str, int]:
        counts: dict[str, int] = {}
        regions = dict(REGIONS)
        for code in [h.admdvs for h in hub_rows.hospitals]:
            if code not in regions:
                regions[code] = region_of(code)
        async with self.hub.transaction():
            await self.hub.execute("SELECT pg_advisory_xact_lock(refdata_lock_id())")
            changed: dict[str, list[str]] = {}
            for spec, incoming in (
                (_REGION, [((r.admdvs,), (r.name, r.prov_admdvs, r.pool_admdvs)) for r in regions.values()]),
                (_HOSPITAL, [((h.fixmedins_code,), (h.fixmedins_name, h.admdvs, h.hosp_lv))
                             for h in hub_rows.hospitals]),
                (_CATALOG, [((c.admdvs, c.med_list_codg), (c.name, c.chrgitm_lv, c.selfpay_prop,
                            None if c.pric_uplmt_amt is None else yuan_to_fen(c.pric_uplmt_amt),
                            c.once_per_day, c.gender_only, c.supply_days))
                            for c in hub_rows.catalog]),
            ):
                current = {tuple(r[: len(spec.key)]): tuple(r[len(spec.key):])
                           for r in await self.hub.fetch(f"SELECT {', '.join(spec.columns)} FROM {spec.name}")}
                diff = diff_rows(current, incoming)
                if diff.inserts:
                    await self.hub.executemany(spec.insert_sql(), [k + v for k, v in diff.inserts])
                if diff.updates:
                    await self.hub.executemany(spec.update_sql(), [k + v for k, v in diff.updates])
                counts[spec.name] = len(incoming)
                counts[f"{spec.name}_changed"] = diff.changed
                changed[spec.name] = [":".join(k) for k in diff.changed_keys()]
            log_rows = change_log(changed)
            if log_rows:
                await self.hub.executemany("INSERT INTO refdata_change (entity, key) VALUES ($1, $2)", log_rows)
                await self.hub.execute("SELECT pg_notify($1, (SELECT max(version) FROM refdata_change)::text)",
                                       REFDATA_CHANNEL)
            await self.record("hub", counts)
        return counts

    def plan(self, staged: _Staged) -> list[tuple[str, str, str, int, int]]:
        """(step, kind, shard, first line, end line) for every chunk of the merge."""
        steps: list[tuple[str, str, str, int, int]] = []
        for shard in self.shards:
            for a, b in chunks(1, staged.person_lines, self.chunk_lines):
                steps.append((f"person:{shard}:{a}", "person", shard, a, b))
            for a, b in chunks(1, staged.filing_lines, self.chunk_lines):
                steps.append((f"filing:{shard}:{a}", "filing", shard, a, b))
        for a, b in chunks(1, staged.person_lines, self.chunk_lines):
            steps.append((f"person_index:{a}", "person_index", "", a, b))
        return steps

    async def merge_chunk(self, kind: str, shard: str, a: int, b: int) -> int:
        conn = self.hub if kind == "person_index" else self.shards[shard]
        async with conn.transaction():
            n = 0
            for sql in _MERGE_SQL[kind]:
                n += _affected(await conn.execute(sql, a, b))
        return n


async def _pipe(src: asyncpg.Connection, query: str, arg: str, dst: asyncpg.Connection, table: str,
                columns: Sequence[str]) -> None:
    """COPY a query's rows from one database into a table of another, streamed in binary."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=32)

    async def sink(chunk: bytes) -> None:
        await queue.put(chunk)

    async def produce() -> None:
        try:
            await src.copy_from_query(query, arg, output=sink, format="binary")
        finally:
            await queue.put(None)

    async def source() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    await asyncio.gather(produce(), dst.copy_to_table(table, source=source(), columns=list(columns),
                                                      format="binary"))


@dataclass(frozen=True)
class _Table:
    name: str
    key: tuple[str, ...]
    values: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return self.key + self.values

    def insert_sql(self) -> str:
        marks = ", ".join(f"${i}" for i in range(1, len(self.columns) + 1))
        return f"INSERT INTO {self.name} ({', '.join(self.columns)}) VALUES ({marks})"

    def update_sql(self) -> str:
        n = len(self.key)
        sets = ", ".join(f"{c} = ${n + i}" for i, c in enumerate(self.values, start=1))
        where = " AND ".join(f"{c} = ${i}" for i, c in enumerate(self.key, start=1))
        return f"UPDATE {self.name} SET {sets} WHERE {where}"


_REGION = _Table("region", ("admdvs",), ("name", "prov_admdvs", "pool_admdvs"))
_HOSPITAL = _Table("hospital", ("fixmedins_code",), ("fixmedins_name", "admdvs", "hosp_lv"))
_CATALOG = _Table("catalog_item", ("admdvs", "med_list_codg"), ("name", "chrgitm_lv", "selfpay_prop", "pric_uplmt_fen",
                                                                 "once_per_day", "gender_only", "supply_days"))

_PERSON_VALUES: Final = ("insuplc_admdvs", "insutype", "psn_type", "assistance", "acct_balc_fen", "chronic_file",
                         "certno", "psn_name")
_IN_CHUNK: Final = "s.line >= $1 AND s.line < $2"
# What changed, set-based: updates where a value is distinct, then inserts of absent keys. The
# effective chronic set keeps the online changes (person_chronic); a new person has none, and the
# staged chronic_file is sorted, which is what person_chronic(file, '{}') returns.
_MERGE_SQL: Final[dict[str, tuple[str, ...]]] = {
    "person": (
        "UPDATE person t SET " + ", ".join(f"{c} = s.{c}" for c in _PERSON_VALUES)
        + ", chronic = person_chronic(s.chronic_file, t.chronic_online) FROM refdata_stage_person s"
        f" WHERE {_IN_CHUNK} AND t.psn_no = s.psn_no AND ("
        + ", ".join(f"t.{c}" for c in _PERSON_VALUES) + ") IS DISTINCT FROM ("
        + ", ".join(f"s.{c}" for c in _PERSON_VALUES) + ")",
        f"INSERT INTO person (psn_no, {', '.join(_PERSON_VALUES)}, chronic)"
        f" SELECT s.psn_no, {', '.join('s.' + c for c in _PERSON_VALUES)}, s.chronic_file"
        f" FROM refdata_stage_person s WHERE {_IN_CHUNK}"
        " AND NOT EXISTS (SELECT 1 FROM person p WHERE p.psn_no = s.psn_no) ORDER BY s.psn_no",
    ),
    # Insert only: an existing filing (revoked or not) is never changed.
    "filing": (
        "INSERT INTO filing (filing_id, psn_no, filing_type, begndate, enddate, target_admdvs, source)"
        " SELECT s.filing_id, s.psn_no, s.filing_type, s.begndate, s.enddate, s.target_admdvs, 'refdata'"
        f" FROM refdata_stage_filing s WHERE {_IN_CHUNK}"
        " AND NOT EXISTS (SELECT 1 FROM filing f WHERE f.filing_id = s.filing_id) ORDER BY s.filing_id",
    ),
    "person_index": (
        "UPDATE person_index t SET psn_no = s.psn_no, insuplc_admdvs = s.insuplc_admdvs"
        f" FROM refdata_stage_person_key s WHERE {_IN_CHUNK} AND s.certno_digest IS NOT NULL"
        " AND t.certno_digest = s.certno_digest"
        " AND (t.psn_no, t.insuplc_admdvs) IS DISTINCT FROM (s.psn_no, s.insuplc_admdvs)",
        "INSERT INTO person_index (certno_digest, psn_no, insuplc_admdvs)"
        f" SELECT s.certno_digest, s.psn_no, s.insuplc_admdvs FROM refdata_stage_person_key s WHERE {_IN_CHUNK}"
        " AND s.certno_digest IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM person_index p WHERE p.certno_digest = s.certno_digest)"
        " ORDER BY s.certno_digest",  # index order: fewer pages touched per chunk
    ),
}


def _affected(status: str) -> int:
    # "INSERT 0 <n>" / "UPDATE <n>"
    return int(status.rsplit(" ", 1)[-1])


async def _start(hub: asyncpg.Connection, digest: str) -> tuple[int, set[str], dict[str, Any] | None]:
    """The running load of these files (resumed) or a new one; other running loads are abandoned."""
    row = await hub.fetchrow("SELECT load_id FROM refdata_load WHERE state = 'running' AND digest = $1"
                             " ORDER BY load_id DESC LIMIT 1", digest)
    if row is None:
        load_id = await hub.fetchval("INSERT INTO refdata_load (digest) VALUES ($1) RETURNING load_id", digest)
    else:
        load_id = row["load_id"]
    await hub.execute("UPDATE refdata_load SET state = 'abandoned', updated_at = now()"
                      " WHERE state = 'running' AND load_id <> $1", load_id)
    steps = {r["step"]: json.loads(r["counts"]) for r in
             await hub.fetch("SELECT step, counts FROM refdata_load_step WHERE load_id = $1", load_id)}
    return load_id, set(steps), steps.get("staged")


async def _load(hub: asyncpg.Connection, directory: Path, s: Settings, progress: _Progress,
                chunk_lines: int, operator: str) -> dict[str, int]:
    if chunk_lines < CHUNK_LINES_MIN:
        raise ValueError(f"chunk_lines must be >= {CHUNK_LINES_MIN}")
    audit.check_operator(operator)
    errors = _Errors()
    for name in (HOSPITALS_FILE, PERSONS_FILE, FILINGS_FILE, CATALOG_FILE):
        if not (directory / name).is_file():
            errors.add(name, 0, "file is missing")
    errors.raise_if_any()
    hub_rows = _read_hub_files(directory, errors)
    errors.raise_if_any()
    for sql in _SESSION:
        await hub.execute(sql)
    await hub.execute("SELECT pg_advisory_lock($1)", LOAD_LOCK_ID)
    shards = await ShardPools.connect(s, 1)
    conns: dict[str, asyncpg.Connection] = {}
    try:
        for name, pool in shards:
            conns[name] = await pool.acquire()
            for sql in _SESSION:
                await conns[name].execute(sql)
        digest = await asyncio.to_thread(files_digest, directory)
        loader = _Loader(hub, conns, shards.map, directory, person_index_key(s), progress, chunk_lines)
        loader.load_id, done, staged_json = await _start(hub, digest)
        staged = _Staged.from_json(staged_json) if staged_json else None
        phase = time.monotonic()
        if staged is None or not await loader.staging_intact(staged):
            staged = await loader.stage(errors)
            log.info("staged %d persons, %d filings in %.1f s", staged.persons, staged.filings,
                     time.monotonic() - phase)
            phase = time.monotonic()
            if not errors.total:
                await loader.check(errors)
            if errors.total:
                await loader.drop_staging()
                await hub.execute("UPDATE refdata_load SET state = 'abandoned', updated_at = now()"
                                  " WHERE load_id = $1", loader.load_id)
                errors.raise_if_any()
            await loader.route_filings(staged)
            await loader.index_staging()
            log.info("checked, routed and indexed in %.1f s", time.monotonic() - phase)
            phase = time.monotonic()
            await hub.execute("DELETE FROM refdata_load_step WHERE load_id = $1 AND step = 'staged'", loader.load_id)
            await loader.record("staged", staged.to_json())
        if "hub" not in done:
            await loader.merge_hub(hub_rows)
        plan = loader.plan(staged)
        todo = set(remaining_steps([p[0] for p in plan], done))
        await _merge_lanes(loader, [p for p in plan if p[0] in todo], progress)
        log.info("merged %d chunk(s) in %.1f s", len(todo), time.monotonic() - phase)
        counts = await _totals(hub, loader.load_id, staged)
        async with hub.transaction():
            previous = await hub.fetchval("SELECT digest FROM refdata_load WHERE state = 'done'"
                                          " ORDER BY finished_at DESC, load_id DESC LIMIT 1")
            await hub.execute("UPDATE refdata_load SET state = 'done', finished_at = now(), updated_at = now(),"
                              " counts = $2::jsonb WHERE load_id = $1", loader.load_id, json.dumps(counts))
            await audit.record(hub, operator, "refdata.load", f"load {loader.load_id}",
                               before=None if previous is None else {"digest": previous},
                               after={"digest": digest, "resumed": bool(done), "counts": counts})
        await loader.drop_staging()
        return counts
    finally:
        for name, conn in conns.items():
            await shards.pools[name].release(conn)
        await shards.close()
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):  # keep the first error
            await hub.execute("SELECT pg_advisory_unlock($1)", LOAD_LOCK_ID)
            await hub.execute("RESET work_mem; RESET maintenance_work_mem")


async def _merge_lanes(loader: _Loader, steps: list[tuple[str, str, str, int, int]], progress: _Progress) -> None:
    """Merge the chunks, one lane per database at once (each shard, and the hub's person index): they are
    independent, and each database's backend gets a core. Within a lane, in plan order. The hub's one
    connection (person-index chunks and every step's record) is used by one lane at a time."""
    lanes: dict[str, list[tuple[str, str, str, int, int]]] = {}
    for p in steps:
        lanes.setdefault(p[2] or "hub", []).append(p)
    hub_lock = asyncio.Lock()
    merged = finished = 0

    async def lane(chunks: list[tuple[str, str, str, int, int]]) -> None:
        nonlocal merged, finished
        for step, kind, shard, a, b in chunks:
            if kind == "person_index":
                async with hub_lock:
                    n = await loader.merge_chunk(kind, shard, a, b)
            else:
                n = await loader.merge_chunk(kind, shard, a, b)
            async with hub_lock:
                await loader.record(step, {f"{kind}_changed": n})
            merged += n  # rows inserted or updated
            finished += 1
            progress("merge", merged, finished, len(steps), force=finished == len(steps))
            if kind == "person" and a == 1:
                await loader.shards[shard].execute("ANALYZE person")  # the planner's view of a table that was empty

    try:
        async with asyncio.TaskGroup() as tasks:  # a failing lane cancels the others before connections go back
            for chunks in lanes.values():
                tasks.create_task(lane(chunks))
    except ExceptionGroup as group:
        raise group.exceptions[0] from None


async def _totals(hub: asyncpg.Connection, load_id: int, staged: _Staged) -> dict[str, int]:
    counts = {"person": staged.persons, "filing": staged.filings, "person_index": 0, "person_changed": 0,
              "filing_changed": 0, "person_index_changed": 0}
    counts["person_index"] = await hub.fetchval(
        "SELECT count(*) FROM refdata_stage_person_key WHERE certno_digest IS NOT NULL")
    for r in await hub.fetch("SELECT step, counts FROM refdata_load_step WHERE load_id = $1 AND step <> 'staged'",
                             load_id):
        for k, v in json.loads(r["counts"]).items():
            counts[k] = counts.get(k, 0) + int(v)
    return counts


async def load_dir(db: asyncpg.Pool | asyncpg.Connection, directory: str | Path, s: Settings | None = None,
                   *, operator: str, progress: IO[str] | None = None, chunk_lines: int = CHUNK_LINES
                   ) -> dict[str, int]:
    """Validate and load `directory` into the hub `db` and the shards of `s` (RefDataError on any bad
    line, before any write to a real table), audited under `operator`. Returns per table rows in the
    files and rows changed (`<table>`, `<table>_changed`). `progress`: a stream for progress lines (the
    command: stderr); `chunk_lines`: lines of persons.jsonl / filings.jsonl merged per transaction and
    resume step."""
    s = s or load_settings()
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await _load(conn, Path(directory), s, _Progress(progress), chunk_lines, operator)
    return await _load(db, Path(directory), s, _Progress(progress), chunk_lines, operator)


async def load_dataset(conn: asyncpg.Connection, dataset: RefDataSet, s: Settings | None = None, *,
                       operator: str) -> dict[str, int]:
    """Load an in-memory dataset (small: tests, the demo) through the same path as a directory."""
    from services.refdata.generate import write_jsonl  # the generator imports nothing from here

    with tempfile.TemporaryDirectory(prefix="refdata-") as tmp:
        write_jsonl(dataset, tmp)
        return await load_dir(conn, tmp, s, operator=operator)


async def _main_async(directory: Path, dsn: str, quiet: bool, chunk_lines: int, operator: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        counts = await load_dir(conn, directory, operator=operator, progress=None if quiet else sys.stderr,
                                chunk_lines=chunk_lines)
    finally:
        await conn.close()
    await audit.publish_after_action(load_settings(), dsn)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load reference data (four .jsonl files) into PostgreSQL.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--dsn", help="the hub's PostgreSQL DSN (default: from the XS_PG_* settings); "
                                      "the shards come from the settings (XS_SHARDS, XS_SHARD_DSNS)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--chunk-lines", type=int, default=CHUNK_LINES,
                        help=f"lines merged per transaction and resume step (>= {CHUNK_LINES_MIN})")
    audit.add_operator_argument(parser)
    args = parser.parse_args(argv)
    operator = audit.operator_or_exit(parser, args.operator)
    if args.chunk_lines < CHUNK_LINES_MIN:
        parser.error(f"--chunk-lines must be >= {CHUNK_LINES_MIN}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dsn = args.dsn or load_settings().pg_dsn
    started = time.monotonic()
    try:
        counts = asyncio.run(_main_async(args.directory, dsn, args.quiet, args.chunk_lines, operator))
    except RefDataError as exc:
        print(f"refdata load refused, nothing written:\n{exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"refdata load failed: {type(exc).__name__}: {exc} (run it again to continue)", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started
    for name in ("region", "hospital", "catalog_item", "person", "filing", "person_index"):
        print(f"{name}: {counts[name]} rows, {counts[name + '_changed']} inserted or updated")
    rows = counts["person"] + counts["filing"]
    print(f"loaded in {elapsed:.1f} s ({rows / elapsed if elapsed else 0:,.0f} person and filing rows/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
