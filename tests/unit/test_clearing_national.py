"""Clearing at national shape without a database: the agency code and what it may send, the router's decision
for an agency, a 3261 batch's schema, the month's confirmation state, and a statement re-issued with an
operator adjustment (money only, netting still conserved, the deposits' difference)."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from loadtest.his import Hospital
from schemas.clearing import Input3261
from schemas.codec import Request, decode_envelope, decode_request, encode
from schemas.errors import BrokerError
from schemas.transactions import AGENCY_INFNOS, TRANSACTIONS, may_send
from services.clearing import cli
from services.clearing.logic import (
    MANUAL,
    Adjustment,
    Amounts,
    ClearingError,
    Position,
    PositionKey,
    RowScope,
    drawdowns,
    month_stas,
    month_statement,
    positions_from_statement,
    reissued_positions,
)
from services.clearing.statement import region_statement, to_html, to_wire
from services.refdata.agency import agency_code, agency_pool, is_agency_code
from services.refdata.regions import UnknownRegion
from services.router.logic import ForwardClearing, IngressMeta, Session, route
from tests.unit.test_router_logic import refdata

D = Decimal
META = IngressMeta(reply_topic="fsi.replies", reply_partition=0, received_ns=0)
AGENCY = Hospital("A15040000000", "赤峰市医保经办机构", "150400")
MONTH = "2026-04"


def test_an_agency_code_names_a_known_pooling_region() -> None:
    assert agency_pool("A15040000000") == "150400"
    assert agency_pool("A50000000000") == "500000"  # 重庆 pools at province level
    assert agency_code("510400") == "A51040000000" and is_agency_code("A51040000000")
    assert agency_pool("H15040099901") is None and agency_pool("A1504000000") is None
    assert agency_pool("A15040000001") is None  # not … 00000
    for code in ("A15040200000", "A99999900000"):  # a district (pools at 150400), an unknown region
        with pytest.raises(UnknownRegion):
            agency_pool(code)


def test_an_agency_may_send_only_sessions_and_clearing_details() -> None:
    assert {"9001", "9002", "3260", "3261", "3262"} == AGENCY_INFNOS
    for infno in TRANSACTIONS:
        assert may_send(infno, "A15040000000") == (infno in AGENCY_INFNOS), infno
    assert may_send("3260", "H15040099901") and may_send("3261", "P15040099901")  # hospitals keep theirs
    assert not may_send("2207", "P15040099901") and not may_send("2102", "H15040099901")


def _lenient(env: dict[str, object]) -> Request:
    return Request(decode_envelope(encode(env)), None)


def test_the_router_forwards_an_agency_without_a_hospital_row() -> None:
    ref = refdata()
    assert AGENCY.fixmedins_code not in ref.hospitals
    assert route(_lenient(AGENCY.envelope("3260", {})), ref, META, 10) == ForwardClearing("A15040000000")
    sign_in = decode_request(encode(AGENCY.envelope("9001", {"signIn": {"opter_no": "OP1", "mac": "", "ip": ""}})))
    assert isinstance(route(sign_in, ref, META, 10), Session)
    county = AGENCY.envelope("3261", {})
    county["mdtrtarea_admvs"] = "150402"  # a county of the agency's pooling region
    assert isinstance(route(_lenient(county), ref, META, 10), ForwardClearing)

    def refusal(env: dict[str, object]) -> str:
        with pytest.raises(BrokerError) as e:
            route(_lenient(env), ref, META, 10)
        return e.value.code

    elsewhere = AGENCY.envelope("3260", {})
    elsewhere["mdtrtarea_admvs"] = "510421"
    assert refusal(elsewhere) == "MDTRTAREA_MISMATCH"
    for infno in ("1101", "2207", "3201", "3203", "5301"):
        assert refusal(AGENCY.envelope(infno, {})) == "INSTITUTION_NOT_ALLOWED", infno
    assert refusal(Hospital("A99999900000", "x", "150400").envelope("3260", {})) == "REGION_UNKNOWN"
    assert refusal(Hospital("X15040000000", "x", "150400").envelope("3260", {})) == "HOSPITAL_UNKNOWN"


def test_a_3261_batch_lists_each_row_once() -> None:
    row = {"setl_sn": "S1", "medfee_sumamt": 1, "optins_pay_sumamt": 1}
    body = {"data": {"trt_year": "2026", "trt_month": "4", "totalrow": 2}, "detail": [row, row]}
    with pytest.raises(msgspec.ValidationError, match="a setl_sn appears twice"):
        msgspec.json.decode(msgspec.json.encode({"type": "Input3261", **body}), type=Input3261)


def test_the_months_confirmation_is_complete_when_every_row_is_confirmed_or_disputed() -> None:
    assert month_stas(108, 107, 1) == "complete" and month_stas(108, 99, 1) == "partial"
    assert month_stas(0, 0, 0) == "complete"
    with pytest.raises(ClearingError):
        month_stas(3, 3, 1)
    with pytest.raises(ValueError):
        RowScope()
    with pytest.raises(ValueError):
        RowScope(fixmedins_code="H1", treating_pool="150400")


def _position(insured: str, treating: str, kind: str, cnt: int, hifp: int) -> Position:
    prov = {"510400": "510000", "150400": "150000", "350300": "350000"}
    key = PositionKey(MONTH, insured, treating, kind, False)
    scope = "cross_province"
    return Position(key, prov[insured], prov[treating], scope, cnt, Amounts(hifp * 2, hifp, 0, 0, 0, hifp))


def _adjustment(ref: str, hifp: int, version: int) -> Adjustment:
    return Adjustment(ref, "510400", "150400", "510000", "150000", "cross_province",
                      Amounts(hifp, hifp, 0, 0, 0, hifp), "review", version).checked()


def test_a_reissued_statement_adds_money_only_and_still_nets_to_zero() -> None:
    frozen = [_position("510400", "150400", "settle", 10, 100_000), _position("510400", "150400", "reverse", 1, -5_000),
              _position("350300", "150400", "settle", 4, 40_000)]
    v1 = month_statement(MONTH, 1, "2026-05-01 00:00:00", frozen)
    adjustments = [_adjustment("R1", -1_234, 2), _adjustment("R2", 200, 3)]
    after = reissued_positions(MONTH, positions_from_statement(v1), adjustments)
    v3 = month_statement(MONTH, 3, "2026-05-01 00:00:00", after, [a.as_json() for a in adjustments])
    [manual] = [p for p in after if p.key.kind == MANUAL]
    assert manual.cnt == 0 and manual.amounts.hifp_pay == -1_034 and manual.key.adjustment
    line1 = next(ln for ln in v1["pool_lines"] if ln["insured"] == "510400")  # type: ignore[attr-defined]
    line3 = next(ln for ln in v3["pool_lines"] if ln["insured"] == "510400")  # type: ignore[attr-defined]
    assert line3["net"]["hifp_pay"] == line1["net"]["hifp_pay"] - 1_034 == 93_966
    assert line3["net_cnt"] == line1["net_cnt"] == 9 and line3["adjusted"]["fund_pay_sumamt"] == -1_034
    assert v3["total"]["fund_pay_sumamt"] == v1["total"]["fund_pay_sumamt"] - 1_034  # type: ignore[index]
    assert v3["entry_cnt"] == v1["entry_cnt"] and "adjustments" not in v1
    assert [a["ref"] for a in v3["adjustments"]] == ["R1", "R2"]  # type: ignore[attr-defined]
    assert sum(n["net"]["fund_pay_sumamt"] for n in v3["pool_net"]) == 0  # type: ignore[attr-defined]
    assert drawdowns(after)["510000"] - drawdowns(frozen)["510000"] == -1_034
    shown = to_wire(region_statement(v3, "150000", status="closed"))  # the treating province names both
    assert [a["ref"] for a in shown["adjustments"]] == ["R1", "R2"] and shown["adjustments"][0]["hifp_pay"] == D(
        "-12.34")
    assert to_wire(region_statement(v3, "350300", status="closed"))["adjustments"] == []
    assert "R2 (version 3)" in to_html(region_statement(v3, "510400", status="closed"))
    # Re-issuing from a re-issued body keeps one manual position, not the old one plus the new.
    again = reissued_positions(MONTH, positions_from_statement(v3), adjustments)
    assert sorted(p.key for p in again) == sorted(p.key for p in after)


def test_an_adjustment_is_checked() -> None:
    with pytest.raises(ClearingError, match="different pooling regions"):
        Adjustment("R", "150400", "150400", "150000", "150000", "cross_province", Amounts(1, 1, 0, 0, 0, 1), "r",
                   2).checked()
    with pytest.raises(ClearingError, match="at least one amount"):
        Adjustment("R", "510400", "150400", "510000", "150000", "cross_province", Amounts(), "r", 2).checked()
    with pytest.raises(ClearingError, match="reason"):
        Adjustment("R", "510400", "150400", "510000", "150000", "cross_province", Amounts(1, 1, 0, 0, 0, 1), "",
                       2).checked()


def test_the_adjust_command_reads_signed_amounts_per_field() -> None:
    args = cli.parser().parse_args(["adjust", "--month", MONTH, "--insured", "510400", "--treating", "150400",
                                    "--amount", "hifp_pay=-12.34", "--amount", "maf_pay=0.66", "--amount",
                                    "medfee_sumamt=-11.68", "--reason", "r", "--ref", "R1", "--operator", "li.ming"])
    assert cli.adjustment_amounts(args.amount) == Amounts(-1_168, -1_234, 0, 0, 66, -1_168)
    with pytest.raises(ValueError, match="twice"):
        cli.adjustment_amounts([("hifp_pay", 1), ("hifp_pay", 2)])
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["adjust", "--month", MONTH, "--insured", "510400", "--treating", "150400",
                                 "--amount", "fund_pay_sumamt=1", "--reason", "r", "--ref", "R1"])
    assert Decimal("-12.34") * 100 == -1_234
