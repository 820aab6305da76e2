"""The monitoring stream's state transitions, pure: no faust, no I/O.

A person's state holds their settled rows with facts (within the horizon of the newest one), the
reversed setl_ids (so a replayed settle row of a reversed settlement stays out), the judgements
last sent and the stay costs last sent. `apply_event` adds one settlement event and says what to
send: new or changed judgements, withdrawals for ids the history no longer produces, and the stay
costs that changed (to the cost groups). A cost group's state works the same way over stays.

Both are idempotent by construction: the output is a diff against what was sent, and the history is
a set keyed by setl_id (or mdtrt_id), so a replayed event changes nothing and sends nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta

import msgspec

from schemas.internal import SettlementEvent
from schemas.monitoring import Judgement, StayCost
from services.smartmon.rules import (
    COST_RULE,
    Episode,
    RuleBook,
    horizon_days,
    judge_stay,
    person_judgements,
    stay_costs,
)


class PersonState(msgspec.Struct, kw_only=True):
    """One person's history, as stored in table `persons` (msgspec JSON)."""

    events: dict[str, SettlementEvent] = {}  # settle rows with facts, by setl_id
    reversed: dict[str, str] = {}  # reversed setl_id -> day of the reversal (pruned like the history)
    emitted: dict[str, Judgement] = {}  # jr_id -> the judgement last sent (not withdrawn)
    stays: dict[str, StayCost] = {}  # mdtrt_id -> the stay cost last sent (not withdrawn)


class CostGroupState(msgspec.Struct, kw_only=True):
    """One cost group's complete stays (table `cost_groups`)."""

    stays: dict[str, StayCost] = {}  # mdtrt_id -> stay
    emitted: dict[str, Judgement] = {}


@dataclass
class Output:
    """What one transition sends: judgements to fsi.judgements, stay costs to fsi.monitor.stays."""

    judgements: list[Judgement] = field(default_factory=list)
    stays: list[StayCost] = field(default_factory=list)


# A cost group keeps at most this many stays, the newest by discharge day: its whole state is one record of the
# table's changelog, which the broker takes up to 1 MB (a stay is about 300 bytes encoded), and each event
# encodes it again. Beyond it the oldest days' stays leave before their window ends (cap_stays): a busy
# group's percentile is then of its newest MAX_GROUP_STAYS stays. (3,300 stays of one group in 30 days made a
# 1 MB record under the benchmark, which the changelog refused: the stream crashed at every restart.)
MAX_GROUP_STAYS = 2_000

_person_decoder = msgspec.json.Decoder(PersonState)
_group_decoder = msgspec.json.Decoder(CostGroupState)
_encoder = msgspec.json.Encoder(decimal_format="number")


def encode(state: PersonState | CostGroupState) -> bytes:
    return _encoder.encode(state)


def decode_person(raw: bytes | None) -> PersonState:
    return _person_decoder.decode(raw) if raw else PersonState()


def decode_group(raw: bytes | None) -> CostGroupState:
    return _group_decoder.decode(raw) if raw else CostGroupState()


def _day(timestamp: str) -> date:
    return date.fromisoformat(timestamp[:10])


def _diff(emitted: dict[str, Judgement], produced: list[Judgement]) -> tuple[dict[str, Judgement], list[Judgement]]:
    """The judgements to send so the receiver ends with `produced`: new or changed ones, and the rest of
    `emitted` withdrawn."""
    now = {j.jr_id: j for j in produced}
    out = [j for jr_id, j in sorted(now.items()) if emitted.get(jr_id) != j]
    out += [msgspec.structs.replace(j, withdrawn=True) for jr_id, j in sorted(emitted.items()) if jr_id not in now]
    return now, out


def apply_event(state: PersonState, ev: SettlementEvent, book: RuleBook) -> Output:
    """Apply one settlement event to `state` (in place) and return what to send."""
    if ev.kind == "reverse":
        if ev.orig_setl_id is None or ev.orig_setl_id in state.reversed:
            return Output()
        state.reversed[ev.orig_setl_id] = ev.setl_time[:10]
        if state.events.pop(ev.orig_setl_id, None) is None:
            return Output()  # a settlement the stream never kept (no facts, or older than the horizon)
    else:
        if ev.visit is None or ev.setl_id in state.events or ev.setl_id in state.reversed:
            return Output()
        state.events[ev.setl_id] = ev
    _prune(state, horizon_days(book))
    return _recompute(state, book)


def _event_day(ev: SettlementEvent) -> date:
    """The later of the settlement's day and the visit's end: how old an episode is for the horizon."""
    end = ev.visit.endtime[:10] if ev.visit is not None else ""
    return _day(max(ev.setl_time[:10], end))


def _prune(state: PersonState, horizon: int) -> None:
    """Forget what lies more than `horizon` days before the newest episode: its judgements and stays are
    forgotten too (not withdrawn — the evidence aged out, it was not taken back)."""
    if not state.events:
        return
    cutoff = max(_event_day(ev) for ev in state.events.values()) - timedelta(days=horizon)
    old = {sid for sid, ev in state.events.items() if _event_day(ev) < cutoff}
    for sid in old:
        del state.events[sid]
    state.reversed = {sid: day for sid, day in state.reversed.items() if date.fromisoformat(day) >= cutoff}
    if old:
        state.emitted = {k: j for k, j in state.emitted.items() if not old & set(j.setl_ids)}
        state.stays = {k: s for k, s in state.stays.items() if not old & set(s.setl_ids)}


def _recompute(state: PersonState, book: RuleBook) -> Output:
    episodes = [ep for ev in state.events.values() if (ep := Episode.from_event(ev)) is not None]
    state.emitted, judgements = _diff(state.emitted, person_judgements(episodes, book))
    stays_now = {s.mdtrt_id: s for s in stay_costs(episodes)}
    sent: list[StayCost] = []
    for mdtrt_id, before in sorted(state.stays.items()):
        after = stays_now.get(mdtrt_id)
        if after is None or after.group != before.group:  # gone, or moved to another group: leave the old one
            sent.append(msgspec.structs.replace(before, withdrawn=True))
    sent += [s for mdtrt_id, s in sorted(stays_now.items()) if state.stays.get(mdtrt_id) != s]
    state.stays = stays_now
    return Output(judgements=judgements, stays=sent)


def apply_stay(state: CostGroupState, stay: StayCost, book: RuleBook) -> list[Judgement]:
    """Apply one stay cost to its group's `state` (in place) and return the COST_OUTLIER judgements to send.

    Only the stays whose window can hold the changed one are judged again (those discharged on its day or
    up to the longest window after it): in a stream that arrives in time order that is the new stay alone,
    so a busy group costs O(stays) per event, not O(stays²) as judging the whole group each time would."""
    before = state.stays.get(stay.mdtrt_id)
    if stay.withdrawn:
        if before is None:
            return []
        del state.stays[stay.mdtrt_id]
    else:
        if before == stay:
            return []
        state.stays[stay.mdtrt_id] = stay
    changed_days = {_day(s.dscg_day) for s in (before, stay) if s is not None}
    if state.stays:
        cutoff = max(_day(s.dscg_day) for s in state.stays.values()) - timedelta(days=horizon_days(book))
        _forget(state, {k for k, s in state.stays.items() if _day(s.dscg_day) < cutoff})
    reach = timedelta(days=_cost_window_max(book))
    spans = [(d.isoformat(), (d + reach).isoformat()) for d in changed_days]  # ISO days compare as strings
    # Peers are stays of strictly earlier days: a change on day d can only move the judgements of the stay
    # itself and of stays discharged in (d, d + window] — not of the (many) others discharged the same day.
    affected = {k for k, s in state.stays.items() if any(lo < s.dscg_day <= hi for lo, hi in spans)}
    affected |= {stay.mdtrt_id} & state.stays.keys()
    # One stay against its window, O(n) in its group: what cost_judgements decides for it over the whole group
    # (tests/unit/test_smartmon_state.py holds the two equal over random groups).
    produced = [j for k in sorted(affected) if (j := judge_stay(state.stays[k], state.stays.values(), book))]
    mine = {k: j for k, j in state.emitted.items() if j.mdtrt_ids[0] in affected | {stay.mdtrt_id}}
    now, out = _diff(mine, produced)
    state.emitted = {k: j for k, j in state.emitted.items() if k not in mine} | now
    return out


def cap_stays(state: CostGroupState, most: int = MAX_GROUP_STAYS) -> int:
    """Let the oldest stays (by discharge day, then mdtrt_id) go until at most `most` remain, with their
    judgements (history, not withdrawn — as the horizon does); returns how many went."""
    excess = len(state.stays) - most
    if excess <= 0:
        return 0
    _forget(state, set(sorted(state.stays, key=lambda k: (state.stays[k].dscg_day, k))[:excess]))
    return excess


def _forget(state: CostGroupState, gone: set[str]) -> None:
    """Drop these stays (mdtrt_ids) and the judgements about them: history, not withdrawn."""
    state.stays = {k: s for k, s in state.stays.items() if k not in gone}
    state.emitted = {k: j for k, j in state.emitted.items() if j.mdtrt_ids[0] not in gone}


def _cost_window_max(book: RuleBook) -> int:
    """The longest COST_OUTLIER window of any region (0 when the rule is absent)."""
    rule = book.rules.get(COST_RULE)
    if rule is None:
        return 0
    return max(int(values.get("window_days", 0)) for values in (rule.params, *rule.overrides.values()))

