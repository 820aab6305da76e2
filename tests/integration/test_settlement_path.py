"""Inpatient settlements end to end: HTTP gateway → Kafka → router → settlement engine → PostgreSQL → reply."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from loadtest.his import FeeLine, GatewayClient, Stay
from tests.integration.conftest import HOSPITALS, ITEM_A, ITEM_B10, ITEM_C, PERSONS, STAY_START, Ledger

pytestmark = pytest.mark.integration

D = Decimal


def stay_for(key: str, hospital: str, *, days: int = 0, **kw: Any) -> Stay:
    person = PERSONS[key][0]
    return Stay(HOSPITALS[hospital], person.psn_no, person.insuplc, person.insutype,
                STAY_START + timedelta(days=days), **kw)


def assert_split(setlinfo: dict[str, Any], expected: dict[str, str]) -> None:
    got = {k: setlinfo[k] for k in expected}
    assert got == {k: D(v) for k, v in expected.items()}


async def test_worked_example_cross_province(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    """REFERENCE §4: 米易县 resident, 低保, 三级 hospital in 赤峰 (another province), TEMPORARY filing."""
    stay = stay_for("example", "chifeng")
    lines = [FeeLine(ITEM_A, D(100), D("300.00")), FeeLine(ITEM_B10, D(10), D("2000.00")),
             FeeLine(ITEM_C, D(5), D("500.00"))]
    r = await gateway.run_stay(stay, lines)
    assert r["infcode"] == 0, r["err_msg"]
    info = r["output"]["setlinfo"]
    assert_split(info, {
        "medfee_sumamt": "52500.00", "fulamt_ownpay_amt": "2500.00", "overlmt_selfpay": "0.00",
        "preselfpay_amt": "2000.00", "inscp_scp_amt": "48000.00", "act_pay_dedc": "800.00",
        "pool_prop_selfpay": "0.4500", "hifp_pay": "21240.00", "hifmi_pay": "7056.00", "hifob_pay": "0.00",
        "maf_pay": "13792.80", "fund_pay_sumamt": "42088.80", "psn_part_amt": "10411.20", "acct_pay": "0.00",
        "psn_cash_pay": "10411.20",
    })
    assert info["clr_optins"] == "510400"  # the insured pooling region clears non-local care
    assert info["medins_setl_id"] == stay.settle()["msgid"][:0] + info["medins_setl_id"]
    row = await ledger.fetchrow("SELECT * FROM settlement WHERE setl_id = $1", info["setl_id"])
    assert row["scope"] == "cross_province"
    assert row["filing_type"] == "TEMPORARY"
    assert (row["hifp_pay"], row["hifmi_pay"], row["maf_pay"], row["fund_pay_sumamt"]) == (
        2124000, 705600, 1379280, 4208880)
    funds = {d["fund_pay_type"]: d["fund_payamt"] for d in r["output"]["setldetail"]}
    assert funds == {"390100": D("21240.00"), "390200": D("7056.00"), "610100": D("13792.80")}


async def test_local_employee_uses_account(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    stay = stay_for("local_employee", "miyi", use_account=True)
    lines = [FeeLine(ITEM_A, D(10), D("300.00")), FeeLine(ITEM_B10, D(1), D("2000.00")),
             FeeLine(ITEM_C, D(1), D("500.00"))]
    r = await gateway.run_stay(stay, lines)
    assert r["infcode"] == 0, r["err_msg"]
    info = r["output"]["setlinfo"]
    # Default employee policy, 三级: deductible 1000, ratio 0.85, local (no cut).
    assert_split(info, {
        "medfee_sumamt": "5500.00", "fulamt_ownpay_amt": "500.00", "preselfpay_amt": "200.00",
        "inscp_scp_amt": "4800.00", "act_pay_dedc": "1000.00", "pool_prop_selfpay": "0.85",
        "hifp_pay": "3230.00", "fund_pay_sumamt": "3230.00", "psn_part_amt": "2270.00", "acct_pay": "2270.00",
        "psn_cash_pay": "0.00", "balc": "2730.00",
    })
    row = await ledger.fetchrow("SELECT scope, clr_optins FROM settlement WHERE setl_id = $1", info["setl_id"])
    assert tuple(row) == ("local", "510400")
    balance = await ledger.fetchval("SELECT balc_fen FROM account WHERE psn_no = $1", stay.psn_no)
    assert balance == 273000


async def test_intra_province_long_term_filing(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    stay = stay_for("intra_resident", "chengdu")
    r = await gateway.run_stay(stay, [FeeLine(ITEM_A, D(10), D("300.00")), FeeLine(ITEM_B10, D(1), D("2000.00"))])
    assert r["infcode"] == 0, r["err_msg"]
    info = r["output"]["setlinfo"]
    # 米易县 resident policy, 三级: deductible 800, ratio 0.55, LONG_TERM cut 0.
    assert_split(info, {
        "medfee_sumamt": "5000.00", "inscp_scp_amt": "4800.00", "act_pay_dedc": "800.00",
        "pool_prop_selfpay": "0.55", "hifp_pay": "2200.00", "hifmi_pay": "0.00", "fund_pay_sumamt": "2200.00",
        "psn_cash_pay": "2800.00",
    })
    row = await ledger.fetchrow("SELECT scope, filing_type FROM settlement WHERE setl_id = $1", info["setl_id"])
    assert tuple(row) == ("intra_province", "LONG_TERM")


async def test_duplicate_msgid_returns_first_response(refdata: dict, gateway: GatewayClient,
                                                      ledger: Ledger) -> None:
    stay = stay_for("plain", "chifeng", days=10)
    r = await gateway.call(stay.admit())
    stay.mdtrt_id = r["output"]["result"]["mdtrt_id"]
    await gateway.call(stay.upload([FeeLine(ITEM_A, D(3), D("400.00"))]))
    await gateway.call(stay.discharge())
    settle = stay.settle()
    first = await gateway.call(settle)
    second = await gateway.call(settle)
    assert first["infcode"] == 0, first["err_msg"]
    assert second == first  # byte-for-byte the stored answer, same inf_refmsgid
    count = await ledger.total("SELECT count(*) FROM settlement WHERE mdtrt_id = $1", stay.mdtrt_id)
    assert count == 1
    # A new msgid for the same visit is refused: it is already settled.
    again = await gateway.call(stay.settle())
    assert again["infcode"] == -1 and again["err_msg"].startswith("VISIT_SETTLED")


async def test_reversal_restores_accumulators_and_account(refdata: dict, gateway: GatewayClient,
                                                          ledger: Ledger) -> None:
    stay = stay_for("retiree", "chifeng", days=20, use_account=True)
    settled = await gateway.run_stay(stay, [FeeLine(ITEM_A, D(10), D("300.00"))])
    assert settled["infcode"] == 0, settled["err_msg"]
    info = settled["output"]["setlinfo"]
    # 赤峰 employee policy, 三级: deductible 900, ratio 0.85 + retiree bonus 0.05.
    assert_split(info, {"act_pay_dedc": "900.00", "pool_prop_selfpay": "0.90", "hifp_pay": "1890.00",
                        "acct_pay": "1000.00", "psn_cash_pay": "110.00", "balc": "0.00"})
    acc = await ledger.fetchrow("SELECT basic_paid FROM accumulator WHERE psn_no = $1 AND acc_year = 2026", stay.psn_no)
    assert acc["basic_paid"] == 189000

    reversed_ = await gateway.call(stay.reverse())
    assert reversed_["infcode"] == 0, reversed_["err_msg"]
    rinfo = reversed_["output"]["setlinfo"]
    assert rinfo["hifp_pay"] == D("-1890.00") and rinfo["acct_pay"] == D("-1000.00")
    acc = await ledger.fetchrow("SELECT * FROM accumulator WHERE psn_no = $1 AND acc_year = 2026", stay.psn_no)
    assert acc["basic_paid"] == 0 and acc["supplementary_paid"] == 0
    assert await ledger.fetchval("SELECT balc_fen FROM account WHERE psn_no = $1", stay.psn_no) == 100000
    # Ledger sums to zero for the visit; reversing twice is refused.
    total = await ledger.total("SELECT sum(fund_pay_sumamt) FROM settlement WHERE mdtrt_id = $1", stay.mdtrt_id)
    assert total == 0
    twice = await gateway.call(stay.reverse())
    assert twice["err_msg"].startswith("SETTLEMENT_REVERSED")
    # The visit can be settled again, with the same result as the first time.
    again = await gateway.call(stay.settle())
    assert again["infcode"] == 0, again["err_msg"]
    assert again["output"]["setlinfo"]["hifp_pay"] == D("1890.00")


async def test_unfiled_non_local_refused_then_promise_filing(refdata: dict, gateway: GatewayClient,
                                                              ledger: Ledger) -> None:
    stay = stay_for("unfiled", "chifeng", days=30)
    refused = await gateway.run_stay(stay, [FeeLine(ITEM_A, D(10), D("300.00"))])
    assert refused["infcode"] == -1
    assert refused["err_msg"].startswith("FILING_REQUIRED")
    assert stay.psn_no not in refused["err_msg"]
    # Filing completed before the discharge settlement (promise system): settles with the TEMPORARY cut.
    stay.promise_filing = True
    r = await gateway.call(stay.settle())
    assert r["infcode"] == 0, r["err_msg"]
    assert r["output"]["setlinfo"]["pool_prop_selfpay"] == D("0.45")  # 0.55 − 0.10
    filing = await ledger.fetchrow("SELECT filing_type, source, target_admdvs FROM filing WHERE psn_no = $1",
                                   stay.psn_no)
    assert tuple(filing) == ("TEMPORARY", "promise", "150000")


async def test_pre_settlement_has_no_effect(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    stay = stay_for("plain", "chifeng", days=40)
    r = await gateway.call(stay.admit())
    stay.mdtrt_id = r["output"]["result"]["mdtrt_id"]
    await gateway.call(stay.upload([FeeLine(ITEM_A, D(1), D("900.00"))]))
    before = await ledger.fetchrow("SELECT * FROM accumulator WHERE psn_no = $1", stay.psn_no)
    pre = await gateway.call(stay.settle(pre=True))
    assert pre["infcode"] == 0, pre["err_msg"]
    assert pre["output"]["setlinfo"]["setl_id"] == ""
    after = await ledger.fetchrow("SELECT * FROM accumulator WHERE psn_no = $1", stay.psn_no)
    assert before == after
    assert await ledger.total("SELECT count(*) FROM settlement WHERE mdtrt_id = $1", stay.mdtrt_id) == 0
    # Settlement before discharge is refused.
    early = await gateway.call(stay.settle())
    assert early["err_msg"].startswith("VISIT_NOT_DISCHARGED")
