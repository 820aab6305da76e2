"""A visit's records on the real stack: diagnoses (2401, 2402, 2403, 2203 `diseinfo`) and the stay's
particulars 2403 may change (README "Transactions")."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from loadtest.his import FeeLine, GatewayClient, OutpatientVisit, Stay, wire_time
from tests.integration.conftest import HOSPITALS, ITEM_A, PERSONS, Ledger

pytestmark = pytest.mark.integration
D = Decimal
START = datetime(2026, 9, 7, 8, 30)
HOSPITAL = HOSPITALS["records"]


def diagnosis(n: int, code: str, main: bool = False, **kw: Any) -> dict[str, Any]:
    return {"diag_type": "1", "diag_srt_no": n, "diag_code": code, "diag_name": f"诊断{n}",
            "maindiag_flag": "1" if main else "0", "diag_dept": "D01", "dise_dor_no": "D001",
            "dise_dor_name": "医生", "diag_time": wire_time(START), "vali_flag": "1", **kw}


def stay(key: str) -> Stay:
    p = PERSONS[key].person
    return Stay(HOSPITAL, p.psn_no, p.insuplc, p.insutype, START)


def ok(r: dict[str, Any]) -> dict[str, Any]:
    assert r["infcode"] == 0, r["err_msg"]
    return r


def refused(r: dict[str, Any], code: str) -> None:
    assert r["infcode"] == -1 and r["err_msg"].startswith(code + ": "), r


async def visit_row(ledger: Ledger, mdtrt_id: str) -> dict[str, Any]:
    row = await ledger.fetchrow("SELECT * FROM visit WHERE mdtrt_id = $1", mdtrt_id)
    assert row is not None
    out = dict(row)
    out["diseinfo"], out["adm_info"] = json.loads(out["diseinfo"]), json.loads(out["adm_info"])
    return out


def change(s: Stay, at: datetime, diseinfo: list[dict[str, Any]] | None = None, **adminfo: Any) -> dict[str, Any]:
    return s._env("2403", {"adminfo": {"mdtrt_id": s.mdtrt_id, "psn_no": s.psn_no, **adminfo},
                           "diseinfo": diseinfo or []}, at)


async def admitted(gateway: GatewayClient, s: Stay, diseinfo: list[dict[str, Any]]) -> None:
    env = s.admit()
    env["input"]["diseinfo"] = diseinfo
    env["input"]["mdtrtinfo"].update(adm_dept_codg="NK01", adm_dept_name="内科", adm_bed="12")
    s.mdtrt_id = ok(await gateway.call(env))["output"]["result"]["mdtrt_id"]


async def test_admission_keeps_diagnoses_and_2403_changes_them(refdata: dict, gateway: GatewayClient,
                                                                ledger: Ledger) -> None:
    s = stay("records0")
    first = [diagnosis(1, "I10.x00", main=True), diagnosis(2, "E11.900")]
    await admitted(gateway, s, first)
    row = await visit_row(ledger, s.mdtrt_id)
    assert row["diseinfo"] == first
    assert row["adm_info"] == {"atddr_no": "D001", "chfpdr_name": "doctor", "adm_diag_dscr": "-", "dise_name": "-",
                               "adm_dept_codg": "NK01", "adm_dept_name": "内科", "adm_bed": "12"}

    # 2403: a new diagnosis list replaces the old; the particulars sent change, the others stay.
    later = START + timedelta(hours=5)
    second = [diagnosis(1, "I63.900", main=True)]
    ok(await gateway.call(change(s, later, second, begntime=wire_time(START - timedelta(hours=1)),
                                 ipt_otp_no="ZY-NEW-1", adm_bed="15", dscg_maindiag_code="I63.900",
                                 coner_name="联系人", tel="13800000000")))
    row = await visit_row(ledger, s.mdtrt_id)
    assert row["diseinfo"] == second
    assert (row["begntime"], row["ipt_otp_no"]) == (START - timedelta(hours=1), "ZY-NEW-1")
    assert row["adm_info"]["adm_bed"] == "15" and row["adm_info"]["adm_dept_codg"] == "NK01"
    assert row["adm_info"]["dscg_maindiag_code"] == "I63.900"
    # The contact person's name and phone are personal data the broker has no use for: not kept anywhere.
    assert "联系人" not in json.dumps(row, default=str, ensure_ascii=False) and "13800000000" not in str(row)

    # Without a list, 2403 leaves the diagnoses as they are.
    ok(await gateway.call(change(s, later + timedelta(minutes=1), adm_dept_name="心内科")))
    row = await visit_row(ledger, s.mdtrt_id)
    assert row["diseinfo"] == second and row["adm_info"]["adm_dept_name"] == "心内科"

    # Refusals: an end time before discharge, a stay's med_type other than 21, an end before the start.
    refused(await gateway.call(change(s, later, endtime=wire_time(later))),
            "VISIT_NOT_DISCHARGED")
    refused(await gateway.call(change(s, later, med_type="11")), "MED_TYPE_UNSUPPORTED")

    # Discharge with discharge diagnoses: they replace the admission's; 2403 may then move the end time.
    ok(await gateway.call(s.upload([FeeLine(ITEM_A, D(1), D("100.00"))])))
    discharge = s.discharge()
    third = [diagnosis(1, "I63.900", main=True), diagnosis(2, "I10.x00")]
    discharge["input"]["diseinfo"] = third
    ok(await gateway.call(discharge))
    assert (await visit_row(ledger, s.mdtrt_id))["diseinfo"] == third
    end = START + timedelta(days=2, hours=3)
    ok(await gateway.call(change(s, end, endtime=wire_time(end))))
    assert (await visit_row(ledger, s.mdtrt_id))["endtime"] == end
    refused(await gateway.call(change(s, end, endtime=wire_time(START - timedelta(days=1)))), "BODY_MALFORMED")
    assert (await visit_row(ledger, s.mdtrt_id))["endtime"] == end


async def test_outpatient_visit_info_keeps_diagnoses(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    p = PERSONS["records1"].person
    visit = OutpatientVisit(HOSPITAL, p.psn_no, p.insuplc, p.insutype, START)
    visit.mdtrt_id = ok(await gateway.call(visit.register()))["output"]["data"]["mdtrt_id"]
    info = visit.declare()
    info["input"]["diseinfo"] = [diagnosis(1, "J06.900", main=True)]
    ok(await gateway.call(info))
    assert (await visit_row(ledger, visit.mdtrt_id))["diseinfo"] == [diagnosis(1, "J06.900", main=True)]


async def test_bad_diagnoses_refused(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    """More than 50 diagnoses, an absurd diagnosis time: BODY_MALFORMED, and nothing is created."""
    for i, diseinfo in enumerate(([diagnosis(n, "I10.x00") for n in range(51)],
                                  [diagnosis(1, "I10.x00", diag_time="9999-99-99 99:99:99")])):
        s = stay(f"records{2 + i}")
        env = s.admit()
        env["input"]["diseinfo"] = diseinfo
        refused(await gateway.call(env), "BODY_MALFORMED")
        assert await ledger.total("SELECT count(*) FROM visit WHERE psn_no = $1", s.psn_no) == 0
