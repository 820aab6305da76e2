"""Outpatient (11/14), pharmacy (41), filings online, 1101 and the visit state machine, on the real stack."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from loadtest.his import FeeLine, GatewayClient, OutpatientVisit, Purchase, Stay, run_outpatient, run_purchase
from services.refdata.regions import SEED_REGIONS
from tests.integration.conftest import HOSPITALS, ITEM_A, ITEM_B10, PERSONS, Ledger

pytestmark = pytest.mark.integration
D = Decimal
DAY = datetime(2026, 8, 3, 9, 0)


def person(key: str) -> Any:
    return PERSONS[key].person


def outpatient(key: str, hospital: str = "chifeng", at: datetime = DAY, **kw: Any) -> OutpatientVisit:
    p = person(key)
    return OutpatientVisit(HOSPITALS[hospital], p.psn_no, p.insuplc, p.insutype, at, **kw)


def ok(r: dict[str, Any]) -> dict[str, Any]:
    assert r["infcode"] == 0, r["err_msg"]
    return r


def refused(r: dict[str, Any], code: str) -> None:
    assert r["infcode"] == -1 and r["err_msg"].startswith(code + ": "), r


async def accumulators(ledger: Ledger, psn_no: str, year: int = 2026) -> dict[str, Any]:
    row = await ledger.fetchrow("SELECT * FROM accumulator WHERE psn_no = $1 AND acc_year = $2", psn_no, year)
    return dict(row) if row else {}


async def test_general_outpatient_deductible_spans_visits(refdata: dict, gateway: GatewayClient,
                                                          ledger: Ledger) -> None:
    """Employee outpatient: annual deductible 1000, ratio 0.60 (赤峰 uses the default outpatient policy)."""
    first = outpatient("op_employee", use_account=True)
    s1 = ok(await run_outpatient(gateway, first, [FeeLine(ITEM_A, D(1), D("800.00"))]))["output"]["setlinfo"]
    assert (s1["act_pay_dedc"], s1["hifp_pay"], s1["acct_pay"], s1["balc"]) == (D(800), 0, D(800), D(2200))
    second = outpatient("op_employee", at=DAY + timedelta(hours=2), use_account=True)
    s2 = ok(await run_outpatient(gateway, second, [FeeLine(ITEM_A, D(1), D("700.00"))]))["output"]["setlinfo"]
    assert (s2["act_pay_dedc"], s2["hifp_pay"], s2["pool_prop_selfpay"]) == (D(200), D(300), D("0.6"))
    assert (s2["acct_pay"], s2["psn_cash_pay"], s2["balc"]) == (D(400), 0, D(1800))
    acc = await accumulators(ledger, first.psn_no)
    assert (acc["outpatient_dedc_used"], acc["outpatient_paid"]) == (100000, 30000)
    # Reversal restores exactly what the second visit added, account included.
    ok(await gateway.call(second.reverse()))
    acc = await accumulators(ledger, first.psn_no)
    assert (acc["outpatient_dedc_used"], acc["outpatient_paid"]) == (80000, 0)
    assert await ledger.fetchval("SELECT balc_fen FROM account WHERE psn_no = $1", first.psn_no) == 220000


async def test_chronic_outpatient_needs_eligibility(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    visit = outpatient("chronic_dm", med_type="14", chronic_disease="DM")
    s = ok(await run_outpatient(gateway, visit, [FeeLine(ITEM_A, D(1), D("1000.00"))]))["output"]["setlinfo"]
    assert (s["med_type"], s["act_pay_dedc"], s["hifp_pay"], s["psn_cash_pay"]) == ("14", 0, D(650), D(350))
    acc = await accumulators(ledger, visit.psn_no)
    assert acc["basic_paid"] == 65000 and '"DM": 65000' in acc["chronic_paid"]

    # Not eligible: refused at 2203; eligible after the chronic-disease filing (2503); revoked by 2504.
    p = person("chronic_none")
    unfit = outpatient("chronic_none", med_type="14", chronic_disease="DM")
    refused(await run_outpatient(gateway, unfit, [FeeLine(ITEM_A, D(1), D("100.00"))]), "CHRONIC_DISEASE_NOT_COVERED")
    ok(await gateway.call(HOSPITALS["chifeng"].envelope(
        "2503", {"data": {"psn_no": p.psn_no, "chronic_disease": "DM"}}, insuplc=p.insuplc)))
    fit = outpatient("chronic_none", at=DAY + timedelta(hours=1), med_type="14", chronic_disease="DM")
    ok(await run_outpatient(gateway, fit, [FeeLine(ITEM_A, D(1), D("100.00"))]))
    ok(await gateway.call(HOSPITALS["chifeng"].envelope(
        "2504", {"data": {"psn_no": p.psn_no, "chronic_disease": "DM"}}, insuplc=p.insuplc)))
    again = outpatient("chronic_none", at=DAY + timedelta(hours=2), med_type="14", chronic_disease="DM")
    refused(await run_outpatient(gateway, again, [FeeLine(ITEM_A, D(1), D("100.00"))]), "CHRONIC_DISEASE_NOT_COVERED")


async def test_pharmacy_account_and_cash(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    p = person("pharmacy_employee")
    pharmacy = HOSPITALS["chifeng_pharmacy"]
    first = Purchase(pharmacy, p.psn_no, p.insuplc, p.insutype, DAY, [FeeLine(ITEM_A, D(2), D("150.00"))])
    pre = ok(await gateway.call(first.settle(pre=True)))["output"]["setlinfo"]
    assert pre["setl_id"] == "" and pre["acct_pay"] == D(300)
    s = ok(await run_purchase(gateway, first))["output"]["setlinfo"]
    assert (s["med_type"], s["fund_pay_sumamt"], s["acct_pay"], s["psn_cash_pay"], s["balc"]) == (
        "41", 0, D(300), 0, D(200))
    ok(await gateway.call(first.reverse()))
    refused(await gateway.call(first.reverse()), "SETTLEMENT_REVERSED")
    assert await ledger.fetchval("SELECT balc_fen FROM account WHERE psn_no = $1", p.psn_no) == 50000
    bigger = Purchase(pharmacy, p.psn_no, p.insuplc, p.insutype, DAY + timedelta(hours=1),
                      [FeeLine(ITEM_B10, D(3), D("200.00"))])
    s = ok(await run_purchase(gateway, bigger))["output"]["setlinfo"]
    assert (s["acct_pay"], s["psn_cash_pay"], s["balc"]) == (D(500), D(100), 0)


async def test_filing_online_takes_effect_and_revocation(refdata: dict, gateway: GatewayClient) -> None:
    p = person("far_unfiled")  # 米易县 resident treated in 赤峰: cross-province
    chifeng = HOSPITALS["chifeng"]
    visit = outpatient("far_unfiled")
    refused(await run_outpatient(gateway, visit, [FeeLine(ITEM_A, D(1), D("300.00"))]), "FILING_REQUIRED")
    refused(await gateway.call(Purchase(HOSPITALS["chifeng_pharmacy"], p.psn_no, p.insuplc, p.insutype, DAY,
                                        [FeeLine(ITEM_A, D(1), D("10.00"))]).settle()), "FILING_REQUIRED")
    filed = ok(await gateway.call(chifeng.envelope("2501", {"data": {
        "psn_no": p.psn_no, "filing_type": "LONG_TERM", "begndate": "2026-01-01", "enddate": "2026-12-31",
        "target_admdvs": "150000"}}, insuplc=p.insuplc)))
    filing_id = filed["output"]["filinginfo"]["filing_id"]
    s = ok(await gateway.call(visit.settle()))["output"]["setlinfo"]  # effective at once: same visit settles
    assert s["pool_prop_selfpay"] == D("0.5")  # resident outpatient 0.50, LONG_TERM cut 0
    listed = ok(await gateway.call(chifeng.envelope("5301", {"data": {"psn_no": p.psn_no}}, insuplc=p.insuplc)))
    assert [f["filing_id"] for f in listed["output"]["filinginfo"]] == [filing_id]
    ok(await gateway.call(chifeng.envelope("2502", {"data": {"psn_no": p.psn_no, "filing_id": filing_id}},
                                           insuplc=p.insuplc)))
    later = outpatient("far_unfiled", at=DAY + timedelta(days=1))
    refused(await run_outpatient(gateway, later, [FeeLine(ITEM_A, D(1), D("300.00"))]), "FILING_REQUIRED")
    refused(await gateway.call(chifeng.envelope("2502", {"data": {"psn_no": p.psn_no, "filing_id": "NOPE"}},
                                                insuplc=p.insuplc)), "FILING_UNKNOWN")


async def test_person_info_1101(refdata: dict, gateway: GatewayClient) -> None:
    spec = PERSONS["info"]
    visit = outpatient("info", med_type="14", chronic_disease="HTN", use_account=True)
    s = ok(await run_outpatient(gateway, visit, [FeeLine(ITEM_A, D(1), D("100.00"))]))["output"]["setlinfo"]
    # Employee chronic ratio 0.80; 特困 assistance pays 90% of the remaining in-scope 20.00.
    assert (s["hifp_pay"], s["maf_pay"], s["acct_pay"]) == (D(80), D(18), D(2))
    assert spec.certno is not None
    r = ok(await gateway.call(HOSPITALS["chifeng"].envelope("1101", {"data": {
        "mdtrt_cert_type": "02", "mdtrt_cert_no": spec.certno, "psn_cert_type": "01", "certno": spec.certno}})))
    out = r["output"]
    base = out["baseinfo"]
    assert (base["psn_no"], base["brdy"], base["gend"]) == (
        spec.person.psn_no, "1958-03-06", "1" if int(spec.certno[16]) % 2 else "2")
    assert out["insuinfo"][0]["balc"] == D("1232.56")
    assert out["insuinfo"][0]["insuplc_admdvs"] == "150400"
    assert out["idetinfo"] == [{"psn_idet_type": "2", "memo": "特困"}]
    assert [f["filing_type"] for f in out["filinginfo"]] == ["LONG_TERM"]
    assert "filing_id" not in out["filinginfo"][0]
    assert out["chronicinfo"] == [{"chronic_disease": "HTN"}]
    cum = {c["cum_type_code"]: c["cum"] for c in out["cuminfo"]}
    assert cum["basic_pool_paid"] == D(80) and cum["chronic_paid_HTN"] == D(80) and cum["assistance_paid"] == D(18)
    unknown = await gateway.call(HOSPITALS["chifeng"].envelope("1101", {"data": {
        "mdtrt_cert_type": "02", "mdtrt_cert_no": "000000000000000000"}}))
    refused(unknown, "PERSON_UNKNOWN")


async def test_visit_state_machine(refdata: dict, gateway: GatewayClient) -> None:
    p = person("op_employee")
    stay = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype, DAY + timedelta(days=5))
    stay.mdtrt_id = ok(await gateway.call(stay.admit()))["output"]["result"]["mdtrt_id"]
    ok(await gateway.call(stay.upload([FeeLine(ITEM_A, D(1), D("500.00"))])))

    def cancel_discharge() -> dict[str, Any]:
        return stay.hospital.envelope("2405", {"data": {"mdtrt_id": stay.mdtrt_id, "psn_no": p.psn_no}},
                                      insuplc=p.insuplc)

    refused(await gateway.call(cancel_discharge()), "VISIT_NOT_DISCHARGED")
    ok(await gateway.call(stay.discharge()))
    refused(await gateway.call(stay.discharge()), "VISIT_DISCHARGED")
    ok(await gateway.call(cancel_discharge()))
    change = stay.hospital.envelope("2403", {"adminfo": {"mdtrt_id": stay.mdtrt_id, "psn_no": p.psn_no,
                                                         "dise_codg": "K35.900"}}, insuplc=p.insuplc)
    ok(await gateway.call(change))
    ok(await gateway.call(stay.discharge()))
    ok(await gateway.call(stay.settle()))
    refused(await gateway.call(stay.settle()), "VISIT_SETTLED")
    refused(await gateway.call(stay.upload([FeeLine(ITEM_A, D(1), D("1.00"))], first_sn=50)), "VISIT_SETTLED")
    refused(await gateway.call(stay.hospital.envelope("2302", {"data": [
        {"feedetl_sn": "0000", "mdtrt_id": stay.mdtrt_id, "psn_no": p.psn_no}]}, insuplc=p.insuplc)), "VISIT_SETTLED")
    refused(await gateway.call(stay.hospital.envelope("2404", {"data": {
        "mdtrt_id": stay.mdtrt_id, "psn_no": p.psn_no}}, insuplc=p.insuplc)), "VISIT_SETTLED")
    # Outpatient numbers on an inpatient visit, and another hospital reversing this one's settlement.
    as_outpatient = OutpatientVisit(stay.hospital, p.psn_no, p.insuplc, p.insutype, DAY, mdtrt_id=stay.mdtrt_id)
    refused(await gateway.call(as_outpatient.upload([FeeLine(ITEM_A, D(1), D("1.00"))])), "VISIT_TYPE_MISMATCH")
    stranger = Stay(HOSPITALS["miyi"], p.psn_no, p.insuplc, p.insutype, DAY, mdtrt_id=stay.mdtrt_id,
                    setl_id="S" + "0" * 30)
    refused(await gateway.call(stranger.reverse()), "VISIT_UNKNOWN")
    # A cancelled registration cannot be settled.
    visit = outpatient("op_employee", at=DAY + timedelta(days=6))
    visit.mdtrt_id = ok(await gateway.call(visit.register()))["output"]["data"]["mdtrt_id"]
    ok(await gateway.call(visit.upload([FeeLine(ITEM_A, D(1), D("10.00"))])))
    ok(await gateway.call(visit.hospital.envelope("2202", {"data": {
        "psn_no": p.psn_no, "mdtrt_id": visit.mdtrt_id, "ipt_otp_no": "X"}}, insuplc=p.insuplc)))
    refused(await gateway.call(visit.settle()), "VISIT_CANCELLED")


async def test_calendar_year_boundary(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    """Accumulators are per calendar year of the settlement (Asia/Shanghai wall time on the wire)."""
    new_year = datetime(2027, 1, 1, 0, 0)
    lines = [FeeLine(ITEM_A, D(1), D("600.00"))]
    late = ok(await run_outpatient(gateway, outpatient("year_boundary", at=new_year - timedelta(minutes=10)), lines))
    early = ok(await run_outpatient(gateway, outpatient("year_boundary", at=new_year + timedelta(minutes=1)), lines))
    assert late["output"]["setlinfo"]["act_pay_dedc"] == D(600)
    assert early["output"]["setlinfo"]["act_pay_dedc"] == D(600)  # a new year, a new deductible
    last = ok(await run_outpatient(gateway, outpatient("year_boundary", at=new_year - timedelta(minutes=5)), lines))
    assert (last["output"]["setlinfo"]["act_pay_dedc"], last["output"]["setlinfo"]["hifp_pay"]) == (D(400), D(120))
    psn_no = person("year_boundary").psn_no
    assert (await accumulators(ledger, psn_no, 2026))["outpatient_dedc_used"] == 100000
    assert (await accumulators(ledger, psn_no, 2027))["outpatient_dedc_used"] == 60000


async def _hospital_day(gateway: GatewayClient, code: str) -> list[dict[str, Any]]:
    hospital, pharmacy = HOSPITALS[f"seed_{code}"], HOSPITALS[f"seed_{code}_pharmacy"]
    resident, employee, visitor = (person(f"day_{code}_{role}") for role in ("resident", "employee", "visitor"))
    t = datetime(2026, 9, 1, 8, 0)
    results = []
    for i in range(3):  # general outpatient, mostly
        v = OutpatientVisit(hospital, resident.psn_no, resident.insuplc, resident.insutype, t + timedelta(minutes=i))
        results.append(await run_outpatient(gateway, v, [FeeLine(ITEM_A, D(1), D("88.00"))]))
    chronic = OutpatientVisit(hospital, employee.psn_no, employee.insuplc, employee.insutype, t + timedelta(hours=1),
                              med_type="14", chronic_disease="HTN", use_account=True)
    results.append(await run_outpatient(gateway, chronic, [FeeLine(ITEM_B10, D(2), D("120.00"))]))
    results.append(await run_purchase(gateway, Purchase(pharmacy, employee.psn_no, employee.insuplc, employee.insutype,
                                                        t + timedelta(hours=2), [FeeLine(ITEM_A, D(1), D("45.50"))])))
    away = OutpatientVisit(hospital, visitor.psn_no, visitor.insuplc, visitor.insutype, t + timedelta(hours=3))
    results.append(await run_outpatient(gateway, away, [FeeLine(ITEM_A, D(1), D("300.00"))]))
    stay = Stay(hospital, visitor.psn_no, visitor.insuplc, visitor.insutype, t + timedelta(hours=4))
    results.append(await gateway.run_stay(stay, [FeeLine(ITEM_A, D(5), D("400.00")), FeeLine(ITEM_B10, D(1),
                                                                                            D("900.00"))]))
    inpatient_local = Stay(hospital, resident.psn_no, resident.insuplc, resident.insutype, t + timedelta(hours=5))
    results.append(await gateway.run_stay(inpatient_local, [FeeLine(ITEM_A, D(4), D("250.00"))], reverse=True))
    return results


async def test_hospital_day_per_seed_region(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    days = await asyncio.gather(*(_hospital_day(gateway, code) for code in SEED_REGIONS))
    for code, results in zip(SEED_REGIONS, days, strict=True):
        for r in results:
            assert r["infcode"] == 0, (code, r["err_msg"])
        rows = await ledger.fetch(
            "SELECT med_type, scope, kind FROM settlement WHERE fixmedins_code = ANY($1) AND setl_time >= '2026-09-01'"
            " AND setl_time < '2026-09-10' AND psn_no = ANY($2)",
            [HOSPITALS[f"seed_{code}"].fixmedins_code, HOSPITALS[f"seed_{code}_pharmacy"].fixmedins_code],
            [person(f"day_{code}_{role}").psn_no for role in ("resident", "employee", "visitor")],
        )
        kinds = sorted((r["med_type"], r["scope"], r["kind"]) for r in rows)
        assert kinds == sorted([
            ("11", "local", "settle"), ("11", "local", "settle"), ("11", "local", "settle"),
            ("14", "local", "settle"), ("41", "local", "settle"), ("11", "cross_province", "settle"),
            ("21", "cross_province", "settle"), ("21", "local", "settle"), ("21", "local", "reverse"),
        ]), code


async def test_fee_and_visit_cancellations(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    p = person("op_employee")
    # Outpatient: cancel one uploaded item (2205), settle on the rest.
    visit = outpatient("op_employee", at=DAY + timedelta(days=8))
    visit.mdtrt_id = ok(await gateway.call(visit.register()))["output"]["data"]["mdtrt_id"]
    ok(await gateway.call(visit.upload([FeeLine(ITEM_A, D(1), D("10.00")), FeeLine(ITEM_A, D(1), D("20.00"))])))
    cancelled = ok(await gateway.call(visit.hospital.envelope("2205", {"data": [
        {"mdtrt_id": visit.mdtrt_id, "psn_no": p.psn_no, "feedetl_sn": "000002"}]}, insuplc=p.insuplc)))
    assert cancelled["output"] == {"cancelled": 1}
    refused(await gateway.call(visit.settle()), "MEDFEE_MISMATCH")  # the HIS still counts 30.00
    visit.fees = visit.fees[:1]
    assert ok(await gateway.call(visit.settle()))["output"]["setlinfo"]["medfee_sumamt"] == D(10)
    # Inpatient: cancel all fees (2302 "0000"), then the admission itself (2404).
    stay = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype, DAY + timedelta(days=9))
    stay.mdtrt_id = ok(await gateway.call(stay.admit()))["output"]["result"]["mdtrt_id"]
    ok(await gateway.call(stay.upload([FeeLine(ITEM_A, D(1), D("5.00")), FeeLine(ITEM_B10, D(1), D("6.00"))])))
    all_fees = ok(await gateway.call(stay.hospital.envelope("2302", {"data": [
        {"feedetl_sn": "0000", "mdtrt_id": stay.mdtrt_id, "psn_no": p.psn_no}]}, insuplc=p.insuplc)))
    assert all_fees["output"] == {"cancelled": 2}
    ok(await gateway.call(stay.hospital.envelope("2404", {"data": {"mdtrt_id": stay.mdtrt_id, "psn_no": p.psn_no}},
                                                 insuplc=p.insuplc)))
    refused(await gateway.call(stay.discharge()), "VISIT_CANCELLED")
    row = await ledger.fetchrow("SELECT state FROM visit WHERE mdtrt_id = $1", stay.mdtrt_id)
    assert row["state"] == "cancelled"
    assert await ledger.total("SELECT count(*) FROM fee_item WHERE mdtrt_id = $1 AND NOT cancelled",
                             stay.mdtrt_id) == 0


async def test_refused_fee_upload_changes_nothing(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    p = person("op_employee")
    visit = outpatient("op_employee", at=DAY + timedelta(days=12))
    visit.mdtrt_id = ok(await gateway.call(visit.register()))["output"]["data"]["mdtrt_id"]
    ok(await gateway.call(visit.upload([FeeLine(ITEM_A, D(1), D("10.00"))])))  # feedetl_sn 000001
    # 000001 again with other content, after a new 000002: the whole upload is refused, 000002 included.
    env = visit.upload([FeeLine(ITEM_A, D(1), D("11.00")), FeeLine(ITEM_A, D(1), D("5.00"))])
    env["input"]["feedetail"][1]["feedetl_sn"] = "000002"
    env["input"]["feedetail"][0]["feedetl_sn"] = "000001"
    refused(await gateway.call(env), "FEE_ITEM_DUPLICATE")
    sns = await ledger.fetch("SELECT feedetl_sn, fee_fen FROM fee_item WHERE mdtrt_id = $1", visit.mdtrt_id)
    assert [(r["feedetl_sn"], r["fee_fen"]) for r in sns] == [("000001", 1000)]
    assert p.psn_no == visit.psn_no
