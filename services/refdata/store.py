"""In-memory snapshot of the reference data, for the router.

`fetch_refdata(conn)` reads the four reference tables in one read-only,
repeatable-read transaction (a consistent snapshot). The dataclasses are plain
values; money is integer fen. `filing_in_force` is pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Final

import asyncpg

from schemas.codes import FILING_PREFERENCE
from services.refdata.regions import province_of


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


@dataclass
class RefData:
    hospitals: dict[str, Hospital] = field(default_factory=dict)  # fixmedins_code →
    persons: dict[str, Person] = field(default_factory=dict)  # psn_no →
    persons_by_cert: dict[str, str] = field(default_factory=dict)  # certno → psn_no
    filings: dict[str, list[Filing]] = field(default_factory=dict)  # psn_no → filings, ordered by filing_id
    catalog: dict[tuple[str, str], CatalogEntry] = field(default_factory=dict)  # (province, med_list_codg) →


async def fetch_refdata(conn: asyncpg.Connection) -> RefData:
    ref = RefData()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for r in await conn.fetch("SELECT fixmedins_code, fixmedins_name, admdvs, hosp_lv FROM hospital"):
            ref.hospitals[r["fixmedins_code"]] = Hospital(r["admdvs"], r["hosp_lv"], r["fixmedins_name"])
        for r in await conn.fetch(
            "SELECT psn_no, insuplc_admdvs, insutype, psn_type, assistance, acct_balc_fen, chronic, certno, psn_name"
            " FROM person"
        ):
            ref.persons[r["psn_no"]] = Person(
                r["insuplc_admdvs"],
                r["insutype"],
                r["psn_type"],
                r["assistance"],
                r["acct_balc_fen"],
                frozenset(r["chronic"]),
                r["certno"],
                r["psn_name"],
            )
            if r["certno"] is not None:
                ref.persons_by_cert[r["certno"]] = r["psn_no"]
        for r in await conn.fetch(
            "SELECT filing_id, psn_no, filing_type, begndate, enddate, target_admdvs, source, revoked"
            " FROM filing ORDER BY psn_no, filing_id"
        ):
            ref.filings.setdefault(r["psn_no"], []).append(
                Filing(
                    r["filing_id"],
                    r["filing_type"],
                    r["begndate"],
                    r["enddate"],
                    r["target_admdvs"],
                    r["source"],
                    r["revoked"],
                )
            )
        for r in await conn.fetch(
            "SELECT admdvs, med_list_codg, name, chrgitm_lv, selfpay_prop, pric_uplmt_fen FROM catalog_item"
        ):
            ref.catalog[(r["admdvs"], r["med_list_codg"])] = CatalogEntry(
                r["chrgitm_lv"], r["selfpay_prop"], r["pric_uplmt_fen"], r["name"]
            )
    return ref


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
