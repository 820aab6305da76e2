"""The monitoring rules (services/smartmon/rules.py) on crafted histories: hits, near misses, exact ids and
amounts. Pure: no Kafka, no database."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from msgspec.structs import replace as sreplace

from schemas.internal import SettlementEvent
from schemas.monitoring import ItemFact, Judgement, StayCost, VisitFacts
from services.smartmon import rules as r
from services.smartmon.rulebook import RuleBookError, load_rules, parse_rules
from services.smartmon.rulebook import main as rulebook_main

BOOK = load_rules()
PSN = "P35030000000777"
INSURED = "150400"  # Inner Mongolia: no overrides in rules.toml
FUJIAN = "350300"  # Fujian: SPLIT_ADMISSION readmit_days = 30 (province override)
H1, H2, PH1, PH2 = "H44010000001", "H11010000002", "P44010000003", "P11010000004"


def ep(setl_id: str, kind: str, begin: str, end: str = "", *, hosp: str = H1, mdtrt: str | None = None,
       medfee: int = 10000, dise: str = "", mid: bool = False, items: tuple[ItemFact, ...] = (),
       gend: str = "1", insured: str = INSURED, hosp_lv: int = 3) -> r.Episode:
    med_type = {"inpatient": "21", "outpatient": "11", "pharmacy": "41"}[kind]
    facts = VisitFacts(visit_type=kind, gend=gend, begntime=begin, endtime=end,  # type: ignore[arg-type]
                       main_dise=dise, hosp_lv=hosp_lv, treating_prov="440000", items=list(items))
    return r.Episode(setl_id=setl_id, mdtrt_id=mdtrt or "M" + setl_id, psn_no=PSN, fixmedins_code=hosp,
                     insured_admdvs=insured, treating_admdvs="440100", med_type=med_type,
                     setl_time=(end or begin), medfee=medfee, mid_setl=mid, facts=facts)


def item(code: str, day: str, cnt: str = "1", sumamt: int = 1000, **catalog: object) -> ItemFact:
    return ItemFact(med_list_codg=code, day=day, cnt=Decimal(cnt), sumamt=sumamt, **catalog)  # type: ignore[arg-type]


def hits(episodes: list[r.Episode], rule_id: str, book: r.RuleBook = BOOK) -> list[Judgement]:
    return r.person_judgements(episodes, book, [rule_id])


def jr(rule_id: str, *anchor: str, book: r.RuleBook = BOOK) -> str:
    return r.jr_id_of(book.rules[rule_id], anchor)


# --- the episode of an event --------------------------------------------------------------------


def _event(kind: str, visit: VisitFacts | None) -> SettlementEvent:
    return SettlementEvent(setl_id="S1", kind=kind, orig_setl_id=None if kind == "settle" else "S0",  # type: ignore[arg-type]
                           msgid="m1", mdtrt_id="M1", psn_no=PSN, fixmedins_code=H1, insutype="310",
                           med_type="21", scope="cross_province", filing_type=None, insured_admdvs=INSURED,
                           treating_admdvs="440100", setl_time="2026-03-10 12:00:00", medfee_sumamt=123456,
                           hifp_pay=0, hifmi_pay=0, hifob_pay=0, maf_pay=0, fund_pay_sumamt=0, acct_pay=0,
                           psn_cash_pay=123456, mid_setl=True, visit=visit)


def test_episode_from_event() -> None:
    facts = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00").facts
    e = r.Episode.from_event(_event("settle", facts))
    assert e is not None
    assert (e.setl_id, e.mdtrt_id, e.medfee, e.mid_setl, e.facts) == ("S1", "M1", 123456, True, facts)
    assert r.Episode.from_event(_event("reverse", None)) is None
    assert r.Episode.from_event(_event("settle", None)) is None


def test_episodes_round_trip_through_msgspec() -> None:
    """The stream keeps a person's episodes as msgspec bytes: what comes back judges the same."""
    history = _everything()
    assert history[0].at == "2026-03-01 08:00:00"  # a computed value cached on the instance is not encoded
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(history), type=list[r.Episode])
    assert back == history
    assert r.person_judgements(back, BOOK) == r.person_judgements(history, BOOK)


# --- OVERLAP_INPATIENT ----------------------------------------------------------------------------


def test_overlap_inpatient_hits_at_two_hospitals() -> None:
    a = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00", hosp=H1, medfee=50000)
    b = ep("S2", "inpatient", "2026-03-05 09:00:00", "2026-03-12 10:00:00", hosp=H2, medfee=70000)
    [j] = hits([a, b], "OVERLAP_INPATIENT")
    assert j.jr_id == jr("OVERLAP_INPATIENT", "S2", "S1")
    assert (j.setl_ids, j.mdtrt_ids, j.fixmedins_code) == (["S2", "S1"], ["MS2", "MS1"], H2)
    assert (j.window_begin, j.window_end, j.suspect_amt) == ("2026-03-05", "2026-03-10", 70000)
    assert (j.rule_name, j.severity, j.rule_version) == ("同一时间多地住院", "high", 1)


def test_overlap_inpatient_edges() -> None:
    a = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00", hosp=H1)
    transfer = ep("S2", "inpatient", "2026-03-10 10:00:00", "2026-03-12 10:00:00", hosp=H2)  # at the discharge
    assert hits([a, transfer], "OVERLAP_INPATIENT") == []
    one_second = ep("S2", "inpatient", "2026-03-10 09:59:59", "2026-03-12 10:00:00", hosp=H2)
    assert len(hits([a, one_second], "OVERLAP_INPATIENT")) == 1
    same_hospital = replace(one_second, fixmedins_code=H1)  # two stays at once at one hospital: also a hit
    assert len(hits([a, same_hospital], "OVERLAP_INPATIENT")) == 1
    assert hits([a], "OVERLAP_INPATIENT") == []  # the other stay reversed: absent from the set


def test_overlap_mid_stay_parts_are_one_stay() -> None:
    part1 = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-05 00:00:00", mdtrt="M1", mid=True, medfee=300)
    final = ep("S3", "inpatient", "2026-03-01 08:00:00", "2026-03-20 10:00:00", mdtrt="M1", medfee=200)
    other = ep("S2", "inpatient", "2026-03-10 08:00:00", "2026-03-15 10:00:00", hosp=H2, medfee=900)
    assert hits([part1, final], "OVERLAP_INPATIENT") == []  # the parts of one stay never overlap each other
    [j] = hits([part1, final, other], "OVERLAP_INPATIENT")
    assert j.jr_id == jr("OVERLAP_INPATIENT", "S2", "S1")  # the stay's anchor: its earliest part
    assert j.setl_ids == ["S2", "S1", "S3"]
    # Before the final part, the stay ends where its mid part ends: no overlap yet with the later stay.
    assert hits([part1, other], "OVERLAP_INPATIENT") == []
    # A later stay is the anchor and bears the amount: here the merged stay (300 + 200 fen).
    early = replace(other, facts=sreplace(other.facts, begntime="2026-02-25 08:00:00"))
    [k] = hits([part1, final, early], "OVERLAP_INPATIENT")
    assert (k.jr_id, k.suspect_amt) == (jr("OVERLAP_INPATIENT", "S1", "S2"), 500)


# --- SPLIT_ADMISSION -------------------------------------------------------------------------------


def test_split_admission_window_edges() -> None:
    first = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00", dise="J18.9", medfee=100)
    day15 = ep("S2", "inpatient", "2026-03-25 23:00:00", "2026-03-30 10:00:00", dise="J18.0", medfee=800)
    [j] = hits([first, day15], "SPLIT_ADMISSION")
    assert (j.jr_id, j.suspect_amt, j.setl_ids) == (jr("SPLIT_ADMISSION", "S2", "S1"), 800, ["S2", "S1"])
    assert (j.window_begin, j.window_end) == ("2026-03-10", "2026-03-25")
    day16 = ep("S2", "inpatient", "2026-03-26 00:00:00", "2026-03-30 10:00:00", dise="J18.0")
    assert hits([first, day16], "SPLIT_ADMISSION") == []
    same_day = ep("S2", "inpatient", "2026-03-10 14:00:00", "2026-03-12 10:00:00", dise="J18.1")
    assert len(hits([first, same_day], "SPLIT_ADMISSION")) == 1


def test_split_admission_near_misses() -> None:
    first = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00", dise="J18.9")
    later = ep("S2", "inpatient", "2026-03-15 08:00:00", "2026-03-20 10:00:00", dise="J18.0")
    assert len(hits([first, later], "SPLIT_ADMISSION")) == 1
    assert hits([first, replace(later, fixmedins_code=H2)], "SPLIT_ADMISSION") == []  # other hospital
    other_dise = replace(later, facts=sreplace(later.facts, main_dise="J20.0"))
    assert hits([first, other_dise], "SPLIT_ADMISSION") == []  # other diagnosis prefix
    no_dise = replace(later, facts=sreplace(later.facts, main_dise=""))
    assert hits([first, no_dise], "SPLIT_ADMISSION") == []
    assert hits([later], "SPLIT_ADMISSION") == []  # the first stay reversed
    mid_only = replace(first, mid_setl=True)  # the first stay not discharged yet: nothing to readmit after
    assert hits([mid_only, later], "SPLIT_ADMISSION") == []


def test_split_admission_pairs_with_latest_discharge() -> None:
    a = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-05 10:00:00", dise="K35.2")
    b = ep("S2", "inpatient", "2026-03-08 08:00:00", "2026-03-12 10:00:00", dise="K35.3")
    c = ep("S3", "inpatient", "2026-03-14 08:00:00", "2026-03-16 10:00:00", dise="K35.8")
    got = {j.jr_id for j in hits([c, a, b], "SPLIT_ADMISSION")}
    assert got == {jr("SPLIT_ADMISSION", "S2", "S1"), jr("SPLIT_ADMISSION", "S3", "S2")}


def test_split_admission_province_override() -> None:
    first = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00", dise="J18.9", insured=FUJIAN)
    day30 = ep("S2", "inpatient", "2026-04-09 08:00:00", "2026-04-12 10:00:00", dise="J18.9", insured=FUJIAN)
    assert BOOK.params("SPLIT_ADMISSION", FUJIAN)["readmit_days"] == 30
    assert len(hits([first, day30], "SPLIT_ADMISSION")) == 1
    day31 = replace(day30, facts=sreplace(day30.facts, begntime="2026-04-10 08:00:00"))
    assert hits([first, day31], "SPLIT_ADMISSION") == []
    elsewhere = [replace(e, insured_admdvs=INSURED) for e in (first, day30)]  # default 15 days
    assert hits(elsewhere, "SPLIT_ADMISSION") == []


# --- OUTPATIENT_DURING_STAY ------------------------------------------------------------------------


def test_outpatient_during_stay() -> None:
    stay = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00", hosp=H1)
    visit = ep("S2", "outpatient", "2026-03-04 09:30:00", hosp=H2, medfee=4321,
               items=(item("X01", "2026-03-04"),))
    [j] = hits([stay, visit], "OUTPATIENT_DURING_STAY")
    assert (j.jr_id, j.suspect_amt, j.fixmedins_code) == (jr("OUTPATIENT_DURING_STAY", "S2", "S1"), 4321, H2)
    assert (j.setl_ids, j.items, j.window_begin, j.window_end) == (["S2", "S1"], ["X01"], "2026-03-01",
                                                                    "2026-03-10")
    pharmacy = ep("S3", "pharmacy", "2026-03-09 18:00:00", hosp=PH1, medfee=99)
    [k] = hits([stay, pharmacy], "OUTPATIENT_DURING_STAY")
    assert (k.jr_id, k.suspect_amt) == (jr("OUTPATIENT_DURING_STAY", "S3", "S1"), 99)


def test_outpatient_during_stay_near_misses() -> None:
    stay = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00", hosp=H1)
    before = ep("S2", "outpatient", "2026-03-01 07:59:59", hosp=H2)  # the referral visit before admission
    at_discharge = ep("S3", "pharmacy", "2026-03-10 10:00:00", hosp=PH1)  # the discharge instant itself
    same_hospital = ep("S4", "outpatient", "2026-03-05 10:00:00", hosp=H1)  # a consult at the same hospital
    assert hits([stay, before, at_discharge, same_hospital], "OUTPATIENT_DURING_STAY") == []
    inside = ep("S5", "outpatient", "2026-03-01 08:00:01", hosp=H2)
    assert len(hits([stay, inside], "OUTPATIENT_DURING_STAY")) == 1
    assert hits([inside], "OUTPATIENT_DURING_STAY") == []  # the stay reversed


# --- FREQUENT_VISITS -------------------------------------------------------------------------------


def _visits(days: list[int], month: str = "2026-03") -> list[r.Episode]:
    return [ep(f"S{i:02d}", "outpatient", f"{month}-{d:02d} 08:{i:02d}:00",
               hosp=(H1, H2)[i % 2], medfee=1000 + i) for i, d in enumerate(days, start=1)]


def test_frequent_visits_ninth_in_seven_days() -> None:
    nine = _visits([1, 1, 2, 3, 4, 5, 6, 7, 7])
    [j] = hits(nine, "FREQUENT_VISITS")
    assert (j.jr_id, j.suspect_amt) == (jr("FREQUENT_VISITS", "S09"), 1009)
    assert j.setl_ids == ["S09", *(f"S{i:02d}" for i in range(1, 9))]
    assert (j.window_begin, j.window_end) == ("2026-03-01", "2026-03-07")
    assert hits(nine[:8], "FREQUENT_VISITS") == []  # eight is the limit
    ten = _visits([1, 1, 2, 3, 4, 5, 6, 7, 7, 7])
    assert {j.jr_id for j in hits(ten, "FREQUENT_VISITS")} == {jr("FREQUENT_VISITS", "S09"),
                                                                 jr("FREQUENT_VISITS", "S10")}


def test_frequent_visits_window_edge() -> None:
    spread = _visits([1, 2, 3, 4, 5, 6, 7, 8, 8])  # the 9th falls on day 8: day 1 is outside 2..8
    assert hits(spread, "FREQUENT_VISITS") == []
    pharmacy = [replace(e, facts=sreplace(e.facts, visit_type="pharmacy")) for e in _visits([1] * 9)]
    assert hits(pharmacy, "FREQUENT_VISITS") == []  # purchases are not visits
    nine = _visits([1, 1, 2, 3, 4, 5, 6, 7, 7])
    assert hits(nine[1:], "FREQUENT_VISITS") == []  # one reversed


# --- PHARMACY_OVERSUPPLY ---------------------------------------------------------------------------

DRUG = "XA10BA02"


def _buy(setl_id: str, day: str, cnt: str, sumamt: int, supply_days: str = "30", hosp: str = PH1,
         kind: str = "pharmacy") -> r.Episode:
    return ep(setl_id, kind, f"{day} 10:00:00", hosp=hosp, medfee=sumamt,
              items=(item(DRUG, day, cnt, sumamt, supply_days=Decimal(supply_days)),))


def test_pharmacy_oversupply_over_pharmacies() -> None:
    a = _buy("S1", "2026-03-01", "2", 6000)  # 60 days
    b = _buy("S2", "2026-03-30", "1", 3000, hosp=PH2)  # 90 in 03-01..03-30: at the limit
    assert hits([a, b], "PHARMACY_OVERSUPPLY") == []
    c = _buy("S3", "2026-03-30", "2", 5000)  # 150 days: 60 over, this purchase brings 60 → all of it
    [j] = hits([a, b, c], "PHARMACY_OVERSUPPLY")
    assert j.jr_id == jr("PHARMACY_OVERSUPPLY", "S3", DRUG, "2026-03-30")
    assert (j.suspect_amt, j.items, j.setl_ids) == (5000, [DRUG], ["S3", "S1", "S2"])
    assert (j.window_begin, j.window_end) == ("2026-03-01", "2026-03-30")
    half = _buy("S3", "2026-03-30", "1", 3001, supply_days="45")  # 135: 45 over of 45 → whole 3001
    assert hits([a, b, half], "PHARMACY_OVERSUPPLY")[0].suspect_amt == 3001
    part = _buy("S3", "2026-03-29", "1", 1001, supply_days="45")  # 105 by 03-29 (b not yet): 15 of 45
    [k] = hits([a, part], "PHARMACY_OVERSUPPLY")
    assert k.suspect_amt == 333  # floor(1001 × 15 / 45)


def test_pharmacy_oversupply_sums_a_drugs_lines_of_one_settlement_and_day() -> None:
    lines = (item(DRUG, "2026-03-01", "2", 6000, supply_days=Decimal("30")),  # 60 days
             item(DRUG, "2026-03-01", "1", 3000, supply_days=Decimal("30")))  # + 30: 90, at the limit
    assert hits([ep("S1", "pharmacy", "2026-03-01 10:00:00", hosp=PH1, items=lines)], "PHARMACY_OVERSUPPLY") == []
    more = (*lines, item(DRUG, "2026-03-01", "1", 1000, supply_days=Decimal("15")))  # 105: 15 over
    [j] = hits([ep("S1", "pharmacy", "2026-03-01 10:00:00", hosp=PH1, items=more)], "PHARMACY_OVERSUPPLY")
    assert (j.setl_ids, j.suspect_amt) == (["S1"], 1428)  # one purchase of 105 days, 10000 fen: floor(10000 × 15/105)
    assert "105 days of supply" in j.detail and "brings 105" in j.detail


def test_pharmacy_oversupply_window_edge_and_kinds() -> None:
    a = _buy("S1", "2026-03-01", "2", 6000)
    late = _buy("S2", "2026-03-31", "2", 6000)  # day 31: 03-01 is outside 03-02..03-31
    assert hits([a, late], "PHARMACY_OVERSUPPLY") == []
    outpatient = _buy("S2", "2026-03-30", "2", 6000, hosp=H1, kind="outpatient")
    assert hits([a, outpatient], "PHARMACY_OVERSUPPLY") == []  # only pharmacy purchases count
    default_supply = ep("S3", "pharmacy", "2026-03-02 10:00:00", hosp=PH1,
                        items=(item(DRUG, "2026-03-02", "91", 9100),))  # supply_days default 1: 91 days
    [j] = hits([default_supply], "PHARMACY_OVERSUPPLY")
    assert j.suspect_amt == 100  # 1 of 91 days


# --- DUPLICATE_CHARGE ------------------------------------------------------------------------------


def test_duplicate_charge() -> None:
    once = {"once_per_day": True}
    visit = ep("S1", "outpatient", "2026-03-03 09:00:00", medfee=900, items=(
        item("BED01", "2026-03-03", "1", 300, **once), item("BED01", "2026-03-03", "2", 600, **once)))
    [j] = hits([visit], "DUPLICATE_CHARGE")
    assert j.jr_id == jr("DUPLICATE_CHARGE", "S1", "BED01", "2026-03-03")
    assert (j.suspect_amt, j.items, j.window_begin) == (600, ["BED01"], "2026-03-03")  # 2 of 3 billings


def test_duplicate_charge_near_misses_and_stay_parts() -> None:
    once = {"once_per_day": True}
    two_days = ep("S1", "outpatient", "2026-03-03 09:00:00", items=(
        item("BED01", "2026-03-03", "1", 300, **once), item("BED01", "2026-03-04", "1", 300, **once)))
    not_flagged = ep("S2", "outpatient", "2026-03-03 09:00:00", items=(
        item("INJ01", "2026-03-03", "1", 300), item("INJ01", "2026-03-03", "1", 300)))
    assert hits([two_days, not_flagged], "DUPLICATE_CHARGE") == []
    other_visit = ep("S3", "outpatient", "2026-03-03 15:00:00", items=(item("BED01", "2026-03-03", "1", 300, **once),))
    assert hits([two_days, other_visit], "DUPLICATE_CHARGE") == []  # another visit on the same day
    part1 = ep("S4", "inpatient", "2026-03-01 08:00:00", "2026-03-05 00:00:00", mdtrt="M9", mid=True,
               items=(item("BED01", "2026-03-05", "1", 300, **once),))
    final = ep("S5", "inpatient", "2026-03-01 08:00:00", "2026-03-09 00:00:00", mdtrt="M9",
               items=(item("BED01", "2026-03-05", "1", 300, **once),))
    [j] = hits([final, part1], "DUPLICATE_CHARGE")  # the parts of one stay are one visit
    assert (j.jr_id, j.setl_ids, j.suspect_amt) == (jr("DUPLICATE_CHARGE", "S4", "BED01", "2026-03-05"),
                                                    ["S4", "S5"], 300)


# --- GENDER_RESTRICTED -----------------------------------------------------------------------------


def test_gender_restricted() -> None:
    obstetric = (item("OBS01", "2026-03-03", "1", 2500, gender_only="2"),
                 item("OBS01", "2026-03-04", "1", 2500, gender_only="2"), item("GEN01", "2026-03-03", "1", 100))
    male = ep("S1", "outpatient", "2026-03-03 09:00:00", items=obstetric, gend="1")
    [j] = hits([male], "GENDER_RESTRICTED")
    assert (j.jr_id, j.suspect_amt, j.items) == (jr("GENDER_RESTRICTED", "S1", "OBS01"), 5000, ["OBS01"])
    assert (j.window_begin, j.window_end) == ("2026-03-03", "2026-03-04")
    assert "female" in j.detail
    assert hits([replace(male, facts=sreplace(male.facts, gend="2"))], "GENDER_RESTRICTED") == []
    assert hits([replace(male, facts=sreplace(male.facts, gend=""))], "GENDER_RESTRICTED") == []  # unknown


# --- COST_OUTLIER ---------------------------------------------------------------------------------


def _stay_cost(i: int, day: str, medfee: int, group: str = "J18|3|440000") -> StayCost:
    return StayCost(group=group, mdtrt_id=f"M{i}", psn_no=f"P{i}", setl_ids=[f"S{i}"], fixmedins_code=H1,
                    insured_admdvs=INSURED, treating_admdvs="440100", dscg_day=day, medfee=medfee)


def test_stay_costs_complete_stays_only() -> None:
    part1 = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-05 00:00:00", mdtrt="M1", mid=True,
               medfee=300, dise="J18.9", hosp_lv=2)
    final = ep("S2", "inpatient", "2026-03-01 08:00:00", "2026-03-09 11:00:00", mdtrt="M1", medfee=200,
               dise="J18.9", hosp_lv=2)
    no_dise = ep("S3", "inpatient", "2026-04-01 08:00:00", "2026-04-03 00:00:00", mdtrt="M3")
    visit = ep("S4", "outpatient", "2026-03-03 09:00:00")
    assert r.stay_costs([part1, no_dise, visit]) == []
    [s] = r.stay_costs([final, part1, no_dise, visit])
    assert s == StayCost(group="J18|2|440000", mdtrt_id="M1", psn_no=PSN, setl_ids=["S1", "S2"], fixmedins_code=H1,
                         insured_admdvs=INSURED, treating_admdvs="440100", dscg_day="2026-03-09", medfee=500)


def test_cost_outlier_nearest_rank() -> None:
    # 100 peers of 1..100 yuan discharged 03-01..03-30; nearest-rank p99 = the 99th = 9900 fen.
    peers = [_stay_cost(i, f"2026-03-{1 + i % 30:02d}", i * 100) for i in range(1, 101)]
    high = _stay_cost(999, "2026-03-31", 12345)
    [j] = r.cost_judgements([*peers, high], BOOK)
    assert (j.jr_id, j.suspect_amt, j.setl_ids) == (jr("COST_OUTLIER", "S999"), 12345 - 9900, ["S999"])
    assert (j.window_begin, j.window_end) == ("2026-03-01", "2026-03-31")
    assert "p99 9900 fen of 100 stays" in j.detail
    # The 100-yuan peer (discharged 03-11) is not above p99 of the others: only `high` hits.
    at_threshold = _stay_cost(999, "2026-03-31", 9900)
    assert r.cost_judgements([*peers, at_threshold], BOOK) == []


def test_cost_outlier_needs_min_stays_in_window_and_group() -> None:
    peers = [_stay_cost(i, "2026-03-01", 1000) for i in range(50)]
    high = _stay_cost(999, "2026-03-31", 5000)
    assert len(r.cost_judgements([*peers, high], BOOK)) == 1  # 50 peers 30 days before: enough
    assert r.cost_judgements([*peers[1:], high], BOOK) == []  # 49
    too_old = _stay_cost(999, "2026-04-01", 5000)  # 03-01 is 31 days before: outside
    assert r.cost_judgements([*peers, too_old], BOOK) == []
    same_day = [_stay_cost(i, "2026-03-31", 1000) for i in range(50)]  # the discharge day itself: not a peer
    assert r.cost_judgements([*same_day, high], BOOK) == []
    other_group = [sreplace(p, group="J18|2|440000") for p in peers]
    assert r.cost_judgements([*other_group, high], BOOK) == []
    withdrawn = [sreplace(p, withdrawn=True) for p in peers]
    assert r.cost_judgements([*withdrawn, high], BOOK) == []
    assert r.nearest_rank([5], 99) == 5
    assert r.nearest_rank(list(range(1, 51)), 99) == 50  # ceil(49.5) = 50


# --- across rules ---------------------------------------------------------------------------------


def _everything() -> list[r.Episode]:
    once = {"once_per_day": True}
    return [
        ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00", hosp=H1, dise="J18.9"),
        ep("S2", "inpatient", "2026-03-05 08:00:00", "2026-03-12 10:00:00", hosp=H2, dise="J18.9"),
        ep("S3", "inpatient", "2026-03-20 08:00:00", "2026-03-22 10:00:00", hosp=H1, dise="J18.1"),
        ep("S4", "pharmacy", "2026-03-06 10:00:00", hosp=PH1, items=(item(DRUG, "2026-03-06", "100", 100000),)),
        ep("S5", "outpatient", "2026-03-25 10:00:00", items=(
            item("BED01", "2026-03-25", "2", 600, **once), item("OBS01", "2026-03-25", "1", 500, gender_only="2"))),
        *_visits([26, 26, 26, 27, 27, 28, 28, 29, 29], month="2026-03"),
    ]


def test_all_rules_ids_stable_and_no_personal_identifiers() -> None:
    history = _everything()
    first = r.person_judgements(history, BOOK)
    assert {j.rule_id for j in first} == set(r.PERSON_RULES)
    assert r.person_judgements(list(reversed(history)), BOOK) == first  # same ids and content, any order
    assert [j.jr_id for j in first] == sorted(j.jr_id for j in first)
    assert len({j.jr_id for j in first}) == len(first)
    for j in first:
        assert PSN not in j.detail and PSN not in j.jr_id
        assert len(j.jr_id) == 32 and int(j.jr_id, 16) >= 0
        assert j.suspect_amt >= 0 and j.window_begin <= j.window_end
    only = r.person_judgements(history, BOOK, ["GENDER_RESTRICTED", "COST_OUTLIER"])
    assert [j.rule_id for j in only] == ["GENDER_RESTRICTED"]
    # A rule's version is part of its ids.
    bumped = load_rules_text(Path(r.__file__).with_name("rules.toml").read_text().replace(
        'name = "限性别"\nseverity = "high"\nversion = 1', 'name = "限性别"\nseverity = "high"\nversion = 2'))
    [old] = [j for j in first if j.rule_id == "GENDER_RESTRICTED"]
    [new] = r.person_judgements(history, bumped, ["GENDER_RESTRICTED"])
    assert (new.rule_version, new.jr_id != old.jr_id, new.suspect_amt) == (2, True, old.suspect_amt)


def test_candidate_visit_is_judged_with_history() -> None:
    """The engine's in-event check: the candidate is an episode with setl_id "P" + msgid."""
    stay = ep("S1", "inpatient", "2026-03-01 08:00:00", "2026-03-10 10:00:00", hosp=H1)
    candidate = ep("Pmsg0001", "outpatient", "2026-03-05 10:00:00", hosp=H2)
    mine = [j for j in r.person_judgements([stay, candidate], BOOK) if "Pmsg0001" in j.setl_ids]
    assert [j.rule_id for j in mine] == ["OUTPATIENT_DURING_STAY"]


def test_horizon_days() -> None:
    assert r.horizon_days(BOOK) == 30 + 31  # PHARMACY_OVERSUPPLY/COST_OUTLIER 30 + the margin
    longer = load_rules_text(Path(r.__file__).with_name("rules.toml").read_text().replace(
        'overrides."350000" = { readmit_days = 30 }', 'overrides."350000" = { readmit_days = 60 }'))
    assert r.horizon_days(longer) == 60 + 31


# --- the rules file ---------------------------------------------------------------------------------


def load_rules_text(text: str) -> r.RuleBook:
    return parse_rules(text, "test.toml")


MINIMAL = """
version = "t1"
history_margin_days = 0
[rules.FREQUENT_VISITS]
name = "频繁就诊"
severity = "low"
version = 3
params = { max_visits = 8, window_days = 7 }
overrides."350000" = { max_visits = 10 }
overrides."350300" = { max_visits = 12 }
"""


def test_rulebook_params_pool_beats_province_beats_default() -> None:
    book = load_rules_text(MINIMAL)
    assert book.version == "t1"
    for _ in range(2):  # the second time from the book's cache of merged parameters
        assert dict(book.params("FREQUENT_VISITS", "150400")) == {"max_visits": 8, "window_days": 7}
        assert dict(book.params("FREQUENT_VISITS", "350100")) == {"max_visits": 10, "window_days": 7}
        assert dict(book.params("FREQUENT_VISITS", "350300")) == {"max_visits": 12, "window_days": 7}
    assert book.params("FREQUENT_VISITS", "350300") is book.params("FREQUENT_VISITS", "350300")
    assert book == load_rules_text(MINIMAL)  # the cache is not part of the book's value
    # Rules absent from the file are not evaluated.
    mine = r.person_judgements(_everything(), book)
    shipped = r.person_judgements(_everything(), BOOK, ["FREQUENT_VISITS"])
    assert len(shipped) == 2  # S5 on 03-25 and the nine of 03-26..29: the 9th and the 10th
    assert sorted((j.rule_id, j.rule_version, j.setl_ids) for j in mine) == sorted(
        ("FREQUENT_VISITS", 3, j.setl_ids) for j in shipped)


def test_the_shipped_rules_file() -> None:
    assert set(BOOK.rules) == {*r.PERSON_RULES, r.COST_RULE}
    assert {k: dict(v.params) for k, v in BOOK.rules.items()} == {
        "OVERLAP_INPATIENT": {}, "SPLIT_ADMISSION": {"readmit_days": 15}, "OUTPATIENT_DURING_STAY": {},
        "FREQUENT_VISITS": {"max_visits": 8, "window_days": 7},
        "PHARMACY_OVERSUPPLY": {"max_supply_days": 90, "window_days": 30}, "DUPLICATE_CHARGE": {"max_per_day": 1},
        "GENDER_RESTRICTED": {}, "COST_OUTLIER": {"percentile": 99, "window_days": 30, "min_stays": 50}}


@pytest.mark.parametrize(("change", "message"), [
    (("max_visits = 8,", "max_visit = 8,"), "test.toml: rule FREQUENT_VISITS.params.max_visit: unknown parameter"),
    (("max_visits = 8,", ""), "test.toml: rule FREQUENT_VISITS.params.max_visits: missing"),
    (("max_visits = 8,", "max_visits = 0,"), "rule FREQUENT_VISITS.params.max_visits: must be between 1 and 1000"),
    (("max_visits = 8,", 'max_visits = "8",'), "rule FREQUENT_VISITS.params.max_visits: must be an integer"),
    (("max_visits = 8,", "max_visits = 8.5,"), "rule FREQUENT_VISITS.params.max_visits: must be an integer"),
    (('severity = "low"', 'severity = "urgent"'), "rule FREQUENT_VISITS.severity: must be one of low, medium, high"),
    (("version = 3", "version = 0"), "rule FREQUENT_VISITS.version: must be between 1 and 1000000"),
    (('name = "频繁就诊"', 'name = ""'), "rule FREQUENT_VISITS.name: must be a text of 1 to 50 characters"),
    (("[rules.FREQUENT_VISITS]", "[rules.FREQUENT_VISIT]"), "rule FREQUENT_VISIT: no such rule in the code"),
    (('overrides."350000"', 'overrides."35"'), "rule FREQUENT_VISITS.overrides.35: key must be a 6-digit"),
    (("{ max_visits = 10 }", "{ max_visits = -1 }"),
     "rule FREQUENT_VISITS.overrides.350000.max_visits: must be between 1 and 1000"),
    (("{ max_visits = 10 }", "{ window = 1 }"), "rule FREQUENT_VISITS.overrides.350000.window: unknown parameter"),
    (('version = "t1"', "version = 1"), "test.toml: version: must be a text"),
    (("history_margin_days = 0", ""), "test.toml: history_margin_days: must be an integer"),
    (("history_margin_days = 0", "history_margin_days = 0\ncolour = 1"), "test.toml: colour: unknown field"),
    (("severity =", "severity = = "), "test.toml: not valid TOML"),
    (('name = "频繁就诊"', 'name = "频繁就诊"\nenabled = "yes"'),
     "rule FREQUENT_VISITS.enabled: must be true or false"),
    (('name = "频繁就诊"', 'name = "频繁就诊"\nowner = "x"'), "rule FREQUENT_VISITS.owner: unknown field"),
])
def test_rulebook_errors_name_rule_and_field(change: tuple[str, str], message: str) -> None:
    text = MINIMAL.replace(*change)
    assert text != MINIMAL
    with pytest.raises(RuleBookError) as caught:
        load_rules_text(text)
    assert message in str(caught.value)


def test_jr_ids_are_pinned() -> None:
    """A replay after an upgrade must find the same ids: the derivation is fixed, not just self-consistent."""
    rule = BOOK.rules["OVERLAP_INPATIENT"]
    assert r.jr_id_of(rule, ["S2", "S1"]) == hashlib.sha256(b"OVERLAP_INPATIENT\x1f1\x1fS2\x1fS1").hexdigest()[:32]
    assert r.jr_id_of(rule, ["S2", "S1"]) == "86930367eae99cfafedc639ea430e3d7"
    assert r.jr_id_of(rule, ["S1", "S2"]) != r.jr_id_of(rule, ["S2", "S1"])


def test_rulebook_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rulebook_main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rules 2026.11-1: 8 rule(s)\n")
    assert "  SPLIT_ADMISSION v1 medium 分解住院: readmit_days=15 [overrides 350000: readmit_days=30]\n" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace("max_visits = 8,", "max_visits = 0,"))
    assert rulebook_main([str(bad)]) == 1
    assert capsys.readouterr().err == ("rules file refused: bad.toml: rule FREQUENT_VISITS.params.max_visits: "
                                       "must be between 1 and 1000\n")


def test_rulebook_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RuleBookError, match="cannot read the rules file"):
        load_rules(tmp_path / "absent.toml")
    empty = tmp_path / "rules.toml"
    empty.write_text('version = "x"\nhistory_margin_days = 1\n')
    with pytest.raises(RuleBookError, match=r"^rules.toml: rules: at least one"):
        load_rules(empty)
    disabled = tmp_path / "disabled.toml"
    disabled.write_text(MINIMAL.replace('severity = "low"', 'severity = "low"\nenabled = false'))
    book = load_rules(disabled)
    assert r.person_judgements(_everything(), book) == []
    assert r.horizon_days(book) == 1
