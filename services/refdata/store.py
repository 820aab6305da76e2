"""Reference data for the router: institutions in memory, persons a batch at a time.

Two kinds of state, two ways of reading it (README "Where person facts are read"):

- `RefView` — hospitals, catalog items and regions: bounded by institutions and items, held in
  memory, read once in one repeatable-read snapshot (`fetch_view`) and then kept current by applying
  the hub's ordered change log `refdata_change` (`fetch_changes` + the pure `apply_changes`): only
  the changed keys are read again, and the applied version never goes back.
- `RefData` — the view one batch routes against: the hospitals and catalog of the `RefView` (shared,
  not copied) plus the batch's persons and filings, read from their shard (`fetch_persons`: one round
  trip per shard per batch). Nothing about a person outlives the batch.

The dataclasses are plain values; money is integer fen. `filing_in_force` and `apply_changes` are pure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any, Final

import asyncpg

from schemas.codes import FILING_PREFERENCE
from services.common.signing import InstitutionKey
from services.refdata.keys import fetch_keys
from services.refdata.regions import Region, province_of


@dataclass(frozen=True, slots=True)
class Hospital:
    admdvs: str
    hosp_lv: int
    name: str


@dataclass(frozen=True, slots=True)
class Person:
    insuplc_admdvs: str
    insutype: str  # "310" | "390"
    psn_type: str
    assistance: str | None  # "1" 低保 | "2" 特困 | None
    acct_balc_fen: int  # account balance as loaded; the live balance is in the `account` table
    chronic: frozenset[str]
    certno: str | None = None  # personal identifier: never log
    psn_name: str | None = None  # personal identifier: never log


@dataclass(frozen=True, slots=True)
class Filing:
    filing_id: str
    filing_type: str  # LONG_TERM | REFERRAL | EMERGENCY | TEMPORARY
    begndate: date
    enddate: date
    target_admdvs: str | None  # a province XX0000, or None for anywhere
    source: str = "refdata"  # refdata | promise | online
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    chrgitm_lv: str  # "01" 甲 | "02" 乙 | "03" 丙
    selfpay_prop: Decimal
    pric_uplmt_fen: int | None
    name: str
    once_per_day: bool = False  # monitoring fields (hub 0009): the rules read them from each item
    gender_only: str = ""  # "1" / "2" restricts the item to that gender; "" none
    supply_days: Decimal = Decimal(1)  # days of supply per unit (drugs)


@dataclass
class RefData:
    """What `route()` sees: institutions (from the `RefView`) and the batch's persons."""

    hospitals: dict[str, Hospital] = field(default_factory=dict)  # fixmedins_code →
    persons: dict[str, Person] = field(default_factory=dict)  # psn_no →
    persons_by_cert: dict[str, str] = field(default_factory=dict)  # certno → psn_no (1101 of this batch)
    filings: dict[str, list[Filing]] = field(default_factory=dict)  # psn_no → filings, ordered by filing_id
    catalog: dict[tuple[str, str], CatalogEntry] = field(default_factory=dict)  # (province, med_list_codg) →
    # Which shard holds a region code (None: one database). A person is looked up only in the shard
    # of the region the request names: found in another shard's province is not found at all.
    shard_of: Callable[[str], str] | None = None

    def person_in(self, psn_no: str, insuplc_admdvs: str) -> Person | None:
        person = self.persons.get(psn_no)
        if person is None or self.shard_of is None:
            return person
        try:
            return person if self.shard_of(insuplc_admdvs) == self.shard_of(person.insuplc_admdvs) else None
        except KeyError:  # a province no shard holds
            return None


# Institutions in memory, kept current from the change log ----------------------------------------


@dataclass
class RefView:
    """Hospitals, catalog items and regions as of change-log `version` (every change ≤ version applied)."""

    hospitals: dict[str, Hospital] = field(default_factory=dict)
    catalog: dict[tuple[str, str], CatalogEntry] = field(default_factory=dict)
    regions: dict[str, Region] = field(default_factory=dict)
    keys: dict[str, tuple[InstitutionKey, ...]] = field(default_factory=dict)  # fixmedins_code → its keys
    version: int = 0


@dataclass(frozen=True, slots=True)
class RefChange:
    """One row of `refdata_change`: `key` is fixmedins_code | "admdvs:med_list_codg" | admdvs."""

    version: int
    entity: str  # hospital | catalog_item | region
    key: str


@dataclass
class ChangedRows:
    """The current rows of the changed keys, read in the same snapshot as the changes (absent: deleted)."""

    hospitals: dict[str, Hospital] = field(default_factory=dict)
    catalog: dict[tuple[str, str], CatalogEntry] = field(default_factory=dict)
    regions: dict[str, Region] = field(default_factory=dict)
    keys: dict[str, tuple[InstitutionKey, ...]] = field(default_factory=dict)


def catalog_key(key: str) -> tuple[str, str]:
    admdvs, _, code = key.partition(":")
    return admdvs, code


def apply_changes(view: RefView, changes: Sequence[RefChange], rows: ChangedRows) -> int:
    """Apply `changes` in version order to `view`: each changed key takes its row from `rows`, or is
    removed when the row is gone. Changes at or below the view's version are already in it and are
    skipped; the version only moves forward. Returns how many changes were applied."""
    applied = 0
    for change in sorted(changes, key=lambda c: c.version):
        if change.version <= view.version:
            continue
        if change.entity == "hospital":
            _put(view.hospitals, change.key, rows.hospitals.get(change.key))
        elif change.entity == "catalog_item":
            key = catalog_key(change.key)
            _put(view.catalog, key, rows.catalog.get(key))
        elif change.entity == "region":
            _put(view.regions, change.key, rows.regions.get(change.key))
        elif change.entity == "institution_key":
            _put(view.keys, change.key, rows.keys.get(change.key))
        else:
            raise ValueError(f"refdata_change {change.version}: unknown entity {change.entity!r}")
        view.version = change.version
        applied += 1
    return applied


def _put(target: dict[Any, Any], key: Any, value: Any) -> None:
    if value is None:
        target.pop(key, None)
    else:
        target[key] = value


_HOSPITALS_SQL: Final = "SELECT fixmedins_code, fixmedins_name, admdvs, hosp_lv FROM hospital"
_CATALOG_SQL: Final = ("SELECT admdvs, med_list_codg, name, chrgitm_lv, selfpay_prop, pric_uplmt_fen,"
                       " once_per_day, gender_only, supply_days FROM catalog_item")
_REGIONS_SQL: Final = "SELECT admdvs, name, prov_admdvs, pool_admdvs FROM region"


def _hospital(r: asyncpg.Record) -> Hospital:
    return Hospital(r["admdvs"].strip(), r["hosp_lv"], r["fixmedins_name"])


def _catalog(r: asyncpg.Record) -> CatalogEntry:
    return CatalogEntry(r["chrgitm_lv"], r["selfpay_prop"], r["pric_uplmt_fen"], r["name"], r["once_per_day"],
                        (r["gender_only"] or "").strip(), r["supply_days"])


def _region(r: asyncpg.Record) -> Region:
    return Region(r["admdvs"].strip(), r["name"], r["prov_admdvs"].strip(), r["pool_admdvs"].strip())


async def fetch_view(conn: asyncpg.Connection, kek: bytes | None = None) -> RefView:
    """Every hospital, catalog item and region and the change log's version, in one snapshot; with the
    key-encryption key `kek`, the institutions' keys too."""
    view = RefView()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        view.version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM refdata_change")
        for r in await conn.fetch(_HOSPITALS_SQL):
            view.hospitals[r["fixmedins_code"]] = _hospital(r)
        for r in await conn.fetch(_CATALOG_SQL):
            view.catalog[(r["admdvs"].strip(), r["med_list_codg"])] = _catalog(r)
        for r in await conn.fetch(_REGIONS_SQL):
            view.regions[r["admdvs"].strip()] = _region(r)
        if kek is not None:
            view.keys = await fetch_keys(conn, kek)
    return view


async def fetch_changes(conn: asyncpg.Connection, after: int, limit: int,
                        kek: bytes | None = None) -> tuple[list[RefChange], ChangedRows]:
    """The next `limit` changes after version `after` and the current rows of their keys, in one snapshot
    (a row read here is at least as new as the last change read: applying them never goes back)."""
    rows = ChangedRows()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        changes = [RefChange(r["version"], r["entity"], r["key"]) for r in await conn.fetch(
            "SELECT version, entity, key FROM refdata_change WHERE version > $1 ORDER BY version LIMIT $2",
            after, limit)]
        keys: dict[str, set[str]] = {}
        for c in changes:
            keys.setdefault(c.entity, set()).add(c.key)
        if "hospital" in keys:
            for r in await conn.fetch(_HOSPITALS_SQL + " WHERE fixmedins_code = ANY($1)", list(keys["hospital"])):
                rows.hospitals[r["fixmedins_code"]] = _hospital(r)
        if "catalog_item" in keys:
            wanted = [catalog_key(k) for k in keys["catalog_item"]]
            for r in await conn.fetch(
                _CATALOG_SQL + " WHERE (admdvs, med_list_codg) IN"
                " (SELECT * FROM unnest($1::text[], $2::text[]))",
                    [a for a, _ in wanted], [c for _, c in wanted]):
                rows.catalog[(r["admdvs"].strip(), r["med_list_codg"])] = _catalog(r)
        if "region" in keys:
            for r in await conn.fetch(_REGIONS_SQL + " WHERE admdvs = ANY($1)", list(keys["region"])):
                rows.regions[r["admdvs"].strip()] = _region(r)
        if "institution_key" in keys and kek is not None:
            rows.keys = await fetch_keys(conn, kek, sorted(keys["institution_key"]))
    return changes, rows


# Persons of one batch, from one shard ------------------------------------------------------------

# One round trip: each person with their filings aggregated (ordered by filing_id, as route expects).
# `chronic` as stored: every writer (the loader, 2503/2504) sets it with person_chronic(), so a read need not
# call that SQL function again for each person (PostgreSQL plans and runs it per row).
_PERSONS_SQL: Final = """
SELECT p.psn_no, p.insuplc_admdvs, p.insutype, p.psn_type, p.assistance, p.acct_balc_fen, p.chronic,
       p.certno, p.psn_name,
       (SELECT json_agg(json_build_array(f.filing_id, f.filing_type, f.begndate, f.enddate, f.target_admdvs,
                                         f.source, f.revoked) ORDER BY f.filing_id)
          FROM filing f WHERE f.psn_no = p.psn_no) AS filings
  FROM person p WHERE p.psn_no = ANY($1::text[])
"""


async def fetch_persons(conn: asyncpg.Connection | asyncpg.Pool,
                        psn_nos: Iterable[str]) -> tuple[dict[str, Person], dict[str, list[Filing]]]:
    """The persons among `psn_nos` in this shard and their filings (`= ANY($1)`: one statement)."""
    persons: dict[str, Person] = {}
    filings: dict[str, list[Filing]] = {}
    for r in await conn.fetch(_PERSONS_SQL, list(psn_nos)):
        psn_no = r["psn_no"]
        persons[psn_no] = person_of(r)
        filings[psn_no] = [
            Filing(fid, ftype, date.fromisoformat(beg), date.fromisoformat(end),
                   target.strip() if target else None, source, revoked)
            for fid, ftype, beg, end, target, source, revoked in json.loads(r["filings"] or "[]")
        ]
    return persons, filings


def person_of(r: asyncpg.Record) -> Person:
    return Person(r["insuplc_admdvs"].strip(), r["insutype"], r["psn_type"], r["assistance"], r["acct_balc_fen"],
                  frozenset(r["chronic"]), r["certno"], r["psn_name"])


# Preference among filings in force (schemas.codes.FILING_PREFERENCE): the smallest ratio cut first.
_RANK: Final[dict[str, int]] = {t: i for i, t in enumerate(FILING_PREFERENCE)}


def filing_in_force(filings: Iterable[Filing], on: date, treating_prov: str) -> Filing | None:
    """The filing that covers care on `on` in the treating province, or None.

    In force: begndate <= on <= enddate, not revoked, target is the treating
    province or None (anywhere). `treating_prov` may be any region code; its
    province is used. Among several: EMERGENCY, then REFERRAL, LONG_TERM,
    TEMPORARY; then the one valid longest, then the smallest filing_id.
    """
    prov = province_of(treating_prov)
    best: Filing | None = None
    best_key: tuple[int, int, str] | None = None
    for f in filings:
        if f.revoked or not f.begndate <= on <= f.enddate:
            continue
        if f.target_admdvs is not None and f.target_admdvs != prov:
            continue
        key = (_RANK.get(f.filing_type, len(_RANK)), -f.enddate.toordinal(), f.filing_id)
        if best_key is None or key < best_key:
            best, best_key = f, key
    return best
