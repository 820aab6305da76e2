"""Deductions (拒付) of confirmed judgements, and the Judgements page's pure parts, without a database:
the deduction month, the amounts, their own line in pair lines, nets and statements, the filters, the mask,
the reason, who may review what."""

from __future__ import annotations

import csv
import io

import pytest

from services.clearing.logic import (
    DEDUCTION,
    ZERO,
    Amounts,
    ClearingError,
    Deduction,
    Position,
    PositionKey,
    aggregate,
    compact_month,
    deduction_amounts,
    deduction_month,
    deduction_positions,
    drawdowns,
    merge,
    month_of_compact,
    month_statement,
    net_positions,
    pool_lines,
    positions_from_statement,
)
from services.clearing.statement import region_statement, to_csv, to_html, to_wire
from services.clearing.store import deduction_of
from services.dashboard.judgements import (
    BadFilter,
    Filters,
    check_decision,
    check_reason,
    mask_psn,
    parse_filters,
    refusal,
)
from tests.unit.test_clearing_logic import amounts, row

# 510400 米易 (四川) insured, 150400 赤峰 (内蒙古) treating; 510100 成都 (四川).


def test_the_deduction_month_is_the_first_open_month_after_the_evidence() -> None:
    assert deduction_month("2025-09", set()) == "2025-10"
    assert deduction_month("2025-09", {"2025-09"}) == "2025-10"
    assert deduction_month("2025-09", {"2025-10", "2025-11"}) == "2025-12"
    assert deduction_month("2025-12", {"2026-01"}) == "2026-02"
    with pytest.raises(ValueError):
        deduction_month("2025-13", set())


def test_compact_months_round_trip() -> None:
    assert compact_month("2025-10") == "202510"
    assert month_of_compact("202510") == "2025-10"
    with pytest.raises(ValueError):
        month_of_compact("202513")


def test_a_deduction_lowers_the_basic_pool_and_the_fund_total_by_the_suspect_amount() -> None:
    assert deduction_amounts(123_456) == Amounts(0, -123_456, 0, 0, 0, -123_456)
    assert deduction_amounts(0) == ZERO
    with pytest.raises(ClearingError):
        deduction_amounts(-1)


def test_deduction_of_a_judgement_maps_its_pools_and_local_care_has_none() -> None:
    d = deduction_of("a" * 32, "2025-10", "510421", "150402", 98_765)
    assert d == Deduction("a" * 32, "2025-10", "510400", "150400", "510000", "150000", "cross_province",
                          Amounts(0, -98_765, 0, 0, 0, -98_765))
    intra = deduction_of("b" * 32, "2025-10", "510400", "510100", 1)
    assert intra is not None and intra.scope == "intra_province"
    assert deduction_of("c" * 32, "2025-10", "510400", "510421", 5) is None  # one pooling region


def _deduction(jr: str, fen: int) -> Deduction:
    d = deduction_of(jr, "2025-10", "510400", "150400", fen)
    assert d is not None
    return d


def test_deductions_sum_into_one_position_per_pair_counting_judgements() -> None:
    pos = deduction_positions([_deduction("a", 100), _deduction("b", 250)])
    key = PositionKey("2025-10", "510400", "150400", DEDUCTION, False)
    assert list(pos) == [key]
    assert pos[key].cnt == 2 and pos[key].amounts == Amounts(0, -350, 0, 0, 0, -350)


def _month_with_deduction() -> dict[PositionKey, Position]:
    settled = aggregate([(row("S1", "510400", "150400", "2025-10-03 10:00:00", amounts(10_000, 2_000)), "2025-10"),
                         (row("S2", "150400", "510400", "2025-10-04 10:00:00", amounts(3_000)), "2025-10")])
    return merge(settled, deduction_positions([_deduction("a", 1_500)]))


def test_a_deduction_is_its_own_line_and_the_net_and_drawdown_reflect_it() -> None:
    positions = _month_with_deduction()
    lines = {(ln.insured, ln.treating): ln for ln in pool_lines(positions.values())}
    line = lines[("510400", "150400")]
    assert line.deduct_cnt == 1 and line.deducted == Amounts(0, -1_500, 0, 0, 0, -1_500)
    assert line.settled.fund_pay_sumamt == 12_000
    assert line.net.fund_pay_sumamt == 10_500 and line.net.hifp_pay == 8_500
    assert line.net_cnt == 1  # person-times unchanged by a deduction
    nets = {n.region: n for n in net_positions(pool_lines(positions.values()))}
    assert nets["510400"].payable.fund_pay_sumamt == 10_500
    assert nets["150400"].receivable.fund_pay_sumamt == 10_500
    assert drawdowns(positions.values()) == {"150000": 3_000, "510000": 10_500}


def test_the_statement_lists_the_deduction_and_reads_back_the_same() -> None:
    positions = _month_with_deduction()
    body = month_statement("2025-10", 1, "2025-11-01 09:00:00", positions.values())
    assert body["entry_cnt"] == 2  # ledger rows; the judgement is not an entry
    assert {p.key: p for p in positions_from_statement(body)} == positions
    st = region_statement(body, "510400", status="closed", digest="d")
    wire = to_wire(st)
    payable = wire["payable"][0]
    assert payable["counterparty"] == "150400" and payable["deduct_cnt"] == 1
    assert str(payable["deducted"]["hifp_pay"]) == "-15.00" and str(payable["net"]["fund_pay_sumamt"]) == "105.00"
    rows = list(csv.DictReader(io.StringIO(to_csv(st).split("\n", 1)[1])))
    assert rows[0]["section"] == "payable" and rows[0]["deduct_cnt"] == "1"
    assert rows[0]["deducted_fund_pay_sumamt"] == "-15.00" and rows[0]["net_fund_pay_sumamt"] == "105.00"
    page = to_html(st)
    assert "Deductions — confirmed monitoring judgements" in page and "-15.00" in page


def test_a_statement_frozen_before_deductions_still_reads() -> None:
    positions = _month_with_deduction()
    body = month_statement("2025-10", 1, "2025-11-01 09:00:00", positions.values())
    for line in body["pool_lines"]:  # type: ignore[attr-defined]
        del line["deducted"], line["deduct_cnt"]
    st = region_statement(body, "510400", status="closed")
    assert st.payable[0].deducted == ZERO


# --- the Judgements page ---------------------------------------------------------------------------------


def test_filters_parse_and_refuse_with_the_field_named() -> None:
    f = parse_filters({"rule": "OVERLAP_INPATIENT", "status": "open", "prov": "510000", "hospital": "H15040200001",
                       "month": "2025-10", "page": "2"})
    assert f == Filters("OVERLAP_INPATIENT", "open", "510000", "H15040200001", "2025-10", 2)
    assert f.query(page=3) == ("rule=OVERLAP_INPATIENT&status=open&prov=510000&hospital=H15040200001&month=2025-10"
                               "&page=3")
    assert parse_filters({}) == Filters()
    assert Filters().query() == ""
    for query, field in [({"status": "closed"}, "status"), ({"prov": "510400"}, "prov"),
                         ({"month": "2025-13"}, "month"), ({"rule": "drop table"}, "rule"), ({"page": "0"}, "page"),
                         ({"page": "x"}, "page"), ({"hospital": "H1'--"}, "hospital")]:
        with pytest.raises(BadFilter, match=f"^{field}:"):
            parse_filters(query)


def test_psn_no_shows_at_most_its_last_four() -> None:
    assert mask_psn("51040219900101123X") == "**************123X"
    assert mask_psn("12345") == "****2345"
    assert mask_psn("1234") == "****"
    assert mask_psn("") == "****"


def test_reason_and_decision() -> None:
    assert check_reason("  billed twice, the hospital agrees \n") == "billed twice, the hospital agrees"
    assert check_reason("x" * 500) == "x" * 500
    for bad in ("", "   ", None, "x" * 501, "bad\x00byte"):
        with pytest.raises(ValueError):
            check_reason(bad)
    assert check_decision("confirm") == "confirm" and check_decision("dismiss") == "dismiss"
    with pytest.raises(ValueError):
        check_decision("withdraw")


def test_only_an_open_judgement_is_reviewed() -> None:
    assert refusal("open", None) is None
    assert "withdrawn" in (refusal("withdrawn", None) or "")
    assert refusal("confirmed", "li.ming") == (
        "this judgement was already reviewed (confirmed by li.ming); a review is final")
    assert "dismissed by" in (refusal("dismissed", "wang") or "")
