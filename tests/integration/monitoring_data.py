"""Traffic and helpers for the metrics, Prometheus and dashboard tests.

The monitoring tests own one label set nobody else drives: persons insured in 南京 (320100,
江苏 320000), treated in 苏州 (320500: intra-province) and in 赤峰 (150400: cross-province).
`ensure_traffic` drives it once per session (the three test modules share the result):
intra-province stays settled directly, manual claims (手工零星报销) for the same route so the
province's rate falls below its 70% target, cross-province stays (one reversed). Stays are
dated so that they settle a few minutes ago: they count in the current month.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from loadtest.his import FeeLine, GatewayClient, Hospital, SignInFailed, Stay, wire_time
from schemas.clearing import ManualClaim
from services.clearing.cli import deposit_topup, submit_claims
from services.common.config import Settings
from services.common.response import SHANGHAI
from services.common.tls import client_session
from services.monitor.ledger import month_bounds
from services.refdata.load import load_dir
from tests.integration.conftest import HOSPITALS, ITEM_A, ITEM_B10, RUN_TOKEN, issue_missing_keys

D = Decimal
T = TypeVar("T")
RETRY_FOR_S = 30.0  # the crash tests restart services meanwhile: resend by msgid
INSURED = "320100"  # 南京市
INSURED_PROV = "320000"  # 江苏省
SUZHOU = Hospital("H32050099901", "苏州监控测试医院", "320500")
CHIFENG = HOSPITALS["chifeng"]
TREATING_CROSS_PROV = "150000"
N_INTRA, N_MANUAL, N_CROSS = 6, 14, 3


def now_sh() -> datetime:
    """Wall-clock time in Asia/Shanghai, as a hospital there stamps its messages."""
    return datetime.now(SHANGHAI).replace(tzinfo=None)


def mpsn(n: int) -> str:
    return f"M{RUN_TOKEN}{n:03d}"


def write_refdata(directory: Path) -> None:
    enc = msgspec.json.Encoder()
    today = now_sh().date()
    begin, end = (today - timedelta(days=60)).isoformat(), (today + timedelta(days=60)).isoformat()
    hospitals = [{"fixmedins_code": SUZHOU.fixmedins_code, "fixmedins_name": SUZHOU.fixmedins_name,
                  "admdvs": SUZHOU.admdvs, "hosp_lv": 3}]
    catalog = [
        {"admdvs": INSURED_PROV, "med_list_codg": ITEM_A, "name": "测试甲类", "chrgitm_lv": "01", "selfpay_prop": "0"},
        {"admdvs": INSURED_PROV, "med_list_codg": ITEM_B10, "name": "测试乙类", "chrgitm_lv": "02",
         "selfpay_prop": "0.10"},
    ]
    persons, filings = [], []
    for n in range(40):
        persons.append({"psn_no": mpsn(n), "insuplc_admdvs": INSURED, "insutype": "390", "psn_type": "1501",
                        "assistance": None, "acct_balc": "0.00"})
        if n < 30:  # 30..39: no filing (refused, then claimed by hand)
            target = INSURED_PROV if n < 20 else TREATING_CROSS_PROV
            filings.append({"psn_no": mpsn(n), "filing_type": "LONG_TERM" if n < 20 else "TEMPORARY",
                            "begndate": begin, "enddate": end, "target_admdvs": target})
    for name, rows in (("hospitals", hospitals), ("persons", persons), ("filings", filings), ("catalog", catalog)):
        (directory / f"{name}.jsonl").write_bytes(b"\n".join(enc.encode(r) for r in rows) + b"\n")


async def load_refdata(db: asyncpg.Pool, s: Settings, directory: Path) -> None:
    write_refdata(directory)
    await load_dir(db, directory, operator="test.loader")
    await issue_missing_keys(s, db)
    deadline = time.monotonic() + 30
    async with client_session(s) as session:
        client = GatewayClient(s.gateway_url, session, retry_for_s=RETRY_FOR_S)
        while time.monotonic() < deadline:
            env = SUZHOU.envelope("2404", {"data": {"mdtrt_id": "NONE", "psn_no": mpsn(39)}}, insuplc=INSURED)
            try:
                r = await client.call(env)
            except SignInFailed:  # the router has not applied the hospital's new key yet
                await asyncio.sleep(0.5)
                continue
            if not r["err_msg"].startswith(("PERSON_UNKNOWN", "HOSPITAL_UNKNOWN", "TIMEOUT", "KEY_UNKNOWN")):
                return
            await asyncio.sleep(0.5)
    raise AssertionError("router did not pick up the monitoring test reference data within 30 s")


def stay_start(minutes_ago: int = 5) -> datetime:
    """An admission such that the settlement (admission + 3 days + 1 hour) is `minutes_ago` old,
    but never before this month began: the stay counts in the current month."""
    settle_at = max(now_sh() - timedelta(minutes=minutes_ago), month_bounds()[0] + timedelta(seconds=30))
    return settle_at - timedelta(days=3, hours=1)


def lines(i: int) -> list[FeeLine]:
    return [FeeLine(ITEM_A, D(10), D(150) + D(i * 11)), FeeLine(ITEM_B10, D(1), D("1000.00"))]


async def settle_stay(client: GatewayClient, hospital: Hospital, n: int, *, reverse: bool = False) -> Stay:
    # Settled 70 minutes ago; a reversal (settlement + 1 hour) 10 minutes ago.
    stay = Stay(hospital, mpsn(n), INSURED, "390", stay_start(70))
    r = await client.run_stay(stay, lines(n), reverse=reverse)
    assert r["infcode"] == 0, r["err_msg"]
    return stay


def manual_claim(n: int, claim_no: int) -> ManualClaim:
    end = now_sh() - timedelta(minutes=10)
    end = max(end, month_bounds()[0] + timedelta(minutes=1))
    return ManualClaim(
        claim_id=f"MON{RUN_TOKEN}{claim_no:03d}", psn_no=mpsn(n), insuplc_admdvs=INSURED,
        mdtrtarea_admvs=SUZHOU.admdvs, fixmedins_code=SUZHOU.fixmedins_code, med_type="21",
        begndate=wire_time(end - timedelta(days=3)), enddate=wire_time(end), medfee_sumamt=D("3000.00"),
        fund_pay_sumamt=D("1500.00"), reason="NOT_FILED", claim_time=wire_time(now_sh()),
    )


# --- reading metrics -------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int, path: str = "/metrics") -> tuple[str, Samples]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sm in family.samples:
            samples[(sm.name, frozenset(sm.labels.items()))] = sm.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def prom_query(s: Settings, expr: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{s.prometheus_port}/api/v1/query", params={"query": expr}
    ) as resp:
        body = await resp.json()
    if body["status"] != "success":
        raise AssertionError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
    return list(body["data"]["result"])


async def prom_alerts(s: Settings) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{s.prometheus_port}/api/v1/alerts"
    ) as resp:
        return list((await resp.json())["data"]["alerts"])


async def wait_for(what: str, probe: Callable[[], Awaitable[T | None]], timeout: float = 60,
                   every: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = await probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)


# --- the shared traffic ----------------------------------------------------------------------------


@dataclass
class Traffic:
    intra: list[Stay] = field(default_factory=list)
    cross: list[Stay] = field(default_factory=list)
    reversed_cross: list[Stay] = field(default_factory=list)
    claims: list[ManualClaim] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)


_traffic: Traffic | None = None
_lock = asyncio.Lock()
INTRA_KEY = {"insured_prov": INSURED_PROV, "treating_prov": INSURED_PROV, "scope": "intra_province",
             "visit_type": "inpatient"}


async def ensure_traffic(s: Settings, db: asyncpg.Pool, tmp: Path) -> Traffic:
    """Drive the monitoring traffic once per session (idempotent across the three modules)."""
    global _traffic
    async with _lock:
        if _traffic is not None:
            return _traffic
        await load_refdata(db, s, tmp)
        async with db.acquire() as conn:  # the run's database starts empty: one deposit for the deposit panels
            await deposit_topup(conn, INSURED_PROV, 100_000_000, f"MON{RUN_TOKEN}", "monitoring traffic",
                                operator="test.monitoring")
        t = Traffic()
        async with exclusive(db, "counters"), client_session(s) as session:
            client = GatewayClient(s.gateway_url, session, retry_for_s=RETRY_FOR_S)
            # One of each first, so Prometheus has seen the series before the rest arrive
            # (increase() cannot count the first value of a series it has never seen).
            t.intra.append(await settle_stay(client, SUZHOU, 0))
            first_cross = await settle_stay(client, CHIFENG, 21)
            t.claims.append(manual_claim(30, 0))
            await submit_claims(s, t.claims, operator="test.monitoring")
            sel = ",".join(f'{k}="{v}"' for k, v in INTRA_KEY.items())
            cross = f'insured_prov="{INSURED_PROV}",treating_prov="{TREATING_CROSS_PROV}",scope="cross_province"'
            await wait_for("first settlements and manual claim in Prometheus",
                           lambda: _both_seen(s, sel, cross), 60)
            rest = [settle_stay(client, SUZHOU, n) for n in range(1, N_INTRA)]
            rest += [settle_stay(client, CHIFENG, 20 + n, reverse=n == 0) for n in range(N_CROSS) if n != 1]
            stays = await asyncio.gather(*rest)
            t.intra += stays[: N_INTRA - 1]
            t.cross = [*stays[N_INTRA - 1:], first_cross]
            t.reversed_cross = t.cross[:1]
            more = [manual_claim(30 + n % 10, n) for n in range(1, N_MANUAL)]
            await submit_claims(s, more, operator="test.monitoring")
            t.claims += more
            # An unfiled person: refused with FILING_REQUIRED (and would then claim by hand).
            stay = Stay(SUZHOU, mpsn(35), INSURED, "390", stay_start())
            t.refused.append(await client.run_stay(stay, lines(35)))
        claim_ids = [c.claim_id for c in t.claims]
        await wait_for("manual claims recorded by the clearing service", lambda: claims_in(db, claim_ids), 60, 0.5)
        _traffic = t
        return t


async def _both_seen(s: Settings, sel: str, cross: str) -> bool:
    direct = await prom_query(s, f'xs_settlements_total{{kind="settle",{sel}}}')
    manual = await prom_query(s, f"xs_manual_claims_total{{{sel}}}")
    direct_cross = await prom_query(s, f'xs_settlements_total{{kind="settle",{cross}}}')
    return bool(direct) and bool(manual) and bool(direct_cross)


async def claims_in(db: asyncpg.Pool, claim_ids: list[str]) -> bool:
    n = await db.fetchval("SELECT count(*) FROM manual_claim WHERE claim_id = ANY($1::text[])", claim_ids)
    return bool(n == len(claim_ids))


# --- one session at a time --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def exclusive(db: asyncpg.Pool, name: str) -> AsyncIterator[None]:
    """Hold a PostgreSQL advisory lock: another engineer's run of these tests waits instead of moving the
    same deposit, Kafka group or counters meanwhile."""
    async with db.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"xsettle-monitoring-tests:{name}")
        try:
            yield
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", f"xsettle-monitoring-tests:{name}")


# --- a deposit below its warning line ----------------------------------------------------------------

# 西藏: the monitoring tests own its deposit's warning line (no other test keeps a deposit there); the
# line is put back to the default (one month's average cleared amount) afterwards.
LOW_DEPOSIT_PROV = "540000"


async def lower_deposit(db: asyncpg.Pool) -> int:
    """Put the province's warning line 10,000 yuan above its balance; returns the line in fen."""
    from services.clearing import store

    async with db.acquire() as conn:
        balance = await conn.fetchval(
            "SELECT balance_fen FROM clearing_deposit WHERE insured_prov = $1", LOW_DEPOSIT_PROV) or 0
        line = max(balance, 0) + 1_000_000
        await store.set_warning_line(conn, LOW_DEPOSIT_PROV, line)
    return int(line)


async def restore_deposit(db: asyncpg.Pool) -> None:
    from services.clearing import store

    async with db.acquire() as conn:
        await store.set_warning_line(conn, LOW_DEPOSIT_PROV, None)
