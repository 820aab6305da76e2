"""The rules of smart monitoring (REFERENCE §8), pure: no I/O, no asyncio, no clock.

Everything is a function of the SET of episodes handed in (the order and batching never matter): episodes
are keyed by setl_id and every sort has a total key ending in a setl_id. The stream (post-event), the
settlement engine (in-event, 2206/2303/3101/3102) and the demo all call the same functions.

Time: `begntime`/`endtime`/`setl_time` are "YYYY-MM-DD HH:MM:SS" strings, compared as such (a date-only
value counts as midnight); calendar-day windows use the first 10 characters. Money is integer fen;
quantities and days of supply are Decimal. The README section "Monitoring rules" states every edge.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_FLOOR, Decimal
from functools import lru_cache
from typing import Any, Final, Generic, NamedTuple, TypeVar, overload

from schemas.internal import SettlementEvent
from schemas.monitoring import Judgement, StayCost, VisitFacts
from services.smartmon.rulebook import WINDOW_PARAMS, Rule, RuleBook, RuleBookError, load_rules

__all__ = [
    "Episode",
    "Rule",
    "RuleBook",
    "RuleBookError",
    "cost_judgements",
    "horizon_days",
    "jr_id_of",
    "load_rules",
    "person_judgements",
    "stay_costs",
]

JR_ID_HEX: Final = 32
_ZERO: Final = Decimal(0)
_T = TypeVar("_T")


class cached_property(Generic[_T]):  # named like the functools one it replaces
    """functools.cached_property without its lock: Python 3.11's takes an RLock on every first access (3.12
    dropped it), a third of smartmon's per-event CPU as Episodes and Stays are built anew for each event.
    The rules run in one thread; the value is computed on first access and stored in the instance's
    __dict__, where later reads find it without calling this descriptor."""

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> cached_property[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> _T | cached_property[_T]:
        if instance is None:
            return self
        value = self.func(instance)
        instance.__dict__[self.name] = value  # frozen dataclasses too: __dict__ is written directly
        return value


@dataclass(frozen=True)
class Episode:
    """One settle row (not reversed) of a person, with its facts."""

    setl_id: str
    mdtrt_id: str
    psn_no: str
    fixmedins_code: str
    insured_admdvs: str
    treating_admdvs: str
    med_type: str
    setl_time: str  # "YYYY-MM-DD HH:MM:SS"
    medfee: int  # fen
    mid_setl: bool
    facts: VisitFacts

    @classmethod
    def from_event(cls, ev: SettlementEvent) -> Episode | None:
        """The episode of a settle event; None for reversals and events without facts."""
        if ev.kind != "settle" or ev.visit is None:
            return None
        return cls(setl_id=ev.setl_id, mdtrt_id=ev.mdtrt_id, psn_no=ev.psn_no, fixmedins_code=ev.fixmedins_code,
                   insured_admdvs=ev.insured_admdvs, treating_admdvs=ev.treating_admdvs, med_type=ev.med_type,
                   setl_time=ev.setl_time, medfee=ev.medfee_sumamt, mid_setl=ev.mid_setl, facts=ev.visit)

    @cached_property
    def at(self) -> str:
        """When the visit happened: its begin time, else the settlement time."""
        return _ts(self.facts.begntime or self.setl_time)


def jr_id_of(rule: Rule, anchor: Iterable[str]) -> str:
    """First 32 hex of SHA-256 over the rule id, its version and the anchor evidence (unit-separated)."""
    text = "\x1f".join([rule.rule_id, str(rule.version), *anchor])
    return hashlib.sha256(text.encode()).hexdigest()[:JR_ID_HEX]


def _ts(value: str) -> str:
    return value + " 00:00:00" if len(value) == 10 else value


@lru_cache(maxsize=4096)
def _day(value: str) -> date:
    return date.fromisoformat(value[:10])


def _floor_share(amount: int, part: Decimal, whole: Decimal) -> int:
    """floor(amount × part / whole) in fen, capped at amount (exact: Decimal, no float)."""
    if whole <= 0 or part <= 0:
        return 0
    share = (Decimal(amount) * part / whole).to_integral_value(rounding=ROUND_FLOOR)
    return min(amount, int(share))


# --- stays -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stay:
    """An inpatient stay: its settlements (mid-stay parts and the final one), in (setl_time, setl_id) order."""

    parts: tuple[Episode, ...]

    @cached_property
    def anchor(self) -> Episode:
        return self.parts[0]  # the earliest part: stable while later parts arrive

    @cached_property
    def final(self) -> Episode | None:
        finals = [p for p in self.parts if not p.mid_setl]
        return finals[-1] if finals else None

    @cached_property
    def latest(self) -> Episode:
        return self.final or self.parts[-1]

    @cached_property
    def begin(self) -> str:
        return min(p.at for p in self.parts)

    @cached_property
    def end(self) -> str:
        """Discharge: the final part's endtime; an unfinished stay ends at the latest end known so far."""
        final = self.final
        if final is not None and final.facts.endtime:
            return max(_ts(final.facts.endtime), self.begin)
        return max([_ts(p.facts.endtime) for p in self.parts if p.facts.endtime] + [self.begin])

    @cached_property
    def complete(self) -> bool:
        return self.final is not None and bool(self.final.facts.endtime)

    @cached_property
    def medfee(self) -> int:
        return sum(p.medfee for p in self.parts)

    @cached_property
    def setl_ids(self) -> list[str]:
        return [p.setl_id for p in self.parts]

    @cached_property
    def main_dise(self) -> str:
        return self.latest.facts.main_dise

    @cached_property
    def fixmedins_code(self) -> str:
        return self.anchor.fixmedins_code


def _unique(episodes: Iterable[Episode]) -> list[Episode]:
    """The set of episodes (one per setl_id) in a total order: (time of the visit, setl_time, setl_id)."""
    by_id = {e.setl_id: e for e in episodes}
    return sorted(by_id.values(), key=lambda e: (e.at, e.setl_time, e.setl_id))


# The stays of the last tuple of episodes: person_judgements hands every rule the same tuple, and three of
# them group it into stays. A tuple cannot change, and holding it keeps its id from being reused.
_last_stays: tuple[tuple[Episode, ...], list[Stay]] | None = None


def _stays(episodes: Sequence[Episode]) -> list[Stay]:
    global _last_stays
    if isinstance(episodes, tuple):
        last = _last_stays  # one read: the pair is replaced whole, never changed
        if last is not None and last[0] is episodes:
            return list(last[1])
        stays = _group_stays(episodes)
        _last_stays = (episodes, stays)
        return list(stays)
    return _group_stays(episodes)


def _group_stays(episodes: Sequence[Episode]) -> list[Stay]:
    parts: dict[tuple[str, str], list[Episode]] = defaultdict(list)
    for e in episodes:
        if e.facts.visit_type == "inpatient":
            parts[(e.fixmedins_code, e.mdtrt_id)].append(e)
    stays = [Stay(tuple(sorted(ps, key=lambda e: (e.setl_time, e.setl_id)))) for ps in parts.values()]
    return sorted(stays, key=lambda s: (s.begin, s.anchor.setl_id))


# --- judgements -------------------------------------------------------------------------------------


def _judgement(rule: Rule, anchor: Sequence[str], lead: Episode, *, setl_ids: Sequence[str],
               mdtrt_ids: Sequence[str], items: Sequence[str], window: tuple[date, date], suspect_amt: int,
               detail: str) -> Judgement:
    return Judgement(
        jr_id=jr_id_of(rule, anchor), rule_id=rule.rule_id, rule_name=rule.name, rule_version=rule.version,
        severity=rule.severity, psn_no=lead.psn_no, insured_admdvs=lead.insured_admdvs,
        treating_admdvs=lead.treating_admdvs, fixmedins_code=lead.fixmedins_code,
        mdtrt_ids=list(dict.fromkeys(mdtrt_ids)), setl_ids=list(dict.fromkeys(setl_ids)),
        items=list(dict.fromkeys(items)), window_begin=window[0].isoformat(), window_end=window[1].isoformat(),
        suspect_amt=max(0, suspect_amt), detail=detail)


def _overlap_inpatient(rule: Rule, book: RuleBook, episodes: Sequence[Episode]) -> list[Judgement]:
    """Two stays whose (admission, discharge) intervals overlap, at any institutions (the same one too)."""
    stays = _stays(episodes)
    out = []
    for i, earlier in enumerate(stays):
        for later in stays[i + 1:]:
            if later.begin >= earlier.end:  # sorted by begin: no later stay can overlap `earlier` either
                break
            if earlier.begin >= later.end:
                continue
            lead = later.anchor
            overlap_end = min(earlier.end, later.end)
            out.append(_judgement(
                rule, [later.anchor.setl_id, earlier.anchor.setl_id], lead,
                setl_ids=later.setl_ids + earlier.setl_ids, mdtrt_ids=[lead.mdtrt_id, earlier.anchor.mdtrt_id],
                items=[], window=(_day(later.begin), _day(overlap_end)), suspect_amt=later.medfee,
                detail=f"inpatient stay at {later.fixmedins_code} {later.begin[:16]}..{later.end[:16]} overlaps "
                       f"the stay at {earlier.fixmedins_code} {earlier.begin[:16]}..{earlier.end[:16]} "
                       f"(medfee of the later stay {later.medfee} fen)"))
    return out


def _split_admission(rule: Rule, book: RuleBook, episodes: Sequence[Episode]) -> list[Judgement]:
    """A stay admitted within readmit_days after the discharge of a complete stay at the same institution
    with the same main-diagnosis prefix; paired with the latest such discharge only."""
    stays = _stays(episodes)
    out = []
    for later in stays:
        prefix = later.main_dise[:3]
        if not prefix:
            continue
        days = book.params(rule.rule_id, later.anchor.insured_admdvs)["readmit_days"]
        candidates = [s for s in stays if s is not later and s.complete and s.fixmedins_code == later.fixmedins_code
                      and s.main_dise[:3] == prefix and s.end <= later.begin
                      and (_day(later.begin) - _day(s.end)).days <= days]
        if not candidates:
            continue
        earlier = max(candidates, key=lambda s: (s.end, s.anchor.setl_id))
        gap = (_day(later.begin) - _day(earlier.end)).days
        out.append(_judgement(
            rule, [later.anchor.setl_id, earlier.anchor.setl_id], later.anchor,
            setl_ids=later.setl_ids + earlier.setl_ids, mdtrt_ids=[later.anchor.mdtrt_id, earlier.anchor.mdtrt_id],
            items=[], window=(_day(earlier.end), _day(later.begin)), suspect_amt=later.medfee,
            detail=f"readmitted at {later.fixmedins_code} on {later.begin[:10]}, {gap} day(s) after the discharge "
                   f"of {earlier.end[:10]} (limit {days}), main diagnosis {prefix}"))
    return out


def _outpatient_during_stay(rule: Rule, book: RuleBook, episodes: Sequence[Episode]) -> list[Judgement]:
    """An outpatient or pharmacy visit strictly between a stay's admission and discharge, elsewhere."""
    stays = _stays(episodes)
    out = []
    for e in episodes:
        if e.facts.visit_type == "inpatient":
            continue
        for stay in stays:
            if stay.fixmedins_code == e.fixmedins_code or not stay.begin < e.at < stay.end:
                continue
            out.append(_judgement(
                rule, [e.setl_id, stay.anchor.setl_id], e, setl_ids=[e.setl_id, *stay.setl_ids],
                mdtrt_ids=[e.mdtrt_id, stay.anchor.mdtrt_id], items=[item.med_list_codg for item in e.facts.items],
                window=(_day(stay.begin), _day(stay.end)), suspect_amt=e.medfee,
                detail=f"{e.facts.visit_type} visit at {e.fixmedins_code} on {e.at[:16]} during the stay at "
                       f"{stay.fixmedins_code} {stay.begin[:16]}..{stay.end[:16]} (medfee {e.medfee} fen)"))
    return out


def _frequent_visits(rule: Rule, book: RuleBook, episodes: Sequence[Episode]) -> list[Judgement]:
    """Every outpatient settlement that is beyond the max_visits-th within window_days calendar days
    (the visit's day and the window_days - 1 days before it), across all institutions."""
    visits = [e for e in episodes if e.facts.visit_type == "outpatient"]
    days = [_day(e.at) for e in visits]  # non-decreasing: episodes come in time order
    out = []
    for i, e in enumerate(visits):
        p = book.params(rule.rule_id, e.insured_admdvs)
        first_day = days[i] - timedelta(days=p["window_days"] - 1)
        window = visits[bisect_left(days, first_day, 0, i): i + 1]
        if len(window) <= p["max_visits"]:
            continue
        out.append(_judgement(
            rule, [e.setl_id], e, setl_ids=[e.setl_id, *(v.setl_id for v in window)],
            mdtrt_ids=[e.mdtrt_id, *(v.mdtrt_id for v in window)], items=[],
            window=(first_day, _day(e.at)), suspect_amt=e.medfee,
            detail=f"outpatient visit {len(window)} within {p['window_days']} days "
                   f"{first_day.isoformat()}..{e.at[:10]} (limit {p['max_visits']}) at {e.fixmedins_code}, "
                   f"{len({v.fixmedins_code for v in window})} institution(s), medfee {e.medfee} fen"))
    return out


class _Purchase(NamedTuple):  # a tuple: one is built per drug bought, for every event of the person
    episode: Episode
    day: date
    supply: Decimal  # days of supply: Σ cnt × supply_days
    sumamt: int


def _pharmacy_oversupply(rule: Rule, book: RuleBook, episodes: Sequence[Episode]) -> list[Judgement]:
    """Every pharmacy purchase of a drug after which the days of supply bought within window_days calendar
    days (the purchase day and the days before) exceed max_supply_days, summed over all pharmacies."""
    # (drug, day, setl_id) → [episode, days of supply, fen], summed in place over the settlement's items
    grouped: dict[tuple[str, date, str], list[Any]] = {}
    for e in episodes:
        if e.facts.visit_type != "pharmacy":
            continue
        for item in e.facts.items:
            key = (item.med_list_codg, _day(item.day), e.setl_id)
            summed = grouped.get(key)
            if summed is None:
                grouped[key] = [e, _ZERO + item.cnt * item.supply_days, item.sumamt]
            else:
                summed[1] += item.cnt * item.supply_days
                summed[2] += item.sumamt
    by_drug: dict[str, list[_Purchase]] = defaultdict(list)
    for (drug, day, _), (e, supply, sumamt) in grouped.items():
        by_drug[drug].append(_Purchase(e, day, supply, sumamt))
    out = []
    for drug, purchases in by_drug.items():
        purchases.sort(key=lambda p: (p.day, p.episode.setl_id))
        days = [q.day for q in purchases]
        for i, buy in enumerate(purchases):
            p = book.params(rule.rule_id, buy.episode.insured_admdvs)
            first_day = buy.day - timedelta(days=p["window_days"] - 1)
            window = purchases[bisect_left(days, first_day, 0, i): i + 1]
            total = sum((q.supply for q in window), Decimal(0))
            limit = Decimal(p["max_supply_days"])
            if total <= limit:
                continue
            excess = min(total - limit, buy.supply)
            out.append(_judgement(
                rule, [buy.episode.setl_id, drug, buy.day.isoformat()], buy.episode,
                setl_ids=[buy.episode.setl_id, *(q.episode.setl_id for q in window)],
                mdtrt_ids=[buy.episode.mdtrt_id, *(q.episode.mdtrt_id for q in window)], items=[drug],
                window=(first_day, buy.day), suspect_amt=_floor_share(buy.sumamt, excess, buy.supply),
                detail=f"drug {drug}: {total} days of supply bought {first_day.isoformat()}..{buy.day.isoformat()} "
                       f"at {len({q.episode.fixmedins_code for q in window})} pharmacy(ies) (limit {limit}); "
                       f"this purchase at {buy.episode.fixmedins_code} brings {buy.supply}"))
    return out


def _duplicate_charge(rule: Rule, book: RuleBook, episodes: Sequence[Episode]) -> list[Judgement]:
    """A once-per-day item billed (Σ cnt) more than max_per_day times on one day of one visit (all parts
    of a stay together)."""
    billed: dict[tuple[str, str, str, str], list[tuple[Episode, Decimal, int]]] = defaultdict(list)
    for e in episodes:
        for item in e.facts.items:
            if item.once_per_day:
                billed[(e.fixmedins_code, e.mdtrt_id, item.med_list_codg, item.day[:10])].append(
                    (e, item.cnt, item.sumamt))
    out = []
    for (_, _, code, day), rows in billed.items():
        rows.sort(key=lambda r: (r[0].setl_time, r[0].setl_id))
        lead = rows[0][0]
        limit = Decimal(book.params(rule.rule_id, lead.insured_admdvs)["max_per_day"])
        count = sum((r[1] for r in rows), Decimal(0))
        if count <= limit:
            continue
        sumamt = sum(r[2] for r in rows)
        out.append(_judgement(
            rule, [lead.setl_id, code, day], lead, setl_ids=[r[0].setl_id for r in rows], mdtrt_ids=[lead.mdtrt_id],
            items=[code], window=(_day(day), _day(day)), suspect_amt=_floor_share(sumamt, count - limit, count),
            detail=f"item {code} billed {count} times on {day} at {lead.fixmedins_code} "
                   f"(once per day, limit {limit}), {sumamt} fen"))
    return out


def _gender_restricted(rule: Rule, book: RuleBook, episodes: Sequence[Episode]) -> list[Judgement]:
    """An item restricted to one gender billed for a person of the other (unknown gender: never)."""
    out = []
    for e in episodes:
        gend = e.facts.gend
        if not gend:
            continue
        wrong: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)  # (item, its gender) → rows
        for item in e.facts.items:
            if item.gender_only and item.gender_only != gend:
                wrong[(item.med_list_codg, item.gender_only)].append((item.day[:10], item.sumamt))
        for (code, only), rows in wrong.items():
            days = sorted(r[0] for r in rows)
            sumamt = sum(r[1] for r in rows)
            out.append(_judgement(
                rule, [e.setl_id, code], e, setl_ids=[e.setl_id], mdtrt_ids=[e.mdtrt_id], items=[code],
                window=(_day(days[0]), _day(days[-1])), suspect_amt=sumamt,
                detail=f"item {code} is for {_GENDER_NAMES[only]} patients only, billed at {e.fixmedins_code} "
                       f"{days[0]}..{days[-1]} for a patient of the other gender, {sumamt} fen"))
    return out


_GENDER_NAMES: Final = {"1": "male", "2": "female"}


PERSON_RULES: Final[Mapping[str, Callable[[Rule, RuleBook, Sequence[Episode]], list[Judgement]]]] = {
    "OVERLAP_INPATIENT": _overlap_inpatient,
    "SPLIT_ADMISSION": _split_admission,
    "OUTPATIENT_DURING_STAY": _outpatient_during_stay,
    "FREQUENT_VISITS": _frequent_visits,
    "PHARMACY_OVERSUPPLY": _pharmacy_oversupply,
    "DUPLICATE_CHARGE": _duplicate_charge,
    "GENDER_RESTRICTED": _gender_restricted,
}
COST_RULE: Final = "COST_OUTLIER"


def person_judgements(episodes: Sequence[Episode], book: RuleBook,
                      rule_ids: Collection[str] | None = None) -> list[Judgement]:
    """Every judgement of the person-keyed rules (all but COST_OUTLIER) over one person's episodes,
    restricted to `rule_ids` when given; sorted by jr_id. A pure function of the set of episodes."""
    ordered = tuple(_unique(episodes))  # a tuple: the rules share its stays (_stays)
    out: list[Judgement] = []
    for rule in book.enabled(rule_ids):
        check = PERSON_RULES.get(rule.rule_id)
        if check is not None:
            out.extend(check(rule, book, ordered))
    return sorted(out, key=lambda j: j.jr_id)


# --- cost outliers (keyed by group, not by person) -------------------------------------------------


def stay_costs(episodes: Sequence[Episode]) -> list[StayCost]:
    """The complete inpatient stays (final part settled, discharged, with a main diagnosis) of the episodes,
    sorted by mdtrt_id; `group` = "<ICD-10 first 3>|<hosp_lv>|<treating_prov>" of the final part."""
    out = []
    for stay in _stays(_unique(episodes)):
        final = stay.final
        if final is None or not stay.complete or not final.facts.main_dise:
            continue
        f = final.facts
        out.append(StayCost(
            group=f"{f.main_dise[:3]}|{f.hosp_lv}|{f.treating_prov}", mdtrt_id=final.mdtrt_id, psn_no=final.psn_no,
            setl_ids=stay.setl_ids, fixmedins_code=final.fixmedins_code, insured_admdvs=final.insured_admdvs,
            treating_admdvs=final.treating_admdvs, dscg_day=stay.end[:10], medfee=stay.medfee))
    return sorted(out, key=lambda s: (s.mdtrt_id, s.fixmedins_code))


def nearest_rank(sorted_values: Sequence[int], percentile: int) -> int:
    """The nearest-rank percentile: the value at rank ceil(percentile × n / 100) (1-based), exact."""
    n = len(sorted_values)
    rank = -(-percentile * n // 100)  # ceil without float
    return sorted_values[max(rank, 1) - 1]


def cost_judgements(stays: Sequence[StayCost], book: RuleBook) -> list[Judgement]:
    """COST_OUTLIER over one group's stays: a stay whose medfee is above the nearest-rank percentile of the
    other stays of its group discharged in the window_days days before its discharge day (that day
    excluded), when there are at least min_stays of them. Withdrawn stays count for nothing."""
    rule = book.rules.get(COST_RULE)
    if rule is None or not rule.enabled:
        return []
    live: dict[tuple[str, str], StayCost] = {}
    for s in stays:
        if s.withdrawn:
            continue
        key = (s.fixmedins_code, s.mdtrt_id)
        if key not in live or _stay_key(s) > _stay_key(live[key]):
            live[key] = s  # one per stay; should a stale copy come along, the fuller one wins
    out = [j for s in live.values() if (j := judge_stay(s, live.values(), book)) is not None]
    return sorted(out, key=lambda j: j.jr_id)


def judge_stay(stay: StayCost, others: Iterable[StayCost], book: RuleBook) -> Judgement | None:
    """COST_OUTLIER of one stay against the others of its group (other groups and withdrawn stays are
    skipped): the stream judges the stays a change can affect with this, `cost_judgements` a whole group."""
    rule = book.rules.get(COST_RULE)
    if rule is None or not rule.enabled or stay.withdrawn:
        return None
    p = book.params(COST_RULE, stay.insured_admdvs)
    day = date.fromisoformat(stay.dscg_day)
    first = day - timedelta(days=p["window_days"])
    peers = sorted(o.medfee for o in others if o is not stay and not o.withdrawn and o.group == stay.group
                   and first <= date.fromisoformat(o.dscg_day) < day)
    if len(peers) < p["min_stays"]:
        return None
    threshold = nearest_rank(peers, p["percentile"])
    if stay.medfee <= threshold:
        return None
    return Judgement(
        jr_id=jr_id_of(rule, [stay.setl_ids[0] if stay.setl_ids else stay.mdtrt_id]), rule_id=rule.rule_id,
        rule_name=rule.name, rule_version=rule.version, severity=rule.severity, psn_no=stay.psn_no,
        insured_admdvs=stay.insured_admdvs, treating_admdvs=stay.treating_admdvs, fixmedins_code=stay.fixmedins_code,
        mdtrt_ids=[stay.mdtrt_id], setl_ids=list(stay.setl_ids), items=[], window_begin=first.isoformat(),
        window_end=stay.dscg_day, suspect_amt=stay.medfee - threshold,
        detail=f"stay at {stay.fixmedins_code} discharged {stay.dscg_day}: medfee {stay.medfee} fen above the "
               f"p{p['percentile']} {threshold} fen of {len(peers)} stays of group {stay.group} discharged "
               f"{first.isoformat()}..{(day - timedelta(days=1)).isoformat()}")


def _stay_key(s: StayCost) -> tuple[int, str, int, tuple[str, ...]]:
    return (len(s.setl_ids), s.dscg_day, s.medfee, tuple(s.setl_ids))


def within_horizon(episodes: Sequence[Episode], book: RuleBook) -> list[Episode]:
    """The episodes worth keeping: those whose last day (a stay: its discharge, all its parts together) is
    no more than `horizon_days` before the newest day of the set. Dropping the others never changes a
    judgement about the newer episodes; the judgements about the dropped ones are history, not withdrawn."""
    ordered = _unique(episodes)
    if not ordered:
        return []
    last_day: dict[str, date] = {}
    for stay in _stays(ordered):
        for part in stay.parts:
            last_day[part.setl_id] = _day(stay.end)
    for e in ordered:
        last_day.setdefault(e.setl_id, max(_day(e.at), _day(_ts(e.facts.endtime or e.at))))
    first_kept = max(last_day.values()) - timedelta(days=horizon_days(book))
    return [e for e in ordered if last_day[e.setl_id] >= first_kept]


# horizon_days by book (a book is loaded once and never changed; the entry keeps it, so its id stays its own).
_horizons: dict[int, tuple[RuleBook, int]] = {}


def horizon_days(book: RuleBook) -> int:
    """How far back (calendar days before the newest episode's day) history matters: the longest window of
    any enabled rule (defaults and overrides) plus the book's margin for late arrivals. Keep an episode while
    the later of its visit day and its end day is within this many days of the newest one."""
    known = _horizons.get(id(book))
    if known is None:
        if len(_horizons) > 64:  # tests build many books: keep the cache small
            _horizons.clear()
        known = _horizons[id(book)] = (book, _horizon_days(book))
    return known[1]


def _horizon_days(book: RuleBook) -> int:
    longest = 1
    for rule in book.enabled():
        for values in (rule.params, *rule.overrides.values()):
            longest = max([longest, *(v for k, v in values.items() if k in WINDOW_PARAMS)])
    return longest + book.history_margin_days
