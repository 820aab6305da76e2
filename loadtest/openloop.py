"""Open-loop load: visits arrive at a target rate whatever the pipeline answers (used by loadtest.bench).

A visit's first request is due at its arrival time, each later request when the previous answer came;
every latency is measured from the request's due time, so a generator or pipeline that falls behind
shows as latency, never as a lower rate (no coordinated omission). Latencies go into HDR histograms
(`hdrhistogram`), per infno family and overall. The pure parts — arrival times, the step mode's rates,
the held criterion, the histograms — are here with the driver; the report is loadtest.bench's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from hdrh.histogram import HdrHistogram

from loadtest.population import (
    ITEMS_NATIONAL,
    ITEMS_TODAY,
    LOOKUP_SHARE,
    Caller,
    Population,
    Scenario,
    Stats,
    TransportError,
    _steps,
    drive_stay,
)

HELD_SHARE: Final = 0.95  # achieved ≥ 95% of the target rate (OpenLoopResult.due_rps)
LATENCY_MAX_US: Final = 120_000_000  # 2 minutes: the histograms' range (3 significant digits)
# Families of transactions a report groups latencies by (first match of the infno's prefix).
FAMILIES: Final[tuple[tuple[str, str], ...]] = (
    ("1101", "1101 person look-up"), ("21", "21xx pharmacy"), ("22", "22xx outpatient"),
    ("23", "23xx/24xx inpatient"), ("24", "23xx/24xx inpatient"),
)


def family(infno: str) -> str:
    for prefix, name in FAMILIES:
        if infno.startswith(prefix):
            return name
    return f"{infno} other"


def arrival_offsets(rate: float, seconds: float, arrivals: str, rng: random.Random) -> Iterator[float]:
    """Offsets (s from the start) of arrivals at `rate` per second within `seconds`: evenly spaced
    (constant) or a Poisson process (exponential gaps)."""
    if rate <= 0:
        return
    t = 0.0 if arrivals == "constant" else rng.expovariate(rate)
    while t < seconds:
        yield t
        t += 1.0 / rate if arrivals == "constant" else rng.expovariate(rate)


def step_rates(start: float, *, factor: float = 1.0, increment: float = 0.0, max_rate: float, max_steps: int
               ) -> list[float]:
    """The step mode's rates: start, then × factor (or + increment), up to max_rate and max_steps."""
    if start <= 0 or (factor <= 1.0 and increment <= 0):
        raise ValueError("the step mode needs a positive start rate and a factor > 1 or an increment > 0")
    rates: list[float] = []
    rate = start
    while rate <= max_rate and len(rates) < max_steps:
        rates.append(round(rate, 3))
        rate = rate * factor if factor > 1.0 else rate + increment
    return rates


def _histogram() -> HdrHistogram:
    """1 µs to LATENCY_MAX_US, 3 significant digits: every histogram of a book alike, so adding is exact."""
    return HdrHistogram(1, LATENCY_MAX_US, 3)


class LatencyBook:
    """HDR histograms of latencies in µs: overall and per family. Pickled (from a generator process of
    `loadtest.bench --processes`) as HDR's own compressed encoding, so books added together are exact."""

    def __init__(self) -> None:
        self.overall = _histogram()
        self.families: dict[str, HdrHistogram] = {}

    def __getstate__(self) -> dict[str, bytes]:
        return {"": self.overall.encode(), **{name: hist.encode() for name, hist in self.families.items()}}

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self.__init__()  # type: ignore[misc]
        for name, encoded in state.items():
            self._hist(name).decode_and_add(encoded)

    def _hist(self, name: str) -> HdrHistogram:
        """The overall histogram (name ""), or the family's, created when first needed."""
        if not name:
            return self.overall
        hist = self.families.get(name)
        if hist is None:
            hist = self.families[name] = _histogram()
        return hist

    def add(self, other: LatencyBook) -> None:
        """Count `other`'s latencies too (every value lands in the same bucket: exact)."""
        self.overall.add(other.overall)
        for name, hist in other.families.items():
            self._hist(name).add(hist)

    def record(self, infno: str, seconds: float) -> None:
        us = min(LATENCY_MAX_US, max(1, round(seconds * 1e6)))
        self.overall.record_value(us)
        self._hist(family(infno)).record_value(us)


def quantiles_ms(hist: HdrHistogram) -> dict[str, float]:
    """count, p50, p99, p999 and max of a histogram, in ms (nan when empty)."""
    n = hist.get_total_count()
    if n == 0:
        return {"count": 0, "p50": float("nan"), "p99": float("nan"), "p999": float("nan"), "max": float("nan")}
    return {"count": n, "p50": hist.get_value_at_percentile(50) / 1000, "p99": hist.get_value_at_percentile(99) / 1000,
            "p999": hist.get_value_at_percentile(99.9) / 1000, "max": hist.get_max_value() / 1000}


@dataclass
class OpenLoopResult:
    """What one rate's load saw. Requests are counted by their due time (offered) and answer time
    (achieved) inside the load window."""

    target_rps: float
    window_s: float
    visits_per_s: float
    requests_per_visit: float
    book: LatencyBook = field(default_factory=LatencyBook)
    stats: Stats = field(default_factory=Stats)
    offered: int = 0  # requests due inside the window
    answered_in_window: int = 0
    arrivals: int = 0  # visits that arrived
    asked: int = 0  # the requests those visits send in all (`visit_requests`), answered in time or not
    skipped: int = 0  # arrivals with no free person (every pick in a visit already): the population's limit
    sender_lag_max_s: float = 0.0  # latest a visit was started after its arrival time
    client_cpu_s: float = 0.0  # the generator's CPU during the load and the drain (all its processes)
    generator_cpu_s: list[float] = field(default_factory=list)  # the same per generator process
    unanswered: int = 0  # requests still waiting when the drain ended
    capped: bool = False  # --max-requests stopped new visits before the window ended
    unreachable: str | None = None

    @property
    def achieved_rps(self) -> float:
        return self.answered_in_window / max(self.window_s, 1e-9)

    @property
    def offered_rps(self) -> float:
        return self.offered / max(self.window_s, 1e-9)

    @property
    def due_rps(self) -> float:
        """The rate to hold: the target, or less when the visits that arrived ask fewer requests than it
        plans for. Poisson arrivals vary (at 250 visits, by ±6%), and so do the requests a visit sends (a
        stay 10 or more, a purchase 2–3): that is the draw's doing, not the pipeline's."""
        return min(self.target_rps, self.asked / max(self.window_s, 1e-9))

    def errors(self) -> Counter[str]:
        """Unexpected error answers by code, plus requests never answered (NO_ANSWER)."""
        out = self.stats.errors()
        if self.unanswered:
            out["NO_ANSWER"] += self.unanswered
        return out


def merge_results(parts: Sequence[OpenLoopResult]) -> OpenLoopResult:
    """One rate's result from the shares of several generator processes (each its own persons and
    institutions, the same window): counts and rates added, histograms added exactly, the latest start of
    any process, each process's CPU kept."""
    if not parts:
        raise ValueError("no generator results to merge")
    first = parts[0]
    out = OpenLoopResult(target_rps=sum(p.target_rps for p in parts), window_s=first.window_s,
                         visits_per_s=sum(p.visits_per_s for p in parts), requests_per_visit=first.requests_per_visit)
    for part in parts:
        out.book.add(part.book)
        out.stats.absorb(part.stats)
        out.offered += part.offered
        out.asked += part.asked
        out.answered_in_window += part.answered_in_window
        out.arrivals += part.arrivals
        out.skipped += part.skipped
        out.unanswered += part.unanswered
        out.sender_lag_max_s = max(out.sender_lag_max_s, part.sender_lag_max_s)
        out.client_cpu_s += part.client_cpu_s
        out.generator_cpu_s += part.generator_cpu_s
        out.capped = out.capped or part.capped
        out.unreachable = out.unreachable or part.unreachable
    return out


def held(result: OpenLoopResult, p99_bound_ms: float) -> tuple[bool, str]:
    """The step mode's criterion: achieved ≥ 95% of the target (of what the visits that arrived ask, when
    fewer arrived), p99 within the bound, no errors other than the expected refusals, every arrival
    served. Returns (held, why not)."""
    reasons = []
    if result.achieved_rps < HELD_SHARE * result.due_rps:
        due = f"{result.target_rps:g}/s" if result.due_rps == result.target_rps else (
            f"{result.due_rps:.1f}/s (what the {result.arrivals} visits that arrived ask)")
        reasons.append(f"achieved {result.achieved_rps:.1f}/s < {HELD_SHARE:.0%} of {due}")
    p99 = quantiles_ms(result.book.overall)["p99"]
    if not p99 <= p99_bound_ms:  # nan (nothing answered) is not within the bound either
        reasons.append(f"p99 {p99:.1f} ms > {p99_bound_ms:g} ms")
    if errors := result.errors():
        reasons.append("errors " + ", ".join(f"{c} {n}" for c, n in errors.most_common()))
    if result.skipped:
        reasons.append(f"{result.skipped} arrivals found no free person (population too small for this rate)")
    return not reasons, "; ".join(reasons)


def mix_items(mix: str) -> dict[str, tuple[int, int]]:
    return ITEMS_NATIONAL if mix == "national" else ITEMS_TODAY


def requests_per_visit(pop: Population, kinds: dict[str, float], mix: str, seed: int, n: int = 2000) -> float:
    """Mean requests of a visit of this mix, from n drawn scenarios (the visit rate is target / this)."""
    rng = random.Random(seed)
    total = drawn = 0
    for _ in range(n):
        scn = pop.scenario(rng, kinds=kinds, items=mix_items(mix), lookup_share=lookup_share(mix))
        if scn is None:
            continue
        pop.release(scn)
        total += visit_requests(scn)
        drawn += 1
    pop.reset_seeding()  # the estimate's draws showed no behaviour: the run's persons still will
    return total / drawn if drawn else 1.0


def visit_requests(scn: Scenario) -> int:
    """The requests a visit sends when every answer is the expected one (a seeded behaviour's companion
    visits included)."""
    _, steps = _steps(scn)
    own = len(steps) if scn.expect_refusal is None else sent_until_refusal(scn)
    return own + sum(len(_steps(visit)[1]) for visit in scn.companions)


def sent_until_refusal(scn: Scenario) -> int:
    """Requests an unfiled visit sends: it stops at its pre-settlement, which is refused."""
    sent = {"inpatient": 1 + len(scn.uploads) + 2, "pharmacy": 1, "chronic": 4}.get(scn.kind, 3)
    return sent + (1 if scn.lookup else 0)


def lookup_share(mix: str) -> float:
    return LOOKUP_SHARE if mix == "national" else 0.0


async def run_open_loop(
    caller: Caller, pop: Population, *, rate: float, seconds: float, arrivals: str, kinds: dict[str, float],
    mix: str, max_requests: int, drain_s: float, seed: int, per_visit: float, resends: int = 1,
    log: Callable[[str], None] = lambda _: None,
) -> OpenLoopResult:
    """Visits at `rate` / `per_visit` per second for `seconds` (new visits stop once `max_requests` requests
    were sent); then at most `drain_s` for the answers in flight."""
    visit_rate = rate / per_visit
    res = OpenLoopResult(target_rps=rate, window_s=seconds, visits_per_s=visit_rate, requests_per_visit=per_visit)
    rng = random.Random(seed)
    stats = res.stats
    in_window: list[bool] = []  # one per answer: did it come inside the window
    sent = 0
    unreachable: list[str] = []
    loop_start = time.perf_counter()
    end = loop_start + seconds

    def on_record(infno: str, latency: float, code: str, expected: bool) -> None:
        res.book.record(infno, latency)
        in_window.append(time.perf_counter() < end)

    stats.on_record = on_record

    def go_on() -> bool:
        nonlocal sent
        if time.perf_counter() >= end or unreachable:
            return False
        sent += 1  # a request is about to be sent: it is due now, inside the window
        return True

    async def visit(scn: Scenario, due: float) -> None:
        try:
            await drive_stay(caller, scn, stats, go_on=go_on, resends=resends, due=due)
        except TransportError as e:
            unreachable.append(str(e))
        finally:
            pop.release(scn)

    tasks: set[asyncio.Task[None]] = set()
    cpu0 = time.process_time()
    for offset in arrival_offsets(visit_rate, seconds, arrivals, rng):
        if sent >= max_requests:
            res.capped = True
            break
        due = loop_start + offset
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        if unreachable:
            break
        res.arrivals += 1
        res.sender_lag_max_s = max(res.sender_lag_max_s, time.perf_counter() - due)
        scn = pop.scenario(rng, kinds=kinds, items=mix_items(mix), lookup_share=lookup_share(mix))
        if scn is None:
            res.skipped += 1
            continue
        res.asked += visit_requests(scn)
        task = asyncio.create_task(visit(scn, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if (rest := end - time.perf_counter()) > 0:
        await asyncio.sleep(rest)
    log(f"bench: {sent} requests sent, {len(tasks)} visits still waiting for an answer; draining ...")
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    res.client_cpu_s = time.process_time() - cpu0
    res.generator_cpu_s = [res.client_cpu_s]
    res.offered = sent
    res.answered_in_window = sum(in_window)
    res.unanswered = sent - len(in_window)
    stats.run_s = seconds
    stats.drain_s = max(0.0, time.perf_counter() - end)
    stats.on_record = None  # the run is over (and a result with a closure in it could not be pickled)
    res.unreachable = unreachable[0] if unreachable else None
    return res
