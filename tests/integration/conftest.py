"""Integration fixtures: the real stack, the broker's services, and test reference data.

Each test run owns its database, topics and services (tests/conftest.py); persons still carry a
per-run token in psn_no, which costs nothing and keeps them apart from the demo's.
Hospitals and catalog items are fixed rows: reloading them is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import msgspec
import pytest

from deploy import stack as stack_ctl
from loadtest.his import GatewayClient, Hospital, Signer, SignInFailed
from schemas.refdata import certno_check_char
from services.common.config import Settings
from services.common.shards import ShardPools
from services.common.signing import key_encryption_key
from services.common.tls import client_session
from services.refdata.keys import issue_key
from services.refdata.load import load_dir
from services.refdata.regions import SEED_REGIONS

RUN_TOKEN = f"{int(time.time()) % 10**9:09d}{os.getpid() % 100:02d}"
SERVICES = ("settle", "gateway", "clearing", "monitor", "dashboard", "smartmon")

HOSPITALS = {
    "miyi": Hospital("H51042199901", "米易县测试医院", "510421"),
    "chengdu": Hospital("H51010099901", "成都测试医院", "510100"),
    "chifeng": Hospital("H15040099901", "赤峰测试医院", "150400"),
    "chifeng_pharmacy": Hospital("P15040099901", "赤峰测试大药房", "150400"),
    # The trust tests' own: two hospitals that attack each other, one for the 1101 rate limit.
    "trust_a": Hospital("H15040099906", "赤峰测试信任甲医院", "150400"),
    "trust_b": Hospital("H15040099907", "赤峰测试信任乙医院", "150400"),
    "trust_rate": Hospital("H15040099908", "赤峰测试限流医院", "150400"),
    # The visit-records tests' own (diagnoses and 2403).
    "records": Hospital("H15040099923", "赤峰测试病案医院", "150400"),
    # The corrections' (test_correction.py): one hospital and one pharmacy that correct, another hospital.
    "correct": Hospital("H15040099910", "赤峰测试冲正医院", "150400"),
    "correct_other": Hospital("H15040099911", "赤峰测试冲正乙医院", "150400"),
    "correct_pharmacy": Hospital("P15040099910", "赤峰测试冲正药房", "150400"),
    # The query tests' own (test_queries.py): the asking hospital, another one, a pharmacy.
    "query_a": Hospital("H15040099916", "赤峰测试查询甲医院", "150400"),
    "query_b": Hospital("H15040099917", "赤峰测试查询乙医院", "150400"),
    "query_pharmacy": Hospital("P15040099916", "赤峰测试查询大药房", "150400"),
    # One hospital and one pharmacy in each seed region, for a whole hospital day per region.
    **{f"seed_{code}": Hospital(f"H{code}99902", f"{code}测试医院", code) for code in SEED_REGIONS},
    **{f"seed_{code}_pharmacy": Hospital(f"P{code}99902", f"{code}测试药房", code) for code in SEED_REGIONS},
    # Mid-stay settlement and policy versions (test_mid_stay.py, test_policy_versions.py).
    "midstay": Hospital("H15040099913", "赤峰测试中途结算医院", "150400"),
    "policy_versions": Hospital("H15040099914", "赤峰测试政策版本医院", "150400"),
    # Clearing at national shape (test_clearing_national.py): two hospitals of 赤峰's agency, one of 攀枝花's.
    "clear_a": Hospital("H15040099919", "赤峰测试清算甲医院", "150400"),
    "clear_b": Hospital("H15040099920", "赤峰测试清算乙医院", "150400"),
    "clear_other": Hospital("H51042199919", "米易县测试清算医院", "510421"),
}
TEST_PROVINCES = ("510000", "150000", "500000", "350000", "140000")
# Test catalog codes, present in every treating province used here.
ITEM_A, ITEM_B10, ITEM_C, ITEM_CEIL = "TESTA001", "TESTB010", "TESTC001", "TESTCEIL"


def psn(n: int) -> str:
    return f"T{RUN_TOKEN}{n:03d}"


@dataclass(frozen=True)
class TestPerson:
    psn_no: str
    insuplc: str
    insutype: str


class PersonSpec(NamedTuple):
    person: TestPerson
    psn_type: str
    assistance: str | None
    balance: str
    filing: tuple[str, str | None] | None  # (filing_type, target province or None = anywhere)
    chronic: tuple[str, ...] = ()
    certno: str | None = None


def _certno(body17: str) -> str:
    return body17 + certno_check_char(body17)


PERSONS: dict[str, PersonSpec] = {
    # REFERENCE §4 worked example: 米易县 resident, 低保, TEMPORARY filing for 内蒙古.
    "example": PersonSpec(TestPerson(psn(1), "510421", "390"), "1501", "1", "0.00", ("TEMPORARY", "150000")),
    "local_employee": PersonSpec(TestPerson(psn(2), "510421", "310"), "1101", None, "5000.00", None),
    "intra_resident": PersonSpec(TestPerson(psn(3), "510421", "390"), "1501", None, "0.00", ("LONG_TERM", "510000")),
    "unfiled": PersonSpec(TestPerson(psn(4), "510421", "390"), "1501", None, "0.00", None),
    "retiree": PersonSpec(TestPerson(psn(5), "150400", "310"), "1201", None, "1000.00", None),
    "plain": PersonSpec(TestPerson(psn(6), "150400", "390"), "1601", None, "0.00", None),
    # For the crash tests: many persons, local care in 赤峰, employees using their accounts.
    **{f"crash{i}": PersonSpec(TestPerson(psn(100 + i), "150400", "310"), "1101", None, "800.00", None)
       for i in range(40)},
    # The trust tests' (test_trust.py): local employees of 赤峰.
    **{f"trust{i}": PersonSpec(TestPerson(psn(300 + i), "150400", "310"), "1101", None, "0.00", None)
       for i in range(10)},
    # The visit-records tests' (test_visit_records.py): local residents of 赤峰.
    **{f"records{i}": PersonSpec(TestPerson(psn(520 + i), "150400", "390"), "1501", None, "0.00", None)
       for i in range(4)},
    # The corrections' (test_correction.py): local employees of 赤峰 with account balances, racers apart.
    **{f"correct{i}": PersonSpec(TestPerson(psn(400 + i), "150400", "310"), "1101", None, "3000.00", None)
       for i in range(30)},
    # Outpatient, chronic, pharmacy, filings, 1101.
    "op_employee": PersonSpec(TestPerson(psn(7), "150400", "310"), "1101", None, "3000.00", None),
    "chronic_dm": PersonSpec(TestPerson(psn(8), "150400", "390"), "1501", None, "0.00", None, ("DM",)),
    "chronic_none": PersonSpec(TestPerson(psn(9), "150400", "390"), "1501", None, "0.00", None),
    "pharmacy_employee": PersonSpec(TestPerson(psn(10), "150400", "310"), "1101", None, "500.00", None),
    "far_unfiled": PersonSpec(TestPerson(psn(11), "510421", "390"), "1501", None, "0.00", None),
    "year_boundary": PersonSpec(TestPerson(psn(12), "150400", "310"), "1101", None, "0.00", None),
    "info": PersonSpec(TestPerson(psn(13), "150400", "310"), "1201", "2", "1234.56", ("LONG_TERM", None), ("HTN",),
                       _certno(f"15040019580306{int(RUN_TOKEN) % 1000:03d}")),
    # Mid-stay settlement and policy versions: local employees of 赤峰 (150400 has a version from 2027-01-01).
    "mid_stay": PersonSpec(TestPerson(psn(430), "150400", "310"), "1101", None, "0.00", None),
    "mid_stay_pre": PersonSpec(TestPerson(psn(431), "150400", "310"), "1101", None, "0.00", None),
    "version_change": PersonSpec(TestPerson(psn(432), "150400", "310"), "1101", None, "0.00", None),
    "new_year_stay": PersonSpec(TestPerson(psn(433), "150400", "310"), "1101", None, "0.00", None),
    "mid_stay_correct": PersonSpec(TestPerson(psn(434), "150400", "310"), "1101", None, "0.00", None),
    # The query tests' (test_queries.py): local persons of 赤峰.
    "q_visits": PersonSpec(TestPerson(psn(460), "150400", "310"), "1101", None, "1000.00", None),
    "q_ledger": PersonSpec(TestPerson(psn(461), "150400", "310"), "1101", None, "1000.00", None),
    "q_paging": PersonSpec(TestPerson(psn(462), "150400", "390"), "1501", None, "0.00", None),
    "q_chronic": PersonSpec(TestPerson(psn(463), "150400", "390"), "1501", None, "0.00", None, ("DM",)),
    "q_stranger": PersonSpec(TestPerson(psn(464), "150400", "390"), "1501", None, "0.00", None),
    "q_cum": PersonSpec(TestPerson(psn(465), "150400", "390"), "1501", None, "0.00", None, ("DM",)),
    # Clearing at national shape: 米易 residents treated in 赤峰, 赤峰 employees treated in 米易 (filed anywhere).
    **{f"clear{i}": PersonSpec(TestPerson(psn(490 + i), "510421", "390"), "1501", None, "0.00", ("LONG_TERM", None))
       for i in range(12)},
    **{f"clear_back{i}": PersonSpec(TestPerson(psn(510 + i), "150400", "310"), "1101", None, "0.00",
                                    ("LONG_TERM", None)) for i in range(3)},
    # A hospital day in each seed region: a local resident, a local employee with chronic HTN, and a
    # visitor insured in the next seed region with a LONG_TERM filing for anywhere.
    **{f"day_{code}_{role}": spec for i, code in enumerate(SEED_REGIONS) for role, spec in (
        ("resident", PersonSpec(TestPerson(psn(200 + 3 * i), code, "390"), "1501", None, "0.00", None)),
        ("employee", PersonSpec(TestPerson(psn(201 + 3 * i), code, "310"), "1101", None, "2000.00", None,
                                ("HTN",))),
        ("visitor", PersonSpec(TestPerson(psn(202 + 3 * i), SEED_REGIONS[(i + 1) % len(SEED_REGIONS)], "310"),
                               "1201", None, "800.00", ("LONG_TERM", None))),
    )},
}


def _write_refdata(directory: Path) -> None:
    enc = msgspec.json.Encoder()
    hospitals = [{"fixmedins_code": h.fixmedins_code, "fixmedins_name": h.fixmedins_name, "admdvs": h.admdvs,
                  "hosp_lv": 1 if h.fixmedins_code.startswith("P") else 3} for h in HOSPITALS.values()]
    catalog = []
    for prov in TEST_PROVINCES:
        catalog += [
            {"admdvs": prov, "med_list_codg": ITEM_A, "name": "测试甲类", "chrgitm_lv": "01", "selfpay_prop": "0"},
            {"admdvs": prov, "med_list_codg": ITEM_B10, "name": "测试乙类", "chrgitm_lv": "02", "selfpay_prop": "0.10"},
            {"admdvs": prov, "med_list_codg": ITEM_C, "name": "测试丙类", "chrgitm_lv": "03", "selfpay_prop": "1"},
            {"admdvs": prov, "med_list_codg": ITEM_CEIL, "name": "测试限价", "chrgitm_lv": "01", "selfpay_prop": "0",
             "pric_uplmt_amt": "100.00"},
        ]
    persons, filings = [], []
    for p, psn_type, assistance, balance, filing, chronic, certno in PERSONS.values():
        persons.append({"psn_no": p.psn_no, "insuplc_admdvs": p.insuplc, "insutype": p.insutype,
                        "psn_type": psn_type, "assistance": assistance, "acct_balc": balance,
                        "chronic": list(chronic), "certno": certno})
        if filing:
            filings.append({"psn_no": p.psn_no, "filing_type": filing[0], "begndate": "2026-01-01",
                            "enddate": "2026-12-31", "target_admdvs": filing[1]})
    for name, rows in (("hospitals", hospitals), ("persons", persons), ("filings", filings), ("catalog", catalog)):
        (directory / f"{name}.jsonl").write_bytes(b"\n".join(enc.encode(r) for r in rows) + b"\n")


@pytest.fixture(scope="session")
async def db(stack: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(stack.pg_dsn, min_size=1, max_size=4)
    yield pool
    await pool.close()


class Ledger:
    """The run's shard databases, for assertions on settlement state wherever it lives: `fetch` runs a
    query on every shard and concatenates the rows, `fetchrow` expects the row in at most one shard,
    `total` sums a scalar over the shards; `of(admdvs)` is the pool of the shard of that region."""

    def __init__(self, shards: ShardPools) -> None:
        self.shards = shards

    def of(self, admdvs: str) -> asyncpg.Pool:
        return self.shards.of(admdvs)

    async def _each(self, method: str, sql: str, *args: object) -> list[Any]:
        """`method` on every shard. A test that restarted PostgreSQL leaves dead connections in the pools:
        those are dropped and the query tried once more."""
        out = []
        for _, pool in self.shards:
            try:
                out.append(await getattr(pool, method)(sql, *args))
            except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, ConnectionError):
                await pool.expire_connections()
                out.append(await getattr(pool, method)(sql, *args))
        return out

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        return [row for rows in await self._each("fetch", sql, *args) for row in rows]

    async def fetchrow(self, sql: str, *args: object) -> Any:
        rows = [r for r in await self._each("fetchrow", sql, *args) if r is not None]
        assert len(rows) <= 1, f"{len(rows)} shards have a row for {sql!r}"
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: object) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    async def total(self, sql: str, *args: object) -> int:
        return sum(int(v or 0) for v in await self._each("fetchval", sql, *args))

    async def execute(self, sql: str, *args: object) -> None:
        await self._each("execute", sql, *args)


@pytest.fixture(scope="session")
async def ledger(stack: Settings) -> AsyncIterator[Ledger]:
    shards = await ShardPools.connect(stack, 2)
    yield Ledger(shards)
    await shards.close()


@pytest.fixture(scope="session")
def services(stack: Settings) -> Settings:
    """The run's own services (its supervisord, free ports, its database and topics), started from
    this checkout's code; the `stack` fixture stops them at the end of the session."""
    stack_ctl.start_services(stack, SERVICES)
    return stack


@pytest.fixture(scope="session")
async def refdata(db: asyncpg.Pool, services: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("refdata")
    _write_refdata(directory)
    await load_dir(db, directory, operator="test.loader")
    await issue_keys(services, db, [h.fixmedins_code for h in HOSPITALS.values()])
    await _wait_router_knows(services, PERSONS["plain"][0])
    return PERSONS


# The test hospitals' keys and sessions: every GatewayClient of the run signs with them.
SIGNER = Signer({})
GatewayClient.default_signer = SIGNER


async def issue_missing_keys(s: Settings, db: asyncpg.Pool) -> None:
    """Keys for every hospital of the hub the run's signer has none for (after a test loads its own)."""
    codes = [r["fixmedins_code"] for r in await db.fetch("SELECT fixmedins_code FROM hospital ORDER BY 1")]
    await issue_keys(s, db, [c for c in codes if c not in SIGNER.keys])


async def issue_keys(s: Settings, db: asyncpg.Pool, codes: list[str]) -> None:
    """Issue a key to each institution (as the broker's operators do) and give it to the run's HIS signer."""
    kek = key_encryption_key(s)
    async with db.acquire() as conn:
        for code in codes:
            SIGNER.keys[code] = (await issue_key(conn, kek, code, "pytest")).secret


async def _wait_router_knows(s: Settings, person: TestPerson) -> None:
    await wait_router_knows(s, HOSPITALS["chifeng"], person.psn_no, person.insuplc)


async def wait_router_knows(s: Settings, hospital: Hospital, psn_no: str, insuplc: str) -> None:
    """The router reloads on NOTIFY; wait until a request for a new person no longer says PERSON_UNKNOWN."""
    deadline = time.monotonic() + 30
    async with client_session(s) as session:
        client = GatewayClient(s.gateway_url, session)
        while time.monotonic() < deadline:
            env = hospital.envelope("2404", {"data": {"mdtrt_id": "NONE", "psn_no": psn_no}}, insuplc=insuplc)
            try:
                r = await client.call(env)
            except SignInFailed:  # the router has not applied the hospital's new key yet
                await asyncio.sleep(0.5)
                continue
            if not r["err_msg"].startswith(("PERSON_UNKNOWN", "TIMEOUT", "KEY_UNKNOWN")):
                return
            await asyncio.sleep(0.5)
    raise AssertionError("router did not pick up the test reference data within 30 s")


@pytest.fixture
async def gateway(services: Settings) -> AsyncIterator[GatewayClient]:
    async with client_session(services) as session:
        yield GatewayClient(services.gateway_url, session)


def yuan(value: str) -> Decimal:
    return Decimal(value)


STAY_START = datetime(2026, 6, 1, 9, 0, 0)
