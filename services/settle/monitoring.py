"""The person's settled history for the in-event checks (2206/2303 warn_msg, 3101/3102), read from the shard.

Two queries per batch whatever its size, only for the persons of the batch's requests that need it: the
settle rows not reversed within the rules' horizon with their visits, then the items those rows settled.
A row becomes a rules `Episode` (`episode`, pure) with the same facts the engine puts on its event; the
hospital's level is not in the shard and no person-keyed rule reads it (0 here).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from schemas.internal import RoutedRequest
from schemas.monitoring import Gender, ItemFact, VisitFacts
from schemas.prescreen import Input3103
from schemas.transactions import infnos_loading
from schemas.wire import parse_wire_time
from services.refdata.regions import province_of
from services.settle.facts import item_fact, main_diagnosis, visit_type
from services.settle.state import BatchState, Fee, IssuedWarning
from services.smartmon.rules import Episode, RuleBook, horizon_days

_HISTORY_INFNOS = infnos_loading("history")

_TIME = "%Y-%m-%d %H:%M:%S"
_HISTORY_SQL = (
    "SELECT s.setl_id, s.mdtrt_id, s.psn_no, s.fixmedins_code, s.insured_admdvs, s.treating_admdvs, s.med_type,"
    " s.setl_time, s.medfee_sumamt, s.mid_setl, v.begntime, v.endtime, v.dise_codg, v.diseinfo"
    " FROM settlement s JOIN visit v ON v.mdtrt_id = s.mdtrt_id"
    " WHERE s.psn_no = ANY($1) AND s.kind = 'settle' AND s.setl_time >= $2"
    " AND NOT EXISTS (SELECT 1 FROM settlement_key k WHERE k.orig_setl_id = s.setl_id)"
)
_ITEMS_SQL = (
    "SELECT mdtrt_id, feedetl_sn, med_list_codg, medins_list_codg, chrgitm_lv, selfpay_prop, pric_uplmt_fen,"
    " fee_fen, cnt, pric_fen, fee_ocur_time, upload_msgid, cancelled, setl_id, once_per_day, gender_only,"
    " supply_days FROM fee_item WHERE setl_id = ANY($1) AND NOT cancelled"
)


async def load_history(conn: asyncpg.Connection, persons: Sequence[str], since: datetime,
                       gender: Mapping[str, Gender]) -> dict[str, list[Episode]]:
    """psn_no → the person's settled episodes since `since` (every person asked has an entry)."""
    history: dict[str, list[Episode]] = {p: [] for p in persons}
    if not persons:
        return history
    rows = await conn.fetch(_HISTORY_SQL, list(persons), since)
    items: dict[str, list[Fee]] = {}
    if rows:
        for r in await conn.fetch(_ITEMS_SQL, [r["setl_id"] for r in rows]):
            items.setdefault(r["setl_id"], []).append(Fee(**dict(r)))
    for r in rows:
        history[r["psn_no"]].append(episode(dict(r), items.get(r["setl_id"], []), gender.get(r["psn_no"], "")))
    return history


def episode(row: Mapping[str, Any], items: Iterable[Fee], gend: Gender) -> Episode:
    """A history row (settlement joined with its visit) and the items it settled, as the rules see it."""
    diseinfo = row["diseinfo"]
    if isinstance(diseinfo, str):
        diseinfo = json.loads(diseinfo)
    endtime: datetime | None = row["endtime"]
    facts = VisitFacts(
        visit_type=visit_type(row["med_type"]), gend=gend, begntime=row["begntime"].strftime(_TIME),
        endtime=endtime.strftime(_TIME) if endtime is not None else "",
        main_dise=main_diagnosis(diseinfo, row["dise_codg"]), hosp_lv=0,
        treating_prov=province_of(row["treating_admdvs"]),
        items=_items(items),
    )
    return Episode(
        setl_id=row["setl_id"], mdtrt_id=row["mdtrt_id"], psn_no=row["psn_no"],
        fixmedins_code=row["fixmedins_code"], insured_admdvs=row["insured_admdvs"],
        treating_admdvs=row["treating_admdvs"], med_type=row["med_type"],
        setl_time=row["setl_time"].strftime(_TIME), medfee=row["medfee_sumamt"], mid_setl=row["mid_setl"],
        facts=facts,
    )


def _items(fees: Iterable[Fee]) -> list[ItemFact]:
    return [item_fact(f) for f in sorted(fees, key=lambda f: f.feedetl_sn)]


async def load_warnings(conn: asyncpg.Connection, jr_ids: Sequence[str]) -> dict[str, IssuedWarning]:
    """The issued warnings a batch's disposals (3103) name."""
    if not jr_ids:
        return {}
    rows = await conn.fetch("SELECT jr_id, msgid, infno, fixmedins_code, psn_no, rule_id, mdtrt_id, vola_amt_fen"
                            " FROM warning_issued WHERE jr_id = ANY($1)", list(jr_ids))
    return {r["jr_id"]: IssuedWarning(**dict(r)) for r in rows}


async def load_for_batch(conn: asyncpg.Connection, fresh: Sequence[RoutedRequest], st: BatchState,
                         book: RuleBook) -> None:
    """What the batch's monitoring requests need: the persons' histories (2206/2303/3101/3102) and the
    warnings its disposals (3103) name; nothing for a batch without them."""
    needing = [m for m in fresh if m.infno in _HISTORY_INFNOS]
    if needing:
        earliest = min(parse_wire_time("inf_time", m.inf_time) for m in needing)
        gender = {m.person.psn_no: m.person.gend for m in needing}
        st.history = await load_history(conn, sorted(gender), earliest - timedelta(days=horizon_days(book)), gender)
    jr_ids = sorted({m.body.data.jr_id for m in fresh if isinstance(m.body, Input3103)})
    st.warnings = await load_warnings(conn, jr_ids)


async def write_warnings(conn: asyncpg.Connection, st: BatchState) -> None:
    """The warnings this batch issued (a jr_id issued before keeps its first row) and its disposals."""
    if st.new_warnings:
        await conn.executemany(
            "INSERT INTO warning_issued (jr_id, msgid, infno, fixmedins_code, psn_no, rule_id, mdtrt_id,"
            " vola_amt_fen) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (jr_id) DO NOTHING",
            [(w.jr_id, w.msgid, w.infno, w.fixmedins_code, w.psn_no, w.rule_id, w.mdtrt_id, w.vola_amt_fen)
             for w in st.new_warnings])
    if st.new_disposals:
        await conn.executemany(
            "INSERT INTO warning_disposal (msgid, jr_id, fixmedins_code, dspo_way, dspo_way_rea)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(d.msgid, d.jr_id, d.fixmedins_code, d.dspo_way, d.dspo_way_rea) for d in st.new_disposals])
