"""Property tests for the monitoring rules: the judgements are a function of the SET of episodes, so any
order, batching, replay or restart of the stream yields the same judgements (and cost judgements)."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.monitoring import ItemFact, Judgement, StayCost, VisitFacts
from services.smartmon import rules as r
from services.smartmon.rulebook import parse_rules

# Tight parameters, so that short random histories hit every rule often.
DENSE = parse_rules("""
version = "dense"
history_margin_days = 3
[rules.OVERLAP_INPATIENT]
name = "同一时间多地住院"
severity = "high"
version = 1
[rules.SPLIT_ADMISSION]
name = "分解住院"
severity = "medium"
version = 1
params = { readmit_days = 5 }
[rules.OUTPATIENT_DURING_STAY]
name = "住院期间门诊/购药"
severity = "medium"
version = 1
[rules.FREQUENT_VISITS]
name = "频繁就诊"
severity = "low"
version = 1
params = { max_visits = 2, window_days = 3 }
overrides."350000" = { max_visits = 1 }
[rules.PHARMACY_OVERSUPPLY]
name = "超量购药"
severity = "medium"
version = 1
params = { max_supply_days = 10, window_days = 5 }
[rules.DUPLICATE_CHARGE]
name = "重复收费"
severity = "medium"
version = 1
params = { max_per_day = 1 }
[rules.GENDER_RESTRICTED]
name = "限性别"
severity = "high"
version = 1
[rules.COST_OUTLIER]
name = "费用异常"
severity = "low"
version = 1
params = { percentile = 75, window_days = 10, min_stays = 3 }
""", "dense.toml")

START = datetime(2026, 3, 1)
HOSPITALS = ("H44010000001", "H44010000002", "P44010000003")
CATALOG = (  # code, once_per_day, gender_only, supply_days
    ("BED01", True, "", Decimal(1)), ("OBS01", False, "2", Decimal(1)), ("DRUG1", False, "", Decimal("7.5")),
    ("DRUG2", False, "", Decimal(3)), ("PRO01", False, "1", Decimal(1)),
)
T = TypeVar("T")
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


@st.composite
def items(draw: st.DrawFn, day: datetime, days: int) -> list[ItemFact]:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        code, once, gender, supply = draw(st.sampled_from(CATALOG))
        on = day + timedelta(days=draw(st.integers(0, days)))
        cnt = draw(st.sampled_from((Decimal(1), Decimal(2), Decimal("0.5"))))
        out.append(ItemFact(med_list_codg=code, day=on.strftime("%Y-%m-%d"), cnt=cnt,
                            sumamt=draw(st.integers(0, 50_000)), once_per_day=once,
                            gender_only=gender, supply_days=supply))  # type: ignore[arg-type]
    return out


@st.composite
def histories(draw: st.DrawFn, psn_no: str = "PSN0001") -> list[r.Episode]:
    """One person's episodes: outpatient visits, pharmacy purchases and stays, some in two parts."""
    insured = draw(st.sampled_from(("150400", "350300")))
    gend = draw(st.sampled_from(("1", "2", "")))
    out: list[r.Episode] = []
    for n in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(("inpatient", "outpatient", "outpatient", "pharmacy")))
        begin = START + timedelta(days=draw(st.integers(0, 20)), hours=draw(st.integers(0, 23)))
        hosp = HOSPITALS[2] if kind == "pharmacy" else draw(st.sampled_from(HOSPITALS[:2]))
        dise = draw(st.sampled_from(("J18.9", "J18.1", "K35.2", "")))
        mdtrt = f"M{n:03d}"

        def episode(setl_id: str, end: datetime | None, mid: bool, facts_items: list[ItemFact],
                    kind: str = kind, begin: datetime = begin, hosp: str = hosp, dise: str = dise,
                    mdtrt: str = mdtrt) -> r.Episode:
            facts = VisitFacts(visit_type=kind, gend=gend, begntime=_ts(begin),  # type: ignore[arg-type]
                               endtime="" if end is None else _ts(end), main_dise=dise,
                               hosp_lv=3, treating_prov="440000", items=facts_items)
            return r.Episode(setl_id=setl_id, mdtrt_id=mdtrt, psn_no=psn_no, fixmedins_code=hosp,
                             insured_admdvs=insured, treating_admdvs="440100",
                             med_type={"inpatient": "21", "outpatient": "11", "pharmacy": "41"}[kind],
                             setl_time=_ts(end or begin), medfee=draw(st.integers(0, 2_000_000)), mid_setl=mid,
                             facts=facts)

        if kind != "inpatient":
            out.append(episode(f"{psn_no}-S{n:03d}", None, False, draw(items(begin, 0))))
            continue
        days = draw(st.integers(0, 6))
        end = begin + timedelta(days=days, hours=draw(st.integers(0, 12)))
        if days >= 2 and draw(st.booleans()):  # a mid-stay settlement, then the final one
            cut = begin + timedelta(days=1)
            out.append(episode(f"{psn_no}-S{n:03d}a", cut, True, draw(items(begin, 1))))
            out.append(episode(f"{psn_no}-S{n:03d}b", end, False, draw(items(cut, days - 1))))
        else:
            out.append(episode(f"{psn_no}-S{n:03d}", end, False, draw(items(begin, days))))
    return out


def _chunks(data: st.DataObject, seq: list[T]) -> list[list[T]]:
    """`seq` cut into consecutive batches at arbitrary points (empty batches too)."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(seq)), max_size=6)))
    return [seq[a:b] for a, b in itertools.pairwise([0, *cuts, len(seq)])]


def _stream(batches: list[list[r.Episode]], reversed_ids: set[str]) -> dict[str, Judgement]:
    """What the stream does: add a batch (a reversal drops its settlement), recompute, emit new and changed
    judgements, withdraw the ids no longer produced; the open ones at the end."""
    held: dict[str, r.Episode] = {}
    emitted: dict[str, Judgement] = {}
    for batch in batches:
        for e in batch:
            held[e.setl_id] = e
        for setl_id in reversed_ids & set(held):
            del held[setl_id]
        now = {j.jr_id: j for j in r.person_judgements(list(held.values()), DENSE)}
        for jr_id in set(emitted) - set(now):
            del emitted[jr_id]  # withdrawn
        emitted.update(now)
    return emitted


@PROPERTY_SETTINGS
@given(history=histories(), data=st.data())
def test_person_judgements_ignore_order_batching_and_replay(history: list[r.Episode], data: st.DataObject) -> None:
    once = r.person_judgements(history, DENSE)
    assert len({j.jr_id for j in once}) == len(once)
    shuffled = data.draw(st.permutations(history))
    assert r.person_judgements(shuffled, DENSE) == once
    # Folded in arbitrary chunks (a restart between any two) with replays of earlier events: same result.
    replayed = shuffled + data.draw(st.lists(st.sampled_from(history), max_size=5)) if history else shuffled
    assert sorted(_stream(_chunks(data, replayed), set()).values(), key=lambda j: j.jr_id) == once
    for j in once:
        assert j.psn_no not in j.detail
        assert j.suspect_amt >= 0 and j.window_begin <= j.window_end
        assert set(j.setl_ids) <= {e.setl_id for e in history}


@PROPERTY_SETTINGS
@given(history=histories(), data=st.data())
def test_reversals_equal_their_absence(history: list[r.Episode], data: st.DataObject) -> None:
    gone = set(data.draw(st.lists(st.sampled_from([e.setl_id for e in history]), max_size=4))) if history else set()
    kept = [e for e in history if e.setl_id not in gone]
    order = data.draw(st.permutations(history))
    streamed = _stream(_chunks(data, order), gone)
    assert sorted(streamed.values(), key=lambda j: j.jr_id) == r.person_judgements(kept, DENSE)
    for rule_id in r.PERSON_RULES:  # a subset of rules is the same subset of the judgements
        assert r.person_judgements(kept, DENSE, [rule_id]) == [
            j for j in r.person_judgements(kept, DENSE) if j.rule_id == rule_id]


@PROPERTY_SETTINGS
@given(history=histories())
def test_pruning_to_the_horizon_keeps_recent_judgements(history: list[r.Episode]) -> None:
    kept = r.within_horizon(history, DENSE)
    kept_ids = {e.setl_id for e in kept}
    full = r.person_judgements(history, DENSE)
    pruned = r.person_judgements(kept, DENSE)
    assert {j.jr_id for j in pruned} <= {j.jr_id for j in full}  # pruning never invents a hit
    # Every judgement whose evidence is all kept survives the pruning unchanged.
    pruned_by_id = {j.jr_id: j for j in pruned}
    for j in full:
        if set(j.setl_ids) <= kept_ids:
            assert pruned_by_id.get(j.jr_id) == j
    if history:  # the newest episodes are always kept
        newest = max(history, key=lambda e: (e.setl_time, e.setl_id))
        assert newest.setl_id in kept_ids


@st.composite
def group_stays(draw: st.DrawFn) -> list[StayCost]:
    """Stays of one group over three weeks; a few withdrawn."""
    out = []
    for n in range(draw(st.integers(0, 30))):
        day = START + timedelta(days=draw(st.integers(0, 20)))
        out.append(StayCost(group="J18|3|440000", mdtrt_id=f"M{n:03d}", psn_no=f"PSN{n:04d}", setl_ids=[f"S{n:03d}"],
                            fixmedins_code=draw(st.sampled_from(HOSPITALS[:2])), insured_admdvs="150400",
                            treating_admdvs="440100", dscg_day=day.strftime("%Y-%m-%d"),
                            medfee=draw(st.integers(0, 100) | st.integers(0, 10_000_000)),
                            withdrawn=draw(st.booleans()) and draw(st.booleans())))
    return out


@PROPERTY_SETTINGS
@given(stays=group_stays(), data=st.data())
def test_cost_judgements_ignore_order_and_batching(stays: list[StayCost], data: st.DataObject) -> None:
    once = r.cost_judgements(stays, DENSE)
    assert r.cost_judgements(data.draw(st.permutations(stays)), DENSE) == once
    # The cost agent's table: stays arriving in chunks, some twice (replay), a withdrawal replacing its
    # stay; recomputing after each chunk ends where the one-shot result is.
    replays = data.draw(st.lists(st.sampled_from(stays), max_size=3)) if stays else []
    live = [s for s in stays if not s.withdrawn]
    arrivals = data.draw(st.permutations(live + replays))
    table: dict[str, StayCost] = {}
    for chunk in _chunks(data, arrivals):
        for s in chunk:
            table[s.mdtrt_id] = s
        r.cost_judgements(list(table.values()), DENSE)
    for s in stays:
        if s.withdrawn:
            table[s.mdtrt_id] = s
    assert r.cost_judgements(list(table.values()), DENSE) == once
    for j in once:
        assert j.psn_no not in j.detail and j.suspect_amt > 0


@PROPERTY_SETTINGS
@given(history=histories(), data=st.data())
def test_stay_costs_ignore_order(history: list[r.Episode], data: st.DataObject) -> None:
    costs = r.stay_costs(history)
    assert r.stay_costs(data.draw(st.permutations(history))) == costs
    assert r.stay_costs(history + history[:3]) == costs
    for s in costs:
        assert s.medfee == sum(e.medfee for e in history if e.setl_id in s.setl_ids)
