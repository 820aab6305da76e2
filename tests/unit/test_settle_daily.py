"""services/settle/daily.py: what a batch's new ledger rows add to ledger_daily (the sums of the shard's
ledger_daily_add), pure."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import pytest

from services.settle.daily import COLUMNS, daily_sums
from services.settle.state import AMOUNT_FIELDS, Settlement


def _row(setl_id: str, kind: str, when: datetime, fund: int, *, orig: str | None = None, mid: bool = False,
         treating: str = "150402") -> Settlement:
    sign = -1 if kind == "reverse" else 1
    amounts = dict.fromkeys(AMOUNT_FIELDS, 0)
    amounts.update(medfee_sumamt=sign * (fund + 1_000), hifp_pay=sign * fund, fund_pay_sumamt=sign * fund)
    return Settlement(setl_id=setl_id, msgid="H" + setl_id, kind=kind, orig_setl_id=orig, mdtrt_id="M1",
                      psn_no="P1", fixmedins_code="H15040000001", insutype="310", med_type="21", scope="local",
                      filing_type=None, insured_admdvs="150402", insured_pool="150400", treating_admdvs=treating,
                      treating_pool=treating[:4] + "00", clr_optins="150400", setl_time=when, acc_year=when.year,
                      amounts=amounts, pool_prop_selfpay=Decimal(0), accum_delta={}, mid_setl=mid)


DAY1, DAY2 = datetime(2026, 5, 1, 9, 0), datetime(2026, 5, 2, 23, 59, 59)
KEY1 = (date(2026, 5, 1), "150000", "150000", "local", "21")
KEY2 = (date(2026, 5, 2), "150000", "150000", "local", "21")


def _as_dicts(rows: list[tuple[object, ...]]) -> list[dict[str, object]]:
    return [dict(zip(COLUMNS, r, strict=True)) for r in rows]


def test_a_settlement_counts_once_with_its_money_on_its_day_and_provinces() -> None:
    [row] = _as_dicts(daily_sums([_row("S1", "settle", DAY1, 8_000)], {}))
    assert row == {"day": date(2026, 5, 1), "insured_prov": "150000", "treating_prov": "150000", "scope": "local",
                   "med_type": "21", "settled": 1, "reversed": 0, "direct": 1, "medfee_sumamt": 9_000,
                   "fund_pay_sumamt": 8_000, "hifp_pay": 8_000, "hifmi_pay": 0, "hifob_pay": 0, "maf_pay": 0}


def test_a_reversal_takes_the_direct_count_off_its_originals_day() -> None:
    original = _row("S1", "settle", DAY1, 8_000)
    reversal = _row("R2", "reverse", DAY2, 8_000, orig="S1")
    sums = daily_sums([reversal], {"S1": original})
    assert [r[:5] for r in sums] == [KEY1, KEY2]  # key order
    day1, day2 = _as_dicts(sums)
    assert (day1["settled"], day1["reversed"], day1["direct"], day1["medfee_sumamt"]) == (0, 0, -1, 0)
    assert (day2["settled"], day2["reversed"], day2["direct"], day2["medfee_sumamt"]) == (0, 1, 0, -9_000)


def test_mid_stay_parts_add_money_but_no_person_time_and_nor_does_their_reversal() -> None:
    part = _row("S1", "settle", DAY1, 5_000, mid=True)
    reversal = _row("R2", "reverse", DAY1, 5_000, orig="S1", mid=True)
    [row] = _as_dicts(daily_sums([part, reversal], {"S1": part}))
    assert (row["settled"], row["reversed"], row["direct"], row["fund_pay_sumamt"]) == (1, 1, 0, 0)


def test_rows_of_one_key_add_up_and_keys_stay_apart() -> None:
    rows = [_row("S1", "settle", DAY1, 1_000), _row("S2", "settle", DAY1, 2_000),
            _row("S3", "settle", DAY1, 4_000, treating="440300")]
    sums = _as_dicts(daily_sums(rows, {}))
    assert [(r["treating_prov"], r["settled"], r["direct"], r["hifp_pay"]) for r in sums] == [
        ("150000", 2, 2, 3_000), ("440000", 1, 1, 4_000)]


def test_a_reversal_without_its_original_is_an_error_not_a_wrong_sum() -> None:
    with pytest.raises(KeyError):
        daily_sums([_row("R2", "reverse", DAY2, 1, orig="S1")], {})
