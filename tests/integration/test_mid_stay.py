"""Mid-stay settlement (mid_setl_flag 1) end to end through the gateway: parts of an open stay, the
deductible once per stay, the accumulators continuing, only the latest part reversed, settled items
kept from cancellation, and a stay counted once as a directly settled person-time."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any, cast

import pytest

from loadtest.his import FeeLine, GatewayClient
from tests.integration.conftest import HOSPITALS, ITEM_A, PERSONS, Ledger
from tests.integration.stays import TimedStay, refused

pytestmark = pytest.mark.integration

D = Decimal
# 赤峰 (150400) employee policy before 2027, 三级 hospital: deductible 900.00, ratio 0.85.
ADMIT = datetime(2026, 5, 11, 9, 0)
PART1, PART2 = datetime(2026, 5, 14, 10, 0), datetime(2026, 5, 18, 10, 0)
DISCHARGE, FINAL = datetime(2026, 5, 21, 9, 0), datetime(2026, 5, 21, 11, 0)


async def _basic_paid(ledger: Ledger, psn_no: str, year: int) -> int:
    return int(await ledger.fetchval("SELECT basic_paid FROM accumulator WHERE psn_no = $1 AND acc_year = $2",
                                     psn_no, year) or 0)


async def _direct(ledger: Ledger, day: date) -> int:
    """The direct person-times of local 赤峰 inpatient care settled on `day` (ledger_daily)."""
    return await ledger.total(
        "SELECT direct FROM ledger_daily WHERE day = $1 AND insured_prov = '150000' AND treating_prov = '150000'"
        " AND scope = 'local' AND med_type = '21'", day)


def _amounts(info: dict, *names: str) -> tuple[Decimal, ...]:
    return tuple(info[n] for n in names)


async def test_parts_then_final_with_reversal_of_the_latest(refdata: dict, gateway: GatewayClient,
                                                             ledger: Ledger) -> None:
    person = PERSONS["mid_stay"].person
    stay = TimedStay(gateway, HOSPITALS["midstay"], person)
    await stay.admit(ADMIT)
    first = await stay.upload([FeeLine(ITEM_A, D(10), D("300.00"))], datetime(2026, 5, 12, 9, 0))

    # Part 1: 3000.00 in scope; the whole deductible 900.00; (3000 − 900) × 0.85 = 1785.00.
    direct_before = await _direct(ledger, PART1.date())
    r1 = await stay.settle(D("3000.00"), PART1, mid=True)
    assert r1["infcode"] == 0, r1["err_msg"]
    p1 = r1["output"]["setlinfo"]
    assert _amounts(p1, "medfee_sumamt", "act_pay_dedc", "hifp_pay", "fund_pay_sumamt", "psn_part_amt") == (
        D("3000.00"), D("900.00"), D("1785.00"), D("1785.00"), D("1215.00"))
    row = await ledger.fetchrow("SELECT mid_setl, stay_part, policy_version FROM settlement WHERE setl_id = $1",
                                p1["setl_id"])
    assert (row["mid_setl"], row["stay_part"], row["policy_version"]) == (True, 1, "150400@base")
    assert await ledger.fetchval("SELECT state FROM visit WHERE mdtrt_id = $1", stay.mdtrt_id) == "admitted"
    assert await _basic_paid(ledger, person.psn_no, 2026) == 178500
    assert await _direct(ledger, PART1.date()) == direct_before  # a part is not a person-time of its own

    # A settled item cannot be cancelled, the stay cannot be cancelled, nothing new to settle yet.
    assert refused(await stay.cancel_fees(first, PART1), "FEE_ITEM_SETTLED")
    assert refused(await stay.cancel_admission(PART1), "VISIT_PART_SETTLED")
    assert refused(await stay.settle(D("0.00"), PART1, mid=True), "NO_FEES")

    # Part 2 covers only what was uploaded since part 1; the deductible is not taken again.
    second = await stay.upload([FeeLine(ITEM_A, D(20), D("100.00"))], datetime(2026, 5, 16, 9, 0))
    assert refused(await stay.settle(D("5000.00"), PART2, mid=True), "MEDFEE_MISMATCH")
    preview = await stay.settle(D("2000.00"), PART2, mid=True, pre=True)
    assert preview["infcode"] == 0, preview["err_msg"]
    assert _amounts(preview["output"]["setlinfo"], "act_pay_dedc", "hifp_pay") == (D("0.00"), D("1700.00"))
    r2 = await stay.settle(D("2000.00"), PART2, mid=True)
    assert r2["infcode"] == 0, r2["err_msg"]
    p2 = r2["output"]["setlinfo"]
    assert _amounts(p2, "medfee_sumamt", "act_pay_dedc", "hifp_pay") == (D("2000.00"), D("0.00"), D("1700.00"))
    assert await _basic_paid(ledger, person.psn_no, 2026) == 178500 + 170000
    # 5204 with a part's setl_id lists the items that part settled.
    for part, sns in ((p1, first), (p2, second)):
        q = await gateway.call(HOSPITALS["midstay"].query("5204", {
            "psn_no": person.psn_no, "mdtrt_id": stay.mdtrt_id, "setl_id": part["setl_id"]},
            insuplc=person.insuplc, inf_time=PART2))
        assert q["infcode"] == 0, q["err_msg"]
        assert [(f["feedetl_sn"], f["setl_id"]) for f in q["output"]["feedetail"]] == [
            (sn, part["setl_id"]) for sn in sns]

    # Only the latest part may be reversed; reversing it unmarks its items and restores its delta.
    assert refused(await stay.reverse(p1["setl_id"], PART2), "MID_SETTLEMENT_NOT_LATEST")
    back = await stay.reverse(p2["setl_id"], PART2)
    assert back["infcode"] == 0, back["err_msg"]
    assert _amounts(back["output"]["setlinfo"], "medfee_sumamt", "hifp_pay") == (D("-2000.00"), D("-1700.00"))
    assert await _basic_paid(ledger, person.psn_no, 2026) == 178500
    assert await ledger.fetchval("SELECT state FROM visit WHERE mdtrt_id = $1", stay.mdtrt_id) == "admitted"
    marks = {r["feedetl_sn"]: r["setl_id"] for r in await ledger.fetch(
        "SELECT feedetl_sn, setl_id FROM fee_item WHERE mdtrt_id = $1", stay.mdtrt_id)}
    assert marks == {first[0]: p1["setl_id"], second[0]: None}

    # Settled again: the same part, numbered 2 again.
    r2b = await stay.settle(D("2000.00"), PART2, mid=True)
    assert r2b["infcode"] == 0, r2b["err_msg"]
    p2b = r2b["output"]["setlinfo"]
    assert _amounts(p2b, "act_pay_dedc", "hifp_pay") == (D("0.00"), D("1700.00"))
    assert await ledger.fetchval("SELECT stay_part FROM settlement WHERE setl_id = $1", p2b["setl_id"]) == 2

    # The discharge settlement is the last part: a part of a discharged stay is refused.
    third = await stay.upload([FeeLine(ITEM_A, D(5), D("100.00"))], datetime(2026, 5, 20, 9, 0))
    assert refused(await stay.settle(D("500.00"), DISCHARGE, mid=False), "VISIT_NOT_DISCHARGED")
    assert (await stay.discharge(DISCHARGE))["infcode"] == 0
    assert refused(await stay.settle(D("500.00"), FINAL, mid=True), "VISIT_DISCHARGED")
    direct_before = await _direct(ledger, FINAL.date())
    final = await stay.settle(D("500.00"), FINAL, mid=False)
    assert final["infcode"] == 0, final["err_msg"]
    f = final["output"]["setlinfo"]
    assert _amounts(f, "medfee_sumamt", "act_pay_dedc", "hifp_pay") == (D("500.00"), D("0.00"), D("425.00"))
    assert await _basic_paid(ledger, person.psn_no, 2026) == 178500 + 170000 + 42500
    assert await ledger.fetchval("SELECT state FROM visit WHERE mdtrt_id = $1", stay.mdtrt_id) == "settled"
    assert await _direct(ledger, FINAL.date()) == direct_before + 1  # the stay counts once
    marks = {r["feedetl_sn"]: r["setl_id"] for r in await ledger.fetch(
        "SELECT feedetl_sn, setl_id FROM fee_item WHERE mdtrt_id = $1", stay.mdtrt_id)}
    assert marks == {first[0]: p1["setl_id"], second[0]: p2b["setl_id"], third[0]: f["setl_id"]}

    # Reversing the final settlement returns the stay to discharged, the parts kept.
    assert refused(await stay.reverse(p2b["setl_id"], FINAL), "MID_SETTLEMENT_NOT_LATEST")
    undo = await stay.reverse(f["setl_id"], FINAL)
    assert undo["infcode"] == 0, undo["err_msg"]
    assert await ledger.fetchval("SELECT state FROM visit WHERE mdtrt_id = $1", stay.mdtrt_id) == "discharged"
    assert await _basic_paid(ledger, person.psn_no, 2026) == 178500 + 170000
    assert await _direct(ledger, FINAL.date()) == direct_before
    open_parts = await ledger.fetch(
        "SELECT s.setl_id FROM settlement s WHERE s.mdtrt_id = $1 AND s.kind = 'settle' AND NOT EXISTS"
        " (SELECT 1 FROM settlement r WHERE r.orig_setl_id = s.setl_id) ORDER BY s.stay_part", stay.mdtrt_id)
    assert [r["setl_id"] for r in open_parts] == [p1["setl_id"], p2b["setl_id"]]
    # The ledger of the stay adds up to what the open parts paid.
    assert await ledger.total("SELECT sum(hifp_pay) FROM settlement WHERE mdtrt_id = $1", stay.mdtrt_id) == 348500


async def test_pre_settlement_previews_a_part(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    person = PERSONS["mid_stay_pre"].person
    stay = TimedStay(gateway, HOSPITALS["midstay"], person)
    await stay.admit(ADMIT)
    await stay.upload([FeeLine(ITEM_A, D(4), D("100.00"))], datetime(2026, 5, 12, 9, 0))
    # 400.00 in scope, all of it under the 900.00 deductible: the fund pays nothing yet.
    r = await stay.settle(D("400.00"), PART1, mid=True, pre=True)
    assert r["infcode"] == 0, r["err_msg"]
    assert _amounts(r["output"]["setlinfo"], "act_pay_dedc", "hifp_pay", "psn_part_amt") == (
        D("400.00"), D("0.00"), D("400.00"))
    assert await ledger.total("SELECT count(*) FROM settlement WHERE mdtrt_id = $1", stay.mdtrt_id) == 0
    # The part itself, then a second part: the deductible left (500.00) is taken by the second.
    r1 = await stay.settle(D("400.00"), PART1, mid=True)
    assert r1["infcode"] == 0, r1["err_msg"]
    await stay.upload([FeeLine(ITEM_A, D(10), D("100.00"))], datetime(2026, 5, 15, 9, 0))
    r2 = await stay.settle(D("1000.00"), PART2, mid=True)
    assert r2["infcode"] == 0, r2["err_msg"]
    # (1000 − 500) × 0.85 = 425.00
    assert _amounts(r2["output"]["setlinfo"], "act_pay_dedc", "hifp_pay") == (D("500.00"), D("425.00"))
    assert await _basic_paid(ledger, person.psn_no, 2026) == 42500
    # Cancelling every item not yet settled ("0000") leaves the parts' items alone.
    await stay.upload([FeeLine(ITEM_A, D(1), D("100.00"))], datetime(2026, 5, 19, 9, 0))
    cancelled = await stay.cancel_fees(["0000"], PART2)
    assert cancelled["infcode"] == 0, cancelled["err_msg"]
    assert cancelled["output"] == {"cancelled": 1}
    # The parts settled every item: the discharge settlement closes the stay with nothing left to pay.
    assert (await stay.discharge(DISCHARGE))["infcode"] == 0
    final = await stay.settle(D("0.00"), FINAL, mid=False)
    assert final["infcode"] == 0, final["err_msg"]
    assert _amounts(final["output"]["setlinfo"], "medfee_sumamt", "act_pay_dedc", "fund_pay_sumamt") == (
        D("0.00"), D("0.00"), D("0.00"))
    assert await ledger.fetchval("SELECT state FROM visit WHERE mdtrt_id = $1", stay.mdtrt_id) == "settled"
    assert await _basic_paid(ledger, person.psn_no, 2026) == 42500


class _Recording:
    """The gateway client, remembering each request's msgid (what a correction names)."""

    def __init__(self, gateway: GatewayClient) -> None:
        self.gateway = gateway
        self.msgids: list[str] = []

    async def call(self, env: dict[str, Any]) -> dict[str, Any]:
        self.msgids.append(env["msgid"])
        return await self.gateway.call(env)


async def test_corrections_of_parts(refdata: dict, gateway: GatewayClient, ledger: Ledger) -> None:
    """2601 on a stay with parts: only the latest part can be undone; an earlier part, an upload a part settled
    and the admission are too late (CORRECTION_NOT_ALLOWED) until the later parts are undone, newest first."""
    person = PERSONS["mid_stay_correct"].person
    hospital = HOSPITALS["midstay"]
    client = _Recording(gateway)
    stay = TimedStay(cast(GatewayClient, client), hospital, person)

    async def correct(omsgid: str, oinfno: str) -> dict[str, Any]:
        return await gateway.call(hospital.correct(omsgid, oinfno, person.psn_no, insuplc=person.insuplc,
                                                   inf_time=FINAL))

    await stay.admit(ADMIT)
    admission = client.msgids[-1]
    await stay.upload([FeeLine(ITEM_A, D(10), D("300.00"))], datetime(2026, 5, 12, 9, 0))
    upload1 = client.msgids[-1]
    assert (await stay.settle(D("3000.00"), PART1, mid=True))["infcode"] == 0
    part1 = client.msgids[-1]
    await stay.upload([FeeLine(ITEM_A, D(20), D("100.00"))], datetime(2026, 5, 16, 9, 0))
    upload2 = client.msgids[-1]
    assert (await stay.settle(D("2000.00"), PART2, mid=True))["infcode"] == 0
    part2 = client.msgids[-1]
    assert await _basic_paid(ledger, person.psn_no, 2026) == 178500 + 170000

    for omsgid, oinfno in ((part1, "2304"), (upload1, "2301"), (upload2, "2301"), (admission, "2401")):
        assert refused(await correct(omsgid, oinfno), "CORRECTION_NOT_ALLOWED"), oinfno
    assert await _basic_paid(ledger, person.psn_no, 2026) == 178500 + 170000

    undone = await correct(part2, "2304")
    assert undone["infcode"] == 0, undone["err_msg"]
    assert _amounts(undone["output"]["setlinfo"], "medfee_sumamt", "hifp_pay") == (D("-2000.00"), D("-1700.00"))
    withdrawn = await correct(upload2, "2301")  # its items are open again: the upload can be withdrawn
    assert withdrawn["infcode"] == 0 and withdrawn["output"]["data"]["fees_cancelled"] == 1, withdrawn
    assert (await correct(part1, "2304"))["infcode"] == 0  # the latest now: a refused correction kept nothing
    assert (await correct(admission, "2401"))["infcode"] == 0
    assert await _basic_paid(ledger, person.psn_no, 2026) == 0
    assert await ledger.fetchval("SELECT state FROM visit WHERE mdtrt_id = $1", stay.mdtrt_id) == "cancelled"
    assert await ledger.total("SELECT sum(fund_pay_sumamt) FROM settlement WHERE mdtrt_id = $1", stay.mdtrt_id) == 0
