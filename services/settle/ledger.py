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
import msgspec

from schemas.correction import Input2601
from schemas.internal import RoutedRequest
from schemas.transactions import correctable, infnos_loading
from services.policy.logic import accumulators_from_json, accumulators_to_json
from services.settle import daily, monitoring
from services.settle.reads import Reads, Row
from services.settle.state import AMOUNT_FIELDS, BatchState, Correction, Fee, Original, Settlement, Visit, columns
from services.smartmon.rules import RuleBook

_VISIT_COLS = columns(Visit)
# What a visit's later transactions may change (2203, 2402, 2403, 2405, settlement, reversal, cancellation).
_VISIT_MUTABLE = ("state", "endtime", "begntime", "dise_codg", "med_type", "chronic_disease", "diseinfo",
                  "adm_info", "ipt_otp_no")
_VISIT_JSON = ("diseinfo", "adm_info")
_FEE_COLS = columns(Fee)
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
# The type of each written column in its rows' table (`_recordset`); any other column is text (char(6)
# included: text casts to it on assignment).
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
_CORRECTION_COLS = columns(Correction)
_ORIGINAL_COLS = columns(Original)


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


async def load_batch(conn: asyncpg.Connection, msgs: list[RoutedRequest], book: RuleBook) -> BatchState:
    """Every row the batch may touch, in two statements whatever its size (`reads.py`): first the locks —
    accounts, accumulators, visits, each by sorted key, so transactions never deadlock —, then every other
    read, once the locks are granted, so it sees what a transaction that held them committed (its
    processed msgids among them). Rows are loaded for the batch's duplicates too (which msgids are
    duplicates is only known from the second statement): they are only read, never written back."""
    st = BatchState()
    if not msgs:
        return st
    infnos = {m.infno for m in msgs}
    named_visits, named_settlements = _referenced(msgs)
    omsgids = sorted({m.body.data.omsgid for m in msgs if isinstance(m.body, Input2601)})
    mdtrt_ids = sorted(named_visits)
    locks = _locks(msgs, infnos, mdtrt_ids, sorted(named_settlements), omsgids)
    if locks:
        locked = await locks.run(conn)
        for r in locked.get("accounts", []):
            st.accounts[r["psn_no"]] = r["balc_fen"]
        for r in locked.get("accumulators", []):
            data = {c: r[c] for c in _ACC_COUNTERS}
            data["chronic_paid"] = json.loads(r["chronic_paid"])
            st.accumulators[(r["psn_no"], r["acc_year"])] = accumulators_from_json(data)
        for r in locked.get("visits", []):
            st.visits[r["mdtrt_id"]] = _visit(r)
        if "mdtrt_ids" in locked:  # the bodies' visits and those found by settlement or original
            mdtrt_ids = [r["mdtrt_id"] for r in locked["mdtrt_ids"]]

    reads = Reads()
    reads.rows("processed", ("msgid", "response"),
               f"FROM processed_request WHERE msgid = ANY({reads.arg([m.msgid for m in msgs], 'text[]')})")
    asked = [m.msgid for m in msgs if m.infno in _CORRECTABLE] + omsgids
    if asked:  # corrections (2601): those already made of the batch's correctable msgids and of its omsgids
        reads.rows("corrections", _CORRECTION_COLS, f"FROM correction WHERE omsgid = ANY({reads.arg(asked, 'text[]')})")
    if omsgids:  # ... and what the originals were
        reads.rows("originals", _ORIGINAL_COLS,
                   f"FROM processed_request WHERE msgid = ANY({reads.arg(omsgids, 'text[]')})")
    if mdtrt_ids and infnos & (_FEE_INFNOS | _REVERSAL_INFNOS):
        visits = reads.arg(mdtrt_ids, "text[]")
        if infnos & _FEE_INFNOS:
            reads.rows("fees", _FEE_COLS, f"FROM fee_item WHERE mdtrt_id = ANY({visits})")
        if infnos & _REVERSAL_INFNOS:
            reads.rows("settlements", (*_SETL_COLS, "reversed"), f"FROM settlement s WHERE mdtrt_id = ANY({visits})",
                       exprs=(*_SETL_COLS, "EXISTS (SELECT 1 FROM settlement_key k WHERE k.orig_setl_id = s.setl_id)"))
    monitoring.add_reads(reads, msgs, book)
    got = await reads.run(conn)
    for r in got["processed"]:
        st.processed[r["msgid"]] = bytes(r["response"])
    for r in got.get("corrections", []):
        st.corrections[r["omsgid"]] = Correction(**r)
    for r in got.get("originals", []):
        st.originals[r["msgid"]] = Original(**r)
    for r in got.get("fees", []):
        st.fees.setdefault(r["mdtrt_id"], {})[r["feedetl_sn"]] = Fee(**r)
    for r in got.get("settlements", []):
        settlement = _settlement(r)
        st.settlements[settlement.setl_id] = settlement
    monitoring.take(got, msgs, st)
    if st.processed:
        await _load_replayed(conn, st)
    return st


def _locks(msgs: list[RoutedRequest], infnos: set[str], mdtrt_ids: list[str], setl_ids: list[str],
           omsgids: list[str]) -> Reads:
    """The locking statement: the batch's accounts and accumulators (for the transactions that move money)
    and its visits — those its bodies name, those of the settlements a pharmacy reversal (2103) names, and
    those of the originals its corrections name — with their ids (`mdtrt_ids`). No parts when the batch
    locks nothing (admissions, registrations, monitoring look-ups)."""
    locks = Reads()
    if infnos & _MONEY_INFNOS:
        persons = locks.arg(sorted({m.person.psn_no for m in msgs}), "text[]")
        locks.rows("accounts", ("psn_no", "balc_fen"),
                   f"FROM account WHERE psn_no = ANY({persons}) ORDER BY psn_no FOR UPDATE")
        locks.rows("accumulators", ("psn_no", "acc_year", *_ACC_COUNTERS, "chronic_paid"),
                   f"FROM accumulator WHERE psn_no = ANY({persons}) ORDER BY psn_no, acc_year FOR UPDATE")
    if not (mdtrt_ids or setl_ids or omsgids):
        return locks
    named = [f"SELECT unnest({locks.arg(mdtrt_ids, 'text[]')}) AS mdtrt_id"]
    if setl_ids:
        named.append(f"SELECT mdtrt_id FROM settlement WHERE setl_id = ANY({locks.arg(setl_ids, 'text[]')})")
    if omsgids:  # the rows an original wrote name its visit; a discharge's only its processed_request row
        o = locks.arg(omsgids, "text[]")
        named += [f"SELECT mdtrt_id FROM processed_request WHERE msgid = ANY({o}) AND mdtrt_id IS NOT NULL",
                  f"SELECT mdtrt_id FROM visit WHERE created_msgid = ANY({o})",
                  f"SELECT mdtrt_id FROM fee_item WHERE upload_msgid = ANY({o})",
                  f"SELECT mdtrt_id FROM settlement WHERE msgid = ANY({o})"]
    locks.with_("named", " UNION ".join(named))
    locks.rows("visits", _VISIT_COLS, "FROM visit WHERE mdtrt_id = ANY(ARRAY(SELECT mdtrt_id FROM named))"
                                      " ORDER BY mdtrt_id FOR UPDATE")
    locks.rows("mdtrt_ids", ("mdtrt_id",), "FROM named ORDER BY mdtrt_id")
    return locks


async def _load_replayed(conn: asyncpg.Connection, st: BatchState) -> None:
    """The ledger rows of the batch's duplicates, with the visits and settled items of their settle rows:
    their events carry the same facts again (a third statement, only on replays)."""
    reads = Reads()
    reads.with_("replayed", f"SELECT {', '.join(_SETL_COLS)} FROM settlement"
                            f" WHERE msgid = ANY({reads.arg(list(st.processed), 'text[]')})")
    reads.rows("rows", (*_SETL_COLS, "reversed"), "FROM replayed", exprs=(*_SETL_COLS, "false"))
    reads.rows("visits", _VISIT_COLS,
               "FROM visit WHERE mdtrt_id = ANY(ARRAY(SELECT mdtrt_id FROM replayed WHERE kind = 'settle'))")
    reads.rows("fees", _FEE_COLS,
               "FROM fee_item WHERE setl_id = ANY(ARRAY(SELECT setl_id FROM replayed WHERE kind = 'settle'))")
    got = await reads.run(conn)
    for r in got["rows"]:
        settlement = _settlement(r)
        st.replayed[settlement.msgid] = settlement
    for r in got["visits"]:
        st.replayed_visits[r["mdtrt_id"]] = _visit(r)
    for r in got["fees"]:
        st.replayed_fees.setdefault(r["setl_id"], []).append(Fee(**r))


def _visit(r: Row) -> Visit:
    visit = dict(r)
    for column in _VISIT_JSON:
        visit[column] = json.loads(visit[column])
    return Visit(**visit)


def _settlement(r: Row) -> Settlement:
    d = dict(r)
    amounts = {name: d.pop(name) for name in AMOUNT_FIELDS}
    d["accum_delta"] = json.loads(d["accum_delta"])
    return Settlement(amounts=amounts, **d)


async def write_batch(conn: asyncpg.Connection, st: BatchState) -> None:
    """Every table the batch changed in one set-based statement each: a table's rows go as one JSON
    parameter (`_recordset`), so PostgreSQL parses, plans and executes a statement per table, not per row.
    The writes that touch a row at most once go together in one round trip (`_Writes`): visits, new items,
    ledger rows and their daily sums, accumulators, accounts, responses. The item updates follow, one
    statement each: they may touch an item the batch also inserts, and one statement may not change a row
    twice."""
    writes = _Writes()
    if st.new_visits:
        writes.insert("visit", _VISIT_COLS,
                      [tuple(getattr(st.visits[v], c) for c in _VISIT_COLS) for v in st.new_visits])
    changed = st.changed_visits - set(st.new_visits)
    if changed:
        cols = ("mdtrt_id", *_VISIT_MUTABLE)
        writes.update("visit", cols, ", ".join(f"{c} = u.{c}" for c in _VISIT_MUTABLE), ("mdtrt_id",),
                      [tuple(getattr(st.visits[v], c) for c in cols) for v in sorted(changed)])
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
            rows.append((*key, *(data[c] for c in _ACC_COUNTERS), data["chronic_paid"]))
        writes.insert("accumulator", cols, rows, " ON CONFLICT (psn_no, acc_year) DO UPDATE SET "
                      + ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[2:]))
    if st.changed_accounts:
        writes.insert("account", ("psn_no", "balc_fen"), [(p, st.accounts[p]) for p in sorted(st.changed_accounts)],
                      " ON CONFLICT (psn_no) DO UPDATE SET balc_fen = EXCLUDED.balc_fen")
    if st.responses:
        writes.insert("processed_request", _PROCESSED_COLS,
                      [(msgid, infno, fixmedins_code, infcode, _bytea(response), st.request_visits.get(msgid))
                       for msgid, (infno, fixmedins_code, infcode, response) in st.responses.items()])
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
    row's visit inserted beside it, the settlement trigger's keys in the rows' order).
    Each part's rows go as one JSON parameter (`_recordset`)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[str | list[str]] = []

    def insert(self, table: str, cols: Sequence[str], rows: list[tuple[Any, ...]], on_conflict: str = "") -> None:
        rows_table = self._rows(cols, rows)
        self.parts.append(f"INSERT INTO {table} ({', '.join(cols)}) SELECT * FROM {rows_table}{on_conflict}")

    def update(self, table: str, cols: Sequence[str], assignments: str, keys: Sequence[str],
               rows: Sequence[tuple[Any, ...]]) -> None:
        """UPDATE the rows matching each row's `keys`; keys[0] must lead an index of `table` (text)."""
        match = " AND ".join(f"t.{k} = u.{k}" for k in keys)
        rows_table = self._rows(cols, rows)
        # A function's row estimate is fixed (json_to_recordset: 100), so the generic plan joined it to a
        # sequential scan of the whole table once the table outgrew a few thousand rows: a cost per batch that
        # grew with the ledger. The leading key as an array (estimated at 10 elements) makes the plan look
        # the batch's rows up by index, whatever the table's size.
        lead = cols.index(keys[0])
        self.args.append(sorted({row[lead] for row in rows}))
        self.parts.append(f"UPDATE {table} t SET {assignments} FROM {rows_table} "
                          f"WHERE t.{keys[0]} = ANY(${len(self.args)}::text[]) AND {match}")

    def _rows(self, cols: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> str:
        self.args.append(_rows_json(cols, rows))
        return _recordset(cols, len(self.args))

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


# Rows go to PostgreSQL as one JSON array of objects per table: msgspec encodes them in C, where asyncpg's
# per-column arrays cost several Python-level type checks per element (loadtest.rows_encoding: a 30-item fee
# upload's insert took 0.5-0.6 ms of the client's CPU as arrays, 0.17-0.24 ms as JSON; PostgreSQL's no more).
# Decimals go as JSON numbers (exact: PostgreSQL reads them as numeric), datetimes and dates as ISO text.
_rows_encoder = msgspec.json.Encoder(decimal_format="number")


def _recordset(cols: Sequence[str], param: int) -> str:
    """The rows of JSON parameter `param` as a table `u`, each column typed (_PG_TYPES)."""
    types = ", ".join(f"{c} {_PG_TYPES.get(c, 'text')}" for c in cols)
    return f"json_to_recordset(${param}::json) AS u({types})"


def _rows_json(cols: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> str:
    return _rows_encoder.encode([dict(zip(cols, row, strict=True)) for row in rows]).decode()


def _bytea(value: bytes) -> str:
    """A bytea value as JSON text can carry it: PostgreSQL's hex input format (msgspec would write base64)."""
    return "\\x" + value.hex()


def _params(n: int) -> str:
    return ", ".join(f"${i}" for i in range(1, n + 1))


def _settlement_values(row: Settlement) -> tuple[Any, ...]:
    return tuple(row.amounts[c] if c in AMOUNT_FIELDS else getattr(row, c) for c in _SETL_COLS)
