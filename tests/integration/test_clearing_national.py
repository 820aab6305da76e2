"""Clearing at national shape on the real stack, through the gateway, signed: a closed month (April 2026) of
more than 100 rows at one hospital confirmed by several 3261 batches of at most 100 rows (exact counts,
repeats, rows confirmed twice, rollback of one batch); the treating region's agency (A15040000000, its key
issued by the keys CLI) pulling and confirming across two hospitals of its region, refused another region's
rows and every non-clearing infno; a hospital still limited to its own rows; statement versions (an
operator adjustment re-issues the statement, both versions kept, amounts exact, `verify` agrees).

Expected rows come from independent SQL over the ledger (`settlement`, every shard) and `clearing_entry`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from loadtest.his import FeeLine, GatewayClient, Hospital, OutpatientVisit, SignInFailed, run_outpatient
from services.clearing import cli, store
from services.common import audit
from services.common.config import PROJECT_ROOT, Settings, settings_env
from services.common.shards import ShardPools
from services.common.tls import client_session
from tests.integration.conftest import HOSPITALS, ITEM_A, ITEM_B10, PERSONS, SIGNER, Ledger, issue_keys

pytestmark = pytest.mark.integration
D = Decimal

MONTH = "2026-04"
Q = {"trt_year": "2026", "trt_month": "04"}
A, B, OTHER = HOSPITALS["clear_a"], HOSPITALS["clear_b"], HOSPITALS["clear_other"]
AGENCY = Hospital("A15040000000", "赤峰市医保经办机构", "150400")
OTHER_AGENCY = Hospital("A51040000000", "攀枝花市医保经办机构", "510400")
A_VISITS, A_REVERSED, B_VISITS, OTHER_VISITS = 105, 3, 6, 3
OPERATOR = "test.clear"


@dataclass
class April:
    a_rows: int
    b_rows: int
    other_rows: int


def _cmd(stack: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings_env(stack)}
    env.pop(audit.OPERATOR_ENV, None)
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


async def _visit(client: GatewayClient, hospital: Hospital, key: str, at: datetime, i: int) -> OutpatientVisit:
    spec = PERSONS[key].person
    visit = OutpatientVisit(hospital, spec.psn_no, spec.insuplc, spec.insutype, at)
    lines = [FeeLine(ITEM_A, D(2), D(30) + D(i)), FeeLine(ITEM_B10, D(1), D("55.50"))]
    r = await run_outpatient(client, visit, lines)
    assert r["infcode"] == 0, r["err_msg"]
    return visit


async def _signed_in(client: GatewayClient, agency: Hospital) -> None:
    """The router applies a new key from the change log: sign in once it has."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await SIGNER.ensure_session(agency.envelope("9001", {}), client._post)
            return
        except SignInFailed:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
async def client(services: Settings) -> AsyncIterator[GatewayClient]:
    async with client_session(services) as session:
        yield GatewayClient(services.gateway_url, session, retry_for_s=30)


@pytest.fixture(scope="module")
async def april(refdata: dict, db: asyncpg.Pool, ledger: Ledger, services: Settings, client: GatewayClient) -> April:
    """April 2026: 105 visits at A (3 reversed), 6 at B, 3 at OTHER; recorded by clearing; the month closed.
    The agencies get their keys: 赤峰's from the keys command line, 攀枝花's from the same function."""
    sem = asyncio.Semaphore(8)

    async def one(hospital: Hospital, key: str, i: int) -> OutpatientVisit:
        async with sem:
            at = datetime(2026, 4, 1 + i % 28, 8 + i % 9, (7 * i) % 60)
            return await _visit(client, hospital, key, at, i)

    a = await asyncio.gather(*(one(A, f"clear{i % 12}", i) for i in range(A_VISITS)))
    await asyncio.gather(*(one(B, f"clear{i % 12}", 200 + i) for i in range(B_VISITS)))
    await asyncio.gather(*(one(OTHER, f"clear_back{i}", 300 + i) for i in range(OTHER_VISITS)))
    for visit in a[:A_REVERSED]:
        r = await client.call(visit.reverse())
        assert r["infcode"] == 0, r["err_msg"]
    ids = [r[0] for r in await ledger.fetch(
        "SELECT setl_id FROM settlement WHERE fixmedins_code = ANY($1::text[]) AND setl_time >= $2 AND setl_time < $3",
        [A.fixmedins_code, B.fixmedins_code, OTHER.fixmedins_code], datetime(2026, 4, 1), datetime(2026, 5, 1))]
    assert len(ids) == A_VISITS + A_REVERSED + B_VISITS + OTHER_VISITS
    deadline = time.monotonic() + 60
    while await db.fetchval("SELECT count(*) FROM clearing_entry WHERE setl_id = ANY($1::text[])", ids) < len(ids):
        assert time.monotonic() < deadline, "clearing did not record the month's rows"
        await asyncio.sleep(0.3)
    await cli.close(services, MONTH, operator=OPERATOR)

    issued = _cmd(services, "services.refdata.keys", "issue", AGENCY.fixmedins_code, "--operator", OPERATOR)
    assert issued.returncode == 0, issued.stderr
    secret = next(line.split()[1] for line in issued.stdout.splitlines() if line.startswith("secret "))
    SIGNER.keys[AGENCY.fixmedins_code] = base64.b64decode(secret)
    await issue_keys(services, db, [OTHER_AGENCY.fixmedins_code])
    await _signed_in(client, AGENCY)
    await _signed_in(client, OTHER_AGENCY)
    return April(A_VISITS + A_REVERSED, B_VISITS, OTHER_VISITS)


async def pull(client: GatewayClient, sender: Hospital) -> tuple[int, list[dict[str, Any]]]:
    """Every row 3260 lists for the sender, page by page (100 rows a page)."""
    rows: list[dict[str, Any]] = []
    total = None
    while total is None or len(rows) < total:
        r = await client.call(sender.envelope("3260", {"data": {**Q, "startrow": len(rows) + 1}}))
        assert r["infcode"] == 0, r["err_msg"]
        total = r["output"]["totalrow"]
        page = r["output"]["data"]
        assert len(page) == min(100, total - len(rows)) and page[0]["seqno"] == len(rows) + 1
        rows += page
    return total, rows


def batch(sender: Hospital, total: int, rows: list[dict[str, Any]], disputed: tuple[int, ...] = (),
          **changes: Any) -> dict[str, Any]:
    return sender.envelope("3261", {"data": {**Q, "totalrow": total}, "detail": [
        {"setl_sn": r["setl_sn"], "medfee_sumamt": r["medfee_sumamt"], "optins_pay_sumamt": r["optins_pay_sumamt"],
         "cnfm_flag": "0" if i in disputed else "1", **changes} for i, r in enumerate(rows)]})


def result(r: dict[str, Any]) -> dict[str, Any]:
    assert r["infcode"] == 0, r["err_msg"]
    return dict(r["output"]["result"])


def counts(r: dict[str, Any]) -> tuple[Any, ...]:
    res = result(r)
    return (res["batch_rows"], res["cnfm_cnt"], res["dspt_cnt"], res["dup_cnt"], res["month_cnfm_cnt"],
            res["month_dspt_cnt"], res["month_stas"], res["cnfm_stas"])


async def test_a_month_of_more_than_100_rows_is_confirmed_in_batches(april: April, client: GatewayClient,
                                                                      db: asyncpg.Pool, ledger: Ledger) -> None:
    total, rows = await pull(client, A)
    ours = {r["setl_id"]: r for r in await ledger.fetch(
        "SELECT setl_id, medfee_sumamt, fund_pay_sumamt FROM settlement WHERE fixmedins_code = $1"
        " AND setl_time >= $2 AND setl_time < $3", A.fixmedins_code, datetime(2026, 4, 1), datetime(2026, 5, 1))}
    assert total == len(rows) == april.a_rows == len(ours) == 108
    assert {r["setl_sn"] for r in rows} == set(ours)
    assert all(D(str(r["optins_pay_sumamt"])) * 100 == ours[r["setl_sn"]]["fund_pay_sumamt"] for r in rows)

    too_big = await client.call(batch(A, total, rows[:101]))
    empty = await client.call(A.envelope("3261", {"data": {**Q, "totalrow": total}, "detail": []}))
    assert too_big["err_msg"].startswith("CONFIRMATION_BATCH_SIZE") and "101 rows" in too_big["err_msg"]
    assert empty["err_msg"].startswith("CONFIRMATION_BATCH_SIZE")

    first_env = batch(A, total, rows[:50], disputed=(0,))
    first = await client.call(first_env)
    assert counts(first) == (50, 49, 1, 0, 49, 1, "partial", "confirmed")
    assert result(first)["otransid"] == first_env["msgid"] and result(first)["totalrow"] == 108
    assert await client.call(first_env) == first  # the same msgid: the same answer, nothing counted again

    second_env = batch(A, total, rows[40:100])  # 10 rows the first batch holds
    second = await client.call(second_env)
    assert counts(second) == (60, 50, 0, 10, 99, 1, "partial", "confirmed")
    assert second["warn_msg"].startswith("10 rows already confirmed")

    foreign = await client.call(batch(A, total, [*rows[100:102], (await pull(client, B))[1][0]]))
    assert foreign["err_msg"].startswith("CONFIRMATION_ROW_UNKNOWN: detail[2]")
    wrong = await client.call(batch(A, total, rows[100:103], optins_pay_sumamt=D("0.01")))
    assert wrong["err_msg"].startswith("CONFIRMATION_MISMATCH: detail[0], detail[1], detail[2]")
    stale = await client.call(batch(A, total - 1, rows[100:103]))
    assert stale["err_msg"].startswith("CONFIRMATION_MISMATCH: totalrow 107")

    third = await client.call(batch(A, total, rows[100:]))  # nothing of the refused batches was recorded
    assert counts(third) == (8, 8, 0, 0, 107, 1, "complete", "confirmed")
    assert await db.fetchval("SELECT count(*) FROM clearing_confirmed_row WHERE fixmedins_code = $1",
                             A.fixmedins_code) == 108

    back_env = A.envelope("3262", {"data": {**Q, "otransid": second_env["msgid"]}})
    back = await client.call(back_env)
    assert counts(back) == (60, 50, 0, 10, 57, 1, "partial", "rolled_back")
    again = await client.call(A.envelope("3262", {"data": {**Q, "otransid": second_env["msgid"]}}))
    assert counts(again) == counts(back) and again["warn_msg"] == "already rolled back"
    not_b = await client.call(B.envelope("3262", {"data": {**Q, "otransid": first_env["msgid"]}}))
    assert not_b["err_msg"].startswith("CONFIRMATION_UNKNOWN")
    assert await db.fetchval("SELECT count(*) FROM clearing_confirmed_row WHERE fixmedins_code = $1",
                             A.fixmedins_code) == 58

    fourth = await client.call(batch(A, total, rows[50:100]))  # rolled back rows are confirmed again
    assert counts(fourth) == (50, 50, 0, 0, 107, 1, "complete", "confirmed")


async def test_the_agency_clears_every_institution_of_its_region_and_nothing_else(
        april: April, client: GatewayClient, db: asyncpg.Pool, ledger: Ledger) -> None:
    total, rows = await pull(client, AGENCY)
    in_region = await ledger.total(
        "SELECT count(*) FROM settlement WHERE scope <> 'local' AND treating_pool = '150400' AND setl_time >= $1"
        " AND setl_time < $2", datetime(2026, 4, 1), datetime(2026, 5, 1))
    entries = await db.fetchval("SELECT count(*) FROM clearing_entry WHERE clr_month = $1 AND treating_pool = '150400'",
                                MONTH)
    assert total == len(rows) == in_region == entries >= april.a_rows + april.b_rows
    codes = {r["medins_no"] for r in rows}
    assert {A.fixmedins_code, B.fixmedins_code} <= codes and OTHER.fixmedins_code not in codes
    assert {r["mdtrtarea"][:4] for r in rows} == {"1504"}

    b_rows = [r for r in rows if r["medins_no"] == B.fixmedins_code]
    a_row = next(r for r in rows if r["medins_no"] == A.fixmedins_code)  # confirmed by A already
    assert len(b_rows) == april.b_rows
    done = await client.call(batch(AGENCY, total, [*b_rows, a_row], disputed=(1,)))
    res = result(done)
    assert (res["batch_rows"], res["cnfm_cnt"], res["dspt_cnt"], res["dup_cnt"]) == (7, 5, 1, 1)
    confirmed = await db.fetchrow(
        "SELECT count(*) FILTER (WHERE cnfm_flag = '1') AS c, count(*) FILTER (WHERE cnfm_flag = '0') AS d"
        " FROM clearing_confirmed_row WHERE clr_month = $1 AND treating_pool = '150400'", MONTH)
    assert (res["month_cnfm_cnt"], res["month_dspt_cnt"]) == (confirmed["c"], confirmed["d"])
    assert res["month_stas"] == ("complete" if confirmed["c"] + confirmed["d"] == total else "partial")

    # Hospital B sees its own rows only, already confirmed by its agency.
    b_total, b_pulled = await pull(client, B)
    assert b_total == april.b_rows and {r["setl_sn"] for r in b_pulled} == {r["setl_sn"] for r in b_rows}
    b_again = result(await client.call(batch(B, b_total, b_pulled)))
    assert (b_again["dup_cnt"], b_again["month_cnfm_cnt"], b_again["month_dspt_cnt"]) == (6, 5, 1)
    b_foreign = await client.call(batch(B, b_total, [a_row]))
    assert b_foreign["err_msg"].startswith("CONFIRMATION_ROW_UNKNOWN: detail[0]")

    # Another region's rows, its agency's view and its credentials.
    o_total, o_rows = await pull(client, OTHER_AGENCY)
    assert o_total == len(o_rows) and OTHER.fixmedins_code in {r["medins_no"] for r in o_rows}
    assert not {r["setl_sn"] for r in o_rows} & {r["setl_sn"] for r in rows}
    other_row = next(r for r in o_rows if r["medins_no"] == OTHER.fixmedins_code)
    refused = await client.call(batch(AGENCY, total, [other_row]))
    assert refused["err_msg"].startswith("CONFIRMATION_ROW_UNKNOWN: detail[0]")
    wrong_area = AGENCY.envelope("3260", {"data": Q})
    wrong_area["mdtrtarea_admvs"] = "510421"
    assert (await client.call(wrong_area))["err_msg"].startswith("MDTRTAREA_MISMATCH")
    not_theirs = await client.call(OTHER_AGENCY.envelope("3262", {"data": {**Q, "otransid": res["otransid"]}}))
    assert not_theirs["err_msg"].startswith("CONFIRMATION_UNKNOWN")

    # The agency rolls back a batch of one of its hospitals (B's, all duplicates: nothing changes) and its own.
    b_back = result(await client.call(AGENCY.envelope("3262", {"data": {**Q, "otransid": b_again["otransid"]}})))
    assert b_back["cnfm_stas"] == "rolled_back" and b_back["month_cnfm_cnt"] == res["month_cnfm_cnt"]
    own_back = result(await client.call(AGENCY.envelope("3262", {"data": {**Q, "otransid": res["otransid"]}})))
    assert (own_back["month_cnfm_cnt"], own_back["month_dspt_cnt"]) == (res["month_cnfm_cnt"] - 5,
                                                                        res["month_dspt_cnt"] - 1)

    # Anything but sign-in/out and 3260-3262 is refused to an agency (valid bodies: the refusal is the sender's).
    spec = PERSONS["clear0"].person
    totals = {"insutype": "390", "clr_type": "11", "setl_optins": "510400", "stmt_begndate": "2026-04-01",
              "stmt_enddate": "2026-04-30", "medfee_sumamt": 0, "fund_pay_sumamt": 0, "acct_pay": 0,
              "fixmedins_setl_cnt": 0}
    register = OutpatientVisit(AGENCY, spec.psn_no, spec.insuplc, spec.insutype, datetime(2026, 4, 2)).register()
    for infno, body, insuplc in (("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": spec.psn_no}}, ""),
                                 ("2201", register["input"], spec.insuplc), ("3201", {"data": totals}, ""),
                                 ("5301", {"data": {"psn_no": spec.psn_no}}, spec.insuplc)):
        r = await client.call(AGENCY.envelope(infno, body, insuplc=insuplc))
        assert r["err_msg"].startswith("INSTITUTION_NOT_ALLOWED"), (infno, r["err_msg"])


async def test_a_statement_is_reissued_as_a_new_version_after_an_adjustment(
        april: April, services: Settings, db: asyncpg.Pool) -> None:
    async with db.acquire() as conn:
        v1 = await store.statement(conn, MONTH)
    assert v1 is not None and v1["version"] == 1
    pair = next(ln for ln in v1["body"]["pool_lines"] if (ln["insured"], ln["treating"]) == ("510400", "150400"))

    args = ["services.clearing.cli", "adjust", "--month", MONTH, "--insured", "510400", "--treating", "150400",
            "--amount", "hifp_pay=-12.34", "--amount", "medfee_sumamt=-12.34", "--reason",
            "duplicate fee found in review", "--ref", "ADJ-2026-04-T1"]
    refused = _cmd(services, *args)
    assert refused.returncode == 2 and "an operator identity is required" in refused.stderr
    done = _cmd(services, *args, "--operator", OPERATOR)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["version"], out["previous_version"], out["duplicate"]) == (2, 1, False)
    assert out["drawdowns"] == {"510000": -12.34}  # 内蒙古's deposit is drawn 12.34 less

    async with db.acquire() as conn:
        v2 = await store.statement(conn, MONTH)
        kept = await store.statement(conn, MONTH, 1)
        versions = await store.statement_versions(conn, MONTH)
        shards = await ShardPools.connect(services, 1)
        try:
            problems = await store.verify(conn, shards, MONTH)
        finally:
            await shards.close()
    assert v2 is not None and kept is not None and v2["version"] == 2
    assert kept["digest"] == v1["digest"] and kept["body"] == v1["body"]
    assert [(r["version"], r["issued_by"], r["reason"]) for r in versions] == [
        (1, "", ""), (2, OPERATOR, "duplicate fee found in review")]
    assert problems == []
    assert v2["fund_pay_sumamt"] == v1["fund_pay_sumamt"] - 1234
    pair2 = next(ln for ln in v2["body"]["pool_lines"] if (ln["insured"], ln["treating"]) == ("510400", "150400"))
    assert pair2["net"] == {**pair["net"], "medfee_sumamt": pair["net"]["medfee_sumamt"] - 1234,
                            "hifp_pay": pair["net"]["hifp_pay"] - 1234,
                            "fund_pay_sumamt": pair["net"]["fund_pay_sumamt"] - 1234}
    assert pair2["net_cnt"] == pair["net_cnt"]  # money only: no person-times
    others = [ln for ln in v1["body"]["pool_lines"] if ln != pair]
    assert [ln for ln in v2["body"]["pool_lines"] if ln != pair2] == others
    assert v2["body"]["adjustments"] == [{
        "ref": "ADJ-2026-04-T1", "insured_pool": "510400", "treating_pool": "150400",
        "reason": "duplicate fee found in review", "version": 2, "medfee_sumamt": -1234, "hifp_pay": -1234,
        "hifmi_pay": 0, "hifob_pay": 0, "maf_pay": 0, "fund_pay_sumamt": -1234}]
    assert await db.fetchval("SELECT amount_fen FROM clearing_deposit_txn WHERE txn_id = $1",
                             f"clearing-{MONTH}-510000-v2") == 1234

    shown = _cmd(services, "services.clearing.cli", "statement", "--month", MONTH, "--region", "510400")
    shown_v1 = _cmd(services, "services.clearing.cli", "statement", "--month", MONTH, "--region", "510400",
                    "--version", "1")
    assert json.loads(shown.stdout)["version"] == 2 and json.loads(shown_v1.stdout)["version"] == 1
    payable = {json.loads(o.stdout)["version"]: json.loads(o.stdout)["payable_total"]["fund_pay_sumamt"]
               for o in (shown, shown_v1)}
    assert D(str(payable[1])) - D(str(payable[2])) == D("12.34")
    assert json.loads(shown_v1.stdout)["adjustments"] == []
    assert json.loads(shown.stdout)["adjustments"] == [{
        "ref": "ADJ-2026-04-T1", "insured_pool": "510400", "treating_pool": "150400", "version": 2,
        "reason": "duplicate fee found in review", "medfee_sumamt": -12.34, "hifp_pay": -12.34, "hifmi_pay": 0,
        "hifob_pay": 0, "maf_pay": 0, "fund_pay_sumamt": -12.34}]

    repeat = _cmd(services, *args, "--operator", OPERATOR)
    assert repeat.returncode == 0 and json.loads(repeat.stdout)["duplicate"] is True
    other = _cmd(services, *[a if a != "hifp_pay=-12.34" else "hifp_pay=-1.00" for a in args], "--operator", OPERATOR)
    assert other.returncode == 1 and "ADJ-2026-04-T1 was used for another adjustment" in other.stderr
    listed = _cmd(services, "services.clearing.cli", "statements", "--month", MONTH)
    assert [line.split()[1] for line in listed.stdout.splitlines()] == ["v1", "v2"]
    rows = await db.fetch("SELECT actor, before, after FROM audit_log WHERE action = 'statement.reissue'"
                          " AND target = $1 ORDER BY audit_id", MONTH)
    assert [r["actor"] for r in rows] == [OPERATOR, OPERATOR]
    first = json.loads(rows[0]["after"])
    assert (json.loads(rows[0]["before"])["stmt_version"], first["stmt_version"], first["digest"]) == (
        1, 2, v2["digest"])
    assert json.loads(rows[1]["after"])["duplicate"] is True

