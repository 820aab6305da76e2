"""5201–5206: the asking institution's own data, from the person's shard.

The engine answers a query inside the shard's batch transaction after the batch's writes (so a query sees
the settlements before it), with plain SELECTs: no row locks, nothing stored in processed_request (a read
may be answered again). Every statement is limited to this person at this institution: another
institution's visit or settlement is simply not found. SQL here, the shaping of rows into answers pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from schemas.codes import MED_TYPE_CHRONIC_OUTPATIENT, MED_TYPE_PHARMACY
from schemas.errors import BrokerError
from schemas.internal import RoutedRequest
from schemas.money import to_yuan
from schemas.person import cum_info
from schemas.query import (
    DrugRow,
    FeeRow,
    Input5201,
    Input5202,
    Input5203,
    Input5204,
    Input5205,
    Input5206,
    Output5201,
    Output5202,
    Output5203,
    Output5204,
    Output5205,
    Output5206,
    Paging,
    QueryBody,
    SettlementRecord,
    VisitRow,
)
from schemas.wire import WIRE_TIME_FORMAT, parse_wire_time
from services.settle.ledger import _SETL_COLS, _settlement
from services.settle.logic import settlement_output

# The accumulator row's counters (fen), as 1101 reads them.
_ACC_COUNTERS = ("basic_paid", "outpatient_dedc_used", "outpatient_paid", "critical_base", "critical_paid",
                 "supplementary_paid", "assistance_paid", "chronic_paid")
# The drug records of 5205: chronic outpatient visits (hospitals) and purchases (pharmacies), once settled.
_DRUG_MED_TYPES = [MED_TYPE_CHRONIC_OUTPATIENT, MED_TYPE_PHARMACY]


def is_query(msg: RoutedRequest) -> bool:
    return isinstance(msg.body, QueryBody)  # type: ignore[arg-type]


async def answer(conn: asyncpg.Connection, msg: RoutedRequest) -> Any:
    """The query's `output`, or BrokerError."""
    body, psn_no, institution = msg.body, msg.person.psn_no, msg.fixmedins_code
    match body:
        case Input5201():
            return await _visits(conn, body, psn_no, institution)
        case Input5202():
            return await _diagnoses(conn, body, psn_no, institution)
        case Input5203():
            return await _settlements(conn, body, psn_no, institution)
        case Input5204():
            return await _fees(conn, body, psn_no, institution)
        case Input5205():
            return await _drugs(conn, body, psn_no, institution)
        case Input5206():
            year = body.data.year or parse_wire_time("inf_time", msg.inf_time).year
            return await _accumulators(conn, psn_no, institution, year)
    raise BrokerError("INFNO_UNSUPPORTED", f"infno {msg.infno} is not a query")


# --- SQL -----------------------------------------------------------------------------------------

_VISIT_ROW = ("mdtrt_id, psn_no, fixmedins_code, med_type, insutype, ipt_otp_no, begntime, endtime, dise_codg,"
              " chronic_disease, state")
_FEE_ROW = ("mdtrt_id, feedetl_sn, med_list_codg, medins_list_codg, fee_ocur_time, fee_fen, cnt, pric_fen,"
            " pric_uplmt_fen, chrgitm_lv, selfpay_prop, cancelled, setl_id")


async def _page(conn: asyncpg.Connection, where: str, order: str, columns: str, args: list[Any],
                paging: Paging) -> tuple[int, list[asyncpg.Record]]:
    """Rows matching `where` (placeholders $1..$n from args): their count, and one page in `order`. One
    statement (the count rides on each row); a second only for a page past the end."""
    n = len(args)
    rows = await conn.fetch(f"SELECT {columns}, count(*) OVER () AS total_rows FROM {where}"
                            f" ORDER BY {order} LIMIT ${n + 1} OFFSET ${n + 2}", *args, paging.page_size, paging.offset)
    if rows:
        return rows[0]["total_rows"], rows
    total = 0 if paging.offset == 0 else await conn.fetchval(f"SELECT count(*) FROM {where}", *args)
    return total, rows


async def _visits(conn: asyncpg.Connection, body: Input5201, psn_no: str, institution: str) -> Output5201:
    q = body.data
    where = ("visit WHERE psn_no = $1 AND fixmedins_code = $2"
             " AND ($3::timestamp IS NULL OR begntime >= $3) AND ($4::timestamp IS NULL OR begntime <= $4)"
             " AND ($5::text IS NULL OR med_type = $5) AND ($6::text IS NULL OR mdtrt_id = $6)")
    args = [psn_no, institution, _opt_time("begntime", q.begntime), _opt_time("endtime", q.endtime),
            q.med_type, q.mdtrt_id]
    total, rows = await _page(conn, where, "begntime, mdtrt_id", _VISIT_ROW, args, q)
    return Output5201(page_num=q.page_num, page_size=q.page_size, total=total,
                      mdtrtinfo=[visit_row(r) for r in rows])


async def _own_visit(conn: asyncpg.Connection, mdtrt_id: str, psn_no: str, institution: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT mdtrt_id, diseinfo FROM visit WHERE mdtrt_id = $1 AND psn_no = $2"
                              " AND fixmedins_code = $3", mdtrt_id, psn_no, institution)
    if row is None:
        raise BrokerError("VISIT_UNKNOWN", "no visit with that mdtrt_id for this person and institution")
    return row


async def _diagnoses(conn: asyncpg.Connection, body: Input5202, psn_no: str, institution: str) -> Output5202:
    visit = await _own_visit(conn, body.data.mdtrt_id, psn_no, institution)
    return Output5202(mdtrt_id=visit["mdtrt_id"], diseinfo=json.loads(visit["diseinfo"]))


async def _settlements(conn: asyncpg.Connection, body: Input5203, psn_no: str, institution: str) -> Output5203:
    q = body.data
    where = ("settlement s WHERE s.psn_no = $1 AND s.fixmedins_code = $2"
             " AND ($3::text IS NULL OR s.setl_id = $3 OR s.orig_setl_id = $3)"
             " AND ($4::text IS NULL OR s.mdtrt_id = $4)"
             " AND ($5::timestamp IS NULL OR s.setl_time BETWEEN $5 AND $6)")
    args = [psn_no, institution, q.setl_id, q.mdtrt_id, _opt_time("begntime", q.begntime),
            _opt_time("endtime", q.endtime)]
    columns = (", ".join(f"s.{c}" for c in _SETL_COLS)
               + ", EXISTS (SELECT 1 FROM settlement_key k WHERE k.orig_setl_id = s.setl_id) AS was_reversed")
    total, rows = await _page(conn, where, "s.setl_time, s.setl_id", columns, args, q)
    return Output5203(page_num=q.page_num, page_size=q.page_size, total=total,
                      setlinfo=[settlement_record(r) for r in rows])


async def _fees(conn: asyncpg.Connection, body: Input5204, psn_no: str, institution: str) -> Output5204:
    q = body.data
    await _own_visit(conn, q.mdtrt_id, psn_no, institution)
    if q.setl_id is not None and not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM settlement WHERE setl_id = $1 AND mdtrt_id = $2)", q.setl_id, q.mdtrt_id
    ):
        raise BrokerError("SETTLEMENT_UNKNOWN", "no settlement with that setl_id for this visit and institution")
    # With setl_id: the items that settlement settled (a mid-stay part settles only some of the stay's;
    # a reversed settlement has released its items, so it lists none).
    where, args = "fee_item WHERE mdtrt_id = $1", [q.mdtrt_id]
    if q.setl_id is not None:
        where, args = where + " AND setl_id = $2", [q.mdtrt_id, q.setl_id]
    total, rows = await _page(conn, where, "feedetl_sn", _FEE_ROW, args, q)
    return Output5204(page_num=q.page_num, page_size=q.page_size, total=total, feedetail=[fee_row(r) for r in rows])


async def _drugs(conn: asyncpg.Connection, body: Input5205, psn_no: str, institution: str) -> Output5205:
    q = body.data
    first, after_last = day_bounds(q.begndate, q.enddate)
    where = ("fee_item f JOIN visit v USING (mdtrt_id) WHERE v.psn_no = $1 AND v.fixmedins_code = $2"
             " AND v.med_type = ANY($3::text[]) AND v.state = 'settled' AND NOT f.cancelled"
             " AND f.fee_ocur_time >= $4 AND f.fee_ocur_time < $5")
    columns = ("f.mdtrt_id, v.med_type, v.chronic_disease, f.feedetl_sn, f.med_list_codg, f.medins_list_codg,"
               " f.fee_ocur_time, f.fee_fen, f.cnt, f.pric_fen, f.chrgitm_lv")
    total, rows = await _page(conn, where, "f.fee_ocur_time, f.mdtrt_id, f.feedetl_sn", columns,
                              [psn_no, institution, _DRUG_MED_TYPES, first, after_last], q)
    return Output5205(page_num=q.page_num, page_size=q.page_size, total=total, druginfo=[drug_row(r) for r in rows])


async def _accumulators(conn: asyncpg.Connection, psn_no: str, institution: str, year: int) -> Output5206:
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM visit WHERE psn_no = $1 AND fixmedins_code = $2)",
                               psn_no, institution):
        raise BrokerError("QUERY_NOT_ALLOWED", "the person has no visit at this institution")
    row = await conn.fetchrow(f"SELECT {', '.join(_ACC_COUNTERS)} FROM accumulator"
                              " WHERE psn_no = $1 AND acc_year = $2", psn_no, year)
    return Output5206(psn_no=psn_no, year=year, cuminfo=cum_info(year, accumulator_counters(row)))


# --- shaping (pure) -------------------------------------------------------------------------------


def _opt_time(field: str, value: str | None) -> datetime | None:
    return None if value is None else parse_wire_time(field, value)


def _wire(t: datetime | None) -> str | None:
    return None if t is None else t.strftime(WIRE_TIME_FORMAT)


def day_bounds(first: date, last: date) -> tuple[datetime, datetime]:
    """[first 00:00, the day after last 00:00): whole days, both ends included."""
    return datetime.combine(first, datetime.min.time()), datetime.combine(last + timedelta(days=1),
                                                                          datetime.min.time())


def visit_row(r: Mapping[str, Any]) -> VisitRow:
    return VisitRow(mdtrt_id=r["mdtrt_id"], psn_no=r["psn_no"], fixmedins_code=r["fixmedins_code"],
                    med_type=r["med_type"], insutype=r["insutype"], ipt_otp_no=r["ipt_otp_no"],
                    begntime=r["begntime"].strftime(WIRE_TIME_FORMAT), endtime=_wire(r["endtime"]),
                    dise_codg=r["dise_codg"], chronic_disease=r["chronic_disease"], state=r["state"])


def settlement_record(r: Mapping[str, Any]) -> SettlementRecord:
    """The answer the ledger row was settled (or reversed) with, rebuilt from the row alone."""
    row = _settlement({c: r[c] for c in _SETL_COLS})  # type: ignore[arg-type]
    output = settlement_output(row)
    return SettlementRecord(setlinfo=output.setlinfo, setldetail=output.setldetail,
                            refd_setl_flag="1" if row.kind == "reverse" else "0", orig_setl_id=row.orig_setl_id,
                            reversed_flag="1" if r["was_reversed"] else "0")


def fee_row(r: Mapping[str, Any]) -> FeeRow:
    uplmt = r["pric_uplmt_fen"]
    return FeeRow(feedetl_sn=r["feedetl_sn"], mdtrt_id=r["mdtrt_id"], med_list_codg=r["med_list_codg"],
                  medins_list_codg=r["medins_list_codg"], fee_ocur_time=r["fee_ocur_time"].strftime(WIRE_TIME_FORMAT),
                  det_item_fee_sumamt=to_yuan(r["fee_fen"]), cnt=r["cnt"], pric=to_yuan(r["pric_fen"]),
                  pric_uplmt_amt=None if uplmt is None else to_yuan(uplmt), chrgitm_lv=r["chrgitm_lv"],
                  selfpay_prop=r["selfpay_prop"], vali_flag="0" if r["cancelled"] else "1", setl_id=r["setl_id"])


def drug_row(r: Mapping[str, Any]) -> DrugRow:
    return DrugRow(mdtrt_id=r["mdtrt_id"], med_type=r["med_type"], chronic_disease=r["chronic_disease"],
                   feedetl_sn=r["feedetl_sn"], med_list_codg=r["med_list_codg"],
                   medins_list_codg=r["medins_list_codg"], fee_ocur_time=r["fee_ocur_time"].strftime(WIRE_TIME_FORMAT),
                   det_item_fee_sumamt=to_yuan(r["fee_fen"]), cnt=r["cnt"], pric=to_yuan(r["pric_fen"]),
                   chrgitm_lv=r["chrgitm_lv"])


def accumulator_counters(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """An accumulator row as 1101's ledger facts read it (fen; chronic_paid decoded); none: empty."""
    if row is None:
        return {}
    counters: dict[str, Any] = {c: row[c] for c in _ACC_COUNTERS}
    counters["chronic_paid"] = json.loads(counters["chronic_paid"])
    return counters

