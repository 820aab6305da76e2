"""Clearing arithmetic without a database: months and their assignment, positions, netting,
reconciliation, deposits, the direct-settlement rate and statement rendering."""

from __future__ import annotations

import csv
import io
import json
import random
from decimal import Decimal

import pytest

from schemas.clearing import Input3201, Input3202, ManualClaim
from schemas.codec import BODY_TYPES
from services.clearing.logic import (
    ZERO,
    Amounts,
    ClearingError,
    LedgerRow,
    MedinsRow,
    RateKey,
    Row,
    aggregate,
    assign_month,
    at_or_below_line,
    compare_fields,
    compare_positions,
    dedupe,
    describe,
    drawdowns,
    fen_text,
    merge,
    month_end,
    month_of,
    month_statement,
    net_positions,
    next_month,
    pool_lines,
    positions_from_statement,
    province_lines,
    rate_lines,
    reconcile_rows,
    round_half_up_div,
    totals_of,
    warning_line,
)
from services.clearing.statement import region_level, region_statement, to_csv, to_html, to_wire
from services.refdata.regions import region_of

# Pools: 510400 米易 (四川), 510100 成都 (四川), 150400 赤峰 (内蒙古), 500000 重庆.


def amounts(hifp: int, hifmi: int = 0, hifob: int = 0, maf: int = 0, medfee: int | None = None) -> Amounts:
    fund = hifp + hifmi + hifob + maf
    return Amounts(medfee if medfee is not None else fund * 2, hifp, hifmi, hifob, maf, fund)


def row(setl_id: str, insured: str, treating: str, when: str, amt: Amounts, kind: str = "settle") -> Row:
    ins, trt = region_of(insured), region_of(treating)
    scope = "cross_province" if ins.prov_admdvs != trt.prov_admdvs else "intra_province"
    if kind == "reverse":
        amt = ZERO - amt
    return Row(setl_id, kind, when, "H00000000001", "M1", "390", "21", scope, ins.admdvs,  # type: ignore[arg-type]
               trt.admdvs, ins.pool_admdvs, trt.pool_admdvs, ins.prov_admdvs, trt.prov_admdvs, amt).checked()


# Months ----------------------------------------------------------------------------------------


def test_months() -> None:
    assert month_of("2026-06-30 23:59:59") == "2026-06"
    assert next_month("2026-12") == "2027-01"
    assert next_month("2026-06") == "2026-07"
    assert str(month_end("2026-12")) == "2027-01-01 00:00:00"
    with pytest.raises(ValueError):
        month_of("2026-13-01 00:00:00")


def test_assign_month_walks_to_the_first_open_month() -> None:
    assert assign_month("2026-06", set()) == "2026-06"
    assert assign_month("2026-06", {"2026-06"}) == "2026-07"
    assert assign_month("2026-06", {"2026-06", "2026-07"}) == "2026-08"
    # A member of a closed month stays in it; a member of a later closed month is found by the walk.
    assert assign_month("2026-06", {"2026-06"}, member_of="2026-06") == "2026-06"
    assert assign_month("2026-06", {"2026-06", "2026-07"}, member_of="2026-07") == "2026-07"
    # Closing need not be in order: an open month before a closed one takes the row.
    assert assign_month("2026-05", {"2026-06"}) == "2026-05"
    assert assign_month("2026-12", {"2026-12"}) == "2027-01"


def test_stream_and_batch_assign_the_same_month_whatever_the_interleaving() -> None:
    """The stream assigns at record time (closed months so far); the batch recomputes later from the
    final close records and membership. They agree for every interleaving of rows and closes."""
    months = ["2026-05", "2026-06", "2026-07", "2026-08"]
    for seed in range(300):
        rnd = random.Random(seed)
        closed: set[str] = set()
        members: dict[str, str] = {}  # setl_id → month assigned by the stream
        assigned: list[tuple[Row, str]] = []
        for i in range(40):
            if rnd.random() < 0.1:
                closed.add(rnd.choice(months))  # a close, at any time, in any order
                continue
            r = row(f"S{i}", "510421", "150400", f"{rnd.choice(months)}-15 10:00:00", amounts(rnd.randint(1, 9999)),
                    rnd.choice(["settle", "reverse"]))
            target = assign_month(r.setl_month, closed)
            members[r.setl_id] = target
            assigned.append((r, target))
        stream = aggregate(assigned)
        for month in months:
            batch = aggregate(
                (r, m) for r, _ in assigned
                if (m := assign_month(r.setl_month, closed, members[r.setl_id] if members[r.setl_id] in closed
                                      else None)) == month
            )
            assert compare_positions(batch, {k: p for k, p in stream.items() if k.clr_month == month}) == []


# Positions and netting ------------------------------------------------------------------------------


def test_dedupe_and_aggregate() -> None:
    a = row("S1", "510421", "150400", "2026-06-01 10:00:00", amounts(10000, 2000))
    b = row("S2", "510421", "150400", "2026-06-02 10:00:00", amounts(5000))
    r = row("R1", "510421", "150400", "2026-06-03 10:00:00", amounts(5000), "reverse")
    rows = dedupe([a, b, a, r, b])
    assert [x.setl_id for x in rows] == ["S1", "S2", "R1"]
    pos = aggregate((x, "2026-06") for x in rows)
    assert len(pos) == 2
    settle = next(p for p in pos.values() if p.key.kind == "settle")
    assert settle.cnt == 2 and settle.amounts.fund_pay_sumamt == 17000 and not settle.key.adjustment
    late = aggregate([(r, "2026-07")])
    assert next(iter(late)).adjustment  # a June row cleared in July is an adjustment
    assert compare_positions(pos, merge(pos)) == []
    assert compare_positions(pos, {}) != []


def test_rows_check_their_invariants() -> None:
    with pytest.raises(ClearingError):
        Amounts(100, 10, 0, 0, 0, 11).checked()
    with pytest.raises(ClearingError):
        row("S1", "510421", "510402", "2026-06-01 10:00:00", amounts(1))  # same pooling region: local


def test_netting_pool_province_and_conservation() -> None:
    rows = [
        (row("A", "510421", "150400", "2026-06-01 10:00:00", amounts(10000, 3000, 0, 500)), "2026-06"),  # 米易→赤峰
        (row("B", "150400", "510421", "2026-06-01 11:00:00", amounts(4000)), "2026-06"),  # 赤峰→米易
        (row("C", "510421", "510100", "2026-06-02 10:00:00", amounts(2500)), "2026-06"),  # 米易→成都 (intra)
        (row("D", "510421", "150400", "2026-06-03 10:00:00", amounts(1000), "reverse"), "2026-06"),
        (row("E", "500154", "150400", "2026-05-31 10:00:00", amounts(700, 0, 300)), "2026-06"),  # adjustment
    ]
    pos = aggregate(rows)
    pools = pool_lines(pos.values())
    by_pair = {(ln.insured, ln.treating): ln for ln in pools}
    assert by_pair[("510400", "150400")].net.fund_pay_sumamt == 13500 - 1000
    assert by_pair[("510400", "150400")].net_cnt == 0  # one settled, one reversed
    assert by_pair[("500000", "150400")].adj_settle_cnt == 1
    assert by_pair[("500000", "150400")].adjusted.hifob_pay == 300
    nets = {r.region: r for r in net_positions(pools)}
    assert nets["510400"].payable.fund_pay_sumamt == 12500 + 2500
    assert nets["510400"].receivable.fund_pay_sumamt == 4000
    assert nets["510400"].net.fund_pay_sumamt == 4000 - 15000
    assert nets["510100"].net.fund_pay_sumamt == 2500
    assert sum(r.net.fund_pay_sumamt for r in nets.values()) == 0
    provinces = province_lines(pools)
    prov = {(ln.insured, ln.treating): ln for ln in provinces}
    assert prov[("510000", "510000")].scope == "intra_province"
    assert prov[("510000", "150000")].net.hifmi_pay == 3000
    pnets = {r.region: r for r in net_positions(provinces)}
    assert pnets["510000"].payable.fund_pay_sumamt == 12500  # intra-province flows move nothing
    assert pnets["150000"].receivable.fund_pay_sumamt == 12500 + 1000


def test_month_statement_round_trip_and_region_statements() -> None:
    rows = [
        (row("A", "510421", "150400", "2026-06-01 10:00:00", amounts(10000, 3000)), "2026-06"),
        (row("B", "150400", "510421", "2026-06-01 11:00:00", amounts(4000)), "2026-06"),
        (row("C", "510421", "510100", "2026-06-02 10:00:00", amounts(2500)), "2026-06"),
    ]
    pos = aggregate(rows)
    body = month_statement("2026-06", 1, "2026-07-01 00:10:00", pos.values())
    assert json.loads(json.dumps(body)) == body
    assert body["entry_cnt"] == 3
    assert body["total"]["fund_pay_sumamt"] == 19500  # type: ignore[index]
    assert {p.key: p for p in positions_from_statement(body)} == pos

    assert region_level("510400") == "pool" and region_level("510000") == "province"
    assert region_level("500000") == "pool"  # a municipality pools at province level
    st = region_statement(body, "510400", status="closed", digest="abc")
    assert [ln.treating for ln in st.payable] == ["150400", "510100"]
    assert [ln.insured for ln in st.receivable] == ["150400"]
    wire = to_wire(st)
    assert wire["net_position"]["fund_pay_sumamt"] == Decimal("-115.00")
    assert wire["payable_total"]["hifmi_pay"] == Decimal("30.00")

    prov = region_statement(body, "510000", status="closed")
    assert prov.internal is not None and prov.internal.net.fund_pay_sumamt == 2500
    assert prov.net.payable.fund_pay_sumamt == 13000

    table = list(csv.reader(io.StringIO(to_csv(st))))
    assert table[1][0] == "section"
    net_row = next(r for r in table if r[0] == "net_position")
    assert net_row[8 + 5] == "-115.00"  # net_fund_pay_sumamt
    page = to_html(st)
    assert "<table>" in page and "Net position" in page and "-115.00" in page


# Reconciliation -------------------------------------------------------------------------------------


def test_totals_and_field_differences() -> None:
    rows = [LedgerRow("S1", "settle", 10000, 6000, 1000, 3000), LedgerRow("R1", "reverse", -4000, -2000, 0, -2000)]
    t = totals_of(rows)
    assert (t.cnt, t.medfee_sumamt, t.fund_pay_sumamt, t.acct_pay, t.cash_payamt) == (2, 6000, 4000, 1000, 1000)
    assert totals_of(rows, include_reversals=False).cnt == 1
    diffs = compare_fields({"fixmedins_setl_cnt": 1, "medfee_sumamt": 6000}, {"fixmedins_setl_cnt": 2,
                                                                              "medfee_sumamt": 6000},
                           counts=("fixmedins_setl_cnt",))
    assert [(d.fld_name, d.diff) for d in diffs] == [("fixmedins_setl_cnt", 1)]
    assert describe(diffs) == "not balanced: fixmedins_setl_cnt: hospital 1, ledger 2"
    assert describe([]) == "balanced"
    assert fen_text(-5) == "-0.05" and fen_text(123456) == "1234.56"


def test_detail_reconciliation_names_each_row() -> None:
    ledger = [LedgerRow("S1", "settle", 10000, 6000, 0, 4000), LedgerRow("S2", "settle", 5000, 2000, 0, 3000),
              LedgerRow("S3", "settle", 7000, 1000, 0, 6000), LedgerRow("R3", "reverse", -7000, -1000, 0, -6000)]
    hospital = [MedinsRow("S1", 10000, 6000, 0, "0"),  # balances
                MedinsRow("S2", 5000, 2100, 0, "0"),  # mis-stated fund pay
                MedinsRow("R3", -7000, -1000, 0, "0"),  # the reversal recorded as a settlement
                MedinsRow("X9", 100, 50, 0, "0")]  # the ledger has no such row; S3 is missing at the hospital
    matched, diffs = reconcile_rows(hospital, ledger)
    assert matched == 1
    got = {d.setl_id: (d.diff_type, d.fields) for d in diffs}
    assert got == {"S2": ("amount_differs", ("fund_pay_sumamt",)), "S3": ("missing_at_medins", ()),
                   "R3": ("flag_differs", ()), "X9": ("missing_in_ledger", ())}
    assert all(d.memo for d in diffs)


# Deposits ----------------------------------------------------------------------------------------------


def test_warning_line_and_alert_threshold() -> None:
    assert warning_line(None, []) == 0
    assert warning_line(None, [100, 200]) == 150
    assert warning_line(None, [100, 201]) == 151  # 150.5 rounds half up
    assert warning_line(None, [10**6] * 5 + [100] * 12) == 100  # the last 12 months only
    assert warning_line(5000, [100]) == 5000  # a configured line wins
    assert warning_line(None, [-300, 100]) == 0  # credits never make a negative line
    assert round_half_up_div(-3, 2) == -2
    assert at_or_below_line(5000, 5000) is True  # at the line
    assert at_or_below_line(4999, 5000) is True
    assert at_or_below_line(5001, 5000) is False  # above it
    assert at_or_below_line(-10, 0) is False  # no line, no alert


def test_drawdowns_are_cross_province_payables() -> None:
    pos = aggregate([
        (row("A", "510421", "150400", "2026-06-01 10:00:00", amounts(10000)), "2026-06"),
        (row("B", "510421", "510100", "2026-06-01 10:00:00", amounts(999)), "2026-06"),  # intra: not drawn
        (row("C", "150400", "500154", "2026-06-01 10:00:00", amounts(300)), "2026-06"),
        (row("D", "150400", "500154", "2026-06-02 10:00:00", amounts(500), "reverse"), "2026-06"),
    ])
    assert drawdowns(pos.values()) == {"150000": -200, "510000": 10000}


# Direct-settlement rate and schemas -----------------------------------------------------------------------


def test_rate_lines() -> None:
    k = RateKey("510000", "150000", "cross_province", "inpatient")
    k2 = RateKey("510000", "150000", "cross_province", "pharmacy")
    lines = {ln.key: ln for ln in rate_lines({k: 7}, {k: 3, k2: 2})}
    assert lines[k].rate == Decimal("0.7000")
    assert lines[k2].rate == Decimal("0.0000") and lines[k2].direct == 0


def test_clearing_bodies_are_registered_and_validated() -> None:
    import msgspec

    for infno in ("3201", "3202", "3203", "3204", "3260", "3261", "3262"):
        assert infno in BODY_TYPES
    ok = {"data": {"insutype": "390", "clr_type": "21", "setl_optins": "510400", "stmt_begndate": "2026-06-01",
                   "stmt_enddate": "2026-06-01", "medfee_sumamt": -12.5, "fund_pay_sumamt": 0, "acct_pay": 0,
                   "fixmedins_setl_cnt": 1}}
    body = msgspec.json.decode(msgspec.json.encode(ok), type=Input3201)
    assert body.data.medfee_sumamt == Decimal("-12.5") and body.data.refd_setl_flag == "1"
    bad = {**ok, "data": {**ok["data"], "stmt_enddate": "2026-08-01"}}
    with pytest.raises(msgspec.ValidationError, match="longer than 31 days"):
        msgspec.json.decode(msgspec.json.encode(bad), type=Input3201)
    twice = {"data": {"setl_optins": "510400", "stmt_begndate": "2026-06-01", "stmt_enddate": "2026-06-01",
                      "medfee_sumamt": 0, "fund_pay_sumamt": 0, "cash_payamt": 0, "fixmedins_setl_cnt": 0},
             "detail": [{"setl_id": "S1", "medfee_sumamt": 1, "fund_pay_sumamt": 0}] * 2}
    with pytest.raises(msgspec.ValidationError, match="appears twice"):
        msgspec.json.decode(msgspec.json.encode(twice), type=Input3202)
    claim = {"claim_id": "C1", "psn_no": "P1", "insuplc_admdvs": "510421", "mdtrtarea_admvs": "150400",
             "med_type": "21", "begndate": "2026-06-01 08:00:00", "enddate": "2026-06-05 08:00:00",
             "medfee_sumamt": "100.00", "fund_pay_sumamt": "200.00", "reason": "NOT_FILED",
             "claim_time": "2026-06-20 08:00:00"}
    with pytest.raises(msgspec.ValidationError, match="more than medfee_sumamt"):
        msgspec.json.decode(msgspec.json.encode(claim), type=ManualClaim)
