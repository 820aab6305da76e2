"""5201–5206 on the real stack, through the gateway, signed: the asking institution sees its own data only."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from loadtest.his import FeeLine, GatewayClient, Hospital, OutpatientVisit, Purchase, Stay, run_outpatient, wire_time
from schemas.codec import encode
from schemas.person import CUM_TYPES
from services.common.config import Settings
from tests.integration.conftest import HOSPITALS, ITEM_A, ITEM_B10, ITEM_C, PERSONS, Ledger
from tests.integration.monitoring_data import scrape, value

pytestmark = pytest.mark.integration
D = Decimal
DAY = datetime(2026, 9, 7, 9, 0)  # the query tests' own dates
ASK = DAY + timedelta(days=5)  # inf_time of the queries: after everything they ask about
A, B, PHARMACY = HOSPITALS["query_a"], HOSPITALS["query_b"], HOSPITALS["query_pharmacy"]


def person(key: str) -> Any:
    return PERSONS[key].person


def ok(r: dict[str, Any]) -> dict[str, Any]:
    assert r["infcode"] == 0, r["err_msg"]
    return r


def refused(r: dict[str, Any], code: str) -> None:
    assert r["infcode"] == -1 and r["err_msg"].startswith(code + ": "), r


async def ask(gateway: GatewayClient, institution: Hospital, infno: str, key: str, **data: Any) -> dict[str, Any]:
    p = person(key)
    return await gateway.call(institution.query(infno, {"psn_no": p.psn_no, **data}, insuplc=p.insuplc, inf_time=ASK))


async def answer(gateway: GatewayClient, institution: Hospital, infno: str, key: str, **data: Any) -> dict[str, Any]:
    return dict(ok(await ask(gateway, institution, infno, key, **data))["output"])


async def all_pages(gateway: GatewayClient, institution: Hospital, infno: str, key: str, rows: str, page_size: int,
                    **data: Any) -> tuple[list[dict[str, Any]], int]:
    """Every page in turn until an empty one: the rows concatenated, and the total each page reported."""
    out: list[dict[str, Any]] = []
    totals = set()
    for page_num in range(1, 20):
        page = await answer(gateway, institution, infno, key, page_num=page_num, page_size=page_size, **data)
        assert (page["page_num"], page["page_size"]) == (page_num, page_size)
        totals.add(page["total"])
        if not page[rows]:
            break
        assert len(page[rows]) <= page_size
        out += page[rows]
    assert len(totals) == 1, totals
    return out, totals.pop()


def outpatient(key: str, at: datetime, hospital: Hospital = A, **kw: Any) -> OutpatientVisit:
    p = person(key)
    return OutpatientVisit(hospital, p.psn_no, p.insuplc, p.insutype, at, **kw)


def stay(key: str, at: datetime, hospital: Hospital = A) -> Stay:
    p = person(key)
    return Stay(hospital, p.psn_no, p.insuplc, p.insutype, at)


def visit_row(v: OutpatientVisit | Stay, state: str, *, med_type: str, begntime: datetime, ipt_otp_no: str,
              endtime: datetime | None = None, dise_codg: str | None = None) -> dict[str, Any]:
    p = v.psn_no
    return {"mdtrt_id": v.mdtrt_id, "psn_no": p, "fixmedins_code": v.hospital.fixmedins_code, "med_type": med_type,
            "insutype": v.insutype, "ipt_otp_no": ipt_otp_no, "begntime": wire_time(begntime),
            "endtime": wire_time(endtime) if endtime else None, "dise_codg": dise_codg, "chronic_disease": None,
            "state": state}


async def test_visits_and_diagnoses_of_the_asking_institution(refdata: dict, gateway: GatewayClient) -> None:
    # At A: a settled general outpatient visit and an admitted stay with two diagnoses; at B: a registration.
    at_a = outpatient("q_visits", DAY)
    ok(await run_outpatient(gateway, at_a, [FeeLine(ITEM_A, D(1), D("50.00"))]))
    ward = stay("q_visits", DAY + timedelta(days=1))
    admission = ward.admit()
    diagnoses = [
        {"diag_type": "1", "diag_srt_no": 1, "diag_code": "I10.x00", "diag_name": "高血压", "maindiag_flag": "1",
         "diag_dept": "心内科", "dise_dor_no": "D001", "dise_dor_name": "医生甲", "diag_time": wire_time(ward.start),
         "vali_flag": "1"},
        {"diag_type": "1", "diag_srt_no": 2, "diag_code": "E11.900", "diag_name": "糖尿病", "maindiag_flag": "0",
         "diag_dept": "心内科", "dise_dor_no": "D001", "dise_dor_name": "医生甲", "diag_time": wire_time(ward.start),
         "vali_flag": "1"},
    ]
    admission["input"]["diseinfo"] = diagnoses
    ward.mdtrt_id = ok(await gateway.call(admission))["output"]["result"]["mdtrt_id"]
    at_b = outpatient("q_visits", DAY + timedelta(hours=2), hospital=B)
    at_b.mdtrt_id = ok(await gateway.call(at_b.register()))["output"]["data"]["mdtrt_id"]

    expected_a = [
        visit_row(at_a, "settled", med_type="11", begntime=DAY, ipt_otp_no=f"MZ{DAY:%m%d%H%M%S}"),
        visit_row(ward, "admitted", med_type="21", begntime=ward.start, ipt_otp_no=f"ZY{ward.start:%m%d%H%M%S}",
                  dise_codg="I10.x00"),
    ]
    out = await answer(gateway, A, "5201", "q_visits")
    assert (out["page_num"], out["page_size"], out["total"]) == (1, 20, 2)
    assert out["mdtrtinfo"] == expected_a
    only_b = await answer(gateway, B, "5201", "q_visits")
    assert only_b["total"] == 1
    assert only_b["mdtrtinfo"] == [visit_row(at_b, "registered", med_type="11", begntime=at_b.at,
                                             ipt_otp_no=f"MZ{at_b.at:%m%d%H%M%S}")]
    # Filters: med_type, a range on begntime (both ends included), one mdtrt_id; B's visit is not A's.
    assert (await answer(gateway, A, "5201", "q_visits", med_type="21"))["mdtrtinfo"] == expected_a[1:]
    ranged = await answer(gateway, A, "5201", "q_visits", begntime=wire_time(DAY), endtime=wire_time(DAY))
    assert ranged["mdtrtinfo"] == expected_a[:1]
    assert (await answer(gateway, A, "5201", "q_visits", mdtrt_id=ward.mdtrt_id))["mdtrtinfo"] == expected_a[1:]
    foreign = await answer(gateway, A, "5201", "q_visits", mdtrt_id=at_b.mdtrt_id)
    assert (foreign["total"], foreign["mdtrtinfo"]) == (0, [])

    # 5202: the stay's diagnoses as sent; another institution's visit is unknown.
    assert await answer(gateway, A, "5202", "q_visits", mdtrt_id=ward.mdtrt_id) == {
        "mdtrt_id": ward.mdtrt_id, "diseinfo": diagnoses}
    assert (await answer(gateway, A, "5202", "q_visits", mdtrt_id=at_a.mdtrt_id))["diseinfo"] == []
    refused(await ask(gateway, B, "5202", "q_visits", mdtrt_id=ward.mdtrt_id), "VISIT_UNKNOWN")
    refused(await ask(gateway, A, "5202", "q_visits", mdtrt_id=at_b.mdtrt_id), "VISIT_UNKNOWN")


def rebuilt(record: dict[str, Any]) -> bytes:
    return encode({"setlinfo": record["setlinfo"], "setldetail": record["setldetail"]})


async def test_settlements_rebuild_the_answers_exactly(refdata: dict, gateway: GatewayClient) -> None:
    """A hospital that lost an answer rebuilds its bill from 5203: the settlement's and the reversal's
    `output` byte for byte (amounts keep their exact decimals through the JSON decode and encode)."""
    ward = stay("q_ledger", DAY, hospital=A)
    ward.use_account = True
    lines = [FeeLine(ITEM_A, D(2), D("3000.00")), FeeLine(ITEM_B10, D(1), D("1000.00")),
             FeeLine(ITEM_C, D(1), D("200.00"))]
    settled = ok(await gateway.run_stay(ward, lines))
    # A query right after the settlement on the same person sees it.
    right_after = await answer(gateway, A, "5203", "q_ledger", mdtrt_id=ward.mdtrt_id)
    assert right_after["total"] == 1 and rebuilt(right_after["setlinfo"][0]) == encode(settled["output"])
    assert settled["output"]["setldetail"], "the stay's answer names its funds"
    reversal = ok(await gateway.call(ward.reverse()))
    visit = outpatient("q_ledger", DAY + timedelta(days=4), use_account=True)
    other = ok(await run_outpatient(gateway, visit, [FeeLine(ITEM_A, D(1), D("120.00"))]))

    by_visit = await answer(gateway, A, "5203", "q_ledger", mdtrt_id=ward.mdtrt_id)
    assert by_visit["total"] == 2
    first, second = by_visit["setlinfo"]
    assert rebuilt(first) == encode(settled["output"])
    assert rebuilt(second) == encode(reversal["output"])
    assert (first["refd_setl_flag"], first["orig_setl_id"], first["reversed_flag"]) == ("0", None, "1")
    assert (second["refd_setl_flag"], second["orig_setl_id"], second["reversed_flag"]) == ("1", ward.setl_id, "0")
    # By setl_id: the settlement and its reversal; by a range on the settlement time: every row in it.
    by_setl = await answer(gateway, A, "5203", "q_ledger", setl_id=ward.setl_id)
    assert [rebuilt(r) for r in by_setl["setlinfo"]] == [rebuilt(first), rebuilt(second)]
    ranged = await answer(gateway, A, "5203", "q_ledger", begntime=wire_time(DAY), endtime=wire_time(ASK))
    assert [rebuilt(r) for r in ranged["setlinfo"]] == [
        encode(settled["output"]), encode(reversal["output"]), encode(other["output"])]
    day_four = await answer(gateway, A, "5203", "q_ledger", begntime=wire_time(visit.at),
                            endtime=wire_time(visit.at + timedelta(hours=1)))
    assert [r["setlinfo"]["setl_id"] for r in day_four["setlinfo"]] == [visit.setl_id]
    # Another institution sees nothing of it.
    for selector in ({"setl_id": ward.setl_id}, {"mdtrt_id": ward.mdtrt_id},
                     {"begntime": wire_time(DAY), "endtime": wire_time(ASK)}):
        foreign = await answer(gateway, B, "5203", "q_ledger", **selector)
        assert (foreign["total"], foreign["setlinfo"]) == (0, [])

    # 5206 after the settlements and the reversal: the accumulators, as 1101 shows them.
    cum = await answer(gateway, A, "5206", "q_ledger")
    p = person("q_ledger")
    info = ok(await gateway.call(A.envelope("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": p.psn_no}},
                                            insuplc=p.insuplc, inf_time=ASK)))["output"]
    assert cum == {"psn_no": p.psn_no, "year": 2026, "cuminfo": info["cuminfo"]}
    assert encode(cum["cuminfo"]) == encode(info["cuminfo"])


async def test_accumulators_are_exact_and_only_for_own_patients(refdata: dict, gateway: GatewayClient,
                                                                ledger: Ledger, services: Settings) -> None:
    p = person("q_cum")
    visit = outpatient("q_cum", DAY + timedelta(hours=5), med_type="14", chronic_disease="DM")
    ok(await run_outpatient(gateway, visit, [FeeLine(ITEM_A, D(1), D("400.00"))]))
    row = await ledger.fetchrow("SELECT * FROM accumulator WHERE psn_no = $1 AND acc_year = 2026", p.psn_no)
    expected = [{"year": 2026, "cum_type_code": code, "cum": D(row[key]) / 100} for key, code in CUM_TYPES.items()]
    expected.append({"year": 2026, "cum_type_code": "chronic_paid_DM", "cum": D(row["basic_paid"]) / 100})
    _, before = await scrape(services.settle_metrics_port)
    cum = await answer(gateway, A, "5206", "q_cum")
    assert cum["cuminfo"] == expected
    assert {c["cum_type_code"]: c["cum"] for c in cum["cuminfo"]}["basic_pool_paid"] == D("260.00")  # 0.65 of 400
    # Another year: zeros. No visit at the institution: refused.
    other_year = await answer(gateway, A, "5206", "q_cum", year=2025)
    assert other_year["cuminfo"] == [{"year": 2025, "cum_type_code": code, "cum": 0} for code in CUM_TYPES.values()]
    refused(await ask(gateway, B, "5206", "q_cum"), "QUERY_NOT_ALLOWED")
    refused(await ask(gateway, A, "5206", "q_stranger"), "QUERY_NOT_ALLOWED")
    # Queries count in the engine's request counter with their infno and outcome.
    _, after = await scrape(services.settle_metrics_port)

    def counted(outcome: str) -> float:
        labels = {"stage": "settle", "infno": "5206", "outcome": outcome}
        return value(after, "xs_requests_total", **labels) - value(before, "xs_requests_total", **labels)

    assert (counted("ok"), counted("QUERY_NOT_ALLOWED")) == (2, 2)


async def test_chronic_drug_records(refdata: dict, gateway: GatewayClient) -> None:
    p = person("q_chronic")
    day = DAY + timedelta(days=2)
    chronic = outpatient("q_chronic", day, med_type="14", chronic_disease="DM")
    chronic.mdtrt_id = ok(await gateway.call(chronic.register()))["output"]["data"]["mdtrt_id"]
    ok(await gateway.call(chronic.declare()))
    kept = [FeeLine(ITEM_A, D(2), D("15.50")), FeeLine(ITEM_B10, D(1), D("8.00"))]
    ok(await gateway.call(chronic.upload([*kept, FeeLine(ITEM_C, D(1), D("3.00"))])))
    ok(await gateway.call(A.envelope("2205", {"data": [  # a cancelled item is no drug record
        {"mdtrt_id": chronic.mdtrt_id, "psn_no": p.psn_no, "feedetl_sn": "000003"}]}, insuplc=p.insuplc,
        inf_time=day + timedelta(minutes=2))))
    chronic.fees = kept
    ok(await gateway.call(chronic.settle()))
    general = outpatient("q_chronic", day + timedelta(hours=1))  # 11: not a chronic record
    ok(await run_outpatient(gateway, general, [FeeLine(ITEM_A, D(1), D("9.00"))]))
    unsettled = outpatient("q_chronic", day + timedelta(hours=2), med_type="14", chronic_disease="DM")
    unsettled.mdtrt_id = ok(await gateway.call(unsettled.register()))["output"]["data"]["mdtrt_id"]
    ok(await gateway.call(unsettled.declare()))
    ok(await gateway.call(unsettled.upload([FeeLine(ITEM_A, D(1), D("7.00"))])))
    purchase = Purchase(PHARMACY, p.psn_no, p.insuplc, p.insutype, day + timedelta(hours=3),
                        [FeeLine(ITEM_A, D(3), D("2.00"))])
    ok(await gateway.call(purchase.settle()))

    def drug(v: OutpatientVisit | None, med_type: str, sn: str, code: str, medins: str, amount: str, cnt: int,
             pric: str, lv: str, at: datetime, mdtrt_id: str = "") -> dict[str, Any]:
        return {"mdtrt_id": v.mdtrt_id if v else mdtrt_id, "med_type": med_type,
                "chronic_disease": "DM" if med_type == "14" else None, "feedetl_sn": sn, "med_list_codg": code,
                "medins_list_codg": medins, "fee_ocur_time": wire_time(at), "det_item_fee_sumamt": D(amount),
                "cnt": D(cnt), "pric": D(pric), "chrgitm_lv": lv}

    dates = {"begndate": f"{day:%Y-%m-%d}", "enddate": f"{day:%Y-%m-%d}"}
    out = await answer(gateway, A, "5205", "q_chronic", **dates)
    assert out["total"] == 2
    assert out["druginfo"] == [
        drug(chronic, "14", "000001", ITEM_A, "H-" + ITEM_A, "31.00", 2, "15.50", "01", day),
        drug(chronic, "14", "000002", ITEM_B10, "H-" + ITEM_B10, "8.00", 1, "8.00", "02", day),
    ]
    bought = await answer(gateway, PHARMACY, "5205", "q_chronic", **dates)
    assert [(r["med_type"], r["med_list_codg"], r["det_item_fee_sumamt"]) for r in bought["druginfo"]] == [
        ("41", ITEM_A, D("6.00"))]
    next_day = f"{day + timedelta(days=1):%Y-%m-%d}"
    assert (await answer(gateway, A, "5205", "q_chronic", begndate=next_day, enddate=next_day))["total"] == 0
    assert (await answer(gateway, B, "5205", "q_chronic", **dates))["total"] == 0


async def test_paging_and_fee_details(refdata: dict, gateway: GatewayClient) -> None:
    # Seven registrations at A: pages of three concatenate to the whole list, in begntime order.
    visits = [outpatient("q_paging", DAY + timedelta(days=3, minutes=10 * i)) for i in range(7)]
    for v in visits:
        v.mdtrt_id = ok(await gateway.call(v.register()))["output"]["data"]["mdtrt_id"]
    rows, total = await all_pages(gateway, A, "5201", "q_paging", "mdtrtinfo", 3)
    assert total == 7 and [r["mdtrt_id"] for r in rows] == [v.mdtrt_id for v in visits]
    page_three = await answer(gateway, A, "5201", "q_paging", page_num=3, page_size=3)
    assert [r["mdtrt_id"] for r in page_three["mdtrtinfo"]] == [visits[6].mdtrt_id]

    # 5204: 25 fee items, one cancelled, in pages of 10; with the settlement's setl_id.
    v = visits[0]
    lines = [FeeLine(ITEM_A if i % 2 else ITEM_B10, D(i + 1), D("1.25")) for i in range(25)]
    ok(await gateway.call(v.upload(lines)))
    ok(await gateway.call(v.hospital.envelope("2205", {"data": [
        {"mdtrt_id": v.mdtrt_id, "psn_no": v.psn_no, "feedetl_sn": "000004"}]}, insuplc=v.insuplc,
        inf_time=v.at + timedelta(minutes=2))))
    fees, total = await all_pages(gateway, A, "5204", "q_paging", "feedetail", 10, mdtrt_id=v.mdtrt_id)
    assert total == 25 and [f["feedetl_sn"] for f in fees] == [f"{i + 1:06d}" for i in range(25)]
    assert [f["feedetl_sn"] for f in fees if f["vali_flag"] == "0"] == ["000004"]
    assert fees[3] == {
        "feedetl_sn": "000004", "mdtrt_id": v.mdtrt_id, "med_list_codg": ITEM_A, "medins_list_codg": "H-" + ITEM_A,
        "fee_ocur_time": wire_time(v.at), "det_item_fee_sumamt": D("5.00"), "cnt": D(4), "pric": D("1.25"),
        "pric_uplmt_amt": None, "chrgitm_lv": "01", "selfpay_prop": D(0), "vali_flag": "0", "setl_id": None}
    assert fees[0]["selfpay_prop"] == D("0.1") and fees[0]["chrgitm_lv"] == "02"
    v.fees = [line for i, line in enumerate(lines) if i != 3]
    v.setl_id = ok(await gateway.call(v.settle()))["output"]["setlinfo"]["setl_id"]
    with_setl = await answer(gateway, A, "5204", "q_paging", mdtrt_id=v.mdtrt_id, setl_id=v.setl_id, page_size=100)
    # The items that settlement settled: every active one, the cancelled one not.
    assert with_setl["total"] == 24
    assert {f["setl_id"] for f in with_setl["feedetail"]} == {v.setl_id}
    assert "000004" not in [f["feedetl_sn"] for f in with_setl["feedetail"]]
    refused(await ask(gateway, A, "5204", "q_paging", mdtrt_id=v.mdtrt_id, setl_id="S0"), "SETTLEMENT_UNKNOWN")
    refused(await ask(gateway, B, "5204", "q_paging", mdtrt_id=v.mdtrt_id), "VISIT_UNKNOWN")

    # Bad paging and bad selectors are refused by the schema, naming the field.
    for data, field in (({"page_size": 101}, "page_size"), ({"page_num": 0}, "page_num"),
                        ({"page_size": "10"}, "page_size")):
        r = await ask(gateway, A, "5201", "q_paging", **data)
        refused(r, "BODY_MALFORMED")
        assert f"$.input.data.{field}" in r["err_msg"]
    refused(await ask(gateway, A, "5203", "q_paging"), "BODY_MALFORMED")
    refused(await ask(gateway, A, "5203", "q_paging", setl_id="S1", mdtrt_id=v.mdtrt_id), "BODY_MALFORMED")
    refused(await ask(gateway, A, "5203", "q_paging", begntime=wire_time(DAY)), "BODY_MALFORMED")
    refused(await ask(gateway, A, "5201", "q_paging", begntime=wire_time(DAY), endtime=wire_time(DAY - timedelta(1))),
            "BODY_MALFORMED")
    refused(await ask(gateway, A, "5205", "q_paging", begndate="2026-09-08", enddate="2026-09-07"), "BODY_MALFORMED")
