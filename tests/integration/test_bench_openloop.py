"""The open-loop benchmark against the run's real pipeline, via Kafka and via HTTP: a short run at a low
rate whose report adds up (bounded: 3 s of load, at most 10 s of drain). It proves the tool, not a rate:
the machine is shared, so whether the rate is held is not asserted."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import asyncpg
import msgspec
import pytest

from loadtest.bench import GeneratorPool, KafkaCaller, cpu_snapshot, generator_shares, open_report
from loadtest.demo import HttpCaller
from loadtest.his import GatewayClient, Hospital
from loadtest.openloop import arrival_offsets, quantiles_ms, requests_per_visit, run_open_loop
from loadtest.population import NATIONAL_MIX, Population, _population
from services.common.config import Settings
from services.common.tls import client_session
from tests.integration.conftest import ITEM_A, ITEM_B10, ITEM_C, ITEM_CEIL, issue_keys, psn, wait_router_knows

# This test's own institutions and persons (local residents of 赤峰, every fifth eligible for chronic care
# of diabetes), one group per ingress path so that the visits one run leaves open do not meet the other's.
HOSPITAL = Hospital("H15040099930", "赤峰测试压测医院", "150400", live_clock=True)
PHARMACY = Hospital("P15040099930", "赤峰测试压测药房", "150400", live_clock=True)
PERSONS = {"kafka": [psn(800 + i) for i in range(40)], "http": [psn(840 + i) for i in range(40)],
           "processes": [psn(600 + i) for i in range(40)]}  # 880+ met test_ops's psn(900)
# Two generator processes: institutions of their own (each process signs its own in).
POOL_HOSPITALS = [Hospital(f"H1504009993{i}", f"赤峰测试压测医院{i}", "150400", live_clock=True) for i in (1, 2)]
RATE, SECONDS, DRAIN = 20.0, 3.0, 10.0


def _write(directory: Path) -> None:
    enc = msgspec.json.Encoder()
    hospitals = [{"fixmedins_code": h.fixmedins_code, "fixmedins_name": h.fixmedins_name, "admdvs": h.admdvs,
                  "hosp_lv": 1 if h is PHARMACY else 3} for h in (HOSPITAL, PHARMACY, *POOL_HOSPITALS)]
    persons = [{"psn_no": p, "insuplc_admdvs": "150400", "insutype": "390", "psn_type": "1501", "assistance": None,
                "acct_balc": "0.00", "chronic": ["DM"] if i % 5 == 0 else [], "certno": None}
               for group in PERSONS.values() for i, p in enumerate(group)]
    (directory / "hospitals.jsonl").write_bytes(b"\n".join(enc.encode(r) for r in hospitals) + b"\n")
    (directory / "persons.jsonl").write_bytes(b"\n".join(enc.encode(r) for r in persons) + b"\n")
    for name in ("filings", "catalog"):  # the catalog: the run's test items, loaded by the refdata fixture
        (directory / f"{name}.jsonl").write_bytes(b"")


@pytest.fixture(scope="module")
async def bench_data(refdata: dict, db: asyncpg.Pool, services: Settings,
                     tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from services.refdata.load import load_dir

    directory = tmp_path_factory.mktemp("bench-refdata")
    _write(directory)
    await load_dir(db, directory, operator="test.loader")
    await issue_keys(services, db, [h.fixmedins_code for h in (HOSPITAL, PHARMACY, *POOL_HOSPITALS)])
    for group in PERSONS.values():
        await wait_router_knows(services, HOSPITAL, group[-1], "150400")
    return services


async def _population_of(s: Settings, via: str) -> Population:
    return await _population(s, [HOSPITAL.fixmedins_code, PHARMACY.fixmedins_code], PERSONS[via],
                             [ITEM_A, ITEM_B10, ITEM_C, ITEM_CEIL])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("via", ["kafka", "http"])
async def test_open_loop_at_a_low_rate_reports_numbers_that_add_up(bench_data: Settings, via: str) -> None:
    s = bench_data
    pop = await _population_of(s, via)
    assert len(pop.persons) == 40 and len(pop.hospitals) == 1 and len(pop.pharmacies) == 1
    per_visit = requests_per_visit(pop, NATIONAL_MIX, "national", seed=14)
    session = client_session(s, limit=64) if via == "http" else None
    caller = HttpCaller(s.gateway_url, session, timeout_s=10) if session else KafkaCaller(s, 3, timeout_s=10)
    try:
        if isinstance(caller, KafkaCaller):
            await caller.start()
        cpu0 = cpu_snapshot(s)
        res = await run_open_loop(caller, pop, rate=RATE, seconds=SECONDS, arrivals="constant", kinds=NATIONAL_MIX,
                                  mix="national", max_requests=1000, drain_s=DRAIN, seed=14, per_visit=per_visit)
        cpu = (cpu0, cpu_snapshot(s))
    finally:
        if isinstance(caller, KafkaCaller):
            await caller.stop()
        if session is not None:
            await session.close()
    st = res.stats
    # visits arrived on the schedule, whatever the answers
    assert res.arrivals == len(list(arrival_offsets(RATE / per_visit, SECONDS, "constant", random.Random(0))))
    assert res.skipped == 0 and not res.capped and res.unreachable is None
    # every request sent was answered, once, and is in the histograms
    assert res.unanswered == 0
    assert res.offered == st.requests() == quantiles_ms(res.book.overall)["count"]
    assert sum(quantiles_ms(h)["count"] for h in res.book.families.values()) == res.offered
    assert sum(st.outcomes.values()) == res.offered
    assert res.answered_in_window <= res.offered
    # the rates: nothing achieved beyond what was offered; offered near the target (small counts: wide slack)
    assert res.achieved_rps <= res.offered_rps <= 2 * RATE
    assert res.offered_rps >= 0.3 * RATE
    # the real pipeline answered every visit without an unexpected error; visits end done or cut at the end
    assert not res.errors(), res.errors()
    assert set(st.stay_outcomes) <= {"done", "cut"}
    assert sum(st.stay_outcomes.values()) == res.arrivals
    assert st.settled == sum(st.settled_by_kind.values()) > 0
    assert not pop.busy
    lines = open_report(res, cpu, SECONDS + st.drain_s, 100.0)
    assert lines[0].startswith(f"rate {RATE:g} requests/s: ")
    assert any(line.startswith("  stack CPU per request ") and "settle" in line and "kafka" in line
               for line in lines)
    assert any(line.startswith("  load generator (this process): ") for line in lines)


@pytest.mark.timeout(240)
async def test_two_generator_processes_share_the_rate_and_their_numbers_merge(bench_data: Settings) -> None:
    """--processes 2 via Kafka: two spawned processes, each half the rate with its own hospital and persons and
    its own reply partition; the merged result counts every request once."""
    s = bench_data
    pop = await _population(s, [h.fixmedins_code for h in POOL_HOSPITALS], PERSONS["processes"],
                            [ITEM_A, ITEM_B10, ITEM_C, ITEM_CEIL])
    assert len(pop.hospitals) == 2 and not pop.pharmacies
    per_visit = requests_per_visit(pop, NATIONAL_MIX, "national", seed=15)
    args = argparse.Namespace(processes=2, via="kafka", reply_partition=2, request_timeout=10.0, http_connections=64)
    assert GatewayClient.default_signer is not None  # the run's HIS signer, with the keys issued above
    shares = generator_shares(pop, GatewayClient.default_signer, args, s.gateway_instance)
    assert [{h.his.fixmedins_code for h in share.places} for share in shares] == [
        {h.fixmedins_code} for h in POOL_HOSPITALS]
    pool = GeneratorPool(shares)
    try:
        await pool.start()
        res = await pool.run(rate=RATE, seconds=SECONDS, arrivals="constant", kinds=NATIONAL_MIX, mix="national",
                             max_requests=1000, drain_s=DRAIN, seed=15, per_visit=per_visit)
    finally:
        await pool.stop()
    assert all(not proc.is_alive() for proc in pool.procs)
    st = res.stats
    assert res.target_rps == RATE and len(res.generator_cpu_s) == 2 and all(c > 0 for c in res.generator_cpu_s)
    # each process's visits arrived on its schedule (half the rate each)
    each = len(list(arrival_offsets(RATE / per_visit / 2, SECONDS, "constant", random.Random(0))))
    assert res.arrivals == 2 * each
    assert res.skipped == 0 and not res.capped and res.unreachable is None
    # every request sent by either process was answered once, and is in the merged histograms
    assert res.unanswered == 0
    assert res.offered == st.requests() == quantiles_ms(res.book.overall)["count"] == sum(st.outcomes.values())
    assert sum(quantiles_ms(h)["count"] for h in res.book.families.values()) == res.offered
    assert not res.errors(), res.errors()
    assert set(st.stay_outcomes) <= {"done", "cut"} and sum(st.stay_outcomes.values()) == res.arrivals
    assert st.settled == sum(st.settled_by_kind.values()) > 0
    lines = open_report(res, (cpu_snapshot(s), cpu_snapshot(s)), SECONDS + st.drain_s, 100.0)
    assert any(line.startswith("  load generator (2 processes): ") for line in lines)
