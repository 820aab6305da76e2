"""Policy versions by effective date end to end: 赤峰 (150400) has a version from 2027-01-01 (employee
inpatient deductible 三级 900.00 → 800.00, ratio 0.85 → 0.88). A settlement uses the version in force on
its settlement date and records it; its reversal restores exactly what it applied, even after the newer
version took effect; a stay across New Year settles in the year of its settlement date."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest

from loadtest.his import FeeLine, GatewayClient
from tests.integration.conftest import HOSPITALS, ITEM_A, PERSONS, Ledger
from tests.integration.stays import TimedStay

pytestmark = pytest.mark.integration

D = Decimal
OLD, NEW = "150400@base", "150400@2027-01-01"


async def _basic_paid(ledger: Ledger, psn_no: str) -> dict[int, int]:
    rows = await ledger.fetch("SELECT acc_year, basic_paid FROM accumulator WHERE psn_no = $1", psn_no)
    return {r["acc_year"]: r["basic_paid"] for r in rows}


async def _row(ledger: Ledger, setl_id: str) -> tuple[str, int, int, int]:
    r = await ledger.fetchrow("SELECT policy_version, acc_year, act_pay_dedc, hifp_pay FROM settlement"
                              " WHERE setl_id = $1", setl_id)
    return r["policy_version"], r["acc_year"], r["act_pay_dedc"], r["hifp_pay"]


async def _settled_stay(stay: TimedStay, amount: FeeLine, admit: datetime, settle: datetime) -> dict:
    await stay.admit(admit)
    await stay.upload([amount], admit.replace(hour=12))
    assert (await stay.discharge(settle.replace(hour=9)))["infcode"] == 0
    r = await stay.settle(amount.amount, settle, mid=False)
    assert r["infcode"] == 0, r["err_msg"]
    return r["output"]["setlinfo"]


async def test_settlements_and_reversals_either_side_of_a_policy_change(
        refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    person = PERSONS["version_change"].person
    hospital = HOSPITALS["policy_versions"]
    three_thousand = FeeLine(ITEM_A, D(10), D("300.00"))

    # Before the change: deductible 900.00, (3000 − 900) × 0.85 = 1785.00, in 2026.
    a = TimedStay(gateway, hospital, person)
    a_info = await _settled_stay(a, three_thousand, datetime(2026, 12, 20, 9), datetime(2026, 12, 30, 10))
    assert (a_info["act_pay_dedc"], a_info["hifp_pay"], a_info["pool_prop_selfpay"]) == (
        D("900.00"), D("1785.00"), D("0.85"))
    assert await _row(ledger, a_info["setl_id"]) == (OLD, 2026, 90000, 178500)

    # Settled and reversed before the change: (1000 − 900) × 0.85 = 85.00, then nothing.
    c = TimedStay(gateway, hospital, person)
    c_info = await _settled_stay(c, FeeLine(ITEM_A, D(10), D("100.00")), datetime(2026, 12, 21, 9),
                                 datetime(2026, 12, 29, 10))
    assert c_info["hifp_pay"] == D("85.00")
    assert (await c.reverse(c_info["setl_id"], datetime(2026, 12, 30, 11)))["infcode"] == 0
    assert await _basic_paid(ledger, person.psn_no) == {2026: 178500}

    # After the change: deductible 800.00, (3000 − 800) × 0.88 = 1936.00, in 2027.
    b = TimedStay(gateway, hospital, person)
    b_info = await _settled_stay(b, three_thousand, datetime(2027, 1, 2, 9), datetime(2027, 1, 5, 10))
    assert (b_info["act_pay_dedc"], b_info["hifp_pay"], b_info["pool_prop_selfpay"]) == (
        D("800.00"), D("1936.00"), D("0.88"))
    assert await _row(ledger, b_info["setl_id"]) == (NEW, 2027, 80000, 193600)
    assert await _basic_paid(ledger, person.psn_no) == {2026: 178500, 2027: 193600}

    # The reversal after the change restores exactly what the old version applied, in its year.
    undo = await a.reverse(a_info["setl_id"], datetime(2027, 1, 6, 10))
    assert undo["infcode"] == 0, undo["err_msg"]
    u = undo["output"]["setlinfo"]
    assert (u["act_pay_dedc"], u["hifp_pay"], u["pool_prop_selfpay"]) == (D("-900.00"), D("-1785.00"), D("0.85"))
    assert await _row(ledger, u["setl_id"]) == (OLD, 2026, -90000, -178500)
    assert await _basic_paid(ledger, person.psn_no) == {2026: 0, 2027: 193600}

    # Settled again after the change: the new version, in the year of the new settlement date.
    again = await a.settle(D("3000.00"), datetime(2027, 1, 7, 10), mid=False)
    assert again["infcode"] == 0, again["err_msg"]
    g = again["output"]["setlinfo"]
    assert await _row(ledger, g["setl_id"]) == (NEW, 2027, 80000, 193600)
    assert await _basic_paid(ledger, person.psn_no) == {2026: 0, 2027: 387200}

    # A reversal of a new-version settlement restores the new version's amounts.
    undo_b = await b.reverse(b_info["setl_id"], datetime(2027, 1, 8, 10))
    assert undo_b["infcode"] == 0, undo_b["err_msg"]
    assert await _row(ledger, undo_b["output"]["setlinfo"]["setl_id"]) == (NEW, 2027, -80000, -193600)
    assert await _basic_paid(ledger, person.psn_no) == {2026: 0, 2027: 193600}


async def test_stay_across_new_year(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    person = PERSONS["new_year_stay"].person
    stay = TimedStay(gateway, HOSPITALS["policy_versions"], person)
    await stay.admit(datetime(2026, 12, 20, 9))
    await stay.upload([FeeLine(ITEM_A, D(10), D("300.00"))], datetime(2026, 12, 21, 9))
    # A part in December: the old version, the 2026 accumulators, the whole deductible.
    part = await stay.settle(D("3000.00"), datetime(2026, 12, 28, 10), mid=True)
    assert part["infcode"] == 0, part["err_msg"]
    p = part["output"]["setlinfo"]
    assert await _row(ledger, p["setl_id"]) == (OLD, 2026, 90000, 178500)
    await stay.upload([FeeLine(ITEM_A, D(20), D("100.00"))], datetime(2027, 1, 1, 8))
    assert (await stay.discharge(datetime(2027, 1, 2, 9)))["infcode"] == 0
    # The discharge settlement in January: the new version and 2027; the stay's deductible was taken
    # (900.00 already, more than the new 800.00): 2000 × 0.88 = 1760.00.
    final = await stay.settle(D("2000.00"), datetime(2027, 1, 3, 10), mid=False)
    assert final["infcode"] == 0, final["err_msg"]
    f = final["output"]["setlinfo"]
    assert (f["act_pay_dedc"], f["hifp_pay"]) == (D("0.00"), D("1760.00"))
    assert await _row(ledger, f["setl_id"]) == (NEW, 2027, 0, 176000)
    assert await _basic_paid(ledger, person.psn_no) == {2026: 178500, 2027: 176000}
    # Reversed newest first, each in its own year.
    assert (await stay.reverse(f["setl_id"], datetime(2027, 1, 4, 10)))["infcode"] == 0
    assert await _basic_paid(ledger, person.psn_no) == {2026: 178500, 2027: 0}
    assert (await stay.reverse(p["setl_id"], datetime(2027, 1, 4, 11)))["infcode"] == 0
    assert await _basic_paid(ledger, person.psn_no) == {2026: 0, 2027: 0}
    assert await ledger.fetchval("SELECT state FROM visit WHERE mdtrt_id = $1", stay.mdtrt_id) == "discharged"
