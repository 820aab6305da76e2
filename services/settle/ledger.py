"""PostgreSQL side of the settlement engine: load a batch's rows, write back its changes.

Both run inside the caller's transaction. Loading locks the visits, accumulators
and accounts of the batch's persons (FOR UPDATE), so two workers that briefly
own the same partition during a rebalance serialize instead of double-applying;
the loser then finds the msgids already processed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from schemas.correction import Input2601
from schemas.internal import RoutedRequest
from schemas.transactions import correctable, infnos_loading
from services.policy.logic import accumulators_from_json, accumulators_to_json
from services.settle import daily
from services.settle.state import AMOUNT_FIELDS, BatchState, Correction, Fee, Original, Settlement, Visit

_VISIT_COLS = ("mdtrt_id", "psn_no", "fixmedins_code", "med_type", "insutype", "scope", "insured_admdvs",
               "treating_admdvs", "ipt_otp_no", "begntime", "endtime", "dise_codg", "state", "created_msgid",
               "chronic_disease", "diseinfo", "adm_info")
# What a visit's later transactions may change (2203, 2402, 2403, 2405, settlement, reversal, cancellation).
_VISIT_MUTABLE = ("state", "endtime", "begntime", "dise_codg", "med_type", "chronic_disease", "diseinfo",
                  "adm_info", "ipt_otp_no")
_VISIT_JSON = ("diseinfo", "adm_info")
_FEE_COLS = ("mdtrt_id", "feedetl_sn", "med_list_codg", "medins_list_codg", "chrgitm_lv", "selfpay_prop",
             "pric_uplmt_fen", "fee_fen", "cnt", "pric_fen", "fee_ocur_time", "upload_msgid", "cancelled",
             "setl_id", "once_per_day", "gender_only", "supply_days")
_SETL_COLS = ("setl_id", "msgid", "kind", "orig_setl_id", "mdtrt_id", "psn_no", "fixmedins_code", "insutype",
              "med_type", "scope", "filing_type", "insured_admdvs", "insured_pool", "treating_admdvs",
              "treating_pool", "clr_optins", "setl_time", "acc_year", *AMOUNT_FIELDS, "pool_prop_selfpay",
              "accum_delta", "policy_version", "mid_setl", "stay_part")
# What a batch must load, by the transactions in it (the registry's `loads`): a batch of admissions and
# fee uploads (most of the traffic) touches neither accumulators nor accounts nor earlier settlements.
_MONEY_INFNOS = infnos_loading("money")
_FEE_INFNOS = infnos_loading("fees")
_REVERSAL_INFNOS = infnos_loading("settlements")
_CORRECTABLE = correctable()
_ACC_COUNTERS = ("basic_paid", "outpatient_dedc_used", "outpatient_paid", "critical_base", "critical_paid",
                 "supplementary_paid", "assistance_paid")
_PROCESSED_COLS = ("msgid", "infno", "fixmedins_code", "infcode", "response", "mdtrt_id")
# The element type of each written column's array (`unnest`); any other column is text (char(6) included:
# text casts to it on assignment).
_PG_TYPES = {
    "begntime": "timestamp", "endtime": "timestamp", "diseinfo": "jsonb", "adm_info": "jsonb",
    "selfpay_prop": "numeric", "pric_uplmt_fen": "bigint", "fee_fen": "bigint", "cnt": "numeric",
    "pric_fen": "bigint", "fee_ocur_time": "timestamp", "cancelled": "boolean", "once_per_day": "boolean",
    "supply_days": "numeric", "setl_time": "timestamp", "acc_year": "smallint",
    **dict.fromkeys(AMOUNT_FIELDS, "bigint"), "pool_prop_selfpay": "numeric", "accum_delta": "jsonb",
    "mid_setl": "boolean", "stay_part": "smallint", "chronic_paid": "jsonb", "balc_fen": "bigint",
    "infcode": "smallint", "response": "bytea", "day": "date",
    **dict.fromkeys((*daily.COUNTS, *daily.MONEY), "bigint"), **dict.fromkeys(_ACC_COUNTERS, "bigint"),
}
_CORRECTION_COLS = ("omsgid", "msgid", "oinfno", "fixmedins_code", "undone", "output", "err_msg")


def _referenced(msgs: Iterable[RoutedRequest]) -> tuple[set[str], set[str]]:
    """The mdtrt_ids and setl_ids the batch's bodies name."""
    mdtrt_ids: set[str] = set()
    setl_ids: set[str] = set()
    for m in msgs:
        body = m.body
        for attr in ("mdtrtinfo", "dscginfo", "adminfo", "data", "feedetail"):
            part = getattr(body, attr, None)
            for item in part if isinstance(part, list) else [part]:
                if mdtrt_id := getattr(item, "mdtrt_id", None):
                    mdtrt_ids.add(mdtrt_id)
                if setl_id := getattr(item, "setl_id", None):
                    setl_ids.add(setl_id)
    return mdtrt_ids, setl_ids


async def load_batch(conn: asyncpg.Connection, msgs: list[RoutedRequest]) -> BatchState:
    st = BatchState()
    msgids = [m.msgid for m in msgs]
    for r in await conn.fetch("SELECT msgid, response FROM processed_request WHERE msgid = ANY($1)", msgids):
        st.processed[r["msgid"]] = bytes(r["response"])
    if st.processed:
        rows = await conn.fetch(
            f"SELECT {', '.join(_SETL_COLS)}, false AS reversed FROM settlement WHERE msgid = ANY($1)",
            list(st.processed),
        )
        for row in rows:
            settlement = _settlement(row)
            st.replayed[settlement.msgid] = settlement
        await _load_replayed_facts(conn, st)
    fresh = [m for m in msgs if m.msgid not in st.processed]
    if not fresh:
        return st
    persons = sorted({m.person.psn_no for m in fresh})
    named_visits, named_settlements = _referenced(fresh)
    named_visits |= await _load_corrections(conn, fresh, st)
    if named_settlements:  # a pharmacy reversal (2103) names only the settlement
        named_visits |= {r["mdtrt_id"] for r in await conn.fetch(
            "SELECT mdtrt_id FROM settlement WHERE setl_id = ANY($1)", list(named_settlements))}
    mdtrt_ids = sorted(named_visits)
    infnos = {m.infno for m in fresh}
    # Lock order: accounts, accumulators, visits — always by sorted key, so workers never deadlock.
    if infnos & _MONEY_INFNOS:
        for r in await conn.fetch(
            "SELECT psn_no, balc_fen FROM account WHERE psn_no = ANY($1) ORDER BY psn_no FOR UPDATE", persons
        ):
            st.accounts[r["psn_no"]] = r["balc_fen"]
        for r in await conn.fetch(
            "SELECT * FROM accumulator WHERE psn_no = ANY($1) ORDER BY psn_no, acc_year FOR UPDATE", persons
        ):
            data: dict[str, Any] = {c: r[c] for c in _ACC_COUNTERS}
            data["chronic_paid"] = json.loads(r["chronic_paid"])
            st.accumulators[(r["psn_no"], r["acc_year"])] = accumulators_from_json(data)
    if not mdtrt_ids:
        return st
    for r in await conn.fetch(
        f"SELECT {', '.join(_VISIT_COLS)} FROM visit WHERE mdtrt_id = ANY($1) ORDER BY mdtrt_id FOR UPDATE",
        mdtrt_ids,
    ):
        st.visits[r["mdtrt_id"]] = _visit(r)
    if infnos & _FEE_INFNOS:
        for r in await conn.fetch(f"SELECT {', '.join(_FEE_COLS)} FROM fee_item WHERE mdtrt_id = ANY($1)", mdtrt_ids):
            st.fees.setdefault(r["mdtrt_id"], {})[r["feedetl_sn"]] = Fee(**dict(r))
    if infnos & _REVERSAL_INFNOS:
        rows = await conn.fetch(
            f"SELECT {', '.join(_SETL_COLS)}, EXISTS (SELECT 1 FROM settlement_key k WHERE k.orig_setl_id = s.setl_id)"
            " AS reversed FROM settlement s WHERE mdtrt_id = ANY($1)",
            mdtrt_ids,
        )
        for r in rows:
            settlement = _settlement(r)
            st.settlements[settlement.setl_id] = settlement
    return st


async def _load_replayed_facts(conn: asyncpg.Connection, st: BatchState) -> None:
    """The visits and settled items of replayed settle rows: their events carry the same facts again."""
    settled = [r for r in st.replayed.values() if r.kind == "settle"]
    if not settled:
        return
    for r in await conn.fetch(f"SELECT {', '.join(_VISIT_COLS)} FROM visit WHERE mdtrt_id = ANY($1)",
                              sorted({s.mdtrt_id for s in settled})):
        st.replayed_visits[r["mdtrt_id"]] = _visit(r)
    for r in await conn.fetch(f"SELECT {', '.join(_FEE_COLS)} FROM fee_item WHERE setl_id = ANY($1)",
                              [s.setl_id for s in settled]):
        st.replayed_fees.setdefault(r["setl_id"], []).append(Fee(**dict(r)))


def _visit(r: asyncpg.Record) -> Visit:
    visit = dict(r)
    for column in _VISIT_JSON:
        visit[column] = json.loads(visit[column])
    return Visit(**visit)


async def _load_corrections(conn: asyncpg.Connection, fresh: list[RoutedRequest], st: BatchState) -> set[str]:
    """For corrections (2601): the corrections already made of the batch's correctable msgids and of the
    omsgids its corrections name, and what those originals were; returns the originals' visits (loaded
    and locked with the batch's others)."""
    omsgids = sorted({m.body.data.omsgid for m in fresh if isinstance(m.body, Input2601)})
    asked = [m.msgid for m in fresh if m.infno in _CORRECTABLE] + omsgids
    if not asked:
        return set()
    for r in await conn.fetch(f"SELECT {', '.join(_CORRECTION_COLS)} FROM correction WHERE omsgid = ANY($1)", asked):
        d = dict(r)
        d["output"] = None if d["output"] is None else bytes(d["output"])
        st.corrections[r["omsgid"]] = Correction(**d)
    if not omsgids:
        return set()
    for r in await conn.fetch("SELECT msgid, infno, fixmedins_code, infcode, mdtrt_id FROM processed_request"
                              " WHERE msgid = ANY($1)", omsgids):
        st.originals[r["msgid"]] = Original(**dict(r))
    # The rows an original wrote name its visit; a discharge's only its processed_request row.
    rows = await conn.fetch(
        "SELECT mdtrt_id FROM processed_request WHERE msgid = ANY($1) AND mdtrt_id IS NOT NULL"
        " UNION SELECT mdtrt_id FROM visit WHERE created_msgid = ANY($1)"
        " UNION SELECT mdtrt_id FROM fee_item WHERE upload_msgid = ANY($1)"
        " UNION SELECT mdtrt_id FROM settlement WHERE msgid = ANY($1)",
        omsgids,
    )
    return {r["mdtrt_id"] for r in rows}


def _settlement(r: asyncpg.Record) -> Settlement:
    d = dict(r)
    amounts = {name: d.pop(name) for name in AMOUNT_FIELDS}
    d["accum_delta"] = json.loads(d["accum_delta"])
    return Settlement(amounts=amounts, **d)


async def write_batch(conn: asyncpg.Connection, st: BatchState) -> None:
    """Every table the batch changed in one set-based statement each: the rows go as one array per column
    (`unnest`), so PostgreSQL parses, plans and executes a statement per table, not per row. The writes that
    touch a row at most once go together in one round trip (`_Writes`): visits, new items, ledger rows and
    their daily sums, accumulators, accounts, responses. The item updates follow, one statement each: they
    may touch an item the batch also inserts, and one statement may not change a row twice."""
    writes = _Writes()
    if st.new_visits:
        writes.insert("visit", _VISIT_COLS,
                      [tuple(_visit_value(st.visits[v], c) for c in _VISIT_COLS) for v in st.new_visits])
    changed = st.changed_visits - set(st.new_visits)
    if changed:
        cols = ("mdtrt_id", *_VISIT_MUTABLE)
        writes.update("visit", cols, ", ".join(f"{c} = u.{c}" for c in _VISIT_MUTABLE), ("mdtrt_id",),
                      [tuple(_visit_value(st.visits[v], c) for c in cols) for v in sorted(changed)])
    if st.new_fees:
        # Each item once (an item sent twice in the batch is one row in its final state): one INSERT may
        # not touch a row twice.
        writes.insert("fee_item", _FEE_COLS,
                      [tuple(getattr(st.fees[m][sn], c) for c in _FEE_COLS) for m, sn in dict.fromkeys(st.new_fees)],
                      " ON CONFLICT (mdtrt_id, feedetl_sn) DO UPDATE SET "
                      + ", ".join(f"{c} = EXCLUDED.{c}" for c in _FEE_COLS[2:]))
    if st.new_settlements:
        writes.insert("settlement", _SETL_COLS, [_settlement_values(st.settlements[s]) for s in st.new_settlements])
        # The month-to-date aggregates, in this transaction: ledger_daily_add's sums (shard migrations 0002,
        # 0006), from the rows in memory (services/settle/daily.py says why).
        new_rows = [st.settlements[s] for s in st.new_settlements]
        writes.insert("ledger_daily AS d", daily.COLUMNS, daily.daily_sums(new_rows, st.settlements),
                      " ON CONFLICT (day, insured_prov, treating_prov, scope, med_type) DO UPDATE SET "
                      + ", ".join(f"{c} = d.{c} + EXCLUDED.{c}" for c in (*daily.COUNTS, *daily.MONEY)))
    if st.changed_accumulators:
        cols = ("psn_no", "acc_year", *_ACC_COUNTERS, "chronic_paid")
        rows = []
        for key in sorted(st.changed_accumulators):
            data = accumulators_to_json(st.accumulators[key])
            rows.append((*key, *(data[c] for c in _ACC_COUNTERS), json.dumps(data["chronic_paid"])))
        writes.insert("accumulator", cols, rows, " ON CONFLICT (psn_no, acc_year) DO UPDATE SET "
                      + ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[2:]))
    if st.changed_accounts:
        writes.insert("account", ("psn_no", "balc_fen"), [(p, st.accounts[p]) for p in sorted(st.changed_accounts)],
                      " ON CONFLICT (psn_no) DO UPDATE SET balc_fen = EXCLUDED.balc_fen")
    if st.responses:
        writes.insert("processed_request", _PROCESSED_COLS,
                      [(msgid, *rest, st.request_visits.get(msgid)) for msgid, rest in st.responses.items()])
    await writes.run(conn)
    if st.cancelled_fees:
        await _update(conn, "fee_item", ("mdtrt_id", "feedetl_sn"), "cancelled = true", ("mdtrt_id", "feedetl_sn"),
                      st.cancelled_fees)
    if st.unsettled_by:  # a reversed part's items are not settled any more (loaded or not)
        await _update(conn, "fee_item", ("mdtrt_id", "setl_id"), "setl_id = NULL", ("mdtrt_id", "setl_id"),
                      st.unsettled_by)
    if st.settled_fees:
        await _update(conn, "fee_item", ("mdtrt_id", "feedetl_sn", "setl_id"), "setl_id = u.setl_id",
                      ("mdtrt_id", "feedetl_sn"), [(*key, setl_id) for key, setl_id in sorted(st.settled_fees.items())])
    if st.new_corrections:
        await conn.executemany(
            f"INSERT INTO correction ({', '.join(_CORRECTION_COLS)}) VALUES ({_params(len(_CORRECTION_COLS))})",
            [tuple(getattr(st.corrections[o], c) for c in _CORRECTION_COLS) for o in st.new_corrections],
        )


class _Writes:
    """Writes sent as one statement: each a data-modifying `WITH` part of it, the last one the main statement.
    PostgreSQL runs the parts on one snapshot, so none may read what another writes, nor two change the same
    row; the constraint checks and triggers run at the statement's end and see every part's rows (a ledger
    row's visit inserted beside it, the settlement trigger's keys in the rows' order)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[list[Any]] = []

    def insert(self, table: str, cols: Sequence[str], rows: list[tuple[Any, ...]], on_conflict: str = "") -> None:
        self.parts.append(f"INSERT INTO {table} ({', '.join(cols)}) SELECT * FROM {self._unnest(cols)}{on_conflict}")
        self.args += _columns(rows, len(cols))

    def update(self, table: str, cols: Sequence[str], assignments: str, keys: Sequence[str],
               rows: Sequence[tuple[Any, ...]]) -> None:
        match = " AND ".join(f"t.{k} = u.{k}" for k in keys)
        self.parts.append(f"UPDATE {table} t SET {assignments} FROM {self._unnest(cols)} WHERE {match}")
        self.args += _columns(rows, len(cols))

    def _unnest(self, cols: Sequence[str]) -> str:
        return _unnest(cols, first=len(self.args) + 1)

    async def run(self, conn: asyncpg.Connection) -> None:
        if not self.parts:
            return
        *ctes, main = self.parts
        with_ = "WITH " + ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(ctes)) + " " if ctes else ""
        await conn.execute(with_ + main, *self.args)


async def _update(conn: asyncpg.Connection, table: str, cols: Sequence[str], assignments: str,
                  keys: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
    """UPDATE the rows that match each row's keys (`keys`: columns of `cols`) in a statement of its own."""
    writes = _Writes()
    writes.update(table, cols, assignments, keys, rows)
    await writes.run(conn)


def _unnest(cols: Sequence[str], first: int = 1) -> str:
    arrays = ", ".join(f"${i}::{_PG_TYPES.get(c, 'text')}[]" for i, c in enumerate(cols, start=first))
    return f"unnest({arrays}) AS u({', '.join(cols)})"


def _columns(rows: Sequence[tuple[Any, ...]], n: int) -> list[list[Any]]:
    """Rows as one list per column (the arrays `unnest` zips back into rows)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(n)]


def _visit_value(visit: Visit, column: str) -> Any:
    value = getattr(visit, column)
    return json.dumps(value, ensure_ascii=False) if column in _VISIT_JSON else value


def _params(n: int) -> str:
    return ", ".join(f"${i}" for i in range(1, n + 1))


def _settlement_values(row: Settlement) -> tuple[Any, ...]:
    values: list[Any] = []
    for c in _SETL_COLS:
        if c in AMOUNT_FIELDS:
            values.append(row.amounts[c])
        elif c == "accum_delta":
            values.append(json.dumps(row.accum_delta))
        else:
            values.append(getattr(row, c))
    return tuple(values)
