"""Clearing arithmetic, pure: months and their assignment, positions, netting and roll-up,
reconciliation of a hospital's totals and rows, deposits and their warning line, and the
direct-settlement rate. Money is integer fen; no I/O, no clock.

Month assignment (the one rule the streaming writer and the batch recomputation share):
a ledger row whose `setl_time` falls in calendar month N (Asia/Shanghai wall time, as
stored) is cleared in the first month M >= N that is open when the row is recorded. A
closed month's members are frozen, so given the close records the batch side decides:
walk from N; stop at the first month that is open, or that is closed and holds the row.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Literal

from schemas.codes import FUND_NAMES as CODE_FUND_NAMES
from schemas.codes import FUND_TOTAL, FUNDS, NON_LOCAL_SCOPES
from schemas.codes import VISIT_TYPES as VISIT_TYPES  # the clearing handler and CLI label by it

# Statement column heads: "English 中文" (schemas.codes.FUND_NAMES).
FUND_NAMES = {**{f: f"{en} {zh}" for f, (zh, en) in CODE_FUND_NAMES.items()}, FUND_TOTAL: "all funds"}
AMOUNT_FIELDS = ("medfee_sumamt", *FUNDS, FUND_TOTAL)
NON_LOCAL = NON_LOCAL_SCOPES
# How many months of clearing the default deposit warning line averages over.
WARNING_HISTORY_MONTHS = 12
MONTHS_WALK_MAX = 1200  # a row never walks further than 100 years of closed months

_MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")

Kind = Literal["settle", "reverse"]
# The kind of a statement position made by an operator adjustment of a closed month (`adjustment_position`).
MANUAL = "manual"
# The kind of the position of confirmed monitoring judgements deducted in a month (拒付, `deduction_position`).
DEDUCTION = "deduction"


class ClearingError(ValueError):
    """An invariant does not hold (a bug or corrupted state): raised, never swallowed."""


# Months -------------------------------------------------------------------------------


def check_month(month: str) -> str:
    if not _MONTH_RE.match(month):
        raise ValueError(f"month must be YYYY-MM, got {month!r}")
    return month


def month_of(setl_time: str | datetime) -> str:
    """Calendar month of a wall time ('yyyy-MM-dd HH:mm:ss' or a naive datetime)."""
    if isinstance(setl_time, datetime):
        return f"{setl_time.year:04d}-{setl_time.month:02d}"
    return check_month(setl_time[:7])


def next_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:7])
    return f"{year + 1:04d}-01" if mon == 12 else f"{year:04d}-{mon + 1:02d}"


def month_start(month: str) -> datetime:
    check_month(month)
    return datetime(int(month[:4]), int(month[5:7]), 1)


def month_end(month: str) -> datetime:
    """Exclusive: the first instant of the next month."""
    return month_start(next_month(month))


def assign_month(setl_month: str, closed: Collection[str], member_of: str | None = None) -> str:
    """The clearing month of a row of calendar month `setl_month`.

    `closed`: the months closed (when the row is recorded: the stream's view; now: the batch's).
    `member_of`: the closed month whose frozen statement holds the row, if any.
    """
    month = setl_month
    for _ in range(MONTHS_WALK_MAX):
        if month not in closed or month == member_of:
            return month
        month = next_month(month)
    raise ClearingError("a row walked past 100 years of closed months")


# Rows and amounts -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Amounts:
    medfee_sumamt: int = 0
    hifp_pay: int = 0
    hifmi_pay: int = 0
    hifob_pay: int = 0
    maf_pay: int = 0
    fund_pay_sumamt: int = 0

    def __add__(self, other: Amounts) -> Amounts:
        return Amounts(*(getattr(self, f) + getattr(other, f) for f in AMOUNT_FIELDS))

    def __sub__(self, other: Amounts) -> Amounts:
        return Amounts(*(getattr(self, f) - getattr(other, f) for f in AMOUNT_FIELDS))

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in AMOUNT_FIELDS}

    @classmethod
    def of(cls, values: Mapping[str, int]) -> Amounts:
        return cls(**{f: int(values[f]) for f in AMOUNT_FIELDS}).checked()

    def checked(self) -> Amounts:
        if self.fund_pay_sumamt != sum(getattr(self, f) for f in FUNDS):
            raise ClearingError("fund_pay_sumamt differs from the sum of the funds")
        return self


ZERO = Amounts()


@dataclass(frozen=True, slots=True)
class Row:
    """A non-local ledger row (settlement or reversal) as clearing sees it."""

    setl_id: str
    kind: Kind
    setl_time: str  # yyyy-MM-dd HH:mm:ss
    fixmedins_code: str
    mdtrt_id: str
    insutype: str
    med_type: str
    scope: str
    insured_admdvs: str
    treating_admdvs: str
    insured_pool: str
    treating_pool: str
    insured_prov: str
    treating_prov: str
    amounts: Amounts

    @property
    def setl_month(self) -> str:
        return month_of(self.setl_time)

    def checked(self) -> Row:
        if self.scope not in NON_LOCAL:
            raise ClearingError("a local row reached clearing")
        if (self.scope == "cross_province") != (self.insured_prov != self.treating_prov):
            raise ClearingError("scope does not match the provinces")
        if self.insured_pool == self.treating_pool:
            raise ClearingError("a non-local row has the same insured and treating pooling region")
        self.amounts.checked()
        return self


def dedupe(rows: Iterable[Row]) -> list[Row]:
    """First occurrence of each setl_id (the stream re-publishes on replay)."""
    seen: set[str] = set()
    out = []
    for row in rows:
        if row.setl_id not in seen:
            seen.add(row.setl_id)
            out.append(row)
    return out


# Positions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class PositionKey:
    clr_month: str
    insured_pool: str
    treating_pool: str
    kind: str
    adjustment: bool


@dataclass(frozen=True, slots=True)
class Position:
    key: PositionKey
    insured_prov: str
    treating_prov: str
    scope: str
    cnt: int
    amounts: Amounts

    def __add__(self, other: Position) -> Position:
        if other.key != self.key:
            raise ClearingError("adding positions of different keys")
        return replace(self, cnt=self.cnt + other.cnt, amounts=self.amounts + other.amounts)


def position_of(row: Row, clr_month: str) -> Position:
    key = PositionKey(clr_month, row.insured_pool, row.treating_pool, row.kind, clr_month != row.setl_month)
    return Position(key, row.insured_prov, row.treating_prov, row.scope, 1, row.amounts)


def aggregate(assigned: Iterable[tuple[Row, str]]) -> dict[PositionKey, Position]:
    """Sum rows, each with its clearing month, into positions."""
    out: dict[PositionKey, Position] = {}
    for row, clr_month in assigned:
        pos = position_of(row, clr_month)
        out[pos.key] = out[pos.key] + pos if pos.key in out else pos
    return out


def merge(*groups: Mapping[PositionKey, Position]) -> dict[PositionKey, Position]:
    out: dict[PositionKey, Position] = {}
    for group in groups:
        for key, pos in group.items():
            out[key] = out[key] + pos if key in out else pos
    return out


def compare_positions(expected: Mapping[PositionKey, Position], actual: Mapping[PositionKey, Position],
                      *, expected_name: str = "batch", actual_name: str = "stream") -> list[str]:
    """Differences as text (codes and amounts only). Empty: equal to the fen."""
    problems = []
    for key in sorted(set(expected) | set(actual)):
        e, a = expected.get(key), actual.get(key)
        e_cnt, a_cnt = (e.cnt if e else 0), (a.cnt if a else 0)
        e_amt, a_amt = (e.amounts if e else ZERO), (a.amounts if a else ZERO)
        if e_cnt != a_cnt or e_amt != a_amt:
            diffs = [f"cnt {expected_name} {e_cnt} {actual_name} {a_cnt}"] if e_cnt != a_cnt else []
            diffs += [f"{f} {expected_name} {getattr(e_amt, f)} {actual_name} {getattr(a_amt, f)}"
                      for f in AMOUNT_FIELDS if getattr(e_amt, f) != getattr(a_amt, f)]
            label = (f"{key.clr_month} {key.insured_pool}->{key.treating_pool} {key.kind}"
                     f"{' adjustment' if key.adjustment else ''}")
            problems.append(f"{label}: {'; '.join(diffs)}")
    return problems


# Netting and roll-up -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairLine:
    """What `insured` owes `treating` for one month: settled, reversed, adjustments, net."""

    insured: str
    treating: str
    insured_prov: str
    treating_prov: str
    scope: str
    settle_cnt: int = 0
    reverse_cnt: int = 0
    adj_settle_cnt: int = 0
    adj_reverse_cnt: int = 0
    settled: Amounts = ZERO
    reversed: Amounts = ZERO
    adjusted: Amounts = ZERO
    deduct_cnt: int = 0  # confirmed judgements deducted (not person-times)
    deducted: Amounts = ZERO  # their deduction (拒付), negative: it lowers what the insured region owes

    @property
    def net(self) -> Amounts:
        return self.settled + self.reversed + self.adjusted + self.deducted

    @property
    def net_cnt(self) -> int:
        """Net person-times: settlements minus reversals, adjustments included."""
        return self.settle_cnt - self.reverse_cnt + self.adj_settle_cnt - self.adj_reverse_cnt

    @property
    def rows(self) -> int:
        return self.settle_cnt + self.reverse_cnt + self.adj_settle_cnt + self.adj_reverse_cnt

    def plus(self, pos: Position) -> PairLine:
        k = pos.key
        if k.kind == MANUAL:  # an operator's correction: money only, no person-times
            return replace(self, adjusted=self.adjusted + pos.amounts)
        if k.kind == DEDUCTION:  # its own line: money, and how many judgements — no person-times
            return replace(self, deduct_cnt=self.deduct_cnt + pos.cnt, deducted=self.deducted + pos.amounts)
        if k.adjustment:
            cnt_field = "adj_settle_cnt" if k.kind == "settle" else "adj_reverse_cnt"
            return replace(self, **{cnt_field: getattr(self, cnt_field) + pos.cnt},
                           adjusted=self.adjusted + pos.amounts)
        if k.kind == "settle":
            return replace(self, settle_cnt=self.settle_cnt + pos.cnt, settled=self.settled + pos.amounts)
        return replace(self, reverse_cnt=self.reverse_cnt + pos.cnt, reversed=self.reversed + pos.amounts)

    def add_line(self, other: PairLine) -> PairLine:
        return replace(
            self,
            settle_cnt=self.settle_cnt + other.settle_cnt, reverse_cnt=self.reverse_cnt + other.reverse_cnt,
            adj_settle_cnt=self.adj_settle_cnt + other.adj_settle_cnt,
            adj_reverse_cnt=self.adj_reverse_cnt + other.adj_reverse_cnt,
            settled=self.settled + other.settled, reversed=self.reversed + other.reversed,
            adjusted=self.adjusted + other.adjusted,
            deduct_cnt=self.deduct_cnt + other.deduct_cnt, deducted=self.deducted + other.deducted,
        )


def pool_lines(positions: Iterable[Position]) -> list[PairLine]:
    """One line per (insured pooling region → treating pooling region), sorted."""
    lines: dict[tuple[str, str], PairLine] = {}
    for pos in positions:
        k = pos.key
        pair = (k.insured_pool, k.treating_pool)
        line = lines.get(pair) or PairLine(k.insured_pool, k.treating_pool, pos.insured_prov, pos.treating_prov,
                                           pos.scope)
        lines[pair] = line.plus(pos)
    return [lines[p] for p in sorted(lines)]


def province_lines(lines: Iterable[PairLine]) -> list[PairLine]:
    """Roll pool pairs up to province pairs (intra-province flows become a province's own line)."""
    out: dict[tuple[str, str], PairLine] = {}
    for line in lines:
        pair = (line.insured_prov, line.treating_prov)
        base = out.get(pair) or PairLine(line.insured_prov, line.treating_prov, line.insured_prov,
                                         line.treating_prov,
                                         "cross_province" if pair[0] != pair[1] else "intra_province")
        out[pair] = base.add_line(line)
    return [out[p] for p in sorted(out)]


@dataclass(frozen=True, slots=True)
class RegionNet:
    region: str
    payable: Amounts  # as insured region: what it owes others
    receivable: Amounts  # as treating region: what others owe it
    payable_cnt: int
    receivable_cnt: int

    @property
    def net(self) -> Amounts:
        """Receivable minus payable: positive means the region is owed money."""
        return self.receivable - self.payable


def net_positions(lines: Iterable[PairLine]) -> list[RegionNet]:
    """Each region's payable, receivable and net. A line within one region (a province's own
    intra-province flows at province level) is internal and moves nothing."""
    pay: dict[str, Amounts] = {}
    rec: dict[str, Amounts] = {}
    pay_cnt: dict[str, int] = {}
    rec_cnt: dict[str, int] = {}
    for line in lines:
        if line.insured == line.treating:
            continue
        pay[line.insured] = pay.get(line.insured, ZERO) + line.net
        rec[line.treating] = rec.get(line.treating, ZERO) + line.net
        pay_cnt[line.insured] = pay_cnt.get(line.insured, 0) + line.net_cnt
        rec_cnt[line.treating] = rec_cnt.get(line.treating, 0) + line.net_cnt
    regions = sorted(set(pay) | set(rec))
    out = [RegionNet(r, pay.get(r, ZERO), rec.get(r, ZERO), pay_cnt.get(r, 0), rec_cnt.get(r, 0)) for r in regions]
    total = ZERO
    for r in out:
        total = total + r.net
    if total != ZERO:  # STYLE 11: netting conserves money
        raise ClearingError("net positions do not sum to zero")
    return out


# The frozen month statement -------------------------------------------------------------

STATEMENT_FORMAT = 1


def _line_json(line: PairLine) -> dict[str, object]:
    return {
        "insured": line.insured, "treating": line.treating, "insured_prov": line.insured_prov,
        "treating_prov": line.treating_prov, "scope": line.scope, "settle_cnt": line.settle_cnt,
        "reverse_cnt": line.reverse_cnt, "adj_settle_cnt": line.adj_settle_cnt,
        "adj_reverse_cnt": line.adj_reverse_cnt, "net_cnt": line.net_cnt, "settled": line.settled.as_dict(),
        "reversed": line.reversed.as_dict(), "adjusted": line.adjusted.as_dict(), "deduct_cnt": line.deduct_cnt,
        "deducted": line.deducted.as_dict(), "net": line.net.as_dict(),
    }


def _net_json(r: RegionNet) -> dict[str, object]:
    return {"region": r.region, "payable_cnt": r.payable_cnt, "receivable_cnt": r.receivable_cnt,
            "payable": r.payable.as_dict(), "receivable": r.receivable.as_dict(), "net": r.net.as_dict()}


def month_statement(clr_month: str, version: int, closed_at: str, positions: Iterable[Position],
                    adjustments: Sequence[Mapping[str, object]] = ()) -> dict[str, object]:
    """The body of a month's statement: every position, pool and province lines, net positions (fen).
    A re-issued version (2, 3, …) also lists the operator adjustments it includes (their positions are
    among `positions`, kind MANUAL)."""
    positions = sorted(positions, key=lambda p: p.key)
    extra: dict[str, object] = {"adjustments": list(adjustments)} if adjustments else {}
    pools = pool_lines(positions)
    provinces = province_lines(pools)
    total = ZERO
    for line in pools:
        total = total + line.net
    return {
        "format": STATEMENT_FORMAT,
        "clr_month": clr_month,
        "version": version,
        "closed_at": closed_at,
        "entry_cnt": sum(p.cnt for p in positions if p.key.kind != DEDUCTION),  # ledger rows only
        "total": total.as_dict(),
        "positions": [
            {"insured_pool": p.key.insured_pool, "treating_pool": p.key.treating_pool, "kind": p.key.kind,
             "adjustment": p.key.adjustment, "insured_prov": p.insured_prov, "treating_prov": p.treating_prov,
             "scope": p.scope, "cnt": p.cnt, **p.amounts.as_dict()}
            for p in positions
        ],
        "pool_lines": [_line_json(line) for line in pools],
        "province_lines": [_line_json(line) for line in provinces],
        "pool_net": [_net_json(r) for r in net_positions(pools)],
        "province_net": [_net_json(r) for r in net_positions(provinces)],
        **extra,
    }


def positions_from_statement(body: Mapping[str, object]) -> list[Position]:
    out = []
    clr_month = str(body["clr_month"])
    for p in body["positions"]:  # type: ignore[attr-defined]
        key = PositionKey(clr_month, p["insured_pool"], p["treating_pool"], p["kind"], bool(p["adjustment"]))
        out.append(Position(key, p["insured_prov"], p["treating_prov"], p["scope"], int(p["cnt"]), Amounts.of(p)))
    return out


# Statement versions: operator adjustments of a closed month ---------------------------------


def _check_pair_line(insured_pool: str, treating_pool: str, scope: str, what: str) -> None:
    """An extra line of a pair (an adjustment, a deduction) is between two pools, for non-local care."""
    if insured_pool == treating_pool:
        raise ClearingError(f"{what} is between two different pooling regions")
    if scope not in NON_LOCAL:
        raise ClearingError(f"{what} is of non-local care")


@dataclass(frozen=True, slots=True)
class Adjustment:
    """An operator's correction of what one insured pooling region owes one treating pooling region in a
    closed month (fen, signed); it re-issues the month's statement as version `version`."""

    ref: str
    insured_pool: str
    treating_pool: str
    insured_prov: str
    treating_prov: str
    scope: str
    amounts: Amounts
    reason: str
    version: int

    def checked(self) -> Adjustment:
        _check_pair_line(self.insured_pool, self.treating_pool, self.scope, "an adjustment")
        if self.amounts == ZERO:
            raise ClearingError("an adjustment changes at least one amount")
        if not 1 <= len(self.reason) <= 500:
            raise ClearingError("an adjustment names its reason (1 to 500 characters)")
        self.amounts.checked()
        return self

    def as_json(self) -> dict[str, object]:
        return {"ref": self.ref, "insured_pool": self.insured_pool, "treating_pool": self.treating_pool,
                "reason": self.reason, "version": self.version, **self.amounts.as_dict()}


def adjustment_position(clr_month: str, adj: Adjustment) -> Position:
    key = PositionKey(clr_month, adj.insured_pool, adj.treating_pool, MANUAL, True)
    return Position(key, adj.insured_prov, adj.treating_prov, adj.scope, 0, adj.amounts)


def reissued_positions(clr_month: str, frozen: Iterable[Position], adjustments: Iterable[Adjustment]
                       ) -> list[Position]:
    """A re-issued statement's positions: the closed month's own (frozen at the close, never changed) and
    one MANUAL position per adjusted pair holding the sum of its adjustments."""
    manual: dict[PositionKey, Position] = {}
    for adj in adjustments:
        pos = adjustment_position(clr_month, adj)
        manual[pos.key] = manual[pos.key] + pos if pos.key in manual else pos
    return [p for p in frozen if p.key.kind != MANUAL] + list(manual.values())


# Deductions (拒付) of confirmed monitoring judgements ------------------------------------------


def compact_month(month: str) -> str:
    """'2025-10' → '202510' (the form of judgement.deduct_month)."""
    return check_month(month).replace("-", "")


def month_of_compact(compact: str) -> str:
    """'202510' → '2025-10'."""
    return check_month(f"{compact[:4]}-{compact[4:]}")


def deduction_month(evidence_month: str, closed: Collection[str]) -> str:
    """Where a confirmed judgement is deducted: the first open clearing month after the month of its
    latest evidence (`window_end`) — `assign_month`'s walk, started one month later, since the evidence's
    own month may already be settled between the regions. Given the close records, the same month again."""
    return assign_month(next_month(check_month(evidence_month)), closed)


def deduction_amounts(suspect_amt: int) -> Amounts:
    """What a deduction changes, in fen: the whole suspect amount comes off the basic pool (hifp_pay, the fund
    that pays the bulk of a stay and that the rules protect) and so off the fund total; medical fees stay
    (the care happened; the insured region refuses to pay part of it)."""
    if suspect_amt < 0:
        raise ClearingError("a suspect amount is never negative")
    return Amounts(hifp_pay=-suspect_amt, fund_pay_sumamt=-suspect_amt)


@dataclass(frozen=True, slots=True)
class Deduction:
    """One confirmed judgement deducted from what `insured_pool` owes `treating_pool` in `clr_month`."""

    jr_id: str
    clr_month: str
    insured_pool: str
    treating_pool: str
    insured_prov: str
    treating_prov: str
    scope: str
    amounts: Amounts

    def checked(self) -> Deduction:
        _check_pair_line(self.insured_pool, self.treating_pool, self.scope, "a deduction")
        if self.amounts.fund_pay_sumamt > 0:
            raise ClearingError("a deduction only lowers what is owed")
        self.amounts.checked()
        return self


def deduction_positions(deductions: Iterable[Deduction]) -> dict[PositionKey, Position]:
    """Deductions summed per month and pair: one DEDUCTION position each, cnt = judgements."""
    out: dict[PositionKey, Position] = {}
    for d in deductions:
        key = PositionKey(d.clr_month, d.insured_pool, d.treating_pool, DEDUCTION, False)
        pos = Position(key, d.insured_prov, d.treating_prov, d.scope, 1, d.amounts)
        out[key] = out[key] + pos if key in out else pos
    return out


# Reconciliation with a hospital (3201 / 3202) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """A ledger row as a hospital reconciles it."""

    setl_id: str
    kind: str
    medfee_sumamt: int
    fund_pay_sumamt: int
    acct_pay: int
    psn_cash_pay: int

    @property
    def refd_setl_flag(self) -> str:
        return "1" if self.kind == "reverse" else "0"


@dataclass(frozen=True, slots=True)
class Totals:
    cnt: int = 0
    medfee_sumamt: int = 0
    fund_pay_sumamt: int = 0
    acct_pay: int = 0
    cash_payamt: int = 0


def totals_of(rows: Iterable[LedgerRow], *, include_reversals: bool = True) -> Totals:
    t = Totals()
    for r in rows:
        if r.kind == "reverse" and not include_reversals:
            continue
        t = Totals(t.cnt + 1, t.medfee_sumamt + r.medfee_sumamt, t.fund_pay_sumamt + r.fund_pay_sumamt,
                   t.acct_pay + r.acct_pay, t.cash_payamt + r.psn_cash_pay)
    return t


@dataclass(frozen=True, slots=True)
class FieldDiff:
    fld_name: str
    medins: int  # fen, or a count
    ledger: int
    is_count: bool = False

    @property
    def diff(self) -> int:
        return self.ledger - self.medins


def compare_fields(medins: Mapping[str, int], ledger: Mapping[str, int],
                   counts: Collection[str] = ()) -> list[FieldDiff]:
    """Every field whose values differ, in the order of `medins`."""
    return [FieldDiff(f, medins[f], ledger[f], f in counts) for f in medins if medins[f] != ledger[f]]


def describe(diffs: Sequence[FieldDiff]) -> str:
    if not diffs:
        return "balanced"
    parts = []
    for d in diffs:
        fmt = str if d.is_count else fen_text
        parts.append(f"{d.fld_name}: hospital {fmt(d.medins)}, ledger {fmt(d.ledger)}")
    return "not balanced: " + "; ".join(parts)


def fen_text(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"


@dataclass(frozen=True, slots=True)
class MedinsRow:
    """A row of the hospital's own list (3202), in fen."""

    setl_id: str
    medfee_sumamt: int
    fund_pay_sumamt: int
    acct_pay: int
    refd_setl_flag: str


DetailDiffType = Literal["missing_at_medins", "missing_in_ledger", "amount_differs", "flag_differs"]


@dataclass(frozen=True, slots=True)
class DetailDiff:
    setl_id: str
    diff_type: DetailDiffType
    ledger: LedgerRow | None
    medins: MedinsRow | None
    fields: tuple[str, ...] = ()

    @property
    def memo(self) -> str:
        match self.diff_type:
            case "missing_at_medins":
                return "in the ledger, missing from the hospital's list"
            case "missing_in_ledger":
                return "in the hospital's list, not in the ledger for this period"
            case "flag_differs":
                return "refd_setl_flag differs (settlement vs reversal)"
        return "amounts differ: " + ", ".join(self.fields)


def reconcile_rows(medins: Sequence[MedinsRow], ledger: Sequence[LedgerRow]) -> tuple[int, list[DetailDiff]]:
    """Match by setl_id. Returns (rows that balance, rows that do not — ledger order, then the
    hospital's extra rows in its order)."""
    theirs = {r.setl_id: r for r in medins}
    ours = {r.setl_id: r for r in ledger}
    matched = 0
    diffs: list[DetailDiff] = []
    for lr in ledger:
        mr = theirs.get(lr.setl_id)
        if mr is None:
            diffs.append(DetailDiff(lr.setl_id, "missing_at_medins", lr, None))
            continue
        if mr.refd_setl_flag != lr.refd_setl_flag:
            diffs.append(DetailDiff(lr.setl_id, "flag_differs", lr, mr))
            continue
        fields = tuple(f for f in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay")
                       if getattr(mr, f) != getattr(lr, f))
        if fields:
            diffs.append(DetailDiff(lr.setl_id, "amount_differs", lr, mr, fields))
        else:
            matched += 1
    diffs += [DetailDiff(mr.setl_id, "missing_in_ledger", None, mr) for mr in medins if mr.setl_id not in ours]
    return matched, diffs


# Clearing details (3260 / 3261 / 3262) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowScope:
    """Whose clearing rows a 3260-3262 sender sees: a hospital's (or pharmacy's) own, or — the treating
    region's agency — those of every institution of its pooling region."""

    fixmedins_code: str | None = None
    treating_pool: str | None = None

    def __post_init__(self) -> None:
        if (self.fixmedins_code is None) == (self.treating_pool is None):
            raise ValueError("a row scope is one institution or one pooling region")


def month_stas(totalrow: int, cnfm_cnt: int, dspt_cnt: int) -> Literal["partial", "complete"]:
    """A month's confirmation is complete when every row is confirmed or disputed."""
    if cnfm_cnt + dspt_cnt > totalrow:
        raise ClearingError("more rows confirmed than the month has")
    return "complete" if cnfm_cnt + dspt_cnt == totalrow else "partial"


# Deposits --------------------------------------------------------------------------------


def round_half_up_div(numerator: int, denominator: int) -> int:
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    sign = -1 if numerator < 0 else 1
    return sign * ((2 * abs(numerator) + denominator) // (2 * denominator))


def warning_line(override_fen: int | None, cleared_fen: Sequence[int]) -> int:
    """The deposit warning line: the configured one, else one month's average cleared amount
    over the last WARNING_HISTORY_MONTHS months cleared (oldest first); 0 without history."""
    if override_fen is not None:
        if override_fen < 0:
            raise ValueError("a warning line cannot be negative")
        return override_fen
    recent = list(cleared_fen)[-WARNING_HISTORY_MONTHS:]
    if not recent:
        return 0
    return max(0, round_half_up_div(sum(recent), len(recent)))


def at_or_below_line(balance_fen: int, line_fen: int) -> bool:
    """Alert when the balance is at or below a positive warning line (not above it)."""
    return line_fen > 0 and balance_fen <= line_fen


def drawdowns(positions: Iterable[Position]) -> dict[str, int]:
    """Per insured province, what a month's clearing draws from its deposit: the net fund amount of
    its cross-province care (intra-province care clears inside the province). Negative: a credit."""
    out: dict[str, int] = {}
    for pos in positions:
        if pos.insured_prov != pos.treating_prov:
            out[pos.insured_prov] = out.get(pos.insured_prov, 0) + pos.amounts.fund_pay_sumamt
    return dict(sorted(out.items()))


# Direct-settlement rate (REFERENCE §6) --------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class RateKey:
    insured_prov: str
    treating_prov: str
    scope: str
    visit_type: str


@dataclass(frozen=True, slots=True)
class RateLine:
    key: RateKey
    direct: int
    manual: int

    @property
    def rate(self) -> Decimal | None:
        """Direct ÷ (direct + manual), 4 places; None when there is nothing to count."""
        total = self.direct + self.manual
        if total == 0:
            return None
        return (Decimal(self.direct) / Decimal(total)).quantize(Decimal("0.0001"))


def rate_lines(direct: Mapping[RateKey, int], manual: Mapping[RateKey, int]) -> list[RateLine]:
    return [RateLine(k, direct.get(k, 0), manual.get(k, 0)) for k in sorted(set(direct) | set(manual))]


# 3203: a hospital's clearing application ------------------------------------------------

APPL_FIELDS = ("psntime", "medfee_sumamt", "med_sumfee", "fund_appy_sum", "cash_payamt", "acct_pay")


@dataclass(frozen=True, slots=True)
class ApplTotals:
    """The ledger's side of an application: net person-times (settlements − reversals) and sums."""

    psntime: int = 0
    medfee_sumamt: int = 0
    med_sumfee: int = 0  # in-scope amount (医保认可费用)
    fund_appy_sum: int = 0
    cash_payamt: int = 0
    acct_pay: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in APPL_FIELDS}
