"""Review of monitoring judgements on the dashboard, and their deduction (拒付) in clearing, on the real stack.

Judgements are inserted into the hub's `judgement` table as the stream's sink would (the input contract);
ledger rows are written into the shard the engine's way. The test owns September and October 2025 (no other
test clears them), its hospital H44030099931 and its persons (the run token). Reviews go through the
dashboard's HTTPS forms with a signed-in session: confirm, dismiss, refusals (viewer, CSRF, withdrawn,
reviewed, bad reason), audit rows; then the confirmed amount in October's positions and statement, to the
fen, and `clearing.cli verify` agreeing before and after the close.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import date, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest

from services.clearing import cli, store
from services.clearing.logic import Amounts, month_end, month_statement
from services.common.config import Settings
from tests.integration.conftest import RUN_TOKEN, Ledger
from tests.integration.dashboard_client import dashboard_session, make_user, sign_in

pytestmark = pytest.mark.integration

SEP, OCT = "2025-09", "2025-10"
HOSPITAL = "H44030099931"  # 深圳 440300 treats
INSURED, TREATING = "150400", "440300"  # 赤峰 (内蒙古) owes 深圳 (广东): cross-province
OPERATOR = "test.review"


def jr(name: str) -> str:
    return hashlib.sha256(f"{RUN_TOKEN}:{name}".encode()).hexdigest()[:32]


def psn(n: int) -> str:
    return f"R{RUN_TOKEN}{n:03d}"


_SETTLEMENT_COLS = (
    "setl_id, msgid, kind, orig_setl_id, mdtrt_id, psn_no, fixmedins_code, insutype, med_type, scope, filing_type,"
    " insured_admdvs, insured_pool, treating_admdvs, treating_pool, clr_optins, setl_time, acc_year, medfee_sumamt,"
    " fulamt_ownpay_amt, overlmt_selfpay, preselfpay_amt, inscp_scp_amt, act_pay_dedc, hifp_pay, pool_prop_selfpay,"
    " hifmi_pay, hifob_pay, maf_pay, fund_pay_sumamt, psn_part_amt, acct_pay, psn_cash_pay, balc, accum_delta")


async def settle(ledger: Ledger, setl_id: str, psn_no: str, when: datetime, hifp: int) -> None:
    """One inpatient settlement of 赤峰 insured at our 深圳 hospital, written as the engine writes it."""
    medfee = hifp + 5_000
    mdtrt_id = "M" + setl_id
    values = (setl_id, "X" + setl_id, "settle", None, mdtrt_id, psn_no, HOSPITAL, "390", "21", "cross_province",
              "LONG_TERM", INSURED, INSURED, TREATING, TREATING, INSURED, when, when.year, medfee, 0, 0, 0, medfee, 0,
              hifp, 0, 0, 0, 0, hifp, medfee - hifp, 0, medfee - hifp, 0, "{}")
    async with ledger.of(INSURED).acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO visit (mdtrt_id, psn_no, fixmedins_code, med_type, insutype, scope, insured_admdvs,"
            " treating_admdvs, ipt_otp_no, begntime, state, created_msgid) VALUES ($1, $2, $3, '21', '390',"
            " 'cross_province', $4, $5, $1, $6, 'settled', $1)", mdtrt_id, psn_no, HOSPITAL, INSURED, TREATING, when)
        await conn.execute(f"INSERT INTO settlement ({_SETTLEMENT_COLS}) VALUES"
                           f" ({', '.join(f'${i}' for i in range(1, 36))})", *values)
        await conn.execute("SELECT ledger_daily_add($1::text[])", [setl_id])


async def add_judgement(db: asyncpg.Pool, name: str, *, setl_ids: list[str], psn_no: str, window: tuple[date, date],
                        suspect_amt: int, rule: str = "OVERLAP_INPATIENT", status: str = "open") -> str:
    """A judgement row as the clearing service's sink upserts it (detected in September 2025)."""
    jr_id = jr(name)
    await db.execute(
        "INSERT INTO judgement (jr_id, rule_id, rule_version, severity, psn_no, insured_admdvs, insured_prov,"
        " treating_admdvs, treating_prov, fixmedins_code, mdtrt_ids, setl_ids, items, window_begin, window_end,"
        " suspect_amt, detail, status, detected_at) VALUES ($1, $2, 1, 'high', $3, $4, '150000', $5, '440000', $6,"
        " $7, $8, '{}', $9, $10, $11, $12, $13, '2025-09-28 10:00:00+08')",
        jr_id, rule, psn_no, INSURED, TREATING, HOSPITAL, ["M" + s for s in setl_ids], setl_ids, window[0],
        window[1], suspect_amt, f"stays overlap {window[0]}..{window[1]} at {HOSPITAL}", status)
    return jr_id


async def post_review(s: Settings, session: aiohttp.ClientSession, jr_id: str, csrf: str | None, decision: str,
                      reason: str) -> tuple[int, str]:
    data = {"decision": decision, "reason": reason, **({"csrf": csrf} if csrf is not None else {})}
    async with session.post(f"{s.dashboard_url}judgements/{jr_id}/review", data=data, allow_redirects=False) as resp:
        return resp.status, await resp.text()


async def withdraw(db: asyncpg.Pool, jr_id: str) -> None:
    """What the sink does when the stream withdraws a confirmed judgement whose month is open (design: status
    withdrawn, deduct_month NULL; hub 0009's check wants no reviewer on a row that is not reviewed)."""
    await db.execute("UPDATE judgement SET status = 'withdrawn', deduct_month = NULL, reviewed_by = NULL,"
                     " updated_at = now() WHERE jr_id = $1", jr_id)


async def row(db: asyncpg.Pool, jr_id: str) -> asyncpg.Record:
    return await db.fetchrow("SELECT status, reviewed_by, review_reason, deduct_month FROM judgement WHERE jr_id = $1",
                             jr_id)


@pytest.fixture(scope="module")
async def reviewers(services: Settings, db: asyncpg.Pool) -> AsyncIterator[dict[str, Any]]:
    """An operator's and a viewer's signed-in sessions, with their CSRF tokens."""
    op_name, op_pw = await make_user(db, "operator")
    vw_name, vw_pw = await make_user(db, "viewer")
    async with dashboard_session(services) as op, dashboard_session(services) as vw:
        yield {"op": op, "op_csrf": await sign_in(services, op, op_name, op_pw), "op_name": op_name,
               "vw": vw, "vw_csrf": await sign_in(services, vw, vw_name, vw_pw)}


async def test_review_confirm_dismiss_refusals_and_audit(services: Settings, db: asyncpg.Pool,
                                                         reviewers: dict[str, Any]) -> None:
    s, op, vw = services, reviewers["op"], reviewers["vw"]
    window = (date(2025, 9, 3), date(2025, 9, 12))
    confirm = await add_judgement(db, "confirm", setl_ids=[f"SREV{RUN_TOKEN}90"], psn_no=psn(1), window=window,
                                  suspect_amt=4_321)
    dismiss = await add_judgement(db, "dismiss", setl_ids=[f"SREV{RUN_TOKEN}91"], psn_no=psn(2), window=window,
                                  suspect_amt=999, rule="FREQUENT_VISITS")
    withdrawn = await add_judgement(db, "withdrawn", setl_ids=[f"SREV{RUN_TOKEN}92"], psn_no=psn(3), window=window,
                                    suspect_amt=500, status="withdrawn")

    # the list, filtered to our hospital: three rows, the hits by rule and status, psn_no masked
    async with op.get(f"{s.dashboard_url}api/judgements?hospital={HOSPITAL}&month={SEP}") as resp:
        assert resp.status == 200
        listed = await resp.json()
    ours = {i["jr_id"]: i for i in listed["items"] if i["jr_id"] in (confirm, dismiss, withdrawn)}
    assert set(ours) == {confirm, dismiss, withdrawn}
    assert ours[confirm]["psn_no"] == "*" * (len(psn(1)) - 4) + psn(1)[-4:]
    counts = {(c["rule_id"], c["status"]): (c["n"], c["suspect_amt"]) for c in listed["counts"]}
    assert counts[("FREQUENT_VISITS", "open")] == (1, 999)
    assert counts[("OVERLAP_INPATIENT", "withdrawn")] == (1, 500)
    async with op.get(f"{s.dashboard_url}judgements?hospital={HOSPITAL}&status=open&rule=FREQUENT_VISITS") as resp:
        page = await resp.text()
    assert resp.status == 200 and f'data-jr-id="{dismiss}"' in page and f'data-jr-id="{confirm}"' not in page
    assert psn(2) not in page and psn(2)[-4:] in page
    async with op.get(f"{s.dashboard_url}judgements?month=2025-13") as resp:
        assert resp.status == 400 and "month" in await resp.text()
    async with op.get(f"{s.dashboard_url}judgements/{confirm}") as resp:
        detail = await resp.text()
    assert resp.status == 200 and 'data-test="review"' in detail and psn(1) not in detail
    assert f"SREV{RUN_TOKEN}90" in detail and "43.21" in detail

    # a viewer reads but may not review, even with its own valid CSRF token
    async with vw.get(f"{s.dashboard_url}judgements/{confirm}") as resp:
        assert resp.status == 200 and 'data-test="review"' not in await resp.text()
    status, text = await post_review(s, vw, confirm, reviewers["vw_csrf"], "confirm", "looks wrong")
    assert status == 403 and "only operators" in text
    # no CSRF token, or another session's: refused before anything happens
    assert (await post_review(s, op, confirm, None, "confirm", "x"))[0] == 403
    assert (await post_review(s, op, confirm, reviewers["vw_csrf"], "confirm", "x"))[0] == 403
    # a reason is 1-500 characters
    assert (await post_review(s, op, confirm, reviewers["op_csrf"], "confirm", "   "))[0] == 400
    assert (await post_review(s, op, confirm, reviewers["op_csrf"], "confirm", "x" * 501))[0] == 400
    assert (await row(db, confirm))["status"] == "open"
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE target = $1", confirm) == 0

    # confirm: deducted in the first open month after September (October), audited
    status, _ = await post_review(s, op, confirm, reviewers["op_csrf"], "confirm", "两家医院重叠住院，已核实")
    assert status == 303
    assert tuple(await row(db, confirm)) == ("confirmed", reviewers["op_name"], "两家医院重叠住院，已核实", "202510")
    ded = await db.fetchrow("SELECT clr_month, insured_pool, treating_pool, hifp_pay, fund_pay_sumamt, medfee_sumamt"
                            " FROM clearing_deduction WHERE jr_id = $1", confirm)
    assert tuple(ded) == (OCT, INSURED, TREATING, -4_321, -4_321, 0)
    # dismiss: no deduction
    status, _ = await post_review(s, op, dismiss, reviewers["op_csrf"], "dismiss", "visits were a dialysis course")
    assert status == 303
    assert tuple(await row(db, dismiss)) == ("dismissed", reviewers["op_name"], "visits were a dialysis course", None)
    assert await db.fetchval("SELECT count(*) FROM clearing_deduction WHERE jr_id = $1", dismiss) == 0

    audits = {r["target"]: r for r in await db.fetch(
        "SELECT actor, action, target, before, after FROM audit_log WHERE target = ANY($1::text[]) ORDER BY audit_id",
        [confirm, dismiss, withdrawn])}
    assert set(audits) == {confirm, dismiss}
    a = audits[confirm]
    assert (a["actor"], a["action"], json.loads(a["before"])) == (reviewers["op_name"], "judgement.confirm",
                                                                  {"status": "open"})
    assert json.loads(a["after"]) == {"status": "confirmed", "rule_id": "OVERLAP_INPATIENT",
                                      "reason": "两家医院重叠住院，已核实", "deduct_month": OCT, "deducted_fen": 4_321}
    assert (audits[dismiss]["action"], json.loads(audits[dismiss]["after"])["deduct_month"]) == (
        "judgement.dismiss", None)

    # a review is final; a withdrawn judgement is not reviewed; an unknown id is not found
    status, text = await post_review(s, op, confirm, reviewers["op_csrf"], "dismiss", "second thoughts")
    assert status == 409 and "already reviewed (confirmed by" in text
    status, text = await post_review(s, op, withdrawn, reviewers["op_csrf"], "confirm", "still suspicious")
    assert status == 409 and "was withdrawn" in text
    assert (await post_review(s, op, jr("nobody"), reviewers["op_csrf"], "confirm", "x"))[0] == 404
    assert (await row(db, confirm))["status"] == "confirmed" and (await row(db, withdrawn))["status"] == "withdrawn"
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE target = ANY($1::text[])",
                             [confirm, dismiss, withdrawn]) == 2

    # the stream withdraws the confirmed judgement while October is open: its deduction goes with it (hub 0010)
    await withdraw(db, confirm)
    assert await db.fetchval("SELECT count(*) FROM clearing_deduction WHERE jr_id = $1", confirm) == 0


async def _verify(month: str) -> int:
    return await asyncio.to_thread(cli.main, ["verify", "--month", month])


async def test_a_confirmed_judgement_is_deducted_in_the_next_month_and_verify_agrees(
        services: Settings, db: asyncpg.Pool, ledger: Ledger, reviewers: dict[str, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    s, op = services, reviewers["op"]
    sep_ids = [f"SREV{RUN_TOKEN}{n}" for n in (1, 2)]
    await settle(ledger, sep_ids[0], psn(10), datetime(2025, 9, 3, 10), 150_000)
    await settle(ledger, sep_ids[1], psn(10), datetime(2025, 9, 12, 16), 80_000)
    await settle(ledger, f"SREV{RUN_TOKEN}3", psn(11), datetime(2025, 10, 6, 9), 60_000)
    overlap = await add_judgement(db, "overlap", setl_ids=sep_ids, psn_no=psn(10),
                                  window=(date(2025, 9, 1), date(2025, 9, 12)), suspect_amt=80_000)
    late = await add_judgement(db, "late", setl_ids=[sep_ids[1]], psn_no=psn(10),
                               window=(date(2025, 9, 10), date(2025, 9, 12)), suspect_amt=12_345)

    # September closes with the two settlements (the close sweeps them in); no deduction there
    closed = await cli.close(s, SEP, operator=OPERATOR)
    assert not closed.already_closed and closed.drawdowns == {"150000": 230_000}
    assert await _verify(SEP) == 0

    for jr_id, reason in ((overlap, "重叠住院，第二次住院费用拒付"), (late, "同一住院重复计费")):
        status, _ = await post_review(s, op, jr_id, reviewers["op_csrf"], "confirm", reason)
        assert status == 303 and (await row(db, jr_id))["deduct_month"] == "202510"
    # the stream withdraws one while October is open: only the other is deducted
    await withdraw(db, late)

    async with db.acquire() as conn:
        await store.sweep(conn, ledger.shards, month_end(OCT))  # October's settlement, as the stream would
        stmt = await cli.statement_for(conn, OCT, INSURED)
    assert stmt.status == "provisional"
    (line,) = [ln for ln in stmt.payable if ln.treating == TREATING]
    assert line.settled == Amounts(65_000, 60_000, 0, 0, 0, 60_000)
    assert (line.deduct_cnt, line.deducted) == (1, Amounts(0, -80_000, 0, 0, 0, -80_000))
    assert line.net == Amounts(65_000, -20_000, 0, 0, 0, -20_000) and line.net_cnt == 1
    assert await _verify(OCT) == 0  # streaming = batch, deductions recomputed from the judgements
    # ...and verify sees a deduction recorded one fen off what the judgement says
    tamper = "UPDATE clearing_deduction SET hifp_pay = hifp_pay + $2, fund_pay_sumamt = fund_pay_sumamt + $2" \
             " WHERE jr_id = $1"
    await db.execute(tamper, overlap, -1)
    assert await _verify(OCT) == 1
    await db.execute(tamper, overlap, 1)

    # October closes with the deduction in its frozen statement; the draw-down is the net, to the fen
    closed = await cli.close(s, OCT, operator=OPERATOR)
    assert closed.drawdowns == {"150000": -20_000} and closed.entry_cnt == 1
    assert await _verify(OCT) == 0
    async with db.acquire() as conn:
        frozen = await cli.statement_for(conn, OCT, INSURED)
        treating = await cli.statement_for(conn, OCT, TREATING)
    assert frozen.status == "closed"
    (line,) = [ln for ln in frozen.payable if ln.treating == TREATING]
    assert (line.deduct_cnt, line.deducted.fund_pay_sumamt, line.net.fund_pay_sumamt) == (1, -80_000, -20_000)
    (owed,) = [ln for ln in treating.receivable if ln.insured == INSURED]
    assert owed.net.fund_pay_sumamt == -20_000
    # a closed month's deduction stays: the stream's withdrawal is refused there (hub 0010's trigger)
    with pytest.raises(asyncpg.CheckViolationError, match="is closed"):
        await withdraw(db, overlap)
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["positions", "--month", OCT]) == 0
    (printed,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"{INSURED}->{TREATING}")]
    assert printed.endswith("fund_pay_sumamt -200.00 (deducted -800.00 for 1 judgement(s))")


async def test_a_review_racing_a_close_lands_in_the_next_open_month(
        services: Settings, db: asyncpg.Pool, reviewers: dict[str, Any]) -> None:
    """October is closed (the test before); a judgement of October goes to November — but November closes
    while the review waits for its lock: the review then lands in December, never in a closed month."""
    s, op = services, reviewers["op"]
    nov, dec = "2025-11", "2025-12"
    raced = await add_judgement(db, "raced", setl_ids=[f"SREV{RUN_TOKEN}3"], psn_no=psn(11),
                                window=(date(2025, 10, 1), date(2025, 10, 6)), suspect_amt=777)
    async with db.acquire() as closer:
        tx = closer.transaction()
        await tx.start()
        try:  # what a close of an empty month does, holding November's lock meanwhile
            await closer.execute("INSERT INTO clearing_month (clr_month) VALUES ($1) ON CONFLICT DO NOTHING", nov)
            await closer.execute("SELECT state FROM clearing_month WHERE clr_month = $1 FOR UPDATE", nov)
            review = asyncio.create_task(post_review(s, op, raced, reviewers["op_csrf"], "confirm", "raced a close"))
            for _ in range(200):  # until the review waits for the lock
                if await db.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted") or review.done():
                    break
                await asyncio.sleep(0.05)
            assert not review.done(), await review
            body = month_statement(nov, 1, "2025-12-01 09:00:00", [])
            await closer.execute(
                "INSERT INTO clearing_statement (clr_month, version, closed_at, entry_cnt, fund_pay_sumamt, body,"
                " digest) VALUES ($1, 1, now(), 0, 0, $2::jsonb, $3)", nov, store.canonical(body).decode(),
                hashlib.sha256(store.canonical(body)).hexdigest())
            await closer.execute("UPDATE clearing_month SET state = 'closed', closed_at = now(), stmt_version = 1"
                                 " WHERE clr_month = $1", nov)
        finally:
            await tx.commit()
    status, _ = await asyncio.wait_for(review, 30)
    assert status == 303 and (await row(db, raced))["deduct_month"] == "202512"
    assert await db.fetchval("SELECT clr_month FROM clearing_deduction WHERE jr_id = $1", raced) == dec
    assert await db.fetchval("SELECT count(*) FROM clearing_deduction WHERE clr_month = $1", nov) == 0
    assert await _verify(nov) == 0 and await _verify(dec) == 0
