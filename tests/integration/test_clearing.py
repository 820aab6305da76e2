"""Clearing and reconciliation on the real stack: a generated month of stays through the HTTP gateway,
hospital reconciliation (3201/3202), the month close and its statements, late reversals, concurrent
reversals during a close, clearing details (3260-3262) and applications (3203/3204), deposits and
their warning line, manual claims, and a crash of the clearing service.

Amounts are compared with independent SQL over the ledger (`settlement`), to the fen.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from deploy import stack as stack_ctl
from loadtest.his import GatewayClient
from schemas.clearing import ManualClaim
from schemas.internal import SettlementEvent
from schemas.money import to_fen
from services.clearing import cli, store
from services.clearing.logic import AMOUNT_FIELDS, Position, compare_positions, month_end, month_start
from services.common.config import Settings
from services.common.kafka import ADMIN, client_auth
from services.common.tls import client_session
from services.refdata.regions import region_of
from tests.integration.clearing_fixtures import (
    CROSS_SHARD,
    EXTRA_PERSONS,
    HOSPITALS,
    M1,
    M2,
    M3,
    M4,
    RECON,
    RETRY_FOR_S,
    RUN_TOKEN,
    Traffic,
    at,
    fee_lines,
    gather_limited,
    generate_month,
    ledger_pairs,
    load_refdata,
    month_plan,
    reverse,
    run_stay,
    wait_recorded,
)
from tests.integration.conftest import Ledger
from topics.catalog import ALERTS, DEPOSITS, SETTLEMENTS

pytestmark = pytest.mark.integration
D = Decimal


@pytest.fixture(scope="module")
async def client(services: Settings) -> AsyncIterator[GatewayClient]:
    async with client_session(services) as session:
        yield GatewayClient(services.gateway_url, session, retry_for_s=RETRY_FOR_S)


@pytest.fixture(scope="module")
async def traffic(db: asyncpg.Pool, ledger: Ledger, services: Settings, client: GatewayClient,
                  tmp_path_factory: pytest.TempPathFactory) -> Traffic:
    await load_refdata(db, services, tmp_path_factory.mktemp("clearing_refdata"))
    t = await generate_month(client)
    await wait_recorded(db, ledger, t.setl_ids())
    return t


def pair_sums(positions: dict[Any, Position]) -> dict[tuple[str, str], dict[str, int]]:
    out: dict[tuple[str, str], dict[str, int]] = {}
    for p in positions.values():
        acc = out.setdefault((p.key.insured_pool, p.key.treating_pool), {"cnt": 0, **dict.fromkeys(AMOUNT_FIELDS, 0)})
        acc["cnt"] += p.cnt
        for f in AMOUNT_FIELDS:
            acc[f] += getattr(p.amounts, f)
    return out


async def metric(port: int, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# The month, streaming and batch ---------------------------------------------------------------------


async def test_month_of_traffic_clears_exactly_like_the_ledger(traffic: Traffic, db: asyncpg.Pool,
                                                                ledger: Ledger) -> None:
    async with db.acquire() as conn:
        # streaming = entries = batch recomputation over every shard, to the fen
        assert await store.verify(conn, ledger.shards, M1) == []
        positions = await store.positions(conn, M1)
    expected = await ledger_pairs(ledger, M1)
    assert pair_sums(positions) == expected
    scopes = {p.scope for p in positions.values()}
    assert scopes == {"intra_province", "cross_province"}
    assert all(p.key.insured_pool != p.key.treating_pool for p in positions.values())  # local care never clears
    seed_pools = {"150400", "500000", "510400", "350300", "140100"}
    assert seed_pools <= {p.key.insured_pool for p in positions.values()}
    assert {"440300", "110000", "330100"} <= {p.key.insured_pool for p in positions.values()}
    totals = {f: sum(v[f] for v in expected.values()) for f in AMOUNT_FIELDS}
    assert totals["hifp_pay"] > 0 and totals["hifmi_pay"] > 0 and totals["maf_pay"] > 0
    reversals = await ledger.total(
        "SELECT count(*) FROM settlement WHERE kind = 'reverse' AND scope <> 'local' AND setl_time >= $1"
        " AND setl_time < $2", month_start(M1), month_end(M1))
    assert sum(p.cnt for p in positions.values() if p.key.kind == "reverse") == reversals >= 5


async def test_replayed_settlement_events_are_not_counted_twice(traffic: Traffic, db: asyncpg.Pool, ledger: Ledger,
                                                                services: Settings) -> None:
    ids = traffic.setl_ids()[:10]
    rows = await ledger.fetch("SELECT * FROM settlement WHERE setl_id = ANY($1::text[]) AND scope <> 'local'", ids)
    assert len(rows) >= 5
    enc = msgspec.json.Encoder()
    events = [SettlementEvent(
        setl_id=r["setl_id"], kind=r["kind"], orig_setl_id=r["orig_setl_id"], msgid=r["msgid"], mdtrt_id=r["mdtrt_id"],
        psn_no=r["psn_no"], fixmedins_code=r["fixmedins_code"], insutype=r["insutype"], med_type=r["med_type"],
        scope=r["scope"], filing_type=r["filing_type"], insured_admdvs=r["insured_admdvs"],
        treating_admdvs=r["treating_admdvs"], setl_time=r["setl_time"].strftime("%Y-%m-%d %H:%M:%S"),
        **{f: r[f] for f in (*AMOUNT_FIELDS, "acct_pay", "psn_cash_pay")},
    ) for r in rows]
    async with db.acquire() as conn:
        before = await store.positions(conn, M1)
    dup_before = await metric(services.clearing_metrics_port, "xs_requests_total", stage="clearing",
                              infno="settlement_event", outcome="duplicate")
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, **client_auth(services, ADMIN), acks="all",
                                enable_idempotence=True)
    await producer.start()
    try:
        for _ in range(2):  # each event twice more: a replay and a duplicate
            for ev in events:
                await producer.send_and_wait(SETTLEMENTS.name, enc.encode(ev), key=ev.psn_no.encode())
    finally:
        await producer.stop()
    deadline = time.monotonic() + 30
    while (dup := await metric(services.clearing_metrics_port, "xs_requests_total", stage="clearing",
                               infno="settlement_event", outcome="duplicate")) < dup_before + 2 * len(events):
        assert time.monotonic() < deadline, "the clearing service did not see the replayed events"
        await asyncio.sleep(0.2)
    assert dup == dup_before + 2 * len(events)
    async with db.acquire() as conn:
        assert compare_positions(before, await store.positions(conn, M1)) == []
        assert await store.verify(conn, ledger.shards, M1) == []


# Hospital reconciliation ----------------------------------------------------------------------------


def _sum(rows: list[dict[str, Any]], field: str) -> Decimal:
    return sum((D(r[field]) for r in rows), D(0))


async def test_hospital_reconciliation_totals_and_details(traffic: Traffic, client: GatewayClient) -> None:
    day10, day11 = f"{M1}-10", f"{M1}-11"
    mine = [s.setlinfo for s in traffic.recon]  # the hospital's own records of its day
    assert {s["setl_time"][:10] for s in mine} == {day10}

    def totals(day: str, rows: list[dict[str, Any]], cnt: int | None = None) -> dict[str, Any]:
        return {"data": {"insutype": "390", "clr_type": "21", "setl_optins": "510400", "stmt_begndate": day,
                         "stmt_enddate": day, "medfee_sumamt": _sum(rows, "medfee_sumamt"),
                         "fund_pay_sumamt": _sum(rows, "fund_pay_sumamt"), "acct_pay": _sum(rows, "acct_pay"),
                         "fixmedins_setl_cnt": len(rows) if cnt is None else cnt}}

    env = RECON.envelope("3201", totals(day10, mine))
    r = await client.call(env)
    assert r["infcode"] == 0, r["err_msg"]
    assert r["output"]["stmtinfo"] == {"setl_optins": "510400", "stmt_rslt": "0", "stmt_rslt_dscr": "balanced"}
    assert await client.call(env) == r  # a resend (same msgid) gets the stored answer, byte for byte

    wrong = await client.call(RECON.envelope("3201", totals(day10, mine, cnt=3)))
    assert wrong["output"]["stmtinfo"]["stmt_rslt"] == "1"
    assert wrong["output"]["stmtdiff"] == [{"fld_name": "fixmedins_setl_cnt", "medins_val": 3, "ledger_val": 4,
                                            "diff_val": 1}]
    # The reversal counts on the day it happened, with negated amounts.
    assert traffic.recon_reversal is not None
    rev = await client.call(RECON.envelope("3201", totals(day11, [traffic.recon_reversal])))
    assert rev["output"]["stmtinfo"]["stmt_rslt"] == "0", rev["output"]
    assert rev["output"]["stmtinfo"]["stmt_rslt_dscr"] == "balanced"

    # 3202: the hospital's list misses one settlement and mis-states another; both are named.
    rows = [{"setl_id": s["setl_id"], "medfee_sumamt": s["medfee_sumamt"], "fund_pay_sumamt": s["fund_pay_sumamt"],
             "acct_pay": s["acct_pay"], "refd_setl_flag": "0"} for s in mine]
    missing, misstated = rows[0]["setl_id"], rows[1]["setl_id"]
    theirs = [dict(rows[1], fund_pay_sumamt=rows[1]["fund_pay_sumamt"] + D("1.00")), *rows[2:]]
    detail = await client.call(RECON.envelope("3202", {
        "data": {"setl_optins": "510400", "stmt_begndate": day10, "stmt_enddate": day10,
                 "medfee_sumamt": _sum(theirs, "medfee_sumamt"), "fund_pay_sumamt": _sum(theirs, "fund_pay_sumamt"),
                 "cash_payamt": sum((D(s["psn_cash_pay"]) for s in mine[1:]), D(0)),
                 "fixmedins_setl_cnt": len(theirs)},
        "detail": theirs,
    }))
    assert detail["infcode"] == 0, detail["err_msg"]
    out = detail["output"]
    assert out["stmtinfo"]["stmt_rslt"] == "1"
    assert out["matched_cnt"] == 2
    named = {d["setl_id"]: d for d in out["detail"]}
    assert set(named) == {missing, misstated}
    assert named[missing]["diff_type"] == "missing_at_medins" and named[missing]["medins_medfee_sumamt"] is None
    assert named[misstated]["diff_type"] == "amount_differs"
    assert named[misstated]["fund_pay_sumamt"] == D(mine[1]["fund_pay_sumamt"])
    assert named[misstated]["medins_fund_pay_sumamt"] == D(mine[1]["fund_pay_sumamt"]) + D("1.00")
    assert {d["fld_name"] for d in out["stmtdiff"]} == {"fixmedins_setl_cnt", "medfee_sumamt", "fund_pay_sumamt",
                                                        "cash_payamt"}
    # The reversal's own day, listed by the hospital as a refund row: balanced.
    rr = traffic.recon_reversal
    balanced = await client.call(RECON.envelope("3202", {
        "data": {"setl_optins": "510400", "stmt_begndate": day11, "stmt_enddate": day11,
                 "medfee_sumamt": rr["medfee_sumamt"], "fund_pay_sumamt": rr["fund_pay_sumamt"],
                 "cash_payamt": rr["psn_cash_pay"], "fixmedins_setl_cnt": 1},
        "detail": [{"setl_id": rr["setl_id"], "medfee_sumamt": rr["medfee_sumamt"],
                    "fund_pay_sumamt": rr["fund_pay_sumamt"], "acct_pay": rr["acct_pay"], "refd_setl_flag": "1"}],
    }))
    assert balanced["output"]["stmtinfo"]["stmt_rslt"] == "0", balanced["output"]
    # A bad period is refused at the gateway, naming the field.
    bad = await client.call(RECON.envelope("3201", {"data": {**totals(day10, mine)["data"],
                                                             "stmt_enddate": f"{M2}-28"}}))
    assert bad["infcode"] == -1 and bad["err_msg"].startswith("BODY_MALFORMED") and "stmt_enddate" in bad["err_msg"]


# The close and its statements ------------------------------------------------------------------------


async def test_close_freezes_the_month_and_statements_match_the_ledger(traffic: Traffic, db: asyncpg.Pool,
                                                                       ledger: Ledger, services: Settings,
                                                                       tmp_path: Path) -> None:
    closed = await cli.close(services, M1, operator="test.clearing")
    again = await cli.close(services, M1, operator="test.clearing")
    assert again.already_closed and (again.version, again.digest) == (closed.version, closed.digest)
    expected = await ledger_pairs(ledger, M1)
    total = sum(v["fund_pay_sumamt"] for v in expected.values())
    assert closed.fund_pay_sumamt == total and closed.entry_cnt == sum(v["cnt"] for v in expected.values())

    def prov(pool: str) -> str:
        return region_of(pool).prov_admdvs

    async with db.acquire() as conn:
        assert await store.verify(conn, ledger.shards, M1) == []
        for region in ("150400", "500000", "510400", "350300", "140100", "440300", "510000", "150000"):
            st = await cli.statement_for(conn, M1, region)
            assert st.status == "closed" and st.digest == closed.digest
            level = st.level
            key = (lambda pool: pool) if level == "pool" else prov
            pay = {f: sum(v[f] for (i, t), v in expected.items() if key(i) == region and key(t) != region)
                   for f in AMOUNT_FIELDS}
            rec = {f: sum(v[f] for (i, t), v in expected.items() if key(t) == region and key(i) != region)
                   for f in AMOUNT_FIELDS}
            assert st.net.payable.as_dict() == pay, region
            assert st.net.receivable.as_dict() == rec, region
            assert st.net.net.fund_pay_sumamt == rec["fund_pay_sumamt"] - pay["fund_pay_sumamt"]
        # Each insured province's deposit was drawn by its cross-province payable.
        drawn = {r["insured_prov"]: -r["amount_fen"] for r in await conn.fetch(
            "SELECT insured_prov, amount_fen FROM clearing_deposit_txn WHERE clr_month = $1", M1)}
    cross: dict[str, int] = {}
    for (i, t), v in expected.items():
        if prov(i) != prov(t):
            cross[prov(i)] = cross.get(prov(i), 0) + v["fund_pay_sumamt"]
    assert drawn == cross

    # The command line: JSON, CSV and a printable page for a region; verify agrees.
    for fmt in ("json", "csv", "html"):
        out = tmp_path / f"510400.{fmt}"
        rc = await asyncio.to_thread(cli.main, ["statement", "--month", M1, "--region", "510400", "--format", fmt,
                                                "--out", str(out)])
        assert rc == 0 and out.stat().st_size > 0
    body = json.loads((tmp_path / "510400.json").read_text())
    pay_fen = sum(v["fund_pay_sumamt"] for (i, t), v in expected.items() if i == "510400")
    rec_fen = sum(v["fund_pay_sumamt"] for (i, t), v in expected.items() if t == "510400")
    assert D(str(body["net_position"]["fund_pay_sumamt"])) == D(rec_fen - pay_fen) / 100
    assert f"{D(rec_fen - pay_fen) / 100:.2f}" in (tmp_path / "510400.csv").read_text()
    assert "<table>" in (tmp_path / "510400.html").read_text()
    assert await asyncio.to_thread(cli.main, ["verify", "--month", M1]) == 0


async def test_reversal_after_close_lands_in_the_next_month(traffic: Traffic, db: asyncpg.Pool, ledger: Ledger,
                                                            client: GatewayClient, services: Settings) -> None:
    # idempotent: closed already by the test before, or now
    closed = await cli.close(services, M1, operator="test.clearing")
    reversed_ids = {r["setl_id"] for r in traffic.reversals}
    candidates = [s for s in traffic.settled if s.setl_id not in reversed_ids]
    async with db.acquire() as conn:
        before = await store.positions(conn, M1)
        nonlocal_ids = {r[0] for r in await ledger.fetch(
            "SELECT setl_id FROM settlement WHERE setl_id = ANY($1::text[]) AND scope <> 'local'",
            [s.setl_id for s in candidates])}
    late_target, next_target = [s for s in candidates if s.setl_id in nonlocal_ids][:2]
    late = await reverse(client, late_target, at(M1, 31, 23, 30))  # dated in the closed month: arrives late
    normal = await reverse(client, next_target, at(M2, 2, 10, 0))
    await wait_recorded(db, ledger, [late["setl_id"], normal["setl_id"]])
    async with db.acquire() as conn:
        entries = {r["setl_id"]: r for r in await conn.fetch(
            "SELECT setl_id, setl_month, clr_month FROM clearing_entry WHERE setl_id = ANY($1::text[])",
            [late["setl_id"], normal["setl_id"]])}
        assert (entries[late["setl_id"]]["setl_month"], entries[late["setl_id"]]["clr_month"]) == (M1, M2)
        assert (entries[normal["setl_id"]]["setl_month"], entries[normal["setl_id"]]["clr_month"]) == (M2, M2)
        # The closed month did not move: same positions, same frozen statement.
        assert compare_positions(before, await store.positions(conn, M1)) == []
        stmt = await store.statement(conn, M1)
        assert stmt is not None and stmt["digest"] == closed.digest
        assert await store.verify(conn, ledger.shards, M1) == []
        assert await store.verify(conn, ledger.shards, M2) == []  # the batch puts the late reversal in M2 as well
        adjustments = [p for p in (await store.positions(conn, M2)).values() if p.key.adjustment]
        assert sum(p.amounts.fund_pay_sumamt for p in adjustments) == to_fen(D(late["fund_pay_sumamt"]))
        st = await cli.statement_for(conn, M2, region_of(late_target.stay.insuplc).pool_admdvs)
        assert st.status == "provisional"
        assert sum(ln.adj_reverse_cnt for ln in st.payable) == 1  # the late reversal, nothing else


async def test_concurrent_reversals_cannot_slip_between_months(traffic: Traffic, db: asyncpg.Pool, ledger: Ledger,
                                                               client: GatewayClient, services: Settings) -> None:
    plan = month_plan(M2, EXTRA_PERSONS, 16, first_day=3, last_day=12)
    settled = await gather_limited(run_stay(client, h, p, when, lines) for h, p, when, lines in plan)
    await wait_recorded(db, ledger, [s.setl_id for s in settled])

    some_done = asyncio.Event()
    done: list[dict[str, Any]] = []

    async def one(s: Any, i: int) -> dict[str, Any]:
        r = await reverse(client, s, at(M2, 25, 10, i))
        done.append(r)
        if len(done) >= 4:
            some_done.set()
        return r

    async def reversals() -> list[dict[str, Any]]:
        tasks = []
        for i, s in enumerate(settled):
            tasks.append(asyncio.create_task(one(s, i)))
            await asyncio.sleep(0.1)
        return list(await asyncio.gather(*tasks))

    async def close_midway() -> store.CloseResult:
        await asyncio.wait_for(some_done.wait(), 30)  # a few answered, the rest still in flight
        return await cli.close(services, M2, operator="test.clearing")

    revs, closed = await asyncio.gather(reversals(), close_midway())
    await wait_recorded(db, ledger, [r["setl_id"] for r in revs])
    async with db.acquire() as conn:
        rev_ids = [r[0] for r in await ledger.fetch(
            "SELECT setl_id FROM settlement WHERE setl_id = ANY($1::text[]) AND scope <> 'local'",
            [r["setl_id"] for r in revs])]
        nonlocal_settled = await ledger.total(
            "SELECT count(*) FROM settlement WHERE setl_id = ANY($1::text[]) AND scope <> 'local'",
            [s.setl_id for s in settled])
        assert len(rev_ids) == nonlocal_settled == sum(
            region_of(h.admdvs).pool_admdvs != region_of(p.insuplc).pool_admdvs for h, p, _, _ in plan)
        months = [r[0] for r in await conn.fetch(
            "SELECT clr_month FROM clearing_entry WHERE setl_id = ANY($1::text[])", rev_ids)]
        assert len(months) == len(rev_ids) and set(months) <= {M2, M3}
        stmt = await store.statement(conn, M2)
        assert stmt is not None and stmt["digest"] == closed.digest
        frozen = {p.key: p for p in store.positions_from_statement(stmt["body"])}
        # Nothing slipped into the closed month after its freeze, nothing was lost.
        assert compare_positions(frozen, await store.positions(conn, M2)) == []
        assert compare_positions(frozen, await store.entry_positions(conn, M2)) == []
        assert await store.verify(conn, ledger.shards, M2) == []
        assert await store.verify(conn, ledger.shards, M3) == []
        late = await conn.fetchval(
            "SELECT count(*) FROM clearing_entry WHERE setl_id = ANY($1::text[]) AND clr_month = $2", rev_ids, M3)
    print(f"reversals during the close: {len(rev_ids) - late} in {M2}, {late} as adjustments of {M3}")


# Clearing details and applications ----------------------------------------------------------------


async def test_clearing_details_confirmation_and_applications(traffic: Traffic, db: asyncpg.Pool, ledger: Ledger,
                                                              client: GatewayClient, services: Settings) -> None:
    await cli.close(services, M1, operator="test.clearing")
    hospital = HOSPITALS["150400"]
    year, mon = M1.split("-")
    q = {"trt_year": year, "trt_month": mon}
    page = await client.call(hospital.envelope("3260", {"data": {**q, "startrow": 1}}))
    assert page["infcode"] == 0, page["err_msg"]
    entry_ids = [r[0] for r in await db.fetch(
        "SELECT setl_id FROM clearing_entry WHERE clr_month = $1 AND fixmedins_code = $2", M1, hospital.fixmedins_code)]
    ours = await ledger.fetch(
        "SELECT setl_id, fund_pay_sumamt, medfee_sumamt FROM settlement WHERE setl_id = ANY($1::text[])", entry_ids)
    assert len(ours) == len(entry_ids)
    out = page["output"]
    assert out["totalrow"] == len(ours) == len(out["data"]) > 2
    assert {r["setl_sn"] for r in out["data"]} == {r["setl_id"] for r in ours}
    assert _sum(out["data"], "optins_pay_sumamt") == D(sum(r["fund_pay_sumamt"] for r in ours)) / 100
    second = await client.call(hospital.envelope("3260", {"data": {**q, "startrow": 2}}))
    assert second["output"]["data"][0] == out["data"][1] and second["output"]["data"][0]["seqno"] == 2
    open_month = await client.call(hospital.envelope("3260", {"data": {"trt_year": M4[:4], "trt_month": M4[5:]}}))
    assert open_month["err_msg"].startswith("MONTH_NOT_CLOSED")

    env = hospital.envelope("3261", {"data": {**q, "totalrow": len(ours)}, "detail": [
        {"setl_sn": r["setl_sn"], "medfee_sumamt": r["medfee_sumamt"], "optins_pay_sumamt": r["optins_pay_sumamt"],
         "cnfm_flag": "0" if i == 0 else "1"} for i, r in enumerate(out["data"])]})
    confirmed = await client.call(env)
    assert confirmed["infcode"] == 0, confirmed["err_msg"]
    assert confirmed["output"]["result"] == {
        "otransid": env["msgid"], "totalrow": len(ours), "cnfm_cnt": len(ours) - 1, "dspt_cnt": 1,
        "cnfm_stas": "confirmed", "batch_rows": len(ours), "dup_cnt": 0, "month_cnfm_cnt": len(ours) - 1,
        "month_dspt_cnt": 1, "month_stas": "complete"}
    again = await client.call(hospital.envelope("3261", {"data": {**q, "totalrow": len(ours)}}))
    assert again["err_msg"].startswith("CONFIRMATION_BATCH_SIZE")  # a batch lists 1 to 100 rows
    mismatch = await client.call(HOSPITALS["440300"].envelope("3261", {"data": {**q, "totalrow": 99999}, "detail": [
        {"setl_sn": "X1", "medfee_sumamt": 0, "optins_pay_sumamt": 0}]}))
    assert mismatch["err_msg"].startswith("CONFIRMATION_MISMATCH")
    back = await client.call(hospital.envelope("3262", {"data": {**q, "otransid": env["msgid"]}}))
    assert back["output"]["result"]["cnfm_stas"] == "rolled_back"
    unknown = await client.call(hospital.envelope("3262", {"data": {**q, "otransid": "NOSUCH"}}))
    assert unknown["err_msg"].startswith("CONFIRMATION_UNKNOWN")

    # 3203: the reconciliation hospital applies for its two days; the ledger must agree.
    rows = [s.setlinfo for s in traffic.recon]
    assert traffic.recon_reversal is not None
    rows.append(traffic.recon_reversal)
    appl = {"clr_type": "21", "setlym": M1.replace("-", ""), "psntime": len(traffic.recon) - 1,
            "medfee_sumamt": _sum(rows, "medfee_sumamt"), "med_sumfee": _sum(rows, "inscp_scp_amt"),
            "fund_appy_sum": _sum(rows, "fund_pay_sumamt"), "cash_payamt": _sum(rows, "psn_cash_pay"),
            "acct_pay": _sum(rows, "acct_pay"), "begndate": f"{M1}-10", "enddate": f"{M1}-11"}
    wrong = await client.call(RECON.envelope("3203", {"data": {**appl, "fund_appy_sum": D("1.00")}}))
    assert wrong["err_msg"].startswith("APPLICATION_MISMATCH") and "fund_appy_sum" in wrong["err_msg"]
    applied = await client.call(RECON.envelope("3203", {"data": appl}))
    assert applied["infcode"] == 0, applied["err_msg"]
    appl_id = applied["output"]["result"]["clr_appy_evt_id"]
    twice = await client.call(RECON.envelope("3203", {"data": appl}))
    assert twice["output"]["result"]["clr_appy_evt_id"] == appl_id
    frozen = await client.call(RECON.envelope("3204", {"data": {"clr_appy_evt_id": appl_id}}))
    assert frozen["err_msg"].startswith("MONTH_CLOSED")  # its month is cleared: nothing to withdraw
    empty = {**appl, "setlym": M4.replace("-", ""), "psntime": 0, "begndate": f"{M4}-01", "enddate": f"{M4}-02",
             **dict.fromkeys(("medfee_sumamt", "med_sumfee", "fund_appy_sum", "cash_payamt", "acct_pay"), D(0))}
    open_appl = await client.call(RECON.envelope("3203", {"data": empty}))
    withdrawn = await client.call(RECON.envelope("3204", {"data": {
        "clr_appy_evt_id": open_appl["output"]["result"]["clr_appy_evt_id"]}}))
    assert withdrawn["output"]["result"]["clr_stas"] == "withdrawn", withdrawn


# Deposits -------------------------------------------------------------------------------------------------


async def _find_on_topic(s: Settings, topic: str, since_ms: int, wanted: set[str], key: str,
                         timeout_s: float = 20) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN), enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    found: set[str] = set()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        offsets = await consumer.offsets_for_times({tp: since_ms})
        if offsets[tp] is None:
            await consumer.seek_to_end(tp)
        else:
            consumer.seek(tp, offsets[tp].offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and found != wanted:
            batch = await consumer.getmany(tp, timeout_ms=200)
            for rec in batch.get(tp, []):
                value = json.loads(rec.value)
                if value.get(key) in wanted:
                    found.add(value[key])
    finally:
        await consumer.stop()
    return found


async def test_deposit_warning_fires_at_the_line_and_not_above_it(db: asyncpg.Pool, services: Settings) -> None:
    prov = "620000"  # a province no test traffic draws from
    since_ms = int(time.time() * 1000) - 1000
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO clearing_deposit (insured_prov) VALUES ($1) ON CONFLICT DO NOTHING", prov)
        before = await conn.fetchval("SELECT balance_fen FROM clearing_deposit WHERE insured_prov = $1 FOR UPDATE",
                                     prov)
        line = before + 100_000
        await store.set_warning_line(conn, prov, line)
        at_line = await cli.deposit_topup(conn, prov, line - before, f"T{RUN_TOKEN}A", "bank transfer",
                                           operator="test.clearing")
        assert (at_line.balance_fen, at_line.warning_line_fen, at_line.alert) == (line, line, True)
        above = await cli.deposit_topup(conn, prov, 1, f"T{RUN_TOKEN}B", operator="test.clearing")
        assert (above.balance_fen, above.alert) == (line + 1, False)
        repeat = await cli.deposit_topup(conn, prov, line - before, f"T{RUN_TOKEN}A", operator="test.clearing")
        assert repeat.duplicate and repeat.balance_fen == line  # a repeated top-up is recorded once
        assert await conn.fetchval("SELECT balance_fen FROM clearing_deposit WHERE insured_prov = $1", prov) == line + 1
        await store.set_warning_line(conn, prov, None)  # back to the default: no clearing history, no line
        assert await store.current_line(conn, prov) == 0
    # The alert event for the movement at the line, none for the one above it (published by the service).
    alerts = {f"deposit-low-topup-T{RUN_TOKEN}A", f"deposit-low-topup-T{RUN_TOKEN}B"}
    assert await _find_on_topic(services, ALERTS.name, since_ms, alerts, "alert_id", timeout_s=8) == {
        f"deposit-low-topup-T{RUN_TOKEN}A"}
    moves = {f"topup-T{RUN_TOKEN}A", f"topup-T{RUN_TOKEN}B"}
    assert await _find_on_topic(services, DEPOSITS.name, since_ms, moves, "txn_id") == moves
    # The dashboard's gauge shows the balance.
    deadline = time.monotonic() + 25
    gauge = {"insured_prov": prov}
    while await metric(services.clearing_metrics_port, "xs_deposit_balance_yuan", **gauge) != (line + 1) / 100:
        assert time.monotonic() < deadline, "the deposit gauge did not show the balance"
        await asyncio.sleep(0.5)


# Manual claims ----------------------------------------------------------------------------------------------


async def test_manual_claims_are_stored_and_count_in_the_rate_denominator(traffic: Traffic, db: asyncpg.Pool,
                                                                          ledger: Ledger, services: Settings) -> None:
    def claim(n: int, insured: str, treating: str) -> ManualClaim:
        return ManualClaim(
            claim_id=f"MC{RUN_TOKEN}{n}", psn_no=EXTRA_PERSONS[n].psn_no, insuplc_admdvs=insured,
            mdtrtarea_admvs=treating, med_type="21", begndate=f"{M1}-05 08:00:00", enddate=f"{M1}-09 08:00:00",
            medfee_sumamt=D("8000.00"), fund_pay_sumamt=D("3000.00"), reason="NOT_FILED",
            claim_time=f"{M2}-02 10:00:00")

    labels = {"insured_prov": "510000", "treating_prov": "150000", "scope": "cross_province",
              "visit_type": "inpatient"}
    counted_before = await metric(services.clearing_metrics_port, "xs_manual_claims_total", **labels)
    claims = [claim(0, "510421", "150400"), claim(1, "510421", "150400"), claim(2, "510421", "150400")]
    local = claim(3, "510421", "510402")  # same pooling region: not a non-local claim
    await cli.submit_claims(services, [*claims, claims[0], local], operator="test.clearing")  # claim 0 twice
    ids = [c.claim_id for c in claims]
    deadline = time.monotonic() + 20
    while await db.fetchval("SELECT count(*) FROM manual_claim WHERE claim_id = ANY($1::text[])", ids) < 3:
        assert time.monotonic() < deadline, "manual claims not stored"
        await asyncio.sleep(0.2)
    assert await db.fetchval("SELECT count(*) FROM manual_claim WHERE claim_id = $1", local.claim_id) == 0
    # Counted once each.
    deadline = time.monotonic() + 15
    while (counted := await metric(services.clearing_metrics_port, "xs_manual_claims_total", **labels)) \
            < counted_before + 3:
        assert time.monotonic() < deadline, "manual claims not counted"
        await asyncio.sleep(0.2)
    assert counted == counted_before + 3

    async with db.acquire() as conn:
        lines = await store.rates(conn, ledger.shards, month_start(M1).date(), (month_end(M1)).date())
        direct = await ledger.total(
            "SELECT count(DISTINCT s.mdtrt_id) FROM settlement s WHERE s.kind = 'settle' AND s.med_type = '21'"
            " AND s.insured_pool = '510400' AND left(s.treating_admdvs, 2) = '15' AND s.setl_time >= $1"
            " AND s.setl_time < $2 AND NOT EXISTS (SELECT 1 FROM settlement r WHERE r.orig_setl_id = s.setl_id)",
            month_start(M1), month_end(M1))
    line = next(x for x in lines if (x["insured_prov"], x["treating_prov"], x["scope"], x["visit_type"])
                == tuple(labels.values()))
    assert (line["direct"], line["manual"]) == (direct, 3)
    assert line["rate"] == (D(direct) / D(direct + 3)).quantize(D("0.0001"))
    assert claims[0].psn_no not in json.dumps([str(x) for x in lines])  # no person in the output


# A crash of the clearing service ------------------------------------------------------------------------------


async def test_clearing_service_crash_keeps_positions_exact(traffic: Traffic, db: asyncpg.Pool, ledger: Ledger,
                                                            client: GatewayClient, services: Settings) -> None:
    plan = month_plan(M4, EXTRA_PERSONS, 20, first_day=1, last_day=20)
    running = asyncio.ensure_future(gather_limited(run_stay(client, h, p, when, lines) for h, p, when, lines in plan))
    await asyncio.sleep(1.0)
    # kill -9 mid-stream, kept down until the stays are answered, then started again.
    assert await asyncio.to_thread(stack_ctl.stop_service, "clearing", True, services)
    settled = await running
    await asyncio.to_thread(stack_ctl.start_service, "clearing", services)
    await wait_recorded(db, ledger, [s.setl_id for s in settled], timeout_s=60)
    async with db.acquire() as conn:
        assert await store.verify(conn, ledger.shards, M4) == []
        assert pair_sums(await store.positions(conn, M4)) == await ledger_pairs(ledger, M4)


# Across the shard boundary --------------------------------------------------------------------------------

M_CROSS = "2025-08"  # no other clearing test sends traffic for August 2025


async def test_a_hospital_treating_both_shards_reconciles_and_clears_like_the_shards(
        traffic: Traffic, db: asyncpg.Pool, ledger: Ledger, client: GatewayClient) -> None:
    """Persons of both shards at one hospital on one day: 3201 per clearing agency, 3203 over the whole
    hospital, the month's clearing positions and the batch recomputation all equal what the shards hold."""
    s1 = [p for p in EXTRA_PERSONS if p.insuplc == "150400"][:2]
    s2 = [p for p in EXTRA_PERSONS if p.insuplc == "510421"][:2]
    assert len(s1) == len(s2) == 2 and ledger.of("150400") is not ledger.of("510421")
    settled = await gather_limited(run_stay(client, CROSS_SHARD, p, at(M_CROSS, 2, 9, 5 * i), fee_lines(70 + i))
                                   for i, p in enumerate([*s1, *s2]))
    day = f"{M_CROSS}-05"  # admission + 3 days + 1 hour
    assert {s.setlinfo["setl_time"][:10] for s in settled} == {day}
    ids = [s.setl_id for s in settled]
    for shard_of, persons in (("150400", s1), ("510421", s2)):  # each shard holds exactly its persons' rows
        held = await ledger.of(shard_of).fetch("SELECT psn_no FROM settlement WHERE setl_id = ANY($1::text[])", ids)
        assert sorted(r[0] for r in held) == sorted(p.psn_no for p in persons)

    # 3201, one clearing agency at a time: balanced against the rows of that agency's shard.
    for persons, optins in ((s1, "150400"), (s2, "510400")):
        mine = [s.setlinfo for s in settled if s.stay.psn_no in {p.psn_no for p in persons}]
        r = await client.call(CROSS_SHARD.envelope("3201", {"data": {
            "insutype": "390", "clr_type": "21", "setl_optins": optins, "stmt_begndate": day, "stmt_enddate": day,
            "medfee_sumamt": _sum(mine, "medfee_sumamt"), "fund_pay_sumamt": _sum(mine, "fund_pay_sumamt"),
            "acct_pay": _sum(mine, "acct_pay"), "fixmedins_setl_cnt": len(mine)}}))
        assert r["infcode"] == 0, r["err_msg"]
        assert r["output"]["stmtinfo"]["stmt_rslt"] == "0", r["output"]

    # The ledger side of an application sums both shards; 3203 is accepted with the hospital's own totals.
    begin = end = datetime.strptime(day, "%Y-%m-%d").date()
    totals = await store.application_totals(ledger.shards, CROSS_SHARD.fixmedins_code, "21", begin, end)
    per_shard = [await pool.fetchrow(
        "SELECT count(*) AS n, sum(fund_pay_sumamt)::bigint AS fund FROM settlement WHERE fixmedins_code = $1",
        CROSS_SHARD.fixmedins_code) for _, pool in ledger.shards]
    assert [r["n"] for r in per_shard] == [2, 2]
    assert totals.psntime == 4 and totals.fund_appy_sum == sum(r["fund"] for r in per_shard) > 0
    rows = [s.setlinfo for s in settled]
    appl = {"clr_type": "21", "setlym": M_CROSS.replace("-", ""), "psntime": 4,
            "medfee_sumamt": _sum(rows, "medfee_sumamt"), "med_sumfee": _sum(rows, "inscp_scp_amt"),
            "fund_appy_sum": _sum(rows, "fund_pay_sumamt"), "cash_payamt": _sum(rows, "psn_cash_pay"),
            "acct_pay": _sum(rows, "acct_pay"), "begndate": day, "enddate": day}
    applied = await client.call(CROSS_SHARD.envelope("3203", {"data": appl}))
    assert applied["infcode"] == 0, applied["err_msg"]

    # Clearing: the month's positions equal the shards' rows, the batch recomputation agrees.
    await wait_recorded(db, ledger, ids)
    async with db.acquire() as conn:
        assert await store.verify(conn, ledger.shards, M_CROSS) == []
        positions = await store.positions(conn, M_CROSS)
    assert pair_sums(positions) == await ledger_pairs(ledger, M_CROSS)
    assert {("150400", "440300"), ("510400", "440300")} <= set(pair_sums(positions))


# Month-to-date aggregates -----------------------------------------------------------------------------------


async def test_rates_from_the_daily_aggregates_equal_the_ledger_recount(traffic: Traffic, db: asyncpg.Pool,
                                                                        ledger: Ledger) -> None:
    """The engine keeps `ledger_daily` in its transaction: the month's rates (settlements, reversals of
    them two days later, both shards) equal the recount from the ledger rows, day windows included."""
    async with db.acquire() as conn:
        for begin, end in ((month_start(M1).date(), month_end(M1).date()), (at(M1, 1).date(), at(M1, 10).date()),
                           (at(M1, 11).date(), at(M1, 11).date())):
            aggregated = await store.rates(conn, ledger.shards, begin, end)
            assert aggregated == await store.rates_recomputed(conn, ledger.shards, begin, end), (begin, end)
        month = await store.rates(conn, ledger.shards, month_start(M1).date(), month_end(M1).date())
    assert sum(x["direct"] for x in month) > 40
    assert {"150000", "510000"} <= {x["insured_prov"] for x in month}  # persons of both shards
    # The money: the aggregates' daily sums equal the ledger's, per shard.
    for _, shard in ledger.shards:
        agg = await shard.fetchrow(
            "SELECT sum(settled)::bigint AS settled, sum(reversed)::bigint AS reversed, sum(fund_pay_sumamt)::bigint"
            " AS fund, sum(maf_pay)::bigint AS maf FROM ledger_daily WHERE day >= $1 AND day < $2",
            month_start(M1).date(), month_end(M1).date())
        raw = await shard.fetchrow(
            "SELECT count(*) FILTER (WHERE kind = 'settle') AS settled, count(*) FILTER (WHERE kind = 'reverse')"
            " AS reversed, sum(fund_pay_sumamt)::bigint AS fund, sum(maf_pay)::bigint AS maf FROM settlement"
            " WHERE setl_time >= $1 AND setl_time < $2", month_start(M1), month_end(M1))
        assert dict(agg) == dict(raw) and raw["settled"] > 0


def _ledger_row(setl_id: str, kind: str, orig: str | None, mdtrt_id: str, psn_no: str, when: datetime,
                fund: int) -> tuple[Any, ...]:
    sign = 1 if kind == "settle" else -1
    medfee, hifp = sign * (fund + 5_000), sign * fund
    return (setl_id, "X" + setl_id, kind, orig, mdtrt_id, psn_no, CROSS_SHARD.fixmedins_code, "390", "21",
            "cross_province", "LONG_TERM", "150400", "150400", "440300", "440300", "150400", when, when.year,
            medfee, 0, 0, 0, medfee, 0, hifp, 0, 0, 0, 0, hifp, medfee - hifp, 0, medfee - hifp, 0, "{}")


async def test_a_visit_settled_again_after_its_reversal_counts_once(ledger: Ledger, db: asyncpg.Pool) -> None:
    """The definition of the direct rate, on rows written the engine's way (rows, then ledger_daily_add in
    the same transaction): settled on day 1, reversed on day 2, settled again on day 3 → one person-time,
    on day 3; a settlement still standing → one on its day. Aggregate = recount for every window."""
    shard = ledger.of("150400")
    day = [datetime(2024, 2, d, 10, 0) for d in (1, 2, 3)]
    psn_no, visit_a, visit_b = f"A{RUN_TOKEN}001", f"MAGG{RUN_TOKEN}A", f"MAGG{RUN_TOKEN}B"
    rows = [("SAGG1" + RUN_TOKEN, "settle", None, visit_a, day[0], 30_000),
            ("RAGG1" + RUN_TOKEN, "reverse", "SAGG1" + RUN_TOKEN, visit_a, day[1], 30_000),
            ("SAGG2" + RUN_TOKEN, "settle", None, visit_a, day[2], 31_000),
            ("SAGG3" + RUN_TOKEN, "settle", None, visit_b, day[0], 12_000)]
    cols = ("setl_id, msgid, kind, orig_setl_id, mdtrt_id, psn_no, fixmedins_code, insutype, med_type, scope,"
            " filing_type, insured_admdvs, insured_pool, treating_admdvs, treating_pool, clr_optins, setl_time,"
            " acc_year, medfee_sumamt, fulamt_ownpay_amt, overlmt_selfpay, preselfpay_amt, inscp_scp_amt,"
            " act_pay_dedc, hifp_pay, pool_prop_selfpay, hifmi_pay, hifob_pay, maf_pay, fund_pay_sumamt,"
            " psn_part_amt, acct_pay, psn_cash_pay, balc, accum_delta")
    try:
        async with shard.acquire() as conn:
            for mdtrt_id in (visit_a, visit_b):
                await conn.execute(
                    "INSERT INTO visit (mdtrt_id, psn_no, fixmedins_code, med_type, insutype, scope, insured_admdvs,"
                    " treating_admdvs, ipt_otp_no, begntime, state, created_msgid) VALUES ($1, $2, $3, '21', '390',"
                    " 'cross_province', '150400', '440300', $1, $4, 'settled', $1)",
                    mdtrt_id, psn_no, CROSS_SHARD.fixmedins_code, day[0] - timedelta(days=3))
            for setl_id, kind, orig, mdtrt_id, when, fund in rows:  # one engine batch per row
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO settlement ({cols}) VALUES ({_params(35)})",
                                       *_ledger_row(setl_id, kind, orig, mdtrt_id, psn_no, when, fund))
                    await conn.execute("SELECT ledger_daily_add($1::text[])", [setl_id])
        async with db.acquire() as hub:
            key = ("150000", "440000", "cross_province", "inpatient")

            async def direct(first: int, last: int) -> tuple[int, int]:
                begin, end = day[first].date(), day[last].date()
                agg = await store.rates(hub, ledger.shards, begin, end)
                recount = await store.rates_recomputed(hub, ledger.shards, begin, end)
                assert agg == recount, (first, last)
                return sum(x["direct"] for x in agg if (x["insured_prov"], x["treating_prov"], x["scope"],
                                                        x["visit_type"]) == key), len(agg)

            assert await direct(0, 2) == (2, 1)  # visit A once (its second settlement), visit B once
            assert await direct(0, 0) == (1, 1)  # day 1: only B stands (A's first settlement was reversed)
            assert await direct(1, 1) == (0, 0)  # the reversal's own day adds no person-time
            assert await direct(2, 2) == (1, 1)
        agg = await shard.fetchrow(
            "SELECT sum(settled) AS s, sum(reversed) AS r, sum(fund_pay_sumamt) AS f FROM ledger_daily"
            " WHERE day BETWEEN $1 AND $2", day[0].date(), day[2].date())
        assert (agg["s"], agg["r"], agg["f"]) == (3, 1, 30_000 - 30_000 + 31_000 + 12_000)
    finally:  # leave February 2024 as empty as it was (no other test writes it)
        async with shard.acquire() as conn, conn.transaction():
            ids = [r[0] for r in rows]
            await conn.execute("DELETE FROM settlement WHERE setl_id = ANY($1)", ids)
            await conn.execute("DELETE FROM settlement_key WHERE setl_id = ANY($1) AND orig_setl_id IS NOT NULL", ids)
            await conn.execute("DELETE FROM settlement_key WHERE setl_id = ANY($1)", ids)
            await conn.execute("DELETE FROM visit WHERE mdtrt_id = ANY($1)", [visit_a, visit_b])
            await conn.execute("DELETE FROM ledger_daily WHERE day BETWEEN $1 AND $2", day[0].date(), day[2].date())


def _params(n: int) -> str:
    return ", ".join(f"${i}" for i in range(1, n + 1))
