"""PostgreSQL side of the settlement engine: load a batch's rows, write back its changes.

Both run inside the caller's transaction. Loading locks the visits, accumulators
and accounts of the batch's persons (FOR UPDATE), so two workers that briefly
own the same partition during a rebalance serialize instead of double-applying;
the loser then finds the msgids already processed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import asyncpg

from schemas.correction import Input2601
from schemas.internal import RoutedRequest
from schemas.transactions import correctable, infnos_loading
from services.policy.logic import accumulators_from_json, accumulators_to_json
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
_CORRECTION_COLS = ("omsgid", "msgid", "oinfno", "fixmedins_code", "undone", "output", "err_msg")
_ACC_COUNTERS = ("basic_paid", "outpatient_dedc_used", "outpatient_paid", "critical_base", "critical_paid",
                 "supplementary_paid", "assistance_paid")


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
            f"SELECT {', '.join(_SETL_COLS)}, EXISTS (SELECT 1 FROM settlement r WHERE r.orig_setl_id = s.setl_id)"
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
    if st.new_visits:
        await conn.executemany(
            f"INSERT INTO visit ({', '.join(_VISIT_COLS)}) VALUES ({_params(len(_VISIT_COLS))})",
            [tuple(_visit_value(st.visits[v], c) for c in _VISIT_COLS) for v in st.new_visits],
        )
    changed = st.changed_visits - set(st.new_visits)
    if changed:
        assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(_VISIT_MUTABLE, start=2))
        await conn.executemany(
            f"UPDATE visit SET {assignments} WHERE mdtrt_id = $1",
            [(v, *(_visit_value(st.visits[v], c) for c in _VISIT_MUTABLE)) for v in sorted(changed)],
        )
    if st.new_fees:
        await conn.executemany(
            f"INSERT INTO fee_item ({', '.join(_FEE_COLS)}) VALUES ({_params(len(_FEE_COLS))})"
            " ON CONFLICT (mdtrt_id, feedetl_sn) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in _FEE_COLS[2:]),
            [tuple(getattr(st.fees[m][sn], c) for c in _FEE_COLS) for m, sn in st.new_fees],
        )
    if st.cancelled_fees:
        await conn.executemany(
            "UPDATE fee_item SET cancelled = true WHERE mdtrt_id = $1 AND feedetl_sn = $2", st.cancelled_fees
        )
    if st.unsettled_by:  # a reversed part's items are not settled any more (loaded or not)
        await conn.executemany("UPDATE fee_item SET setl_id = NULL WHERE mdtrt_id = $1 AND setl_id = $2",
                               st.unsettled_by)
    if st.settled_fees:
        await conn.executemany(
            "UPDATE fee_item SET setl_id = $3 WHERE mdtrt_id = $1 AND feedetl_sn = $2",
            [(*key, setl_id) for key, setl_id in sorted(st.settled_fees.items())],
        )
    if st.new_settlements:
        await conn.executemany(
            f"INSERT INTO settlement ({', '.join(_SETL_COLS)}) VALUES ({_params(len(_SETL_COLS))})",
            [_settlement_values(st.settlements[s]) for s in st.new_settlements],
        )
        # The month-to-date aggregates, in this transaction (shard migration 0002.ledger-daily).
        await conn.execute("SELECT ledger_daily_add($1::text[])", list(st.new_settlements))
    if st.changed_accumulators:
        cols = ("psn_no", "acc_year", *_ACC_COUNTERS, "chronic_paid")
        rows = []
        for key in sorted(st.changed_accumulators):
            data = accumulators_to_json(st.accumulators[key])
            rows.append((*key, *(data[c] for c in _ACC_COUNTERS), json.dumps(data["chronic_paid"])))
        await conn.executemany(
            f"INSERT INTO accumulator ({', '.join(cols)}) VALUES ({_params(len(cols))})"
            " ON CONFLICT (psn_no, acc_year) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[2:]),
            rows,
        )
    if st.changed_accounts:
        await conn.executemany(
            "INSERT INTO account (psn_no, balc_fen) VALUES ($1, $2)"
            " ON CONFLICT (psn_no) DO UPDATE SET balc_fen = EXCLUDED.balc_fen",
            [(p, st.accounts[p]) for p in sorted(st.changed_accounts)],
        )
    if st.responses:
        await conn.executemany(
            "INSERT INTO processed_request (msgid, infno, fixmedins_code, infcode, response, mdtrt_id)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(msgid, *rest, st.request_visits.get(msgid)) for msgid, rest in st.responses.items()],
        )
    if st.new_corrections:
        await conn.executemany(
            f"INSERT INTO correction ({', '.join(_CORRECTION_COLS)}) VALUES ({_params(len(_CORRECTION_COLS))})",
            [tuple(getattr(st.corrections[o], c) for c in _CORRECTION_COLS) for o in st.new_corrections],
        )


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
