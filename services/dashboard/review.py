"""The Judgements page's database side: list and count the hub's `judgement` rows, show one, and review it.

A review (confirm or dismiss, with a reason) is one transaction: the judgement row locked and checked
(`judgements.refusal`), its status and reviewer set, on confirm the deduction (拒付) recorded in the next open
clearing month of its pooling-region pair (`logic.deduction_month`, `store.deduction_of`; hub 0010), and the
audit row (`judgement.confirm` / `judgement.dismiss`: who, which jr_id, the reason, the month and amount).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from services.clearing import store
from services.clearing.logic import compact_month, deduction_month, month_end, month_start
from services.common import audit
from services.dashboard.judgements import DECISIONS, PAGE_SIZE, Filters, check_decision, check_reason, refusal
from services.refdata.regions import UnknownRegion

CLOSE_RACE_RETRIES: Final = 2  # a month closed between reading the months and recording: pick the next one
_LIST_COLS: Final = ("jr_id, rule_id, rule_version, severity, psn_no, insured_admdvs, insured_prov, treating_admdvs,"
                     " treating_prov, fixmedins_code, window_begin, window_end, suspect_amt, status, deduct_month,"
                     " to_char(detected_at AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS') AS detected_at")
_DETAIL_COLS: Final = (_LIST_COLS + ", mdtrt_ids, setl_ids, items, detail, reviewed_by, review_reason,"
                       " to_char(reviewed_at AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS') AS reviewed_at")


class ReviewRefused(Exception):
    """A review that cannot be done: `status` is the HTTP status (404 unknown, 409 not reviewable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Reviewed:
    jr_id: str
    status: str
    deduct_month: str | None  # YYYY-MM, confirmed non-local judgements only
    deducted_fen: int


def _where(f: Filters, *, counts: bool = False) -> tuple[str, list[Any]]:
    """SQL conditions of the filters (the counts ignore rule and status: they are what they break down)."""
    conds: list[str] = []
    args: list[Any] = []

    def add(sql: str, value: Any) -> None:
        args.append(value)
        conds.append(sql.replace("?", f"${len(args)}"))

    if f.rule and not counts:
        add("rule_id = ?", f.rule)
    if f.status and not counts:
        add("status = ?", f.status)
    if f.prov:
        add("insured_prov = ?", f.prov)
    if f.hospital:
        add("fixmedins_code = ?", f.hospital)
    if f.month:
        add("detected_at >= (?::timestamp AT TIME ZONE 'Asia/Shanghai')", month_start(f.month))
        add("detected_at < (?::timestamp AT TIME ZONE 'Asia/Shanghai')", month_end(f.month))
    return (" WHERE " + " AND ".join(conds)) if conds else "", args


async def list_judgements(pool: asyncpg.Pool, f: Filters) -> tuple[int, list[asyncpg.Record]]:
    """(how many match, the page asked for), newest first."""
    where, args = _where(f)
    async with pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM judgement{where}", *args)
        rows = await conn.fetch(
            f"SELECT {_LIST_COLS} FROM judgement{where} ORDER BY detected_at DESC, jr_id"
            f" OFFSET ${len(args) + 1} LIMIT ${len(args) + 2}", *args, (f.page - 1) * PAGE_SIZE, PAGE_SIZE)
    return int(total), list(rows)


async def hit_counts(pool: asyncpg.Pool, f: Filters) -> list[asyncpg.Record]:
    """The hits: judgements per (rule, status) under the province, hospital and month filters, and their
    suspect amounts in fen."""
    where, args = _where(f, counts=True)
    return list(await pool.fetch(
        f"SELECT rule_id, status, count(*) AS n, sum(suspect_amt)::bigint AS suspect_amt FROM judgement{where}"
        " GROUP BY 1, 2 ORDER BY 1, 2", *args))


async def judgement(pool: asyncpg.Pool, jr_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(f"SELECT {_DETAIL_COLS} FROM judgement WHERE jr_id = $1", jr_id)


async def review(pool: asyncpg.Pool, jr_id: str, decision: str, reason: str, reviewer: str) -> Reviewed:
    """Confirm or dismiss an open judgement (raises ValueError for a bad decision or reason, ReviewRefused
    when the judgement is unknown, withdrawn or reviewed already)."""
    check_decision(decision)
    reason = check_reason(reason)
    audit.check_operator(reviewer)
    for attempt in range(CLOSE_RACE_RETRIES + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await _review(conn, jr_id, decision, reason, reviewer)
        except asyncpg.CheckViolationError as e:
            # hub 0010's trigger: the month closed after we read the closed months; the next one is open
            if "is closed" not in str(e) or attempt == CLOSE_RACE_RETRIES:
                raise
    raise AssertionError("unreachable")


async def _review(conn: asyncpg.Connection, jr_id: str, decision: str, reason: str, reviewer: str) -> Reviewed:
    row = await conn.fetchrow(
        "SELECT rule_id, status, reviewed_by, insured_admdvs, treating_admdvs, suspect_amt, window_end"
        " FROM judgement WHERE jr_id = $1 FOR UPDATE", jr_id)
    if row is None:
        raise ReviewRefused(404, "no such judgement")
    why = refusal(row["status"], row["reviewed_by"])
    if why is not None:
        raise ReviewRefused(409, why)
    status = DECISIONS[decision]
    deduction = None
    if status == "confirmed":
        month = deduction_month(f"{row['window_end']:%Y-%m}", await store.closed_months(conn))
        try:
            deduction = store.deduction_of(jr_id, month, row["insured_admdvs"], row["treating_admdvs"],
                                           row["suspect_amt"])
        except UnknownRegion:
            raise ReviewRefused(409, "the judgement names a region the region table does not know;"
                                     " it cannot be deducted") from None
    await conn.execute(
        "UPDATE judgement SET status = $2, reviewed_by = $3, reviewed_at = now(), review_reason = $4,"
        " deduct_month = $5, updated_at = now() WHERE jr_id = $1",
        jr_id, status, reviewer, reason, compact_month(deduction.clr_month) if deduction else None)
    if deduction is not None:
        await store.record_deduction(conn, deduction)
    deducted = -deduction.amounts.fund_pay_sumamt if deduction else 0
    await audit.record(conn, reviewer, f"judgement.{decision}", jr_id, before={"status": row["status"]}, after={
        "status": status, "rule_id": row["rule_id"], "reason": reason,
        "deduct_month": deduction.clr_month if deduction else None, "deducted_fen": deducted})
    return Reviewed(jr_id, status, deduction.clr_month if deduction else None, deducted)
