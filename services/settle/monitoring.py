"""The person's settled history for the in-event checks (2206/2303 warn_msg, 3101/3102), read from the shard.

Parts of the batch's read statement (`ledger.load_batch`, `reads.py`), only for the persons of the batch's
requests that need it: the settle rows not reversed within the rules' horizon with their visits, and the
items those rows settled.
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
from services.settle.reads import Reads, Row
from services.settle.state import BatchState, Fee, IssuedWarning, columns
from services.smartmon.rules import Episode, RuleBook, horizon_days

_HISTORY_INFNOS = infnos_loading("history")

_TIME = "%Y-%m-%d %H:%M:%S"
# A history row: the settle row's columns (s), then its visit's (v).
_HISTORY_SOURCES = ("s.setl_id", "s.mdtrt_id", "s.psn_no", "s.fixmedins_code", "s.insured_admdvs", "s.treating_admdvs",
                    "s.med_type", "s.setl_time", "s.medfee_sumamt", "s.mid_setl", "v.begntime", "v.endtime",
                    "v.dise_codg", "v.diseinfo")
_HISTORY_COLS = tuple(source.partition(".")[2] for source in _HISTORY_SOURCES)
_ITEM_COLS = columns(Fee)
_WARNING_COLS = columns(IssuedWarning)


def add_reads(reads: Reads, msgs: Sequence[RoutedRequest], book: RuleBook) -> None:
    """What the batch's monitoring requests need, as parts of the batch's read statement (`ledger.load_batch`):
    the persons' settle rows not reversed within the rules' horizon with their visits (2206/2303/3101/3102),
    the items those rows settled, and the warnings its disposals (3103) name; nothing for a batch without them."""
    needing = [m for m in msgs if m.infno in _HISTORY_INFNOS]
    if needing:
        earliest = min(parse_wire_time("inf_time", m.inf_time) for m in needing)
        persons = reads.arg(sorted({m.person.psn_no for m in needing}), "text[]")
        since = reads.arg(earliest - timedelta(days=horizon_days(book)), "timestamp")
        reads.with_("recent", f"SELECT {', '.join(_HISTORY_SOURCES)}"
                    " FROM settlement s JOIN visit v ON v.mdtrt_id = s.mdtrt_id"
                    f" WHERE s.psn_no = ANY({persons}) AND s.kind = 'settle' AND s.setl_time >= {since}"
                    " AND NOT EXISTS (SELECT 1 FROM settlement_key k WHERE k.orig_setl_id = s.setl_id)")
        reads.rows("history", _HISTORY_COLS, "FROM recent")
        reads.rows("history_items", _ITEM_COLS,
                   "FROM fee_item WHERE setl_id = ANY(ARRAY(SELECT setl_id FROM recent)) AND NOT cancelled")
    jr_ids = sorted({m.body.data.jr_id for m in msgs if isinstance(m.body, Input3103)})
    if jr_ids:
        reads.rows("warnings", _WARNING_COLS, f"FROM warning_issued WHERE jr_id = ANY({reads.arg(jr_ids, 'text[]')})")


def take(got: Mapping[str, list[Row]], msgs: Sequence[RoutedRequest], st: BatchState) -> None:
    """The parts `add_reads` asked for, into the batch state: psn_no → the person's settled episodes (every
    person asked has an entry), jr_id → the issued warning."""
    if "history" in got:
        gender = {m.person.psn_no: m.person.gend for m in msgs if m.infno in _HISTORY_INFNOS}
        items: dict[str, list[Fee]] = {}
        for r in got["history_items"]:
            items.setdefault(r["setl_id"], []).append(Fee(**r))
        st.history = {p: [] for p in gender}
        for r in got["history"]:
            st.history[r["psn_no"]].append(episode(r, items.get(r["setl_id"], []), gender[r["psn_no"]]))
    st.warnings = {r["jr_id"]: IssuedWarning(**r) for r in got.get("warnings", [])}


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
