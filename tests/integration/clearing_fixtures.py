"""Reference data and traffic for the clearing tests.

The clearing tests clear March to June 2025, months no other test sends traffic for (each test run
owns its database, so no earlier run has closed them).
Hospitals, catalog items and regions are fixed rows (reloading them is a no-op); persons carry
the run token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from loadtest.his import FeeLine, GatewayClient, Hospital, Stay
from services.clearing.logic import month_end, month_start
from services.common.config import Settings
from services.refdata.load import load_dir
from services.refdata.regions import region_of
from tests.integration.conftest import RUN_TOKEN, Ledger, issue_missing_keys, wait_router_knows

D = Decimal
YEAR = 2025
M1, M2, M3, M4 = (f"{YEAR}-{m:02d}" for m in (3, 4, 5, 6))
RETRY_FOR_S = 30.0  # the crash tests restart services meanwhile: resend by msgid
CONCURRENCY = 12

ITEM_A, ITEM_B = "CLRA001", "CLRB010"
TREATING = ("150400", "500154", "510421", "350300", "140100", "440300", "110105", "330100", "510100")
HOSPITALS = {code: Hospital(f"H{code}99911", f"清算测试医院{code}", code) for code in TREATING}
RECON = Hospital("H15040099912", "清算对账测试医院", "150400")  # reconciliation: its own day, its own persons
# One hospital treating persons of both shards (赤峰 150400 on s1, 米易 510421 on s2): cross-province for both.
CROSS_SHARD = Hospital("H44030099913", "清算跨分片测试医院", "440300")
INSURED = ("150400", "500154", "510421", "350300", "140100", "440300", "110105", "330100")


def at(month: str, day: int, hour: int = 9, minute: int = 0) -> datetime:
    return datetime(int(month[:4]), int(month[5:]), day, hour, minute)


@dataclass(frozen=True)
class Person:
    psn_no: str
    insuplc: str
    insutype: str
    psn_type: str
    assistance: str | None = None


def _persons() -> list[Person]:
    out = []
    for i, region in enumerate(INSURED):
        out.append(Person(f"C{RUN_TOKEN}{2 * i:03d}", region, "390", "1501", "1" if i % 3 == 0 else None))
        out.append(Person(f"C{RUN_TOKEN}{2 * i + 1:03d}", region, "310", "1101" if i % 2 else "1201"))
    return out


PERSONS = _persons()
# Reconciliation persons: 米易 residents (one clearing agency, 510400; one insutype), at the RECON hospital.
RECON_PERSONS = [Person(f"C{RUN_TOKEN}{100 + i:03d}", "510421", "390", "1501") for i in range(4)]
EXTRA_PERSONS = [Person(f"C{RUN_TOKEN}{200 + i:03d}", INSURED[i % len(INSURED)], "390", "1601") for i in range(24)]


def write_refdata(directory: Path) -> None:
    enc = msgspec.json.Encoder()
    hospitals = [{"fixmedins_code": h.fixmedins_code, "fixmedins_name": h.fixmedins_name, "admdvs": h.admdvs,
                  "hosp_lv": 3} for h in (*HOSPITALS.values(), RECON, CROSS_SHARD)]
    provinces = sorted({region_of(code).prov_admdvs for code in TREATING})
    catalog = []
    for prov in provinces:
        catalog += [
            {"admdvs": prov, "med_list_codg": ITEM_A, "name": "清算测试甲类", "chrgitm_lv": "01", "selfpay_prop": "0"},
            {"admdvs": prov, "med_list_codg": ITEM_B, "name": "清算测试乙类", "chrgitm_lv": "02",
             "selfpay_prop": "0.10"},
        ]
    persons, filings = [], []
    for p in (*PERSONS, *RECON_PERSONS, *EXTRA_PERSONS):
        persons.append({"psn_no": p.psn_no, "insuplc_admdvs": p.insuplc, "insutype": p.insutype,
                        "psn_type": p.psn_type, "assistance": p.assistance, "acct_balc": "0.00"})
        filings.append({"psn_no": p.psn_no, "filing_type": "LONG_TERM", "begndate": f"{YEAR}-01-01",
                        "enddate": f"{YEAR}-12-31", "target_admdvs": None})
    for name, rows in (("hospitals", hospitals), ("persons", persons), ("filings", filings), ("catalog", catalog)):
        (directory / f"{name}.jsonl").write_bytes(b"\n".join(enc.encode(r) for r in rows) + b"\n")


async def load_refdata(db: asyncpg.Pool, s: Settings, directory: Path) -> None:
    write_refdata(directory)
    await load_dir(db, directory, operator="test.loader")
    await issue_missing_keys(s, db)
    # The router reloads on NOTIFY: wait until it knows the last person loaded.
    person = EXTRA_PERSONS[-1]
    await wait_router_knows(s, HOSPITALS["150400"], person.psn_no, person.insuplc)


@dataclass
class Settled:
    """One settlement as the hospital recorded it (the 2304 answer), and its stay."""

    stay: Stay
    setlinfo: dict[str, Any]

    @property
    def setl_id(self) -> str:
        return str(self.setlinfo["setl_id"])


@dataclass
class Traffic:
    settled: list[Settled] = field(default_factory=list)
    reversals: list[dict[str, Any]] = field(default_factory=list)  # setlinfo of 2305 answers
    recon: list[Settled] = field(default_factory=list)
    recon_reversal: dict[str, Any] | None = None

    def setl_ids(self) -> list[str]:
        return ([s.setl_id for s in (*self.settled, *self.recon)] + [str(r["setl_id"]) for r in self.reversals]
                + ([str(self.recon_reversal["setl_id"])] if self.recon_reversal else []))


def fee_lines(i: int, big: bool = False) -> list[FeeLine]:
    lines = [FeeLine(ITEM_A, D(10), D(120) + D(i * 37) + D("0.35")), FeeLine(ITEM_B, D(1), D("2000.00"))]
    if big:  # enough for critical illness (resident) and assistance
        lines.append(FeeLine(ITEM_A, D(100), D("600.00")))
    return lines


async def run_stay(client: GatewayClient, hospital: Hospital, person: Person, start: datetime,
                   lines: list[FeeLine]) -> Settled:
    stay = Stay(hospital, person.psn_no, person.insuplc, person.insutype, start)
    r = await client.run_stay(stay, lines)
    assert r["infcode"] == 0, r["err_msg"]
    return Settled(stay, r["output"]["setlinfo"])


async def reverse(client: GatewayClient, settled: Settled, when: datetime) -> dict[str, Any]:
    stay = settled.stay
    env = stay.hospital.envelope("2305", {"data": {"psn_no": stay.psn_no, "mdtrt_id": stay.mdtrt_id,
                                                   "setl_id": settled.setl_id}}, insuplc=stay.insuplc, inf_time=when)
    r = await client.call(env)
    assert r["infcode"] == 0, r["err_msg"]
    return dict(r["output"]["setlinfo"])


async def gather_limited(coros: Iterable[Any], limit: int = CONCURRENCY) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


def month_plan(month: str, persons: list[Person], n: int, first_day: int = 1, last_day: int = 24
               ) -> list[tuple[Hospital, Person, datetime, list[FeeLine]]]:
    """n stays spread over the month, each person at hospitals outside its pooling region, and every
    tenth at home when it has a hospital there (local care, which clearing must ignore)."""
    plan = []
    for i in range(n):
        person = persons[i % len(persons)]
        home = region_of(person.insuplc).pool_admdvs
        away = [c for c in TREATING if region_of(c).pool_admdvs != home]
        local = [c for c in TREATING if region_of(c).pool_admdvs == home]
        code = local[0] if local and i % 10 == 9 else away[(i + i // len(persons)) % len(away)]
        day = first_day + (i * 7) % (last_day - first_day + 1)
        big = person.insutype == "390" and person.assistance is not None and i % 4 == 0
        plan.append((HOSPITALS[code], person, at(month, day, 8 + i % 9, i % 60), fee_lines(i, big)))
    return plan


async def generate_month(client: GatewayClient) -> Traffic:
    """A month (M1) of stays across the seed regions and other provinces, some reversed later in the
    month; the reconciliation hospital's day (M1-10) and a reversal on the next day."""
    t = Traffic()
    plan = month_plan(M1, PERSONS, 48)
    # Intra-province care (省内异地): 米易 (510400) persons in 成都 (510100).
    plan += [(HOSPITALS["510100"], p, at(M1, 4 + i, 10), fee_lines(60 + i)) for i, p in enumerate(PERSONS)
             if p.insuplc == "510421"]
    t.settled = await gather_limited(run_stay(client, h, p, when, lines) for h, p, when, lines in plan)
    # Reversals of some settlements, on a later day of the month (they count on their own day).
    targets = t.settled[3::9]
    t.reversals = await gather_limited(
        reverse(client, s, datetime.strptime(s.setlinfo["setl_time"], "%Y-%m-%d %H:%M:%S") + timedelta(days=2))
        for s in targets)
    # The reconciliation hospital: four stays settled on M1-10 (start M1-07 09:xx + 3 days + 1 h).
    t.recon = await gather_limited(
        run_stay(client, RECON, p, at(M1, 7, 9, 10 * i), fee_lines(40 + i)) for i, p in enumerate(RECON_PERSONS))
    t.recon_reversal = await reverse(client, t.recon[0], at(M1, 11, 15, 0))
    return t


async def wait_recorded(db: asyncpg.Pool, ledger: Ledger, setl_ids: list[str], timeout_s: float = 45) -> None:
    """Until the clearing service (hub) has recorded every non-local one of these ledger rows (shards)."""
    deadline = time.monotonic() + timeout_s
    nonlocal_ids = [r[0] for r in await ledger.fetch(
        "SELECT setl_id FROM settlement WHERE setl_id = ANY($1::text[]) AND scope <> 'local'", setl_ids)]
    while True:
        missing = len(nonlocal_ids) - await db.fetchval(
            "SELECT count(*) FROM clearing_entry WHERE setl_id = ANY($1::text[])", nonlocal_ids)
        if missing == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{missing} ledger rows not recorded by the clearing service in {timeout_s:.0f} s")
        await asyncio.sleep(0.2)


async def ledger_pairs(ledger: Ledger, month: str) -> dict[tuple[str, str], dict[str, int]]:
    """Independent SQL over `settlement` of every shard: per (insured pool → treating pool) of rows whose
    setl_time is in the month, the count and the sums of every fund (the shards' sums added)."""
    rows = await ledger.fetch(
        "SELECT insured_pool, treating_pool, count(*) AS cnt, sum(medfee_sumamt)::bigint AS medfee_sumamt,"
        " sum(hifp_pay)::bigint AS hifp_pay, sum(hifmi_pay)::bigint AS hifmi_pay, sum(hifob_pay)::bigint AS hifob_pay,"
        " sum(maf_pay)::bigint AS maf_pay, sum(fund_pay_sumamt)::bigint AS fund_pay_sumamt FROM settlement"
        " WHERE scope <> 'local' AND setl_time >= $1 AND setl_time < $2 GROUP BY 1, 2",
        month_start(month), month_end(month),
    )
    keys = ("insured_pool", "treating_pool")
    out: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        acc = out.setdefault((r["insured_pool"], r["treating_pool"]), {})
        for k, v in r.items():
            if k not in keys:
                acc[k] = acc.get(k, 0) + v
    return out
