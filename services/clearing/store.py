"""PostgreSQL side of clearing: record rows into months and positions, close a month, recompute
positions from the ledger, deposits, outbox. Every function runs in the caller's transaction
unless it says otherwise.

Exactly once: `record_rows` inserts one `clearing_entry` per setl_id (ON CONFLICT DO NOTHING)
and adds to `clearing_position` only what that insert returned, in one transaction; the
consumer commits its offsets after the commit. A replayed or duplicated event finds its
entry and adds nothing; a crash before the commit leaves nothing.

Months: writers lock the months they assign to FOR SHARE (`resolve_months`); a close locks
its month FOR UPDATE, so it waits for writers in flight, and writers after it see the month
closed and move to the next open one. The closed month's entries and positions are frozen
(the triggers in clearing.sql refuse writes into a closed month as a second line of defence).

The ledger (`settlement`) lives in the shard databases, clearing in the hub (services/common/shards.py):
readers of ledger rows run one index-bound query per shard and join with the hub's entries in Python
(membership by `setl_id = ANY($1)`), never across databases.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from schemas.clearing import DepositAlert, DepositEvent
from schemas.event_views import ClearingEventView
from schemas.money import to_yuan
from services.clearing.logic import (
    AMOUNT_FIELDS,
    APPL_FIELDS,
    MANUAL,
    MONTHS_WALK_MAX,
    VISIT_TYPES,
    Adjustment,
    Amounts,
    ApplTotals,
    ClearingError,
    Deduction,
    LedgerRow,
    Position,
    PositionKey,
    RateKey,
    Row,
    RowScope,
    aggregate,
    assign_month,
    at_or_below_line,
    check_month,
    compact_month,
    compare_positions,
    deduction_amounts,
    deduction_positions,
    dedupe,
    drawdowns,
    merge,
    month_end,
    month_start,
    month_statement,
    next_month,
    positions_from_statement,
    rate_lines,
    reissued_positions,
    warning_line,
)
from services.common import audit
from services.common.response import SHANGHAI
from services.common.shards import ShardPools
from services.refdata.regions import classify_scope, province_of, region_of
from topics.catalog import ALERTS, DEPOSITS

CLOSE_LOCK_KEY = 0x78636C73  # "xcls": one close at a time
SWEEP_CHUNK_ROWS = 5_000
MEMBERSHIP_CHUNK_IDS = 10_000
OUTBOX_CHUNK_ROWS = 500
_encoder = msgspec.json.Encoder(decimal_format="number")

_ENTRY_COLS = ("setl_id", "kind", "setl_month", "clr_month", "fixmedins_code", "mdtrt_id", "insutype", "med_type",
               "scope", "insured_admdvs", "treating_admdvs", "insured_pool", "treating_pool", "insured_prov",
               "treating_prov", "setl_time", *AMOUNT_FIELDS, "source")
_ENTRY_TYPES = {"setl_time": "timestamp", **{f: "bigint" for f in AMOUNT_FIELDS}}
_POS_COLS = ("clr_month", "insured_pool", "treating_pool", "kind", "adjustment", "insured_prov", "treating_prov",
             "scope", "cnt", *AMOUNT_FIELDS)
_LEDGER_COLS = ("setl_id", "kind", "setl_time", "fixmedins_code", "mdtrt_id", "insutype", "med_type", "scope",
                "insured_admdvs", "treating_admdvs", "insured_pool", "treating_pool", *AMOUNT_FIELDS)


def now_text() -> str:
    return datetime.now(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")


# Rows from the stream and from the ledger ------------------------------------------------


def row_from_event(ev: ClearingEventView) -> Row:
    """Raises UnknownRegion for a region the table does not know, ClearingError for a broken row."""
    insured, treating = region_of(ev.insured_admdvs), region_of(ev.treating_admdvs)
    amounts = Amounts(ev.medfee_sumamt, ev.hifp_pay, ev.hifmi_pay, ev.hifob_pay, ev.maf_pay, ev.fund_pay_sumamt)
    return Row(
        setl_id=ev.setl_id, kind=ev.kind, setl_time=ev.setl_time, fixmedins_code=ev.fixmedins_code,
        mdtrt_id=ev.mdtrt_id, insutype=ev.insutype, med_type=ev.med_type, scope=ev.scope,
        insured_admdvs=ev.insured_admdvs, treating_admdvs=ev.treating_admdvs, insured_pool=insured.pool_admdvs,
        treating_pool=treating.pool_admdvs, insured_prov=insured.prov_admdvs, treating_prov=treating.prov_admdvs,
        amounts=amounts,
    ).checked()


def row_from_ledger(r: asyncpg.Record) -> Row:
    return Row(
        setl_id=r["setl_id"], kind=r["kind"], setl_time=r["setl_time"].strftime("%Y-%m-%d %H:%M:%S"),
        fixmedins_code=r["fixmedins_code"], mdtrt_id=r["mdtrt_id"], insutype=r["insutype"], med_type=r["med_type"],
        scope=r["scope"], insured_admdvs=r["insured_admdvs"], treating_admdvs=r["treating_admdvs"],
        insured_pool=r["insured_pool"], treating_pool=r["treating_pool"],
        insured_prov=province_of(r["insured_admdvs"]), treating_prov=province_of(r["treating_admdvs"]),
        amounts=Amounts.of(r),
    ).checked()


# Months ---------------------------------------------------------------------------------


async def resolve_months(conn: asyncpg.Connection, setl_months: Iterable[str]) -> dict[str, str]:
    """setl_month → the first open month at or after it, each target locked FOR SHARE until commit."""
    pending = {m: m for m in setl_months}
    states: dict[str, str] = {}
    resolved: dict[str, str] = {}
    for _ in range(MONTHS_WALK_MAX):
        need = sorted({c for c in pending.values() if c not in states})
        if need:
            await conn.execute(
                "INSERT INTO clearing_month (clr_month) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", need
            )
            rows = await conn.fetch(
                "SELECT clr_month, state FROM clearing_month WHERE clr_month = ANY($1::text[])"
                " ORDER BY clr_month FOR SHARE",
                need,
            )
            states.update({r["clr_month"]: r["state"] for r in rows})
        for setl_month, candidate in list(pending.items()):
            if states[candidate] == "open":
                resolved[setl_month] = candidate
                del pending[setl_month]
            else:
                pending[setl_month] = next_month(candidate)
        if not pending:
            return resolved
    raise ClearingError("no open month within 100 years")


async def closed_months(conn: asyncpg.Connection) -> set[str]:
    return {r[0] for r in await conn.fetch("SELECT clr_month FROM clearing_month WHERE state = 'closed'")}


async def month_state(conn: asyncpg.Connection, month: str) -> str:
    state = await conn.fetchval("SELECT state FROM clearing_month WHERE clr_month = $1", month)
    return state or "open"


# Recording --------------------------------------------------------------------------------


@dataclass
class Recorded:
    rows: list[tuple[Row, str]] = field(default_factory=list)  # newly recorded, with their month
    duplicates: int = 0


async def record_rows(conn: asyncpg.Connection, rows: Sequence[Row], source: str) -> Recorded:
    """Record non-local rows not seen before, assign their months, add them to the positions."""
    given = len(rows)
    rows = dedupe(rows)
    out = Recorded(duplicates=given)
    if not rows:
        return out
    seen = {r[0] for r in await conn.fetch(
        "SELECT setl_id FROM clearing_entry WHERE setl_id = ANY($1::text[])", [r.setl_id for r in rows])}
    fresh = [r for r in rows if r.setl_id not in seen]
    if not fresh:
        return out
    months = await resolve_months(conn, {r.setl_month for r in fresh})
    # One insert order for every writer (by setl_id), so two writers of overlapping rows never deadlock.
    assigned = sorted(((r, months[r.setl_month]) for r in fresh), key=lambda a: a[0].setl_id)
    columns: dict[str, list[Any]] = {c: [] for c in _ENTRY_COLS}
    for row, clr_month in assigned:
        values = {**_row_values(row), "clr_month": clr_month, "source": source}
        for c in _ENTRY_COLS:
            columns[c].append(values[c])
    unnest = ", ".join(f"${i}::{_ENTRY_TYPES.get(c, 'text')}[]" for i, c in enumerate(_ENTRY_COLS, 1))
    inserted = {r[0] for r in await conn.fetch(
        f"INSERT INTO clearing_entry ({', '.join(_ENTRY_COLS)}) SELECT * FROM unnest({unnest})"
        " ON CONFLICT (setl_id) DO NOTHING RETURNING setl_id",
        *(columns[c] for c in _ENTRY_COLS),
    )}
    out.rows = [(r, m) for r, m in assigned if r.setl_id in inserted]
    out.duplicates = given - len(out.rows)  # seen before, twice in the batch, or recorded by a concurrent writer
    await _add_positions(conn, aggregate(out.rows).values())
    return out


def _row_values(row: Row) -> dict[str, Any]:
    return {
        "setl_id": row.setl_id, "kind": row.kind, "setl_month": row.setl_month, "fixmedins_code": row.fixmedins_code,
        "mdtrt_id": row.mdtrt_id, "insutype": row.insutype, "med_type": row.med_type, "scope": row.scope,
        "insured_admdvs": row.insured_admdvs, "treating_admdvs": row.treating_admdvs,
        "insured_pool": row.insured_pool, "treating_pool": row.treating_pool, "insured_prov": row.insured_prov,
        "treating_prov": row.treating_prov,
        "setl_time": datetime.strptime(row.setl_time, "%Y-%m-%d %H:%M:%S"), **row.amounts.as_dict(),
    }


async def _add_positions(conn: asyncpg.Connection, deltas: Iterable[Position]) -> None:
    ordered = sorted(deltas, key=lambda p: p.key)  # one lock order for every writer
    if not ordered:
        return
    updates = ", ".join(f"{c} = clearing_position.{c} + EXCLUDED.{c}" for c in ("cnt", *AMOUNT_FIELDS))
    await conn.executemany(
        f"INSERT INTO clearing_position ({', '.join(_POS_COLS)}) VALUES ({_params(len(_POS_COLS))})"
        f" ON CONFLICT (clr_month, insured_pool, treating_pool, kind, adjustment) DO UPDATE SET {updates}",
        [_position_values(p) for p in ordered],
    )


def _position_values(p: Position) -> tuple[Any, ...]:
    k = p.key
    return (k.clr_month, k.insured_pool, k.treating_pool, k.kind, k.adjustment, p.insured_prov, p.treating_prov,
            p.scope, p.cnt, *(getattr(p.amounts, f) for f in AMOUNT_FIELDS))


def _params(n: int) -> str:
    return ", ".join(f"${i}" for i in range(1, n + 1))


async def recorded_months(conn: asyncpg.Connection, setl_ids: Sequence[str]) -> dict[str, str]:
    """setl_id → the clearing month of its entry, for the ids the clearing service has recorded (by
    primary-key lookups, a bounded array at a time)."""
    out: dict[str, str] = {}
    for i in range(0, len(setl_ids), MEMBERSHIP_CHUNK_IDS):
        out.update({r[0]: r[1] for r in await conn.fetch(
            "SELECT setl_id, clr_month FROM clearing_entry WHERE setl_id = ANY($1::text[])",
            list(setl_ids[i:i + MEMBERSHIP_CHUNK_IDS]))})
    return out


async def sweep(conn: asyncpg.Connection, shards: ShardPools, before: datetime | None = None) -> int:
    """Record non-local ledger rows the stream has not delivered (a lost event), each shard's oldest
    first: the shard's rows in chunks along (setl_time, setl_id), membership checked on the hub."""
    total = 0
    for _, shard in shards:
        after: tuple[datetime, str] | None = None
        while True:
            recs = await shard.fetch(
                f"SELECT {', '.join(_LEDGER_COLS)} FROM settlement"
                " WHERE scope <> 'local' AND ($1::timestamp IS NULL OR setl_time < $1)"
                " AND ($2::timestamp IS NULL OR (setl_time, setl_id) > ($2, $3::text))"
                " ORDER BY setl_time, setl_id LIMIT $4",
                before, after[0] if after else None, after[1] if after else None, SWEEP_CHUNK_ROWS,
            )
            if not recs:
                break
            seen = await recorded_months(conn, [r["setl_id"] for r in recs])
            missing = [row_from_ledger(r) for r in recs if r["setl_id"] not in seen]
            if missing:
                total += len((await record_rows(conn, missing, "sweep")).rows)
            if len(recs) < SWEEP_CHUNK_ROWS:
                break
            after = (recs[-1]["setl_time"], recs[-1]["setl_id"])
    return total


# Deductions (拒付) of confirmed judgements ------------------------------------------------------------

_DED_COLS = ("jr_id", "clr_month", "insured_pool", "treating_pool", "insured_prov", "treating_prov", "scope",
             *AMOUNT_FIELDS)


def deduction_of(jr_id: str, clr_month: str, insured_admdvs: str, treating_admdvs: str, suspect_amt: int
                 ) -> Deduction | None:
    """A judgement's deduction in `clr_month`; None when its care is local (one pooling region owes itself
    nothing). Raises UnknownRegion for a region the table does not know."""
    insured, treating = region_of(insured_admdvs), region_of(treating_admdvs)
    if insured.pool_admdvs == treating.pool_admdvs:
        return None
    return Deduction(jr_id, clr_month, insured.pool_admdvs, treating.pool_admdvs, insured.prov_admdvs,
                     treating.prov_admdvs, classify_scope(insured_admdvs, treating_admdvs),
                     deduction_amounts(suspect_amt)).checked()


async def record_deduction(conn: asyncpg.Connection, d: Deduction) -> None:
    """The deduction's entry (hub 0010: its trigger refuses a closed month, waiting for a close in flight)."""
    values = {"jr_id": d.jr_id, "clr_month": d.clr_month, "insured_pool": d.insured_pool,
              "treating_pool": d.treating_pool, "insured_prov": d.insured_prov, "treating_prov": d.treating_prov,
              "scope": d.scope, **d.amounts.as_dict()}
    await conn.execute(f"INSERT INTO clearing_deduction ({', '.join(_DED_COLS)}) VALUES ({_params(len(_DED_COLS))})",
                       *(values[c] for c in _DED_COLS))


async def recorded_deductions(conn: asyncpg.Connection, month: str) -> dict[PositionKey, Position]:
    """The streaming side of a month's deductions: the entries recorded when the judgements were confirmed."""
    rows = await conn.fetch(f"SELECT {', '.join(_DED_COLS)} FROM clearing_deduction WHERE clr_month = $1", month)
    return deduction_positions(
        Deduction(r["jr_id"], r["clr_month"], r["insured_pool"], r["treating_pool"], r["insured_prov"],
                  r["treating_prov"], r["scope"], Amounts.of(r)) for r in rows)


async def judged_deductions(conn: asyncpg.Connection, month: str) -> dict[PositionKey, Position]:
    """The batch side: a month's deductions recomputed from the `judgement` rows alone (confirmed, with
    that deduct_month)."""
    rows = await conn.fetch(
        "SELECT jr_id, insured_admdvs, treating_admdvs, suspect_amt FROM judgement"
        " WHERE status = 'confirmed' AND deduct_month = $1", compact_month(month))
    found = (deduction_of(r["jr_id"], month, r["insured_admdvs"], r["treating_admdvs"], r["suspect_amt"])
             for r in rows)
    return deduction_positions(d for d in found if d is not None)


# Reading positions ---------------------------------------------------------------------------


def _position(r: asyncpg.Record) -> Position:
    key = PositionKey(r["clr_month"], r["insured_pool"], r["treating_pool"], r["kind"], r["adjustment"])
    return Position(key, r["insured_prov"], r["treating_prov"], r["scope"], r["cnt"], Amounts.of(r))


async def positions(conn: asyncpg.Connection, month: str) -> dict[PositionKey, Position]:
    """The streaming side: running positions of a month, its deductions included."""
    rows = await conn.fetch(f"SELECT {', '.join(_POS_COLS)} FROM clearing_position WHERE clr_month = $1", month)
    return merge({p.key: p for p in map(_position, rows)}, await recorded_deductions(conn, month))


async def entry_positions(conn: asyncpg.Connection, month: str) -> dict[PositionKey, Position]:
    """The entries of a month, summed (must equal `positions`: the pair check of STYLE 11)."""
    rows = await conn.fetch(
        "SELECT clr_month, insured_pool, treating_pool, kind, clr_month <> setl_month AS adjustment,"
        " min(insured_prov) AS insured_prov, min(treating_prov) AS treating_prov, min(scope) AS scope,"
        " count(*) AS cnt, " + ", ".join(f"sum({f})::bigint AS {f}" for f in AMOUNT_FIELDS) +
        " FROM clearing_entry WHERE clr_month = $1 GROUP BY 1, 2, 3, 4, 5",
        month,
    )
    return merge({p.key: p for p in map(_position, rows)}, await recorded_deductions(conn, month))


@dataclass
class Batch:
    positions: dict[PositionKey, Position]
    unrecorded: int  # ledger rows of the month the clearing service has not recorded yet
    misassigned: int  # recorded rows whose month differs from the rule's


async def batch_positions(conn: asyncpg.Connection, shards: ShardPools, month: str, *,
                          closing: bool = False) -> Batch:
    """The batch side: a month's positions recomputed from the ledger (`settlement`, every shard) alone,
    with the month rule of `logic.assign_month`; clearing_entry only tells which closed month holds a row.
    `closing`: as the month will be once closed (rows not recorded yet belong to the next month)."""
    check_month(month)
    closed = await closed_months(conn)
    view = closed | {month} if closing else closed
    # Only a row of the closed months right before `month` (no open month between) can walk into it.
    run: list[str] = []
    m = month
    while len(run) < MONTHS_WALK_MAX and (m := _previous_month(m)) in closed:
        run.append(m)
    since = month_start(run[-1]) if run else month_start(month)
    assigned = []
    unrecorded = misassigned = 0
    for _, shard in shards:
        recs = await shard.fetch(
            f"SELECT {', '.join(_LEDGER_COLS)} FROM settlement"
            " WHERE scope <> 'local' AND setl_time >= $1 AND setl_time < $2",
            since, month_end(month),
        )
        members = await recorded_months(conn, [r["setl_id"] for r in recs])
        for r in recs:
            row = row_from_ledger(r)
            member_of = members.get(row.setl_id)
            target = assign_month(row.setl_month, view, member_of)
            if target != month:
                continue
            assigned.append((row, target))
            if member_of is None:
                unrecorded += 1
            elif member_of != target:
                misassigned += 1
    return Batch(merge(aggregate(assigned), await judged_deductions(conn, month)), unrecorded, misassigned)


def _previous_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:])
    return f"{year - 1}-12" if mon == 1 else f"{year}-{mon - 1:02d}"


async def verify(conn: asyncpg.Connection, shards: ShardPools, month: str) -> list[str]:
    """Streaming vs batch vs entries (vs the frozen statement, once closed). Empty: agree to the fen."""
    stream = await positions(conn, month)
    problems = compare_positions(await entry_positions(conn, month), stream, expected_name="entries",
                                 actual_name="positions")
    batch = await batch_positions(conn, shards, month)
    problems += compare_positions(batch.positions, stream, expected_name="ledger", actual_name="positions")
    if batch.unrecorded:
        problems.append(f"{batch.unrecorded} ledger rows of {month} not recorded by the clearing service yet")
    if batch.misassigned:
        problems.append(f"{batch.misassigned} rows recorded in a month other than the rule's")
    stmt = await statement(conn, month)
    if stmt is not None:
        # The latest version: the month's own positions as frozen at the close, plus the operator adjustments
        # it lists — exactly those recorded up to its version.
        listed = _statement_positions(stmt["body"])
        frozen = {p.key: p for p in listed if p.key.kind != MANUAL}
        problems += compare_positions(frozen, stream, expected_name="statement", actual_name="positions")
        manual = {p.key: p for p in listed if p.key.kind == MANUAL}
        recorded = {p.key: p for p in reissued_positions(month, [], await adjustments(conn, month, stmt["version"]))}
        problems += compare_positions(recorded, manual, expected_name="adjustments", actual_name="statement")
    return problems


# Close ----------------------------------------------------------------------------------------


@dataclass
class CloseResult:
    clr_month: str
    version: int
    closed_at: str
    digest: str
    entry_cnt: int
    fund_pay_sumamt: int
    already_closed: bool
    swept: int = 0
    drawdowns: dict[str, int] = field(default_factory=dict)


def canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


async def close_month(pool: asyncpg.Pool, shards: ShardPools, month: str, *, operator: str) -> CloseResult:
    """Freeze a month: idempotent (closing a closed month returns its statement). Refuses — raising
    ClearingError and changing nothing — when the positions disagree with the entries or the ledger.
    Audited (`month.close`, one row per call) in the same transaction."""
    check_month(month)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CLOSE_LOCK_KEY)
        await conn.execute("INSERT INTO clearing_month (clr_month) VALUES ($1) ON CONFLICT DO NOTHING", month)
        # Waits for every writer holding the month FOR SHARE; later writers see it closed.
        state = await conn.fetchrow("SELECT state, stmt_version FROM clearing_month WHERE clr_month = $1 FOR UPDATE",
                                    month)
        if state["state"] == "closed":
            stmt = await statement(conn, month, state["stmt_version"])
            if stmt is None:
                raise ClearingError(f"{month} is closed but has no statement")
            closed = {"state": "closed", "stmt_version": stmt["version"], "digest": stmt["digest"]}
            await audit.record(conn, operator, "month.close", month, before=closed, after=closed)
            return CloseResult(month, stmt["version"], stmt["closed_at"], stmt["digest"], stmt["entry_cnt"],
                               stmt["fund_pay_sumamt"], already_closed=True)
        swept = await sweep(conn, shards, month_end(month))
        stream = await positions(conn, month)
        problems = compare_positions(await entry_positions(conn, month), stream, expected_name="entries",
                                     actual_name="positions")
        batch = await batch_positions(conn, shards, month, closing=True)
        problems += compare_positions(batch.positions, stream, expected_name="ledger", actual_name="positions")
        if batch.misassigned:
            problems.append(f"{batch.misassigned} rows recorded in a month other than the rule's")
        if problems:
            raise ClearingError(f"{month} not closed: " + " | ".join(problems[:20]))
        version = 1
        closed_at = now_text()
        body = month_statement(month, version, closed_at, stream.values())
        digest = hashlib.sha256(canonical(body)).hexdigest()
        total = body["total"]["fund_pay_sumamt"]  # type: ignore[index]
        await conn.execute(
            "INSERT INTO clearing_statement (clr_month, version, closed_at, entry_cnt, fund_pay_sumamt, body, digest)"
            " VALUES ($1, $2, now(), $3, $4, $5::jsonb, $6)",
            month, version, body["entry_cnt"], total, canonical(body).decode(), digest,
        )
        await conn.execute(
            "UPDATE clearing_month SET state = 'closed', closed_at = now(), stmt_version = $2 WHERE clr_month = $1",
            month, version,
        )
        drawn = drawdowns(stream.values())
        for prov, amount in drawn.items():
            await deposit_move(conn, f"clearing-{month}-{prov}", prov, "drawdown", -amount, month,
                               f"clearing of {month}")
        await audit.record(conn, operator, "month.close", month, before={"state": state["state"]}, after={
            "state": "closed", "stmt_version": version, "digest": digest, "entry_cnt": body["entry_cnt"],
            "fund_pay_sumamt_fen": total, "swept": swept, "drawdowns_fen": drawn})
        return CloseResult(month, version, closed_at, digest, int(body["entry_cnt"]), int(total),  # type: ignore[call-overload]
                           already_closed=False, swept=swept, drawdowns=drawn)


@dataclass
class ReissueResult:
    clr_month: str
    version: int
    digest: str
    fund_pay_sumamt: int
    previous_version: int
    duplicate: bool  # the ref was recorded before: nothing changed
    drawdowns: dict[str, int] = field(default_factory=dict)  # what this version drew on top of the last


_ADJ_COLS = ("adj_ref", "insured_pool", "treating_pool", "insured_prov", "treating_prov", "scope", *AMOUNT_FIELDS,
             "reason", "stmt_version")


def _adjustment(r: asyncpg.Record) -> Adjustment:
    return Adjustment(r["adj_ref"], r["insured_pool"], r["treating_pool"], r["insured_prov"], r["treating_prov"],
                      r["scope"], Amounts.of(r), r["reason"], r["stmt_version"])


async def adjustments(conn: asyncpg.Connection, month: str, up_to_version: int | None = None) -> list[Adjustment]:
    """The operator adjustments of a month (those a statement version includes), in version order."""
    return [_adjustment(r) for r in await conn.fetch(
        f"SELECT {', '.join(_ADJ_COLS)} FROM clearing_adjustment WHERE clr_month = $1"
        " AND ($2::int IS NULL OR stmt_version <= $2) ORDER BY stmt_version", month, up_to_version)]


async def reissue_statement(conn: asyncpg.Connection, month: str, ref: str, insured_pool: str, treating_pool: str,
                            amounts: Amounts, reason: str, *, operator: str) -> ReissueResult:
    """Adjust a closed month (one pooling-region pair's amounts, with a reason) and re-issue its statement as
    the next version, in one transaction: the adjustment, the new version (older ones stay, frozen), the
    deposits' draw-down of the difference, the audit row (`statement.reissue`). `ref` is the idempotency
    key: the same ref again changes nothing; with other values it is refused."""
    check_month(month)
    insured, treating = region_of(insured_pool), region_of(treating_pool)
    if insured.pool_admdvs != insured_pool or treating.pool_admdvs != treating_pool:
        raise ClearingError("an adjustment names two pooling regions (统筹区)")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CLOSE_LOCK_KEY)
        state = await conn.fetchrow(
            "SELECT state, stmt_version FROM clearing_month WHERE clr_month = $1 FOR UPDATE", month)
        if state is None or state["state"] != "closed":
            raise ClearingError(f"{month} is not closed: only a closed month's statement is re-issued")
        seen = await conn.fetchrow(f"SELECT clr_month, {', '.join(_ADJ_COLS)} FROM clearing_adjustment"
                                   " WHERE adj_ref = $1", ref)
        if seen is not None:
            done = _adjustment(seen)
            if (seen["clr_month"], done.insured_pool, done.treating_pool, done.amounts, done.reason) != (
                    month, insured_pool, treating_pool, amounts, reason):
                raise ClearingError(f"the ref {ref} was used for another adjustment")
            stmt = await statement(conn, month, done.version)
            assert stmt is not None
            await audit.record(conn, operator, "statement.reissue", month, before=None, after={
                "adj_ref": ref, "stmt_version": done.version, "duplicate": True})
            return ReissueResult(month, done.version, stmt["digest"], stmt["fund_pay_sumamt"], done.version - 1,
                                 duplicate=True)
        previous = await statement(conn, month, state["stmt_version"])
        if previous is None:
            raise ClearingError(f"{month} is closed but has no statement")
        version = int(previous["version"]) + 1
        adj = Adjustment(ref, insured_pool, treating_pool, insured.prov_admdvs, treating.prov_admdvs,
                         classify_scope(insured_pool, treating_pool), amounts, reason, version).checked()
        await conn.execute(
            f"INSERT INTO clearing_adjustment (clr_month, {', '.join(_ADJ_COLS)}, created_by)"
            f" VALUES ({_params(len(_ADJ_COLS) + 2)})",
            month, ref, insured_pool, treating_pool, adj.insured_prov, adj.treating_prov, adj.scope,
            *(getattr(amounts, f) for f in AMOUNT_FIELDS), reason, version, operator)
        included = await adjustments(conn, month)
        before = positions_from_statement(previous["body"])
        after = reissued_positions(month, before, included)
        body = month_statement(month, version, previous["body"]["closed_at"], after,
                               [a.as_json() for a in included])
        digest = hashlib.sha256(canonical(body)).hexdigest()
        total = int(body["total"]["fund_pay_sumamt"])  # type: ignore[index]
        await conn.execute(
            "INSERT INTO clearing_statement (clr_month, version, closed_at, entry_cnt, fund_pay_sumamt, body, digest,"
            " issued_by, reason) SELECT $1, $2, closed_at, $3, $4, $5::jsonb, $6, $7, $8 FROM clearing_month"
            " WHERE clr_month = $1",
            month, version, body["entry_cnt"], total, canonical(body).decode(), digest, operator, reason)
        await conn.execute("UPDATE clearing_month SET stmt_version = $2 WHERE clr_month = $1", month, version)
        old, new = drawdowns(before), drawdowns(after)
        extra = {p: new.get(p, 0) - old.get(p, 0) for p in sorted(set(old) | set(new))}
        extra = {p: v for p, v in extra.items() if v}
        for prov, amount in extra.items():
            await deposit_move(conn, f"clearing-{month}-{prov}-v{version}", prov, "drawdown", -amount, month,
                               f"clearing of {month}, statement version {version}")
        await audit.record(conn, operator, "statement.reissue", month, before={
            "stmt_version": previous["version"], "digest": previous["digest"],
            "fund_pay_sumamt_fen": previous["fund_pay_sumamt"]}, after={
            "stmt_version": version, "digest": digest, "fund_pay_sumamt_fen": total, "adj_ref": ref,
            "pair": f"{insured_pool}->{treating_pool}", "amounts_fen": amounts.as_dict(), "drawdowns_fen": extra})
        return ReissueResult(month, version, digest, total, int(previous["version"]), duplicate=False,
                             drawdowns=extra)


async def statement_versions(conn: asyncpg.Connection, month: str) -> list[asyncpg.Record]:
    """Every version of a month's statement, oldest first (never a body)."""
    return list(await conn.fetch(
        "SELECT version, to_char(issued_at AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS') AS issued_at,"
        " issued_by, reason, entry_cnt, fund_pay_sumamt, digest FROM clearing_statement WHERE clr_month = $1"
        " ORDER BY version", month))


async def statement(conn: asyncpg.Connection, month: str, version: int | None = None) -> dict[str, Any] | None:
    """A stored statement (the latest version unless asked), body decoded."""
    r = await conn.fetchrow(
        "SELECT clr_month, version, to_char(closed_at AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS')"
        " AS closed_at, entry_cnt, fund_pay_sumamt, body::text AS body, digest FROM clearing_statement"
        " WHERE clr_month = $1 AND ($2::int IS NULL OR version = $2) ORDER BY version DESC LIMIT 1",
        month, version,
    )
    if r is None:
        return None
    out = dict(r)
    out["body"] = json.loads(r["body"])
    if hashlib.sha256(canonical(out["body"])).hexdigest() != r["digest"]:
        raise ClearingError(f"the statement of {month} does not match its digest")
    return out


def _statement_positions(body: dict[str, Any]) -> list[Position]:
    return positions_from_statement(body)


# Reconciliation queries (3201 / 3202 / 3203 / 3260) ------------------------------------------------


async def ledger_rows(shards: ShardPools, fixmedins_code: str, begin: date, end: date, *,
                      insutype: str | None = None, clr_type: str | None = None,
                      setl_optins: str | None = None) -> list[LedgerRow]:
    """A hospital's ledger rows with setl_time on days begin..end (a reversal on its own day), from
    every shard (a hospital treats persons of every province), in (setl_time, setl_id) order."""
    recs = await shards.fetch(
        "SELECT setl_id, kind, medfee_sumamt, fund_pay_sumamt, acct_pay, psn_cash_pay, setl_time FROM settlement"
        " WHERE fixmedins_code = $1 AND setl_time >= $2 AND setl_time < $3"
        " AND ($4::text IS NULL OR insutype = $4) AND ($5::text IS NULL OR med_type = $5)"
        " AND ($6::text IS NULL OR clr_optins = $6)",
        fixmedins_code, _day(begin), _day(end + timedelta(days=1)), insutype, clr_type, setl_optins,
    )
    recs.sort(key=lambda r: (r["setl_time"], r["setl_id"]))
    return [LedgerRow(**{k: v for k, v in r.items() if k != "setl_time"}) for r in recs]


def _day(d: date) -> datetime:
    return datetime(d.year, d.month, d.day)


async def application_totals(shards: ShardPools, fixmedins_code: str, clr_type: str, begin: date,
                             end: date) -> ApplTotals:
    sums = dict.fromkeys(APPL_FIELDS, 0)
    for r in await shards.fetch(
        "SELECT coalesce(sum(CASE WHEN kind = 'settle' THEN 1 ELSE -1 END), 0)::bigint AS psntime,"
        " coalesce(sum(medfee_sumamt), 0)::bigint AS medfee_sumamt,"
        " coalesce(sum(inscp_scp_amt), 0)::bigint AS med_sumfee,"
        " coalesce(sum(fund_pay_sumamt), 0)::bigint AS fund_appy_sum,"
        " coalesce(sum(psn_cash_pay), 0)::bigint AS cash_payamt, coalesce(sum(acct_pay), 0)::bigint AS acct_pay"
        " FROM settlement WHERE fixmedins_code = $1 AND med_type = $2 AND setl_time >= $3 AND setl_time < $4",
        fixmedins_code, clr_type, _day(begin), _day(end + timedelta(days=1)),
    ):
        for k in sums:
            sums[k] += r[k]
    return ApplTotals(**sums)


def _scope_sql(scope: RowScope) -> tuple[str, str]:
    """The column and value that select a sender's rows (both tables carry them)."""
    if scope.treating_pool is not None:
        return "treating_pool", scope.treating_pool
    return "fixmedins_code", str(scope.fixmedins_code)


async def month_details(conn: asyncpg.Connection, month: str, scope: RowScope, offset: int | None = None,
                        limit: int | None = None) -> tuple[int, list[asyncpg.Record]]:
    """A closed month's clearing rows of a hospital, or of every institution of an agency's pooling region:
    their count and the page asked for, in (setl_time, setl_id) order."""
    column, value = _scope_sql(scope)
    total = await conn.fetchval(
        f"SELECT count(*) FROM clearing_entry WHERE clr_month = $1 AND {column} = $2", month, value)
    recs = await conn.fetch(
        f"SELECT * FROM clearing_entry WHERE clr_month = $1 AND {column} = $2 ORDER BY setl_time, setl_id"
        " OFFSET $3 LIMIT $4",
        month, value, offset or 0, limit,
    )
    return total, recs


async def month_rows(conn: asyncpg.Connection, month: str, scope: RowScope, setl_ids: Sequence[str]
                     ) -> dict[str, asyncpg.Record]:
    """The rows among `setl_ids` that are clearing rows of the month in the sender's scope."""
    column, value = _scope_sql(scope)
    return {r["setl_id"]: r for r in await conn.fetch(
        f"SELECT setl_id, fixmedins_code, treating_pool, medfee_sumamt, fund_pay_sumamt FROM clearing_entry"
        f" WHERE setl_id = ANY($1::text[]) AND clr_month = $2 AND {column} = $3", list(setl_ids), month, value)}


async def confirm_rows(conn: asyncpg.Connection, otransid: str, month: str, rows: Sequence[tuple[Any, ...]]
                       ) -> list[asyncpg.Record]:
    """Record (setl_id, fixmedins_code, treating_pool, cnfm_flag, medfee_sumamt, fund_pay_sumamt) rows for batch
    `otransid`; a row another live batch holds is left as it is. Returns the rows this batch recorded."""
    return list(await conn.fetch(
        "INSERT INTO clearing_confirmed_row (setl_id, fixmedins_code, treating_pool, cnfm_flag, medfee_sumamt,"
        " fund_pay_sumamt, clr_month, otransid)"
        " SELECT s, f, p, c, m, u, $7, $8 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],"
        " $6::bigint[]) AS t (s, f, p, c, m, u)"
        " ORDER BY s ON CONFLICT (setl_id) DO NOTHING RETURNING setl_id, cnfm_flag",
        *(list(col) for col in zip(*rows, strict=True)), month, otransid,
    ))


async def month_confirmed(conn: asyncpg.Connection, month: str, scope: RowScope) -> tuple[int, int]:
    """(rows confirmed, rows disputed) of the month in the sender's scope, by live batches of anyone."""
    column, value = _scope_sql(scope)
    r = await conn.fetchrow(
        f"SELECT count(*) FILTER (WHERE cnfm_flag = '1') AS cnfm, count(*) FILTER (WHERE cnfm_flag = '0') AS dspt"
        f" FROM clearing_confirmed_row WHERE clr_month = $1 AND {column} = $2", month, value)
    return int(r["cnfm"]), int(r["dspt"])


# Deposits ---------------------------------------------------------------------------------------


@dataclass
class DepositMove:
    txn_id: str
    insured_prov: str
    amount_fen: int
    balance_fen: int
    warning_line_fen: int
    alert: bool
    duplicate: bool


async def cleared_history(conn: asyncpg.Connection, prov: str) -> list[int]:
    """What each closed month's clearing drew (positive: paid out), oldest first."""
    return [-r[0] for r in await conn.fetch(  # a re-issued statement adds a month's second draw-down: one sum
        "SELECT sum(amount_fen)::bigint FROM clearing_deposit_txn WHERE insured_prov = $1 AND kind = 'drawdown'"
        " GROUP BY clr_month ORDER BY clr_month", prov)]


async def current_line(conn: asyncpg.Connection, prov: str) -> int:
    override = await conn.fetchval("SELECT warning_line_fen FROM clearing_deposit WHERE insured_prov = $1", prov)
    return warning_line(override, await cleared_history(conn, prov))


async def deposit_move(conn: asyncpg.Connection, txn_id: str, prov: str, kind: str, amount_fen: int,
                       clr_month: str | None, memo: str) -> DepositMove:
    """Apply one movement once (txn_id is the idempotency key); queue its event, and an alert when the
    balance ends at or below the warning line."""
    if province_of(prov) != prov:
        raise ValueError("deposits are kept per province (XX0000)")
    await conn.execute("INSERT INTO clearing_deposit (insured_prov) VALUES ($1) ON CONFLICT DO NOTHING", prov)
    balance = await conn.fetchval(
        "SELECT balance_fen FROM clearing_deposit WHERE insured_prov = $1 FOR UPDATE", prov)
    seen = await conn.fetchrow("SELECT * FROM clearing_deposit_txn WHERE txn_id = $1", txn_id)
    if seen is not None:
        if (seen["insured_prov"], seen["kind"], seen["amount_fen"]) != (prov, kind, amount_fen):
            raise ValueError("txn_id already used for another movement")
        return DepositMove(txn_id, prov, amount_fen, seen["balance_after_fen"], await current_line(conn, prov),
                           alert=False, duplicate=True)
    balance += amount_fen
    await conn.execute(
        "INSERT INTO clearing_deposit_txn (txn_id, insured_prov, kind, amount_fen, clr_month, balance_after_fen, memo)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        txn_id, prov, kind, amount_fen, clr_month, balance, memo,
    )
    await conn.execute("UPDATE clearing_deposit SET balance_fen = $2, updated_at = now() WHERE insured_prov = $1",
                       prov, balance)
    line = await current_line(conn, prov)
    at = now_text()
    event = DepositEvent(txn_id=txn_id, insured_prov=prov, kind=kind, amount=to_yuan(amount_fen),  # type: ignore[arg-type]
                         balance=to_yuan(balance), warning_line=to_yuan(line), clr_month=clr_month, at=at)
    await outbox_add(conn, f"deposit-{txn_id}", DEPOSITS.name, prov.encode(), _encoder.encode(event))
    alert = at_or_below_line(balance, line)
    if alert:
        warning = DepositAlert(alert_id=f"deposit-low-{txn_id}", insured_prov=prov, balance=to_yuan(balance),
                               warning_line=to_yuan(line), txn_id=txn_id, at=at)
        await outbox_add(conn, warning.alert_id, ALERTS.name, prov.encode(), _encoder.encode(warning))
    return DepositMove(txn_id, prov, amount_fen, balance, line, alert=alert, duplicate=False)


async def set_warning_line(conn: asyncpg.Connection, prov: str, line_fen: int | None) -> None:
    if province_of(prov) != prov:
        raise ValueError("deposits are kept per province (XX0000)")
    await conn.execute(
        "INSERT INTO clearing_deposit (insured_prov, warning_line_fen) VALUES ($1, $2)"
        " ON CONFLICT (insured_prov) DO UPDATE SET warning_line_fen = EXCLUDED.warning_line_fen, updated_at = now()",
        prov, line_fen,
    )


async def deposits(conn: asyncpg.Connection) -> list[tuple[str, int, int]]:
    """(province, balance, warning line) for every province with a deposit account."""
    out = []
    for r in await conn.fetch("SELECT insured_prov, balance_fen FROM clearing_deposit ORDER BY insured_prov"):
        out.append((r["insured_prov"], r["balance_fen"], await current_line(conn, r["insured_prov"])))
    return out


# Outbox ---------------------------------------------------------------------------------------------


_OUTBOX_INSERT = ("INSERT INTO clearing_outbox (event_id, topic, key, value) VALUES ($1, $2, $3, $4)"
                  " ON CONFLICT (event_id) DO NOTHING")


async def outbox_add(conn: asyncpg.Connection, event_id: str, topic: str, key: bytes | None, value: bytes) -> None:
    await conn.execute(_OUTBOX_INSERT, event_id, topic, key, value)


async def outbox_add_many(conn: asyncpg.Connection, events: Sequence[tuple[str, str, bytes | None, bytes]]) -> None:
    """Many (event_id, topic, key, value) at once (a file of manual claims)."""
    await conn.executemany(_OUTBOX_INSERT, events)


async def publish_outbox(pool: asyncpg.Pool, send: Any, flush: Any = None) -> int:
    """Publish pending events (`send(topic, key, value)` awaits the broker's ack — or only queues the
    record when `flush()` awaits every ack of the chunk), then mark them.
    Rows are locked while they are sent, so two publishers never send the same row at once; a crash
    between send and mark sends a row again (consumers dedupe by event_id / alert_id / txn_id / claim_id)."""
    sent = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            recs = await conn.fetch(
                "SELECT event_id, topic, key, value FROM clearing_outbox WHERE published_at IS NULL"
                " ORDER BY created_at, event_id LIMIT $1 FOR UPDATE SKIP LOCKED",
                OUTBOX_CHUNK_ROWS,
            )
            if not recs:
                return sent
            for r in recs:
                await send(r["topic"], bytes(r["key"]) if r["key"] is not None else None, bytes(r["value"]))
            if flush is not None:
                await flush()
            await conn.execute("UPDATE clearing_outbox SET published_at = now() WHERE event_id = ANY($1::text[])",
                               [r["event_id"] for r in recs])
            sent += len(recs)
        if len(recs) < OUTBOX_CHUNK_ROWS:
            return sent


# Gauges -----------------------------------------------------------------------------------------------


async def province_positions(conn: asyncpg.Connection, month: str) -> list[asyncpg.Record]:
    """A month's net amounts per province pair, its deductions included."""
    amounts = ", ".join(AMOUNT_FIELDS)
    return await conn.fetch(
        "SELECT insured_prov, treating_prov, " + ", ".join(f"sum({f})::bigint AS {f}" for f in AMOUNT_FIELDS) +
        f" FROM (SELECT insured_prov, treating_prov, {amounts} FROM clearing_position WHERE clr_month = $1"
        f" UNION ALL SELECT insured_prov, treating_prov, {amounts} FROM clearing_deduction WHERE clr_month = $1) AS p"
        " GROUP BY 1, 2 ORDER BY 1, 2", month)


async def stored_response(conn: asyncpg.Connection, msgid: str) -> bytes | None:
    """The answer already given to a 32xx msgid, byte for byte (None: not answered yet)."""
    stored = await conn.fetchval("SELECT response FROM clearing_request WHERE msgid = $1", msgid)
    return bytes(stored) if stored is not None else None


async def store_response(conn: asyncpg.Connection, msgid: str, infno: str, fixmedins_code: str, infcode: int,
                         response: bytes) -> None:
    """A plain INSERT: a concurrent answer to the same msgid is a unique violation, not a second answer."""
    await conn.execute(
        "INSERT INTO clearing_request (msgid, infno, fixmedins_code, infcode, response) VALUES ($1, $2, $3, $4, $5)",
        msgid, infno, fixmedins_code, infcode, response,
    )


async def insert_manual_claims(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """Insert manual claims (columns in the order below); the claim_ids actually inserted (new ones)."""
    inserted = await conn.fetch(
        "INSERT INTO manual_claim (claim_id, psn_no, insured_admdvs, treating_admdvs, insured_prov,"
        " treating_prov, scope, fixmedins_code, med_type, visit_type, begntime, endtime, medfee_sumamt,"
        " fund_pay_sumamt, reason, reason_dscr, claim_time)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
        " $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamp[], $12::timestamp[],"
        " $13::bigint[], $14::bigint[], $15::text[], $16::text[], $17::timestamp[])"
        " ON CONFLICT (claim_id) DO NOTHING RETURNING claim_id",
        *(list(col) for col in zip(*rows, strict=True)),
    )
    return [r[0] for r in inserted]


def _window(begin: date, end: date) -> tuple[datetime, datetime]:
    return datetime(begin.year, begin.month, begin.day), datetime(end.year, end.month, end.day) + timedelta(1)


async def _manual_counts(conn: asyncpg.Connection, start: datetime, stop: datetime) -> dict[RateKey, int]:
    manual: dict[RateKey, int] = {}
    for r in await conn.fetch(
        "SELECT insured_prov, treating_prov, scope, visit_type, count(*) AS n FROM manual_claim"
        " WHERE endtime >= $1 AND endtime < $2 GROUP BY 1, 2, 3, 4", start, stop,
    ):
        key = RateKey(r["insured_prov"], r["treating_prov"], r["scope"], r["visit_type"])
        manual[key] = manual.get(key, 0) + r["n"]
    return manual


def _rate_dicts(direct: dict[RateKey, int], manual: dict[RateKey, int]) -> list[dict[str, Any]]:
    return [{**asdict(line.key), "direct": line.direct, "manual": line.manual, "rate": line.rate}
            for line in rate_lines(direct, manual)]


def _rate_key(insured: str, treating: str, scope: str, med_type: str) -> RateKey:
    return RateKey(province_of(insured), province_of(treating), scope, VISIT_TYPES.get(med_type, "other"))


async def rates(conn: asyncpg.Connection, shards: ShardPools, begin: date, end: date) -> list[dict[str, Any]]:
    """The one definition of person-times (clearing CLI, monitor, dashboard). Direct-settlement rate
    per (insured province, treating province, scope, visit type) for visits
    settled (or manually claimed, by their end) on days begin..end. A settlement counts as direct
    unless reversed; a visit settled again after a reversal counts once.

    Direct person-times come from the shards' daily aggregates (`ledger_daily.direct`, kept by the
    engine); `rates_recomputed` counts the same from the ledger rows (a test proves them equal)."""
    start, stop = _window(begin, end)
    direct: dict[RateKey, int] = {}
    for r in await shards.fetch(
        "SELECT insured_prov, treating_prov, scope, med_type, sum(direct)::bigint AS n FROM ledger_daily"
        " WHERE day >= $1 AND day < $2 AND scope <> 'local' GROUP BY 1, 2, 3, 4",
        start.date(), stop.date(),
    ):
        if r["n"]:
            key = _rate_key(r["insured_prov"], r["treating_prov"], r["scope"], r["med_type"])
            direct[key] = direct.get(key, 0) + r["n"]
    return _rate_dicts(direct, await _manual_counts(conn, start, stop))


async def rates_recomputed(conn: asyncpg.Connection, shards: ShardPools, begin: date, end: date
                           ) -> list[dict[str, Any]]:
    """`rates` counted from the ledger rows themselves (a scan of the window): the check of the aggregates."""
    start, stop = _window(begin, end)
    direct: dict[RateKey, int] = {}
    for r in await shards.fetch(
        "SELECT s.insured_admdvs, s.treating_admdvs, s.scope, s.med_type, count(DISTINCT s.mdtrt_id) AS n"
        " FROM settlement s WHERE s.kind = 'settle' AND NOT s.mid_setl AND s.scope <> 'local' AND s.setl_time >= $1"
        " AND s.setl_time < $2 AND NOT EXISTS (SELECT 1 FROM settlement r WHERE r.orig_setl_id = s.setl_id)"
        " GROUP BY 1, 2, 3, 4", start, stop,
    ):
        key = _rate_key(r["insured_admdvs"], r["treating_admdvs"], r["scope"], r["med_type"])
        direct[key] = direct.get(key, 0) + r["n"]
    return _rate_dicts(direct, await _manual_counts(conn, start, stop))


# --- Smart monitoring: the stream's judgements (fsi.judgements) -----------------------------------

# Insert a new judgement; a re-emitted one (new evidence, same jr_id) updates its evidence only while
# the row is `open` — a reviewed or withdrawn row keeps what it has. `inserted` is true only for the
# INSERT that created the row (xmax = 0), so a judgement is counted once however often it is replayed.
_JUDGEMENT_UPSERT = (
    "INSERT INTO judgement AS j (jr_id, rule_id, rule_version, severity, psn_no, insured_admdvs, insured_prov,"
    " treating_admdvs, treating_prov, fixmedins_code, mdtrt_ids, setl_ids, items, window_begin, window_end,"
    " suspect_amt, detail)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    " ON CONFLICT (jr_id) DO UPDATE SET mdtrt_ids = EXCLUDED.mdtrt_ids, setl_ids = EXCLUDED.setl_ids,"
    " items = EXCLUDED.items, window_begin = EXCLUDED.window_begin, window_end = EXCLUDED.window_end,"
    " suspect_amt = EXCLUDED.suspect_amt, detail = EXCLUDED.detail, updated_at = now()"
    " WHERE j.status = 'open' AND (j.mdtrt_ids, j.setl_ids, j.items, j.window_begin, j.window_end, j.suspect_amt,"
    " j.detail) IS DISTINCT FROM (EXCLUDED.mdtrt_ids, EXCLUDED.setl_ids, EXCLUDED.items, EXCLUDED.window_begin,"
    " EXCLUDED.window_end, EXCLUDED.suspect_amt, EXCLUDED.detail)"
    " RETURNING (xmax = 0) AS inserted"
)
# Withdrawn by the stream (its evidence was taken back): an open row, or a confirmed one whose deduction
# month (YYYYMM) is not closed yet — its deduction is dropped (deduct_month NULL; the review's reason and
# time stay, the audit log has the reviewer). Dismissed rows and deductions of closed months stay.
_JUDGEMENT_WITHDRAW = (
    "UPDATE judgement AS j SET status = 'withdrawn', deduct_month = NULL, reviewed_by = NULL, updated_at = now()"
    " WHERE j.jr_id = $1 AND (j.status = 'open' OR (j.status = 'confirmed' AND NOT EXISTS ("
    "   SELECT 1 FROM clearing_month m WHERE j.deduct_month IS NOT NULL AND m.state = 'closed'"
    "   AND m.clr_month = substr(j.deduct_month, 1, 4) || '-' || substr(j.deduct_month, 5, 2))))"
    " RETURNING j.rule_id"
)


@dataclass(frozen=True)
class JudgementRow:
    """A judgement as the hub stores it (provinces resolved by the caller)."""

    jr_id: str
    rule_id: str
    rule_version: int
    severity: str
    psn_no: str
    insured_admdvs: str
    insured_prov: str
    treating_admdvs: str
    treating_prov: str
    fixmedins_code: str
    mdtrt_ids: list[str]
    setl_ids: list[str]
    items: list[str]
    window_begin: date
    window_end: date
    suspect_amt: int
    detail: str

    def values(self) -> list[Any]:
        """The fields in order, as they are (`asdict` would deep-copy the lists of every judgement stored)."""
        return [getattr(self, f.name) for f in fields(self)]


async def upsert_judgement(conn: asyncpg.Connection, row: JudgementRow) -> bool:
    """Store an emitted judgement; True when this call created the row."""
    inserted = await conn.fetchval(_JUDGEMENT_UPSERT, *row.values())
    return bool(inserted)


async def withdraw_judgement(conn: asyncpg.Connection, jr_id: str) -> str | None:
    """Set a judgement withdrawn where the rules above allow it; its rule_id when a row changed."""
    rule_id: str | None = await conn.fetchval(_JUDGEMENT_WITHDRAW, jr_id)
    return rule_id
