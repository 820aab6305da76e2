"""The monitoring stream's state transitions (services/smartmon/state.py), with the real rule book:
what one event sends, replay, reversal, order, the horizon, the stay costs and the cost groups."""

from __future__ import annotations

import itertools
import random
from datetime import date, timedelta

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.monitoring import Judgement, StayCost
from services.smartmon.rulebook import parse_rules
from services.smartmon.rules import RuleBook, cost_judgements, horizon_days, load_rules
from services.smartmon.state import (
    MAX_GROUP_STAYS,
    CostGroupState,
    PersonState,
    apply_event,
    apply_stay,
    cap_stays,
    decode_group,
    decode_person,
    encode,
)
from tests.monitoring_events import cost_stays, reverse, settle


@pytest.fixture(scope="module")
def book() -> RuleBook:
    return load_rules()


def _overlapping() -> tuple:
    a = settle("s-a", "mon001", hospital="H32050000001", begin="2026-03-01 09:00:00", end="2026-03-10 10:00:00",
               medfee=300_000)
    b = settle("s-b", "mon001", hospital="H15040000001", begin="2026-03-05 09:00:00", end="2026-03-08 10:00:00",
               medfee=200_000)
    return a, b


def _final(state: PersonState, events: list, book: RuleBook) -> dict[str, Judgement]:
    """What a receiver holds after every judgement `events` make `state` send (latest per jr_id)."""
    held: dict[str, Judgement] = {}
    for ev in events:
        for j in apply_event(state, ev, book).judgements:
            held[j.jr_id] = j
    return held


def test_overlapping_stays_send_one_judgement_and_a_replay_sends_nothing(book: RuleBook) -> None:
    a, b = _overlapping()
    state = PersonState()
    assert apply_event(state, a, book).judgements == []
    out = apply_event(state, b, book)
    [j] = out.judgements
    assert (j.rule_id, j.setl_ids, j.mdtrt_ids, j.suspect_amt, j.withdrawn) == (
        "OVERLAP_INPATIENT", ["s-b", "s-a"], ["v-s-b", "v-s-a"], 200_000, False)
    assert (j.window_begin, j.window_end, j.fixmedins_code, j.treating_admdvs) == (
        "2026-03-05", "2026-03-08", "H15040000001", "150400")
    assert "mon001" not in j.detail
    saved = encode(state)
    for ev in (a, b, a):
        again = apply_event(state, ev, book)
        assert (again.judgements, again.stays) == ([], [])
    assert encode(state) == saved


def test_a_reversal_withdraws_and_replaying_the_reversed_settlement_changes_nothing(book: RuleBook) -> None:
    a, b = _overlapping()
    state = PersonState()
    [j] = _final(state, [a, b], book).values()
    rev = reverse(b, "s-b-rev")
    [w] = apply_event(state, rev, book).judgements
    assert w == msgspec.structs.replace(j, withdrawn=True)
    assert state.emitted == {} and set(state.events) == {"s-a"} and set(state.reversed) == {"s-b"}
    saved = encode(state)
    for ev in (b, rev, a):  # the whole stream replayed
        assert apply_event(state, ev, book).judgements == []
    assert encode(state) == saved


def test_the_judgements_do_not_depend_on_the_order_of_the_events(book: RuleBook) -> None:
    a, b = _overlapping()
    c = settle("s-c", "mon001", hospital="H32050000002", visit_type="outpatient", begin="2026-03-06 14:00:00",
               end="2026-03-06 15:00:00", medfee=5_000)
    rev_a = reverse(a, "s-a-rev", at="2026-03-21 08:00:00")
    expected = None
    for order in itertools.permutations([a, b, c]):
        state = PersonState()
        held = _final(state, [*order, rev_a], book)
        final = {k: (v.rule_id, v.withdrawn, tuple(v.setl_ids)) for k, v in held.items()}
        assert decode_person(encode(state)) == state
        assert final == (expected := expected or final)
    assert expected is not None
    # a hit on the stay of s-a (the overlap and the outpatient visit during it) ends withdrawn
    assert {v for v in expected.values() if "s-a" in v[2]} == {(r, True, s) for r, _, s in expected.values()
                                                               if "s-a" in s}
    assert {r for r, _, _ in expected.values()} >= {"OVERLAP_INPATIENT", "OUTPATIENT_DURING_STAY"}


def test_history_beyond_the_horizon_is_forgotten_not_withdrawn(book: RuleBook) -> None:
    a, b = _overlapping()
    state = PersonState()
    _final(state, [a, b], book)
    days = horizon_days(book)
    late = settle("s-late", "mon001", visit_type="outpatient", begin="2027-06-01 09:00:00",
                  end="2027-06-01 10:00:00", medfee=1_000)
    assert days < 400  # 2027-06-01 is past the horizon of March 2026
    out = apply_event(state, late, book)
    assert out.judgements == [] and out.stays == []
    assert set(state.events) == {"s-late"} and state.emitted == {} and state.stays == {}
    assert apply_event(state, a, book).judgements == []  # an old event replayed: pruned at once
    assert set(state.events) == {"s-late"}


def test_complete_stays_go_to_their_cost_group_and_a_reversal_withdraws_them(book: RuleBook) -> None:
    a = settle("s-a", "mon002", main_dise="K35.800", begin="2026-03-01 09:00:00", end="2026-03-04 10:00:00",
               medfee=120_000)
    state = PersonState()
    [stay] = apply_event(state, a, book).stays
    assert stay == StayCost(group="K35|3|320000", mdtrt_id="v-s-a", psn_no="mon002", setl_ids=["s-a"],
                            fixmedins_code="H32050000001", insured_admdvs="320100", treating_admdvs="320500",
                            dscg_day="2026-03-04", medfee=120_000)
    assert apply_event(state, a, book).stays == []
    [gone] = apply_event(state, reverse(a, "s-a-rev"), book).stays
    assert gone == msgspec.structs.replace(stay, withdrawn=True)


def test_a_mid_stay_part_then_the_final_part_send_one_stay_with_both(book: RuleBook) -> None:
    part = settle("s-p1", "mon003", mdtrt_id="v-3", mid_setl=True, begin="2026-03-01 09:00:00", end="",
                  medfee=50_000)
    part = msgspec.structs.replace(part, setl_time="2026-03-10 09:00:00")
    final = settle("s-p2", "mon003", mdtrt_id="v-3", begin="2026-03-01 09:00:00", end="2026-03-20 10:00:00",
                   medfee=70_000)
    state = PersonState()
    assert apply_event(state, part, book).stays == []  # not complete yet
    [stay] = apply_event(state, final, book).stays
    assert (stay.setl_ids, stay.medfee, stay.dscg_day) == (["s-p1", "s-p2"], 120_000, "2026-03-20")


def _stay_of(ev) -> StayCost:  # type: ignore[no-untyped-def]
    [stay] = apply_event(PersonState(), ev, load_rules()).stays
    return stay


def test_cost_outlier_needs_min_stays_peers_and_is_withdrawn_with_its_stay(book: RuleBook) -> None:
    peers = [_stay_of(ev) for ev in cost_stays("mon1", 50, medfee=100_000)]
    outlier = _stay_of(settle("s-out", "mon1999", main_dise="K35.800", begin="2026-03-29 08:00:00",
                              end="2026-03-29 18:00:00", medfee=900_000))
    group = CostGroupState()
    for stay in peers[:49]:
        assert apply_stay(group, stay, book) == []
    assert apply_stay(group, outlier, book) == []  # 49 peers: below min_stays
    [j] = apply_stay(group, peers[49], book)  # the 50th peer: now the outlier stands out
    assert (j.rule_id, j.setl_ids, j.suspect_amt, j.withdrawn) == ("COST_OUTLIER", ["s-out"], 800_000, False)
    saved = encode(group)
    assert apply_stay(group, peers[3], book) == [] and encode(group) == saved  # replay: nothing
    [w] = apply_stay(group, msgspec.structs.replace(outlier, withdrawn=True), book)
    assert w == msgspec.structs.replace(j, withdrawn=True)
    assert decode_group(encode(group)) == group


# A dense cost rule (3 peers, a 5-day window, the median; a longer window for 350000), so that short random
# groups hit it often.
DENSE_COST = parse_rules("""
version = "dense-cost"
history_margin_days = 3
[rules.COST_OUTLIER]
name = "费用异常"
severity = "low"
version = 1
params = { percentile = 50, window_days = 5, min_stays = 3 }
overrides."350000" = { window_days = 8 }
""")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(1, 9), st.booleans(), st.booleans()),
                min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_a_groups_judgements_by_stay_equal_the_rule_over_the_whole_group(
        raw: list[tuple[int, int, bool, bool]], rnd: random.Random) -> None:
    """apply_stay judges only the stays a change can reach; in any arrival order (withdrawals and changed
    amounts included) the group ends with exactly what `cost_judgements` says of its live stays."""
    stays = [StayCost(group="K35|3|320000", mdtrt_id=f"v{i}", psn_no=f"mon{i}", setl_ids=[f"s{i}"],
                      fixmedins_code="H32050000001", insured_admdvs="350100" if fj else "320100",
                      treating_admdvs="320500", dscg_day=(date(2026, 3, 1) + timedelta(days=day)).isoformat(),
                      medfee=fee * 10_000)
             for i, (day, fee, fj, _) in enumerate(raw)]
    arrivals = [*stays, *(msgspec.structs.replace(s, withdrawn=True) for s, (*_, gone) in zip(stays, raw, strict=True)
                          if gone),
                *(msgspec.structs.replace(s, medfee=s.medfee + 5) for s in stays[::3])]
    rnd.shuffle(arrivals)
    group, held = CostGroupState(), dict[str, Judgement]()
    for stay in arrivals:
        held.update((j.jr_id, j) for j in apply_stay(group, stay, DENSE_COST))
    want = {j.jr_id: j for j in cost_judgements(list(group.stays.values()), DENSE_COST)}
    assert {k: j for k, j in held.items() if not j.withdrawn} == want
    assert group.emitted == want


def _busy_stay(i: int, day: int, medfee: int = 1_200_000) -> StayCost:
    """A stay of a busy group, its ids as long as the pipeline's (msgid-derived)."""
    return StayCost(group="I63|3|150000", mdtrt_id=f"MH15040099901202603{i:015d}", psn_no=f"P150400{i:023d}",
                    setl_ids=[f"SH15040099901202603{i:015d}"], fixmedins_code="H15040099901",
                    insured_admdvs="150400", treating_admdvs="150400",
                    dscg_day=(date(2026, 3, 1) + timedelta(days=day)).isoformat(), medfee=medfee)


def test_a_busy_group_keeps_its_newest_stays_and_lets_the_judgements_of_the_others_go(book: RuleBook) -> None:
    group = CostGroupState()
    for i in range(12):  # days 0..5, two stays a day
        apply_stay(group, _busy_stay(i, i // 2), book)
    oldest, newest = _busy_stay(0, 0).mdtrt_id, _busy_stay(11, 5).mdtrt_id
    group.emitted = {"j-old": _judgement("j-old", oldest), "j-new": _judgement("j-new", newest)}
    assert cap_stays(group, most=12) == 0 and len(group.stays) == 12
    assert cap_stays(group, most=5) == 7
    # The five newest by discharge day, then mdtrt_id: day 5's two, day 4's two, day 3's later one.
    assert sorted(group.stays) == sorted(_busy_stay(i, 0).mdtrt_id for i in (7, 8, 9, 10, 11))
    assert list(group.emitted) == ["j-new"]  # a judgement goes with its stay (history, not withdrawn)


def _judgement(jr_id: str, mdtrt_id: str, detail: str = "-") -> Judgement:
    return Judgement(jr_id=jr_id, rule_id="COST_OUTLIER", rule_name="费用异常", rule_version=1, severity="low",
                     psn_no="P1", insured_admdvs="150400", treating_admdvs="150400", fixmedins_code="H15040099901",
                     mdtrt_ids=[mdtrt_id], setl_ids=["y"], items=[], window_begin="2026-03-01",
                     window_end="2026-03-01", suspect_amt=1, detail=detail)


def test_a_full_group_fits_one_changelog_record(book: RuleBook) -> None:
    """MAX_GROUP_STAYS stays of the pipeline's id lengths, every hundredth judged, stay well under Kafka's 1 MB."""
    group = CostGroupState(stays={s.mdtrt_id: s for s in (_busy_stay(i, i % 30) for i in range(MAX_GROUP_STAYS))})
    group.emitted = {f"j{i}": _judgement(f"j{i}", _busy_stay(i, 0).mdtrt_id, "x" * 200)
                     for i in range(0, MAX_GROUP_STAYS, 100)}
    assert len(encode(group)) < 900_000
