"""The open-loop benchmark's pure parts (arrivals, step rates, the held criterion, HDR latencies, the
national mix) and its driver against an in-memory pipeline whose answer time the test sets."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import statistics
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from loadtest.his import Hospital
from loadtest.openloop import (
    LatencyBook,
    OpenLoopResult,
    arrival_offsets,
    family,
    held,
    quantiles_ms,
    requests_per_visit,
    run_open_loop,
    step_rates,
)
from loadtest.population import (
    INPATIENT_ONLY,
    ITEMS_NATIONAL,
    NATIONAL_MIX,
    UPLOAD_LINES_MAX,
    CatalogInfo,
    HospitalInfo,
    PersonInfo,
    Population,
    Stats,
    _steps,
)
from services.refdata.regions import region_of

NOW = datetime(2026, 11, 30, 10, 0, 0)


def _place(code: str, admdvs: str) -> HospitalInfo:
    r = region_of(admdvs)
    return HospitalInfo(Hospital(code, "医院", admdvs), admdvs, 3, r.prov_admdvs, r.pool_admdvs)


def _population(persons: int = 60) -> Population:
    """Local care in 赤峰 only (no filings needed, so nothing is refused), a hospital and a pharmacy, 80
    catalog items so that an inpatient stay can bill 60 distinct ones."""
    items = [CatalogInfo(f"X{i:03d}", "01", None) for i in range(40)]
    items += [CatalogInfo(f"00{i:03d}", "02", None) for i in range(40)]
    people = [PersonInfo(f"P150400{i:08d}", "150400", "390", ("DM",) if i % 5 == 0 else ())
              for i in range(persons)]
    return Population([_place("H15040000001", "150400"), _place("P15040000001", "150400")], people, {},
                      {"150000": items})


def test_constant_arrivals_are_evenly_spaced_and_bounded_in_time() -> None:
    offsets = list(arrival_offsets(10, 2.0, "constant", random.Random(0)))
    assert len(offsets) == 20
    assert offsets[0] == 0.0 and offsets[-1] == pytest.approx(1.9)
    assert all(b - a == pytest.approx(0.1) for a, b in itertools.pairwise(offsets))
    assert list(arrival_offsets(0, 2.0, "constant", random.Random(0))) == []


def test_poisson_arrivals_have_the_rate_on_average() -> None:
    offsets = list(arrival_offsets(1000, 10.0, "poisson", random.Random(4)))
    assert 9_600 < len(offsets) < 10_400  # 10,000 expected, standard deviation 100
    assert offsets == sorted(offsets) and offsets[0] > 0 and offsets[-1] < 10.0
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    # exponential gaps: the standard deviation equals the mean (evenly spaced ones would have none)
    assert 0.95 < statistics.pstdev(gaps) / statistics.mean(gaps) < 1.05


def test_step_rates_grow_by_factor_or_increment_within_bounds() -> None:
    assert step_rates(100, factor=1.5, max_rate=500, max_steps=10) == [100, 150, 225, 337.5]
    assert step_rates(100, factor=1.0, increment=250, max_rate=10_000, max_steps=3) == [100, 350, 600]
    with pytest.raises(ValueError):
        step_rates(100, factor=1.0, increment=0, max_rate=500, max_steps=3)
    with pytest.raises(ValueError):
        step_rates(0, factor=2.0, max_rate=500, max_steps=3)


def test_latency_book_groups_by_family_with_hdr_precision() -> None:
    assert [family(i) for i in ("1101", "2102", "2207", "2304", "2401", "9001")] == [
        "1101 person look-up", "21xx pharmacy", "22xx outpatient", "23xx/24xx inpatient", "23xx/24xx inpatient",
        "9001 other"]
    book = LatencyBook()
    for ms in range(1, 1001):  # 1 … 1000 ms, once each
        book.record("2304" if ms % 2 else "2207", ms / 1000)
    q = quantiles_ms(book.overall)
    assert q["count"] == 1000
    # HDR keeps 3 significant digits: each value within 0.1% of the exact one
    assert q["p50"] == pytest.approx(500, rel=1e-3) and q["p99"] == pytest.approx(990, rel=1e-3)
    assert q["p999"] == pytest.approx(999, rel=1e-3) and q["max"] == pytest.approx(1000, rel=1e-3)
    assert quantiles_ms(book.families["23xx/24xx inpatient"])["count"] == 500
    assert quantiles_ms(book.families["22xx outpatient"])["max"] == pytest.approx(1000, rel=1e-3)


def _result(target: float, answered: int, latency_ms: float, window_s: float = 10.0) -> OpenLoopResult:
    res = OpenLoopResult(target_rps=target, window_s=window_s, visits_per_s=target / 4, requests_per_visit=4)
    for _ in range(answered):
        res.book.record("2207", latency_ms / 1000)
    res.answered_in_window = res.offered = answered
    res.arrivals = round(target / 4 * window_s)  # as many visits as the target plans for ...
    res.asked = round(target * window_s)  # ... asking as many requests
    return res


def test_held_needs_the_rate_the_p99_and_no_errors() -> None:
    assert held(_result(100, 960, 20), 100) == (True, "")
    ok, why = held(_result(100, 940, 20), 100)
    assert not ok and why == "achieved 94.0/s < 95% of 100/s"
    ok, why = held(_result(100, 1000, 150), 100)
    assert not ok and why == "p99 150.0 ms > 100 ms"
    res = _result(100, 1000, 20)
    res.stats.outcomes[("2207", "INTERNAL")] += 2
    res.stats.outcomes[("2206", "FILING_REQUIRED")] += 3
    res.stats.expected_refusals["FILING_REQUIRED"] += 3  # expected refusals are no errors
    res.unanswered = 1
    ok, why = held(res, 100)
    assert not ok and why == "errors INTERNAL 2, NO_ANSWER 1"
    res = _result(100, 1000, 20)
    res.skipped = 4
    assert held(res, 100) == (False, "4 arrivals found no free person (population too small for this rate)")
    ok, why = held(_result(100, 0, 20), 100)  # nothing answered: neither rate nor p99
    assert not ok and why.startswith("achieved 0.0/s") and "p99 nan ms" in why


def test_held_measures_the_rate_against_the_visits_that_arrived() -> None:
    """Poisson drew fewer visits than the target plans for, or visits that send fewer requests (more
    purchases, fewer stays): the pipeline is judged on the requests those visits ask."""
    res = _result(100, 880, 20)
    res.arrivals, res.asked = 225, 900  # 90 requests/s asked instead of 100
    assert held(res, 100) == (True, "")
    res.answered_in_window = 850  # below 95% of the 90/s those visits ask
    ok, why = held(res, 100)
    assert not ok and why == "achieved 85.0/s < 95% of 90.0/s (what the 225 visits that arrived ask)"
    res = _result(100, 880, 20)
    res.asked = 900  # as many visits as planned, but of the kinds that send fewer requests
    assert held(res, 100) == (True, "")
    res = _result(100, 940, 20)
    res.arrivals, res.asked = 300, 1200  # more than planned: the target stays the bar
    ok, why = held(res, 100)
    assert not ok and why == "achieved 94.0/s < 95% of 100/s"


def test_national_mix_draws_the_reference_shares_with_lookups_and_real_bills() -> None:
    pop = _population()
    rng = random.Random(11)
    kinds: Counter[str] = Counter()
    lookups = 0
    n = 4000
    for _ in range(n):
        scn = pop.scenario(rng, now=NOW, kinds=NATIONAL_MIX, items=ITEMS_NATIONAL, lookup_share=0.3)
        assert scn is not None
        pop.release(scn)
        kinds[scn.kind] += 1
        lines = [line for upload in scn.uploads for line in upload]
        low, high = ITEMS_NATIONAL[scn.kind]
        assert low <= len(lines) <= high
        assert all(len(upload) <= UPLOAD_LINES_MAX for upload in scn.uploads)
        _, steps = _steps(scn)
        if scn.lookup:
            lookups += 1
            first = steps[0]()
            assert first["infno"] == "1101"
            assert first["input"]["data"] == {"mdtrt_cert_type": "02", "mdtrt_cert_no": scn.person.psn_no}
    total = sum(NATIONAL_MIX.values())
    for kind, weight in NATIONAL_MIX.items():
        # within 2.5 percentage points of the national share (n = 4000: a standard deviation under 0.8)
        assert abs(kinds[kind] / n - weight / total) < 0.025, (kind, kinds)
    assert abs(lookups / n - 0.3) < 0.03


def test_requests_per_visit_of_the_mixes() -> None:
    pop = _population()
    # inpatient: 2401, 1-3 uploads of at most 20 of 15-60 items, 2402, 2303, 2304 (+ 2305, + 2304 again)
    inpatient = requests_per_visit(pop, INPATIENT_ONLY, "national", seed=1)
    assert 6.0 < inpatient < 8.0
    # mostly outpatient (4 requests) and pharmacy (2), 30% with a look-up, 10% reversed
    national = requests_per_visit(pop, NATIONAL_MIX, "national", seed=1)
    assert 3.6 < national < 4.6
    assert not pop.busy


class FakePipeline:
    """An in-memory pipeline: every request answered OK after `delay_s`; with `serial`, one at a time
    (a pipeline that falls behind)."""

    def __init__(self, delay_s: float, serial: bool = False) -> None:
        self.delay_s = delay_s
        self.lock = asyncio.Lock() if serial else None
        self.calls: Counter[str] = Counter()

    async def call(self, envelope: dict[str, Any]) -> dict[str, Any]:
        if self.lock is not None:
            async with self.lock:
                await asyncio.sleep(self.delay_s)
        else:
            await asyncio.sleep(self.delay_s)
        self.calls[envelope["infno"]] += 1
        ids = {"mdtrt_id": "M" + envelope["msgid"]}
        setl = {"setl_id": "S" + envelope["msgid"], "medins_setl_id": envelope["msgid"], "fund_pay_sumamt": "1.00",
                "medfee_sumamt": "2.00"}
        return {"infcode": 0, "output": {"result": ids, "data": ids, "setlinfo": setl}}


async def test_open_loop_holds_a_rate_the_pipeline_keeps_up_with() -> None:
    pop, pipeline = _population(), FakePipeline(0.005)
    res = await run_open_loop(pipeline, pop, rate=200, seconds=2.0, arrivals="constant", kinds=NATIONAL_MIX,
                              mix="national", max_requests=10_000, drain_s=2.0, seed=3, per_visit=4.0)
    sent = sum(pipeline.calls.values())
    assert res.offered == sent == res.stats.requests()  # every request sent was answered and counted once
    assert res.unanswered == 0 and res.answered_in_window <= res.offered
    assert res.arrivals == 100 and res.skipped == 0  # 50 visits/s, evenly, for 2 s
    # what they asked: every request they sent, and more only if the window's end cut a visit short
    assert res.asked >= res.offered and (res.asked > res.offered) == (res.stats.stay_outcomes["cut"] > 0)
    assert res.achieved_rps <= res.offered_rps
    assert quantiles_ms(res.book.overall)["count"] == sent
    assert sum(quantiles_ms(h)["count"] for h in res.book.families.values()) == sent
    assert quantiles_ms(res.book.overall)["p50"] >= 5.0
    assert not res.errors() and not pop.busy
    assert res.stats.stay_outcomes["failed"] == 0 and res.stats.settled > 0  # every visit went to its end
    assert res.client_cpu_s > 0 and res.generator_cpu_s == [res.client_cpu_s]


async def test_a_pipeline_that_falls_behind_shows_as_latency_not_as_a_lower_rate_of_arrivals() -> None:
    # 20 ms per request, one at a time: at most 50 requests/s against 200 offered.
    pop, pipeline = _population(200), FakePipeline(0.02, serial=True)
    res = await run_open_loop(pipeline, pop, rate=200, seconds=1.5, arrivals="constant", kinds=INPATIENT_ONLY,
                              mix="inpatient", max_requests=10_000, drain_s=0.5, seed=5, per_visit=4.0)
    assert res.arrivals == 75  # visits still arrived on time: 50/s for 1.5 s
    q = quantiles_ms(res.book.overall)
    # latency counts from the due time: the queue behind the slow pipeline is in it (coordinated omission
    # would show about 20 ms)
    assert q["max"] > 500
    ok, why = held(res, 100)
    assert not ok and "achieved" in why and "p99" in why
    assert res.unanswered > 0 and "NO_ANSWER" in res.errors()
    assert not pop.busy


async def test_max_requests_stops_new_visits() -> None:
    pop, pipeline = _population(), FakePipeline(0.001)
    res = await run_open_loop(pipeline, pop, rate=400, seconds=2.0, arrivals="poisson", kinds=NATIONAL_MIX,
                              mix="national", max_requests=40, drain_s=1.0, seed=9, per_visit=4.0)
    assert res.capped
    # visits already going finish their steps: a few more than 40, far fewer than 800
    assert 40 <= res.offered < 80
    assert isinstance(res.stats, Stats)


def test_report_gives_cpu_per_request_per_process_and_the_generator_s_own() -> None:
    from loadtest.bench import open_report, step_summary

    res = _result(100, 1000, 20)
    res.client_cpu_s = 0.25
    before = {"settle": (12, {12: 2.0}), "kafka": (13, {13: 5.0}),
              "postgres": (14, {14: 1.0, 15: 1.0}), "gateway": (16, {16: 3.0}), "machine busy": (0, {0: 100.0})}
    after = {"settle": (12, {12: 2.25}), "kafka": (13, {13: 6.0}),
             "postgres": (14, {14: 1.5, 15: 1.25, 17: 0.25}),  # a backend started during the load counts whole
             "gateway": (26, {26: 0.5}), "machine busy": (0, {0: 110.0})}  # the gateway restarted
    lines = open_report(res, (before, after), 10.0, 100.0)
    assert lines[0] == "rate 100 requests/s: HELD"
    assert ("  stack CPU per request 2.250 ms: settle 0.250, kafka 1.000, postgres 1.000 "
            "(gateway restarted: not counted)") in lines
    assert any(line.startswith("  load generator (this process): 0.250 ms CPU per request (0.2 CPU-s = 2% ")
               for line in lines)
    assert not any("WARNING" in line for line in lines)
    res.client_cpu_s = 8.0  # 80% of one core over 10 s
    assert any(line.startswith("  WARNING: a load generator process kept one core 80% busy")
               for line in open_report(res, (before, after), 10.0, 100.0))
    res.client_cpu_s, res.generator_cpu_s = 9.0, [4.0, 5.0]  # two processes: each under 70% of a core
    lines = open_report(res, (before, after), 10.0, 100.0)
    assert ("  load generator (2 processes): 9.000 ms CPU per request in all (9.0 CPU-s); per process 4.0 CPU-s = 40% "
            "of one core, 5.0 CPU-s = 50% of one core; latest visit start 0.0 ms after its arrival time") in lines
    assert not any("WARNING" in line for line in lines)
    summary = step_summary([(res, True, 2.75), (_result(200, 1000, 150), False, 1.5)], 100.0)
    assert summary[-1] == "  highest rate held: 100 requests/s"
    assert summary[-2].split() == ["200", "100.0", "no", "150.0", "150.0", "150.0", "1.500"]


def test_latency_books_cross_processes_and_add_up_exactly() -> None:
    import pickle

    from loadtest.openloop import merge_results

    a, b, both = _result(100, 0, 0), _result(100, 0, 0), LatencyBook()
    for i, ms in enumerate(range(1, 2001)):  # 1 … 2000 ms, alternately in the two processes' books
        (a if i % 2 else b).book.record("2304" if ms % 3 else "2102", ms / 1000)
        both.record("2304" if ms % 3 else "2102", ms / 1000)
    a.offered, a.answered_in_window, a.arrivals, a.client_cpu_s, a.generator_cpu_s = 1000, 990, 250, 0.5, [0.5]
    b.offered, b.answered_in_window, b.arrivals, b.client_cpu_s, b.generator_cpu_s = 1000, 1000, 251, 0.75, [0.75]
    a.sender_lag_max_s, b.sender_lag_max_s, b.unanswered, b.skipped = 0.004, 0.002, 3, 1
    a.stats.outcomes[("2304", "ok")] += 7
    b.stats.outcomes[("2304", "ok")] += 5
    b.stats.outcomes[("2206", "FILING_REQUIRED")] += 2
    b.stats.expected_refusals["FILING_REQUIRED"] += 2
    a.stats.settle_ids["S1"], b.stats.settle_ids["S2"] = 100, 200
    a.stats.answered_at, b.stats.answered_at = [1.0, 2.0], [1.5]
    # what a generator process sends its parent: pickled, the histograms as HDR's own encoding
    parts = [pickle.loads(pickle.dumps(part)) for part in (a, b)]
    merged = merge_results(parts)
    assert merged.target_rps == 200 and merged.window_s == 10.0 and merged.visits_per_s == 50
    assert (merged.offered, merged.answered_in_window, merged.arrivals, merged.unanswered, merged.skipped) == (
        2000, 1990, 501, 3, 1)
    assert merged.achieved_rps == 199.0
    assert merged.client_cpu_s == 1.25 and merged.generator_cpu_s == [0.5, 0.75]
    assert merged.sender_lag_max_s == 0.004
    assert merged.stats.outcomes == Counter({("2304", "ok"): 12, ("2206", "FILING_REQUIRED"): 2})
    assert merged.errors() == Counter({"NO_ANSWER": 3})  # the refusals were expected where they were seen
    assert merged.stats.settled == 2 and merged.stats.requests() == 3
    # exact: the merged histograms are the ones one process recording everything would have
    for name in ("", "23xx/24xx inpatient", "21xx pharmacy"):
        got, want = merged.book._hist(name), both._hist(name)
        assert got.get_total_count() == want.get_total_count() > 0
        for q in (50, 90, 99, 99.9, 100):
            assert got.get_value_at_percentile(q) == want.get_value_at_percentile(q)
    assert quantiles_ms(merged.book.overall)["count"] == 2000
    with pytest.raises(ValueError):
        merge_results([])


def test_generator_shares_deal_out_disjoint_institutions_and_persons() -> None:
    import argparse

    from loadtest.bench import generator_shares
    from loadtest.his import Signer, next_msgid, start_msgids_at

    items = [CatalogInfo(f"X{i:03d}", "01", None) for i in range(10)]
    people = [PersonInfo(f"P150400{i:08d}", "150400", "390") for i in range(9)]
    places = [_place(f"H1504000000{i}", "150400") for i in range(4)] + [_place("P15040000001", "150400")]
    pop = Population(places, people, {}, {"150000": items})
    signer = Signer({h.his.fixmedins_code: bytes([i]) * 32 for i, h in enumerate(places)})
    args = argparse.Namespace(processes=2, via="kafka", reply_partition=3, request_timeout=10.0,
                              http_connections=512)
    shares = generator_shares(pop, signer, args, gateway_partition=0)
    assert [s.reply_partition for s in shares] == [3, 2]  # each process its own fsi.replies partition
    codes = [{h.his.fixmedins_code for h in s.places} for s in shares]
    assert codes[0] == {"H15040000000", "H15040000002", "P15040000001"}
    assert codes[1] == {"H15040000001", "H15040000003"}  # one pharmacy: the second process has none
    assert [set(s.keys) for s in shares] == codes
    assert not {p.psn_no for p in shares[0].persons} & {p.psn_no for p in shares[1].persons}
    assert sum(len(s.persons) for s in shares) == 9
    assert shares[0].http_connections == 256
    # a share's process stamps its msgids past every one this process sent
    from loadtest import his

    sent = next_msgid("H15040000000")
    saved = his._clock_base, his._counter
    start_msgids_at(shares[0].msgid_clock)
    try:
        assert next_msgid("H15040000000")[12:26] > sent[12:26]
    finally:
        his._clock_base, his._counter = saved
    args.processes = 5  # more processes than hospitals
    with pytest.raises(ValueError, match="only 4 hospitals"):
        generator_shares(pop, signer, args, gateway_partition=0)


def test_generator_processes_never_read_the_gateways_reply_partition() -> None:
    from loadtest.bench import reply_partitions

    # fsi.replies has 4 partitions; the gateway (instance 0) reads partition 0 and would drop what it took
    assert reply_partitions(3, 3, gateway_partition=0) == [3, 2, 1]
    assert reply_partitions(1, 3, gateway_partition=0) == [1, 3, 2]
    assert reply_partitions(0, 2, gateway_partition=0) == [3, 2]
    assert reply_partitions(3, 2, gateway_partition=2) == [3, 1]
    assert reply_partitions(3, 5, gateway_partition=0) == [3, 2, 1, 3, 2]  # beyond 3 they share, never 0


def test_msgids_and_sending_times_formatted_once_stay_what_they_were() -> None:
    from datetime import timedelta

    from loadtest import his

    saved = his._clock_base, his._counter
    his.start_msgids_at(4_102_444_790)  # 2100-01-01 00:00 UTC - 10 s: past any real clock
    try:
        ids = [his.next_msgid("H1504000000123") for _ in range(20_001)]
    finally:
        his._clock_base, his._counter = saved  # the session's later msgids as they would have been
    assert len(set(ids)) == len(ids) and all(len(i) == 30 for i in ids)
    # the stamp moves one second every 10,000 msgids, formatted as before (local time, yyyyMMddHHmmss)
    for n in (0, 9_999, 10_000, 20_000):
        stamp = datetime.fromtimestamp(4_102_444_790 + n // 10_000).strftime("%Y%m%d%H%M%S")
        assert ids[n] == f"H15040000001{stamp}{n % 10_000:04d}"
    before = his.wire_time(his.shanghai_now())
    sent = his.sending_time()
    after = his.wire_time(his.shanghai_now())
    assert before <= sent <= after
    live = Hospital("H15040000001", "医院", "150400", live_clock=True)
    assert before <= live.envelope("2201", {})["inf_time"] <= his.wire_time(his.shanghai_now())
    fixed = Hospital("H15040000001", "医院", "150400").envelope("2201", {}, inf_time=NOW + timedelta(seconds=1))
    assert fixed["inf_time"] == "2026-11-30 10:00:01"


async def test_a_sign_in_answered_timeout_is_resent_with_the_same_msgid() -> None:
    from loadtest.his import SIGN_IN_RESENDS, Signer, SignInFailed

    sent: list[bytes] = []
    answers = [{"infcode": -1, "err_msg": "TIMEOUT: no answer within 5000 ms"},
               {"infcode": 0, "err_msg": "", "output": {"signinoutb": {"sign_no": "S" * 30}}}]

    async def post(raw: bytes) -> dict[str, Any]:
        sent.append(raw)
        return answers.pop(0)

    signer = Signer({"H15040000001": b"k" * 32})
    envelope = Hospital("H15040000001", "医院", "150400").envelope("2201", {}, inf_time=NOW)
    await signer.ensure_session(envelope, post)
    assert signer.sessions["H15040000001"] == "S" * 30
    assert len(sent) == 2 and sent[0] == sent[1]  # the same signed 9001, the same msgid
    # other refusals are not resent, nor a TIMEOUT more than SIGN_IN_RESENDS times
    answers[:] = [{"infcode": -1, "err_msg": "KEY_UNKNOWN: no key"}]
    sent.clear()
    with pytest.raises(SignInFailed):
        await Signer({"H15040000001": b"k" * 32}).ensure_session(envelope, post)
    assert len(sent) == 1
    answers[:] = [{"infcode": -1, "err_msg": "TIMEOUT: no answer"}] * (1 + SIGN_IN_RESENDS)
    sent.clear()
    with pytest.raises(SignInFailed):
        await Signer({"H15040000001": b"k" * 32}).ensure_session(envelope, post)
    assert len(sent) == 1 + SIGN_IN_RESENDS


@pytest.mark.parametrize("warmup_s", [0.0, 0.6])
async def test_the_warm_up_runs_first_at_the_first_rate_and_is_not_reported(warmup_s: float, tmp_path: Path) -> None:
    """`--warmup-seconds`: a load at the first rate before the measured ones, whose requests reach the
    pipeline but none of the report's counts."""
    from loadtest.bench import open_loop, parse_args
    from services.common.config import load_settings

    pop, pipeline = _population(), FakePipeline(0.001)
    args = parse_args(["--step", "--start-rate", "100", "--step-factor", "2", "--max-steps", "2", "--seconds", "1",
                       "--drain-seconds", "1", "--arrivals", "constant", "--warmup-seconds", str(warmup_s)])
    s = dataclasses.replace(load_settings(), state_dir=tmp_path, run_dir=tmp_path)  # no stack: no stage CPU read
    out, results = await open_loop(s, args, pipeline, pop, {"persons": len(pop.persons)})
    measured = sum(res.offered for res, _, _ in results)
    assert [res.target_rps for res, _, _ in results] == [100, 200]
    warm = sum(pipeline.calls.values()) - measured  # sent, answered, and in no result
    if warmup_s:
        assert 30 <= warm <= 90  # about 100/s for 0.6 s
    else:
        assert warm == 0
    assert f"after an unreported warm-up of {warmup_s:g} s at the first rate" in "\n".join(out)


async def test_repeated_step_runs_report_each_highest_rate_held_and_their_median(tmp_path: Path) -> None:
    """`--step --repeat 3`: three step runs, each its own table, then the median of their highest rates held."""
    from loadtest.bench import open_loop, parse_args
    from services.common.config import load_settings

    pop, pipeline = _population(), FakePipeline(0.001)
    args = parse_args(["--step", "--start-rate", "50", "--step-factor", "2", "--max-steps", "2", "--seconds", "0.5",
                       "--drain-seconds", "1", "--arrivals", "constant", "--warmup-seconds", "0", "--repeat", "3",
                       "--p99-bound-ms", "2000"])  # a busy machine's scheduling delays are not this test's subject
    s = dataclasses.replace(load_settings(), state_dir=tmp_path, run_dir=tmp_path)
    out, results = await open_loop(s, args, pipeline, pop, {"persons": len(pop.persons)})
    assert [res.target_rps for res, _, _ in results] == [50, 100] * 3
    assert sum(line.startswith("  highest rate held: 100 requests/s") for line in out) == 3
    assert out.count("run 2 of 3") == 1
    assert "3 step runs: highest rate held 100, 100, 100 requests/s (0: none); median 100 requests/s" in out
    assert sum(res.offered for res, _, _ in results) == sum(pipeline.calls.values())  # no warm-up here


def test_repeated_runs_at_one_rate_give_the_median_p99() -> None:
    from loadtest.bench import repeat_summary

    runs = [[(_result(100, 1000, ms), ms < 100, cpu)] for ms, cpu in ((20, 2.0), (150, 3.0), (40, 2.5))]
    assert repeat_summary(runs, step=False) == [
        "3 runs at 100 requests/s: held in 2; p99 20.0, 150.0, 40.0 ms, median 40.0 ms; stack CPU per request "
        "median 2.500 ms"]
    ladders = [[(_result(100, 1000, 20), True, 1.0), (_result(150, 1000, 20), False, 1.0)],
               [(_result(100, 1000, 200), False, 1.0)]]
    assert repeat_summary(ladders, step=True) == [
        "2 step runs: highest rate held 100, 0 requests/s (0: none); median 0 requests/s (of an even count, the "
        "lower: a rate that was measured)"]
