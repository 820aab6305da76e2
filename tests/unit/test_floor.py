"""The floor benchmark's pure parts: the hop count, the draw of each request's effects, the record head,
the arithmetic of its report and the parsing of the bench's report."""

from __future__ import annotations

import random

import pytest

from loadtest.floor import (
    HEAD,
    TARGET_MS,
    BenchFigures,
    Phase,
    Topology,
    decode_head,
    diff,
    effects,
    encode_head,
    held,
    net_of_idle,
    padded,
    parse_bench,
    per_request_ms,
    percentile,
    phase_lines,
    topology_from_counts,
)


def test_hops_of_a_request_through_router_and_engine_with_a_settlement() -> None:
    # Every request routed and settled once: ingress, routed, reply, event, smartmon's record produced;
    # ingress, routed, reply and the event twice (clearing, smartmon) consumed.
    topo = Topology(routed=1.0, settlements=1.0, side=1.0)
    assert topo.produced == 5.0
    assert topo.consumed == 5.0


def test_hops_of_a_request_the_router_answers() -> None:
    topo = Topology(routed=0.0, settlements=0.0, side=0.0)
    assert topo.produced == 2.0  # the request and its reply
    assert topo.consumed == 2.0


def test_one_hop_less_when_router_and_engine_are_one_stage() -> None:
    topo = Topology(routed=0.9, settlements=0.25, side=1.0, merged=True)
    assert topo.produced == pytest.approx(2 + 0.25 * 2)  # no routed record
    assert topo.consumed == pytest.approx(2 + 0.25 * 2)
    assert topo.describe().startswith("router and engine one stage: no routed record, 1 reply, 0.250 settlement")


def test_topology_from_the_counts_of_the_real_topics() -> None:
    topo = topology_from_counts({"ingress": 1_000, "routed": 900, "replies": 1_000, "settlements": 250, "side": 500})
    assert topo == Topology(routed=0.9, settlements=0.25, side=2.0)
    assert topo.produced == pytest.approx(1 + 0.9 + 1 + 0.25 * 3)
    assert topo.consumed == pytest.approx(1 + 0.9 + 1 + 0.25 * 2)


def test_topology_caps_routed_at_one_and_has_no_side_without_events() -> None:
    # A bench run's resends can put more records on fsi.routed than requests counted: never above one.
    assert topology_from_counts({"ingress": 100, "routed": 103, "settlements": 0, "side": 7}) == \
        Topology(routed=1.0, settlements=0.0, side=0.0)


def test_topology_needs_requests() -> None:
    with pytest.raises(ValueError, match="no requests"):
        topology_from_counts({"ingress": 0, "routed": 0, "settlements": 0, "side": 0})


def test_effects_have_the_topologys_means() -> None:
    topo = Topology(routed=0.88, settlements=0.25, side=1.0)
    rng = random.Random(7)
    draws = [effects(rng, topo) for _ in range(200_000)]
    assert sum(routed for routed, _ in draws) / len(draws) == pytest.approx(0.88, abs=0.005)
    assert sum(events for _, events in draws) / len(draws) == pytest.approx(0.25, abs=0.005)
    assert all(events == 0 for routed, events in draws if not routed)  # only the engine settles


def test_effects_more_than_one_event_per_routed_request() -> None:
    rng = random.Random(3)
    draws = [effects(rng, Topology(routed=0.5, settlements=0.75, side=0.0)) for _ in range(100_000)]
    assert {events for routed, events in draws if routed} == {1, 2}
    assert sum(events for _, events in draws) / len(draws) == pytest.approx(0.75, abs=0.01)


def test_the_record_head_survives_every_hop_and_the_padding() -> None:
    head = encode_head(1_764_539_000_123_456_789, 42, True, 3)
    value = padded(head, 2_500)
    assert len(value) == 2_500
    assert decode_head(value) == (1_764_539_000_123_456_789, 42, True, 3)
    assert decode_head(padded(value[:HEAD.size], 600)) == (1_764_539_000_123_456_789, 42, True, 3)
    assert len(padded(head, 4)) == HEAD.size  # never shorter than the head


def test_per_request_and_net_of_idle_arithmetic() -> None:
    assert per_request_ms({"router": 0.5, "kafka": 2.0}, 1_000) == {"router": 0.5, "kafka": 2.0}
    assert per_request_ms({"router": 0.5}, 0) == {"router": 500.0}  # no division by zero
    assert net_of_idle(3.0, 0.05, 20.0) == pytest.approx(2.0)
    assert net_of_idle(0.5, 0.05, 20.0) == 0.0  # never negative


def test_cpu_diff_leaves_out_a_backend_that_ended_and_counts_a_new_one_whole() -> None:
    before = {"postgres": {10: 5.0, 11: 80.0}, "router": {20: 1.0}}
    after = {"postgres": {10: 5.5, 12: 0.25}, "router": {20: 1.5}}  # backend 11 ended, 12 started
    assert diff(before, after) == {"postgres": 0.75, "router": 0.5}


def test_percentile_of_sorted_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert percentile([], 0.99) == 0.0


BENCH_REPORT = """\
rate 100 requests/s: HELD
  target        100.0 requests/s = 25.1 visits/s x 3.98 requests per visit (the mix's mean)
  offered        97.3 requests/s (1946 requests due in 20 s, 502 visits arrived)
  achieved       95.2 requests/s (1904 answered inside the window; 1946 with the drain of 1.2 s, 0 never answered)
  stack CPU per request 12.500 ms: gateway 0.100, router 2.200, settle 2.700, clearing 0.750, monitor 0.220, \
smartmon 0.870, kafka 3.700, postgres 1.960 (dashboard restarted: not counted)
"""


def test_parse_bench_takes_the_stack_cpu_per_process_and_the_achieved_rate() -> None:
    fig = parse_bench(BENCH_REPORT)
    assert fig.stack_ms == 12.5
    assert fig.achieved_rps == 95.2
    assert fig.per_process_ms == {"gateway": 0.1, "router": 2.2, "settle": 2.7, "clearing": 0.75, "monitor": 0.22,
                                  "smartmon": 0.87, "kafka": 3.7, "postgres": 1.96}


def test_parse_bench_refuses_a_report_without_cpu() -> None:
    with pytest.raises(ValueError, match="stack CPU per request"):
        parse_bench("rate 100 requests/s: HELD\n")


def test_phase_lines_add_up_and_compare_with_target_and_pipeline() -> None:
    ph = Phase("fixed", 100.0, sent=2_000, answered=2_000, wall_s=20.0, latencies_s=[0.01] * 99 + [0.05],
               cpu_s={"router": 0.4, "engine": 0.4, "clearing": 0.1, "smartmon": 0.1, "kafka": 1.0, "postgres": 0.2},
               cpu_raw_s={"kafka": 1.5, "postgres": 0.2}, generator_cpu_s=0.6,
               relayed={"router": 2_000, "engine": 1_760, "clearing": 500, "smartmon": 500}, load_s=20.0)
    lines = phase_lines(ph, Topology(0.88, 0.25, 1.0), BenchFigures(12.0, {}, 98.0), 10_000)
    assert lines[0] == ("floor at 100 requests/s: sent 2000, answered 2000 in 20.0 s = 100.0 requests/s; "
                        "latency p50 10.0 ms, p99 50.0 ms")
    assert lines[1] == ("  sent in 20.0 s = 100.0 requests/s offered; HELD (p99 <= 100 ms, every request answered, "
                        ">= 95% of the target offered)")
    assert lines[3].startswith("  floor CPU per request 1.100 ms: router 0.200, engine 0.200, clearing 0.050, "
                               "smartmon 0.050, kafka 0.500, postgres 0.100")
    assert "raw kafka 0.750, postgres 0.100" in lines[3]
    assert lines[4] == "  load generator 0.300 ms per request (not counted)"
    assert lines[5] == f"  floor / 0.3 ms target = {1.1 / TARGET_MS:.2f}"
    assert lines[6] == "  floor / pipeline (bench in this run: 12.000 ms at 98.0 requests/s) = 0.09"


def test_held_needs_the_rate_offered_every_answer_and_p99_within_the_bound() -> None:
    def phase(sent: int, answered: int, p99_s: float) -> Phase:
        return Phase("fixed", 5_000.0, sent=sent, answered=answered, wall_s=11.0,
                     latencies_s=[0.002] * 98 + [p99_s] * 2, cpu_s={}, cpu_raw_s={}, generator_cpu_s=0.0, load_s=10.0)

    assert held(phase(50_000, 50_000, 0.09)) == (True, "")
    assert held(phase(47_000, 47_000, 0.09)) == (False, "offered 4700.0/s < 95% of 5000/s")
    assert held(phase(50_000, 49_990, 0.09)) == (False, "10 never answered")
    assert held(phase(50_000, 50_000, 0.15)) == (False, "p99 150.0 ms > 100 ms")


def test_phase_lines_at_saturation_name_the_window() -> None:
    ph = Phase("saturation", None, sent=10, answered=10, wall_s=1.0, latencies_s=[0.1] * 10,
               cpu_s={"router": 0.001}, cpu_raw_s={}, generator_cpu_s=0.0)
    lines = phase_lines(ph, Topology(1.0, 0.0, 0.0), None, 5_000)
    assert lines[0].startswith("floor at saturation (5000 requests in flight): sent 10, answered 10 in 1.0 s")
    assert not any("pipeline" in line for line in lines)
