"""Seeded suspicious behaviour of the demo and the benchmark (loadtest.population): who shows it, that it
leaves the ordinary scenario draws alone, and that each rule's visits hit that rule — checked with the real
rule code (services.smartmon.rules) over the episodes the visits would settle."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from loadtest.his import Hospital
from loadtest.population import (
    ITEMS_TODAY,
    KIND_WEIGHTS,
    STAY_DAYS,
    SUSPICIOUS_RULES,
    SUSPICIOUS_SHARE,
    CatalogInfo,
    HospitalInfo,
    PersonInfo,
    Population,
    Scenario,
    Stats,
    drive_stay,
    fee_lines,
    suspicious_rule,
    usual_cnt,
)
from schemas.monitoring import ItemFact, VisitFacts
from services.refdata.regions import region_of
from services.smartmon.rules import Episode, cost_judgements, load_rules, person_judgements, stay_costs

NOW = datetime(2026, 11, 23, 10, 0, 0)
PROV = "150000"


def _hospital(code: str, admdvs: str = "150400", lv: int = 3) -> HospitalInfo:
    r = region_of(admdvs)
    return HospitalInfo(Hospital(code, "医院", admdvs), admdvs, lv, r.prov_admdvs, r.pool_admdvs)


CATALOG = [
    CatalogInfo("XJ01CAA040A001001", "01", None),
    CatalogInfo("XA10BAD001A001001", "01", None, supply_days=Decimal(30)),
    CatalogInfo("XC09AAK001A001001", "01", None, supply_days=Decimal(7)),
    CatalogInfo("ZA06AAL001A001001", "01", None),
    CatalogInfo("XG03DAH001B002001", "01", None, gender_only="2"),
    CatalogInfo("001103000010000", "01", None, once_per_day=True),
    CatalogInfo("002201000010000", "01", 6000, once_per_day=True),
    CatalogInfo("002502000010000", "01", None),
    CatalogInfo("003105010010000", "02", 18_000),
    CatalogInfo("003106060010000", "01", None, gender_only="2"),
    CatalogInfo("003109020030000", "01", None, gender_only="1"),
    CatalogInfo("C0101020010100100001", "02", 800),
]
BY_CODE = {c.code: c for c in CATALOG}


def _population(share: float = SUSPICIOUS_SHARE, persons: int = 400) -> Population:
    hospitals = [_hospital("H15040000001"), _hospital("H15040000002"), _hospital("H15040000003", lv=2),
                 _hospital("P15040000001", lv=1), _hospital("P15040000002", lv=1)]
    people = [PersonInfo(f"P150400{i:08d}", "150400", "390", gend="12"[i % 2]) for i in range(1, persons + 1)]
    return Population(hospitals, people, {}, {PROV: list(CATALOG)}, seed=7, suspicious_share=share)


def _fen(amount: Decimal) -> int:
    return int(amount * 100)


def _episodes(visits: list[Scenario]) -> list[Episode]:
    """The episodes the settlement engine would record for these visits (loadtest.his's bodies: a stay is
    admitted at `start`, its fees dated + 1 h, discharged + 3 days, main diagnosis I10; an outpatient visit
    and a purchase at `start`)."""
    out = []
    for n, v in enumerate(visits):
        lines = [line for upload in v.uploads for line in upload]
        if v.kind == "inpatient":
            begin, end, day = v.start, v.start + timedelta(days=STAY_DAYS), (v.start + timedelta(hours=1)).date()
            setl, main, med_type = end + timedelta(hours=1), "I10.x00", "21"
        else:
            begin, end, day, setl, main = v.start, None, v.start.date(), v.start + timedelta(minutes=3), ""
            med_type = "41" if v.kind == "pharmacy" else "11"
        items = [ItemFact(med_list_codg=line.med_list_codg, day=day.isoformat(), cnt=line.cnt,
                          sumamt=_fen(line.amount), once_per_day=BY_CODE[line.med_list_codg].once_per_day,
                          gender_only=BY_CODE[line.med_list_codg].gender_only,  # type: ignore[arg-type]
                          supply_days=BY_CODE[line.med_list_codg].supply_days) for line in lines]
        facts = VisitFacts(visit_type="outpatient" if v.kind == "chronic" else v.kind,  # type: ignore[arg-type]
                           gend=v.person.gend,  # type: ignore[arg-type]
                           begntime=f"{begin:%Y-%m-%d %H:%M:%S}", endtime=f"{end:%Y-%m-%d %H:%M:%S}" if end else "",
                           main_dise=main, hosp_lv=v.hospital.hosp_lv, treating_prov=v.hospital.prov, items=items)
        out.append(Episode(setl_id=f"S{n:04d}", mdtrt_id=f"M{n:04d}", psn_no=v.person.psn_no,
                           fixmedins_code=v.hospital.his.fixmedins_code, insured_admdvs=v.person.insuplc,
                           treating_admdvs=v.hospital.pool, med_type=med_type, setl_time=f"{setl:%Y-%m-%d %H:%M:%S}",
                           medfee=sum(i.sumamt for i in items), mid_setl=False, facts=facts))
    return out


def _hits(visits: list[Scenario]) -> Counter[tuple[str, str]]:
    """(rule, psn_no) of every judgement the rules find over these visits."""
    book = load_rules()
    episodes = _episodes(visits)
    by_person: dict[str, list[Episode]] = defaultdict(list)
    for e in episodes:
        by_person[e.psn_no].append(e)
    found: Counter[tuple[str, str]] = Counter()
    for history in by_person.values():
        for j in person_judgements(history, book):
            found[(j.rule_id, j.psn_no)] += 1
    groups = defaultdict(list)
    for s in stay_costs(episodes):
        groups[s.group].append(s)
    for stays in groups.values():
        for j in cost_judgements(stays, book):
            found[(j.rule_id, j.psn_no)] += 1
    return found


def test_each_rule_is_shown_by_its_share_of_persons_drawn_from_the_person_alone() -> None:
    psn_nos = [f"P150400{i:08d}" for i in range(1, 20_001)]
    rules = Counter(suspicious_rule(7, p, SUSPICIOUS_SHARE) for p in psn_nos)
    assert set(rules) == {*SUSPICIOUS_RULES, None}
    for rule in SUSPICIOUS_RULES:  # 1 % each: 200 of 20,000, binomial sd 14
        assert 150 <= rules[rule] <= 250, (rule, rules[rule])
    assert rules == Counter(suspicious_rule(7, p, SUSPICIOUS_SHARE) for p in psn_nos)  # deterministic
    assert Counter(suspicious_rule(8, p, SUSPICIOUS_SHARE) for p in psn_nos) != rules  # by seed
    assert all(suspicious_rule(7, p, 0.0) is None for p in psn_nos[:100])
    # A larger share flags a superset: the draw is the person's, only the cut moves.
    assert all(suspicious_rule(7, p, 0.02) is not None for p in psn_nos if rules and suspicious_rule(7, p, 0.01))
    with pytest.raises(ValueError):
        suspicious_rule(7, psn_nos[0], 0.2)


def test_seeding_leaves_the_ordinary_scenario_draws_as_they_were() -> None:
    plain, seeded = _population(0.0), _population(SUSPICIOUS_SHARE)
    rng_a, rng_b = random.Random(5), random.Random(5)
    behaviours = 0
    for _ in range(400):
        a = plain.scenario(rng_a, now=NOW)
        b = seeded.scenario(rng_b, now=NOW)
        assert a is not None and b is not None
        assert (a.kind, a.hospital, a.person, a.start, a.uploads, a.reverse, a.filing) == (
            b.kind, b.hospital, b.person, b.start, b.uploads, b.reverse, b.filing)
        assert not a.companions and a.behaviour is None
        if b.behaviour is not None:
            assert b.kind != "inpatient"  # a stay of the last days would hold the backdated visits
            behaviours += 1
            assert b.companions and suspicious_rule(7, b.person.psn_no, SUSPICIOUS_SHARE) == b.behaviour
        plain.release(a)
        seeded.release(b)
        assert not seeded.busy
    assert behaviours == sum(seeded.seeded.values()) > 0
    assert len(seeded.seeded_persons) == behaviours  # once per person and run


def test_ordinary_visits_bill_no_gender_item_and_honest_counts() -> None:
    pop = _population(0.0)
    rng = random.Random(3)
    for _ in range(300):
        scn = pop.scenario(rng, now=NOW, kinds=KIND_WEIGHTS)
        assert scn is not None
        pop.release(scn)
        for line in (line for upload in scn.uploads for line in upload):
            item = BY_CODE[line.med_list_codg]
            assert not item.gender_only
            if item.once_per_day:
                assert line.cnt == 1
            if item.supply_days > 1:
                assert line.cnt * item.supply_days <= 30
    assert usual_cnt(BY_CODE["XC09AAK001A001001"], 20) == 4 and usual_cnt(BY_CODE["XJ01CAA040A001001"], 20) == 20


@pytest.mark.parametrize("rule", SUSPICIOUS_RULES)
def test_each_seeded_behaviour_hits_its_rule(rule: str) -> None:
    pop = _population()
    pop.cost_group_stays = 60  # the rule needs 50 peers; 60 ordinary stays keep the test small
    person = next(p for p in pop.persons if p.gend == "1")
    rng = random.Random(1)
    scn = pop.scenario(rng, now=NOW, kinds={"outpatient": 1.0})
    assert scn is not None and scn.person != person  # the scenario only carries the plan here
    scn.companions = []
    assert pop.seed_behaviour(scn, rule, now=NOW)  # for `scn.person`
    visits = scn.companions
    assert scn.behaviour == rule and pop.seeded[rule] == 1
    assert all(v.person == scn.person for v in visits if not (rule == "COST_OUTLIER" and not v.expensive))
    assert all(not v.reverse and v.start < NOW and v.start + timedelta(days=STAY_DAYS, hours=2) <= NOW
               for v in visits if v.kind == "inpatient")
    hits = _hits(visits)
    assert hits[(rule, scn.person.psn_no)] >= 1, hits
    # The ordinary fillers of a cost group hit nothing.
    assert not [k for k in hits if k[1] != scn.person.psn_no]


def test_a_cost_group_is_filled_once_per_run_and_makes_room_for_one_outlier_per_its_size() -> None:
    pop = _population(persons=400)
    pop.cost_group_stays = 60
    rng = random.Random(2)
    first = pop.scenario(rng, now=NOW, kinds={"outpatient": 1.0})
    assert first is not None and pop.seed_behaviour(first, "COST_OUTLIER", now=NOW)
    assert len(first.companions) == 61 and first.companions[0].expensive  # the outlier first: never cut off
    fillers = first.companions[1:]
    assert len({v.person.psn_no for v in fillers}) == 60 and first.person not in {v.person for v in fillers}
    assert {(v.start + timedelta(days=STAY_DAYS)).date() for v in fillers} <= {
        (NOW - timedelta(days=d)).date() for d in range(4, 30)}  # peers: discharged on earlier days
    second = pop.scenario(rng, now=NOW, kinds={"outpatient": 1.0})
    assert second is not None and second.person not in {v.person for v in first.companions}
    assert not pop.seed_behaviour(second, "COST_OUTLIER", now=NOW)  # no room left, no second filling
    assert pop.seeded["COST_OUTLIER"] == 1


def test_an_unknown_gender_shows_no_gender_behaviour() -> None:
    pop = Population([_hospital("H15040000001")], [PersonInfo("P15040000000001", "150400", "390")], {},
                     {PROV: list(CATALOG)}, suspicious_share=SUSPICIOUS_SHARE)
    scn = pop.scenario(random.Random(1), now=NOW)
    assert scn is not None
    assert not pop.seed_behaviour(scn, "GENDER_RESTRICTED", now=NOW)
    assert scn.behaviour is None and not scn.companions


def test_fee_lines_of_the_flagged_items_keep_the_draws() -> None:
    # The count is capped after the draw: the same number of draws, so later lines are unchanged.
    plain = [CatalogInfo(c.code, c.lv, c.ceiling_fen) for c in CATALOG]
    a = fee_lines(random.Random(9), plain, 8)
    b = fee_lines(random.Random(9), CATALOG, 8)
    assert [(x.med_list_codg, x.pric) for x in a] == [(x.med_list_codg, x.pric) for x in b]
    assert ITEMS_TODAY["inpatient"] == (3, 15)


def test_an_oversupply_across_provinces_buys_a_drug_both_pharmacies_sell() -> None:
    # 赤峰 persons buy at a pharmacy of 内蒙古 and one of 重庆 (a seed region): the provincial 制剂 of one
    # province is unknown in the other's catalog.
    local = [*CATALOG, CatalogInfo("Z15YNZJ0001", "02", None)]
    other = [*CATALOG, CatalogInfo("Z50YNZJ0001", "02", None)]
    pharmacies = [_hospital("H15040000001"), _hospital("P15040000001", lv=1), _hospital("P50015400001", "500154", 1)]
    people = [PersonInfo(f"P150400{i:08d}", "150400", "390", gend="1") for i in range(1, 41)]
    pop = Population(pharmacies, people, {}, {PROV: local, "500000": other}, suspicious_share=SUSPICIOUS_SHARE)
    rng = random.Random(4)
    for _ in range(40):
        scn = pop.scenario(rng, now=NOW, kinds={"pharmacy": 1.0})
        assert scn is not None
        scn.companions = []
        assert pop.seed_behaviour(scn, "PHARMACY_OVERSUPPLY", now=NOW)
        provs = {v.hospital.prov for v in scn.companions}
        codes = {line.med_list_codg for v in scn.companions for upload in v.uploads for line in upload}
        assert len(codes) == 1 and all(code in {c.code for c in pop.catalog[p]} for p in provs for code in codes)
        pop.release(scn)
        pop.seeded_persons.clear()


class _Answers:
    """A pipeline that accepts everything: the answers' ids are what the visit's next requests need."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.sent: list[str] = []

    async def call(self, envelope: dict[str, Any]) -> dict[str, Any]:
        infno = envelope["infno"]
        self.sent.append(infno)
        n = next(self.ids)
        output: dict[str, Any] = {"data": {"mdtrt_id": f"M{n}"}, "result": {"mdtrt_id": f"M{n}"},
                                  "setlinfo": {"setl_id": f"S{n}", "medins_setl_id": envelope["msgid"],
                                               "fund_pay_sumamt": "1.00", "medfee_sumamt": "2.00"}}
        return {"infcode": 0, "err_msg": "", "output": output}


@pytest.mark.parametrize("more", [True, False])
def test_a_behaviours_visits_are_driven_after_its_visit_unless_the_run_is_over(more: bool) -> None:
    pop = _population()
    scn = pop.scenario(random.Random(6), now=NOW, kinds={"outpatient": 1.0}, reversal_share=0.0)
    assert scn is not None
    scn.lookup = scn.query = False
    scn.companions = []
    assert pop.seed_behaviour(scn, "FREQUENT_VISITS", now=NOW)
    stats, answers = Stats(), _Answers()
    outcome = asyncio.run(drive_stay(answers, scn, stats, more=lambda: more))
    assert outcome == "done"
    visits = 1 + (len(scn.companions) if more else 0)
    assert stats.stays_started == stats.stay_outcomes["done"] == visits == answers.sent.count("2201")
    assert stats.settled == visits and stats.behaviour_visits["FREQUENT_VISITS"] == visits - 1


def test_the_demo_prints_hits_by_rule_against_what_it_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest import demo
    from services.common.config import load_settings

    pop = _population()
    pop.seeded.update({"FREQUENT_VISITS": 2, "GENDER_RESTRICTED": 1})
    pop.planned_visits.update({"FREQUENT_VISITS": 20, "GENDER_RESTRICTED": 1})
    stats = Stats()
    stats.behaviour_visits.update({"FREQUENT_VISITS": 13, "GENDER_RESTRICTED": 1})
    reads = []

    async def counts(s: Any, since: datetime, seeded: dict[str, str]) -> tuple[Counter[str], Counter[str], int]:
        reads.append(since)
        return Counter({"FREQUENT_VISITS": 3, "OVERLAP_INPATIENT": 1}), Counter({"FREQUENT_VISITS": 2}), 1

    monkeypatch.setattr(demo, "judgement_counts", counts)
    lines = asyncio.run(demo.judgement_report(load_settings(), pop, stats, NOW, wait_s=0))
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.strip().split(" ")[0] in SUSPICIOUS_RULES}
    assert rows["FREQUENT_VISITS"] == ["2", "13/20", "2", "3"]
    assert rows["GENDER_RESTRICTED"] == ["1", "1/1", "0", "0"]
    assert rows["OVERLAP_INPATIENT"] == ["0", "0/0", "0", "1"]
    assert set(rows) == set(SUSPICIOUS_RULES) and reads == [NOW]
    assert "1 withdrawn" in lines[-2] and lines[-1].endswith("/judgements") and "Judgements page" in lines[-1]
    assert not any(p.psn_no in line for p in pop.persons for line in lines)
