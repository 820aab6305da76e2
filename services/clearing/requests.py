"""Answers to the 32xx transactions: typed body in, typed output out (or BrokerError), inside the
caller's transaction. The arithmetic is `logic`; this module only reads and writes rows.

Every answer is stored by msgid by the caller (`clearing_request`), so a resend returns the same
bytes; commands are idempotent beyond that: a second application for the same period returns the
live one, a second confirmation of a month the live confirmation, a second withdrawal or rollback
the current state.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg

from schemas.clearing import (
    CLEARING_PAGE_ROWS,
    CONFIRM_BATCH_ROWS_MAX,
    ApplResult,
    ClearingDetail,
    ConfirmResult,
    DetailResult,
    Input3201,
    Input3202,
    Input3203,
    Input3204,
    Input3260,
    Input3261,
    Input3262,
    Output3201,
    Output3202,
    Output3203,
    Output3260,
    Output3261,
    StmtDiff,
    StmtInfo,
    clearing_month,
    parse_date,
)
from schemas.envelope import RequestEnvelope
from schemas.errors import BrokerError
from schemas.money import to_fen, to_yuan
from schemas.transactions import AGENCY_INFNOS
from services.clearing import store
from services.clearing.logic import (
    APPL_FIELDS,
    FieldDiff,
    MedinsRow,
    RowScope,
    compare_fields,
    describe,
    month_stas,
    reconcile_rows,
    totals_of,
)
from services.common.shards import ShardPools
from services.refdata.agency import agency_pool
from services.refdata.regions import UnknownRegion, region_of

Output = Output3201 | Output3202 | Output3203 | Output3260 | Output3261


async def answer(conn: asyncpg.Connection, shards: ShardPools, env: RequestEnvelope, body: Any) -> tuple[Output, str]:
    """(output, warn_msg) for one 32xx request of hospital `env.fixmedins_code`."""
    if env.fixmedins_code[:1] == "A" and env.infno not in AGENCY_INFNOS:  # the router refuses them first
        raise BrokerError("INSTITUTION_NOT_ALLOWED", f"infno {env.infno} is not sent by an agency")
    match body:
        case Input3201():
            return await reconcile_totals(shards, env, body), ""
        case Input3202():
            return await reconcile_details(shards, env, body), ""
        case Input3203():
            return await apply_for_clearing(conn, shards, env, body)
        case Input3204():
            return await withdraw_application(conn, env, body)
        case Input3260():
            return await clearing_details(conn, env, body), ""
        case Input3261():
            return await confirm_details(conn, env, body)
        case Input3262():
            return await rollback_confirmation(conn, env, body)
    raise BrokerError("INFNO_UNSUPPORTED", f"infno {env.infno} is not answered by the clearing service")


def _diffs(diffs: list[FieldDiff]) -> list[StmtDiff]:
    def value(v: int, is_count: bool) -> Decimal:
        return Decimal(v) if is_count else to_yuan(v)

    return [StmtDiff(fld_name=d.fld_name, medins_val=value(d.medins, d.is_count),
                     ledger_val=value(d.ledger, d.is_count), diff_val=value(d.diff, d.is_count)) for d in diffs]


# 3201 -------------------------------------------------------------------------------------


async def reconcile_totals(shards: ShardPools, env: RequestEnvelope, body: Input3201) -> Output3201:
    d = body.data
    rows = await store.ledger_rows(
        shards, env.fixmedins_code, parse_date("stmt_begndate", d.stmt_begndate),
        parse_date("stmt_enddate", d.stmt_enddate), insutype=d.insutype, clr_type=d.clr_type,
        setl_optins=d.setl_optins,
    )
    ledger = totals_of(rows, include_reversals=d.refd_setl_flag == "1")
    diffs = compare_fields(
        {"fixmedins_setl_cnt": d.fixmedins_setl_cnt, "medfee_sumamt": to_fen(d.medfee_sumamt),
         "fund_pay_sumamt": to_fen(d.fund_pay_sumamt), "acct_pay": to_fen(d.acct_pay)},
        {"fixmedins_setl_cnt": ledger.cnt, "medfee_sumamt": ledger.medfee_sumamt,
         "fund_pay_sumamt": ledger.fund_pay_sumamt, "acct_pay": ledger.acct_pay},
        counts=("fixmedins_setl_cnt",),
    )
    info = StmtInfo(setl_optins=d.setl_optins, stmt_rslt="1" if diffs else "0", stmt_rslt_dscr=describe(diffs))
    return Output3201(stmtinfo=info, stmtdiff=_diffs(diffs))


# 3202 -------------------------------------------------------------------------------------


async def reconcile_details(shards: ShardPools, env: RequestEnvelope, body: Input3202) -> Output3202:
    d = body.data
    rows = await store.ledger_rows(
        shards, env.fixmedins_code, parse_date("stmt_begndate", d.stmt_begndate),
        parse_date("stmt_enddate", d.stmt_enddate), clr_type=d.clr_type or None, setl_optins=d.setl_optins,
    )
    with_reversals = d.refd_setl_flag == "1"
    rows = [r for r in rows if with_reversals or r.kind != "reverse"]
    ledger = totals_of(rows)
    totals = compare_fields(
        {"fixmedins_setl_cnt": d.fixmedins_setl_cnt, "medfee_sumamt": to_fen(d.medfee_sumamt),
         "fund_pay_sumamt": to_fen(d.fund_pay_sumamt), "cash_payamt": to_fen(d.cash_payamt)},
        {"fixmedins_setl_cnt": ledger.cnt, "medfee_sumamt": ledger.medfee_sumamt,
         "fund_pay_sumamt": ledger.fund_pay_sumamt, "cash_payamt": ledger.cash_payamt},
        counts=("fixmedins_setl_cnt",),
    )
    theirs = [MedinsRow(r.setl_id, to_fen(r.medfee_sumamt), to_fen(r.fund_pay_sumamt), to_fen(r.acct_pay),
                        r.refd_setl_flag) for r in body.detail if with_reversals or r.refd_setl_flag != "1"]
    matched, diffs = reconcile_rows(theirs, rows)
    detail = [
        DetailResult(
            setl_id=x.setl_id, memo=x.memo, diff_type=x.diff_type,
            refd_setl_flag=(x.ledger.refd_setl_flag if x.ledger else x.medins.refd_setl_flag if x.medins else "0"),
            medfee_sumamt=to_yuan(x.ledger.medfee_sumamt) if x.ledger else None,
            fund_pay_sumamt=to_yuan(x.ledger.fund_pay_sumamt) if x.ledger else None,
            acct_pay=to_yuan(x.ledger.acct_pay) if x.ledger else None,
            medins_medfee_sumamt=to_yuan(x.medins.medfee_sumamt) if x.medins else None,
            medins_fund_pay_sumamt=to_yuan(x.medins.fund_pay_sumamt) if x.medins else None,
            medins_acct_pay=to_yuan(x.medins.acct_pay) if x.medins else None,
        )
        for x in diffs
    ]
    unbalanced = bool(totals or diffs)
    text = describe(totals)
    if diffs:
        text = ("not balanced: " if not totals else text + "; ") + f"{len(diffs)} rows differ"
    info = StmtInfo(setl_optins=d.setl_optins, stmt_rslt="1" if unbalanced else "0", stmt_rslt_dscr=text)
    return Output3202(stmtinfo=info, stmtdiff=_diffs(totals), matched_cnt=matched, detail=detail)


# 3203 / 3204 ----------------------------------------------------------------------------------


def _appl_id(msgid: str) -> str:
    return f"CA{msgid}"


async def apply_for_clearing(conn: asyncpg.Connection, shards: ShardPools, env: RequestEnvelope,
                             body: Input3203) -> tuple[Output3203, str]:
    d = body.data
    begin, end = parse_date("begndate", d.begndate), parse_date("enddate", d.enddate)
    ledger = await store.application_totals(shards, env.fixmedins_code, d.clr_type, begin, end)
    theirs = {"psntime": d.psntime, **{f: to_fen(getattr(d, f)) for f in APPL_FIELDS if f != "psntime"}}
    diffs = compare_fields(theirs, ledger.as_dict(), counts=("psntime",))
    if diffs:
        raise BrokerError("APPLICATION_MISMATCH", describe(diffs))
    live = await conn.fetchval(
        "SELECT clr_appy_evt_id FROM clearing_application WHERE fixmedins_code = $1 AND clr_type = $2"
        " AND begndate = $3 AND enddate = $4 AND state = 'applied'",
        env.fixmedins_code, d.clr_type, begin, end,
    )
    if live is not None:
        return Output3203(result=ApplResult(clr_appy_evt_id=live, clr_stas="applied")), \
            "an application for this period is already live"
    appl_id = _appl_id(env.msgid)
    await conn.execute(
        "INSERT INTO clearing_application (clr_appy_evt_id, msgid, fixmedins_code, clr_type, setlym, begndate,"
        " enddate, psntime, medfee_sumamt, med_sumfee, fund_appy_sum, cash_payamt, acct_pay, state)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'applied')",
        appl_id, env.msgid, env.fixmedins_code, d.clr_type, d.setlym, begin, end,
        *(theirs[f] for f in APPL_FIELDS),
    )
    return Output3203(result=ApplResult(clr_appy_evt_id=appl_id, clr_stas="applied")), ""


async def withdraw_application(conn: asyncpg.Connection, env: RequestEnvelope, body: Input3204
                               ) -> tuple[Output3203, str]:
    appl_id = body.data.clr_appy_evt_id
    r = await conn.fetchrow(
        "SELECT state, setlym FROM clearing_application WHERE clr_appy_evt_id = $1 AND fixmedins_code = $2"
        " FOR UPDATE", appl_id, env.fixmedins_code)
    if r is None:
        raise BrokerError("APPLICATION_UNKNOWN", "no clearing application with that clr_appy_evt_id")
    if r["state"] == "withdrawn":
        return Output3203(result=ApplResult(clr_appy_evt_id=appl_id, clr_stas="withdrawn")), "already withdrawn"
    month = f"{r['setlym'][:4]}-{r['setlym'][4:]}"
    if await store.month_state(conn, month) == "closed":
        raise BrokerError("MONTH_CLOSED", f"the clearing month {month} is closed")
    await conn.execute(
        "UPDATE clearing_application SET state = 'withdrawn', withdrawn_at = now() WHERE clr_appy_evt_id = $1",
        appl_id)
    return Output3203(result=ApplResult(clr_appy_evt_id=appl_id, clr_stas="withdrawn")), ""


# 3260 / 3261 / 3262 -----------------------------------------------------------------------------


async def _closed_month(conn: asyncpg.Connection, year: str, month: str) -> str:
    m = clearing_month(year, month)
    if await store.month_state(conn, m) != "closed":
        raise BrokerError("MONTH_NOT_CLOSED", f"the clearing month {m} is not closed yet")
    return m


def _detail(seqno: int, r: asyncpg.Record) -> ClearingDetail:
    return ClearingDetail(
        seqno=seqno, mdtrtarea=r["treating_admdvs"], medins_no=r["fixmedins_code"], mdtrt_id=r["mdtrt_id"],
        mdtrt_setl_time=r["setl_time"].strftime("%Y-%m-%d %H:%M:%S"), setl_sn=r["setl_id"], fulamt_advpay_flag="0",
        medfee_sumamt=to_yuan(r["medfee_sumamt"]), optins_pay_sumamt=to_yuan(r["fund_pay_sumamt"]),
        insuplc_admdvs=r["insured_admdvs"], refd_setl_flag="1" if r["kind"] == "reverse" else "0",
        setl_month=r["setl_month"], hifp_pay=to_yuan(r["hifp_pay"]), hifmi_pay=to_yuan(r["hifmi_pay"]),
        hifob_pay=to_yuan(r["hifob_pay"]), maf_pay=to_yuan(r["maf_pay"]),
    )


def _scope(env: RequestEnvelope) -> RowScope:
    """A hospital sees its own rows; the treating region's agency those of its pooling region."""
    try:
        pool = agency_pool(env.fixmedins_code)
    except UnknownRegion:
        raise BrokerError("INSTITUTION_NOT_ALLOWED", "the agency code names no known pooling region") from None
    return RowScope(treating_pool=pool) if pool else RowScope(fixmedins_code=env.fixmedins_code)


def _sender_pool(env: RequestEnvelope, scope: RowScope) -> str:
    """The sender's pooling region: the agency's, or the hospital's (the router checked that mdtrtarea_admvs
    is in it)."""
    return scope.treating_pool or region_of(env.mdtrtarea_admvs).pool_admdvs


async def clearing_details(conn: asyncpg.Connection, env: RequestEnvelope, body: Input3260) -> Output3260:
    d = body.data
    month = await _closed_month(conn, d.trt_year, d.trt_month)
    total, recs = await store.month_details(conn, month, _scope(env), d.startrow - 1, CLEARING_PAGE_ROWS)
    return Output3260(totalrow=total, startrow=d.startrow,
                      data=[_detail(d.startrow + i, r) for i, r in enumerate(recs)])


async def _confirm_result(conn: asyncpg.Connection, r: asyncpg.Record, scope: RowScope) -> Output3261:
    """The batch `r` and the month's confirmation state (the sender's rows) as it is now."""
    total, _ = await store.month_details(conn, r["clr_month"], scope, 0, 0)
    cnfm, dspt = await store.month_confirmed(conn, r["clr_month"], scope)
    return Output3261(result=ConfirmResult(
        otransid=r["otransid"], totalrow=total, cnfm_cnt=r["cnfm_cnt"], dspt_cnt=r["dspt_cnt"], cnfm_stas=r["state"],
        batch_rows=r["batch_rows"], dup_cnt=r["dup_cnt"], month_cnfm_cnt=cnfm, month_dspt_cnt=dspt,
        month_stas=month_stas(total, cnfm, dspt)))


def _indexes(found: list[int]) -> str:
    shown = ", ".join(f"detail[{i}]" for i in found[:5])
    return shown + (f" and {len(found) - 5} more" if len(found) > 5 else "")


async def confirm_details(conn: asyncpg.Connection, env: RequestEnvelope, body: Input3261) -> tuple[Output3261, str]:
    """One batch of at most 100 rows. Every row must be a clearing row of the month in the sender's scope and a
    confirmed one (cnfm_flag 1) must carry the row's amounts — else nothing of the batch is recorded. A row an
    earlier live batch holds stays as that batch recorded it (counted in dup_cnt, not again)."""
    d = body.data
    if not 1 <= len(body.detail) <= CONFIRM_BATCH_ROWS_MAX:
        raise BrokerError("CONFIRMATION_BATCH_SIZE", f"detail lists {len(body.detail)} rows; a batch lists 1 to "
                          f"{CONFIRM_BATCH_ROWS_MAX}")
    month = await _closed_month(conn, d.trt_year, d.trt_month)
    scope = _scope(env)
    total, _ = await store.month_details(conn, month, scope, 0, 0)
    if d.totalrow != total:
        raise BrokerError("CONFIRMATION_MISMATCH", f"totalrow {d.totalrow}, the month has {total} rows")
    ours = await store.month_rows(conn, month, scope, [row.setl_sn for row in body.detail])
    unknown = [i for i, row in enumerate(body.detail) if row.setl_sn not in ours]
    if unknown:
        raise BrokerError("CONFIRMATION_ROW_UNKNOWN", f"{_indexes(unknown)}: not a clearing row of {month} for this "
                          "sender")
    differ = [i for i, row in enumerate(body.detail) if row.cnfm_flag == "1" and (
        to_fen(row.medfee_sumamt), to_fen(row.optins_pay_sumamt)) != (ours[row.setl_sn]["medfee_sumamt"],
                                                                       ours[row.setl_sn]["fund_pay_sumamt"])]
    if differ:
        raise BrokerError("CONFIRMATION_MISMATCH", f"{_indexes(differ)}: amounts differ from the clearing row "
                          "(confirm the amounts 3260 lists, or dispute the row with cnfm_flag 0)")
    await conn.execute(
        "INSERT INTO clearing_confirmation (otransid, fixmedins_code, clr_month, totalrow, cnfm_cnt, dspt_cnt,"
        " batch_rows, sender_pool, state) VALUES ($1, $2, $3, $4, 0, 0, $5, $6, 'confirmed')",
        env.msgid, env.fixmedins_code, month, total, len(body.detail), _sender_pool(env, scope))
    recorded = await store.confirm_rows(conn, env.msgid, month, [
        (row.setl_sn, ours[row.setl_sn]["fixmedins_code"], ours[row.setl_sn]["treating_pool"], row.cnfm_flag,
         to_fen(row.medfee_sumamt), to_fen(row.optins_pay_sumamt)) for row in body.detail])
    disputed = [r["setl_id"] for r in recorded if r["cnfm_flag"] == "0"]
    dup = len(body.detail) - len(recorded)
    r = await conn.fetchrow(
        "UPDATE clearing_confirmation SET cnfm_cnt = $2, dspt_cnt = $3, dup_cnt = $4, disputed = $5"
        " WHERE otransid = $1 RETURNING *", env.msgid, len(recorded) - len(disputed), len(disputed), dup, disputed)
    warn = f"{dup} rows already confirmed or disputed by an earlier batch: not counted again" if dup else ""
    return await _confirm_result(conn, r, scope), warn


async def rollback_confirmation(conn: asyncpg.Connection, env: RequestEnvelope, body: Input3262
                                ) -> tuple[Output3261, str]:
    """Roll back one batch (its otransid): its rows are unconfirmed again. A hospital rolls back its own
    batches; an agency its own and those of its region's institutions."""
    d = body.data
    month = await _closed_month(conn, d.trt_year, d.trt_month)
    scope = _scope(env)
    r = await conn.fetchrow(
        "SELECT * FROM clearing_confirmation WHERE otransid = $1 AND clr_month = $2 FOR UPDATE", d.otransid, month)
    mine = r is not None and (r["fixmedins_code"] == env.fixmedins_code
                              or (scope.treating_pool is not None and r["sender_pool"] == scope.treating_pool))
    if r is None or not mine:
        raise BrokerError("CONFIRMATION_UNKNOWN", "no confirmation with that otransid for this sender and month")
    if r["state"] == "rolled_back":
        return await _confirm_result(conn, r, scope), "already rolled back"
    await conn.execute("DELETE FROM clearing_confirmed_row WHERE otransid = $1", d.otransid)
    r = await conn.fetchrow(
        "UPDATE clearing_confirmation SET state = 'rolled_back', rolled_back_at = now() WHERE otransid = $1"
        " RETURNING *", d.otransid)
    return await _confirm_result(conn, r, scope), ""
