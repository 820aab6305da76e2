"""5201–5206, the pure parts: the bodies' checks and the shaping of shard rows into answers."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from schemas.codec import encode
from schemas.person import CUM_TYPES, cum_info
from schemas.query import PAGE_SIZE_MAX, Input5201, Input5203, Input5205
from services.settle.ledger import _SETL_COLS
from services.settle.logic import settlement_output
from services.settle.queries import accumulator_counters, day_bounds, fee_row, settlement_record, visit_row
from services.settle.state import AMOUNT_FIELDS, Settlement

T = "2026-05-01 08:00:00"


def decode(body_type: type, data: dict[str, Any]) -> Any:
    return msgspec.json.decode(encode({"data": data}), type=body_type)


def test_paging_defaults_and_bounds() -> None:
    q = decode(Input5201, {"psn_no": "P1"}).data
    assert (q.page_num, q.page_size, q.offset) == (1, 20, 0)
    assert decode(Input5201, {"psn_no": "P1", "page_num": 3, "page_size": 7}).data.offset == 14
    assert decode(Input5201, {"psn_no": "P1", "page_size": PAGE_SIZE_MAX}).data.page_size == PAGE_SIZE_MAX
    for bad in ({"page_size": PAGE_SIZE_MAX + 1}, {"page_size": 0}, {"page_num": 0}, {"page_num": "1"}):
        with pytest.raises(msgspec.ValidationError, match=next(iter(bad))):
            decode(Input5201, {"psn_no": "P1", **bad})


def test_ranges_and_the_settlement_query_selector() -> None:
    with pytest.raises(msgspec.ValidationError, match="endtime: before begntime"):
        decode(Input5201, {"psn_no": "P1", "begntime": T, "endtime": "2026-04-30 23:59:59"})
    with pytest.raises(msgspec.ValidationError, match="enddate: before begndate"):
        decode(Input5205, {"psn_no": "P1", "begndate": "2026-05-02", "enddate": "2026-05-01"})
    for selectors in ({}, {"setl_id": "S1", "mdtrt_id": "M1"}, {"begntime": T}, {"mdtrt_id": "M1", "begntime": T,
                                                                                 "endtime": T}):
        with pytest.raises(msgspec.ValidationError):
            decode(Input5203, {"psn_no": "P1", **selectors})
    for selector in ({"setl_id": "S1"}, {"mdtrt_id": "M1"}, {"begntime": T, "endtime": T}):
        assert decode(Input5203, {"psn_no": "P1", **selector}).data.psn_no == "P1"


def test_day_bounds_include_both_days() -> None:
    assert day_bounds(date(2026, 5, 1), date(2026, 5, 31)) == (datetime(2026, 5, 1), datetime(2026, 6, 1))


def _settlement_row(kind: str) -> dict[str, Any]:
    amounts = dict.fromkeys(AMOUNT_FIELDS, 0)
    amounts.update(medfee_sumamt=12345, inscp_scp_amt=12345, hifp_pay=8000, fund_pay_sumamt=8000,
                   psn_part_amt=4345, psn_cash_pay=4345, balc=99)
    sign = -1 if kind == "reverse" else 1
    row = Settlement(setl_id=("R" if sign < 0 else "S") + "1", msgid="H1", kind=kind,
                     orig_setl_id="S1" if sign < 0 else None, mdtrt_id="M1", psn_no="P1",
                     fixmedins_code="H15040000001", insutype="310", med_type="21", scope="local", filing_type=None,
                     insured_admdvs="150402", insured_pool="150400", treating_admdvs="150402",
                     treating_pool="150400", clr_optins="150400", setl_time=datetime(2026, 5, 1, 8, 0, 1),
                     acc_year=2026, amounts={k: sign * v if k != "balc" else v for k, v in amounts.items()},
                     pool_prop_selfpay=Decimal("0.1500"), accum_delta={"basic_paid": sign * 8000})
    record = {c: getattr(row, c) for c in _SETL_COLS if c not in AMOUNT_FIELDS}
    record.update(row.amounts)
    record["accum_delta"] = encode(row.accum_delta).decode()  # jsonb arrives as text
    return {"row": row, "record": record}


@pytest.mark.parametrize("kind", ["settle", "reverse"])
def test_a_ledger_row_rebuilds_its_answer_exactly(kind: str) -> None:
    made = _settlement_row(kind)
    record = settlement_record({**made["record"], "was_reversed": kind == "settle"})
    original = settlement_output(made["row"])
    assert encode({"setlinfo": record.setlinfo, "setldetail": record.setldetail}) == encode(original)
    assert (record.refd_setl_flag, record.orig_setl_id, record.reversed_flag) == (
        ("0", None, "1") if kind == "settle" else ("1", "S1", "0"))


def test_visit_and_fee_rows() -> None:
    visit = {"mdtrt_id": "M1", "psn_no": "P1", "fixmedins_code": "H1", "med_type": "21", "insutype": "390",
             "ipt_otp_no": "ZY1", "begntime": datetime(2026, 5, 1, 8), "endtime": None, "dise_codg": "I10",
             "chronic_disease": None, "state": "admitted"}
    assert msgspec.to_builtins(visit_row(visit)) == {**visit, "begntime": "2026-05-01 08:00:00"}
    fee = {"mdtrt_id": "M1", "feedetl_sn": "7", "med_list_codg": "A", "medins_list_codg": "HA",
           "fee_ocur_time": datetime(2026, 5, 1, 9, 30), "fee_fen": 1050, "cnt": Decimal("3.0000"), "pric_fen": 350,
           "pric_uplmt_fen": 400, "chrgitm_lv": "02", "selfpay_prop": Decimal("0.1000"), "cancelled": True,
           "setl_id": "S9"}
    assert encode(fee_row(fee)) == (
        b'{"feedetl_sn":"7","mdtrt_id":"M1","med_list_codg":"A","medins_list_codg":"HA",'
        b'"fee_ocur_time":"2026-05-01 09:30:00","det_item_fee_sumamt":10.50,"cnt":3.0000,"pric":3.50,'
        b'"pric_uplmt_amt":4.00,"chrgitm_lv":"02","selfpay_prop":0.1000,"vali_flag":"0","setl_id":"S9"}')


def test_accumulators_read_as_1101_does() -> None:
    assert accumulator_counters(None) == {}
    assert cum_info(2026, {}) == [{"year": 2026, "cum_type_code": c, "cum": Decimal("0.00")}
                                  for c in CUM_TYPES.values()]
    row = {**dict.fromkeys(CUM_TYPES, 0), "basic_paid": 26000, "chronic_paid": '{"DM": 26000}'}
    rows = cum_info(2026, accumulator_counters(row))
    assert rows[0] == {"year": 2026, "cum_type_code": "basic_pool_paid", "cum": Decimal("260.00")}
    assert rows[-1] == {"year": 2026, "cum_type_code": "chronic_paid_DM", "cum": Decimal("260.00")}
