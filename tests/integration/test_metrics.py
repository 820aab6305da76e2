"""Metrics of every service on the real stack: counts follow the ledger, labels stay bounded
and free of personal identifiers, the monitor sees Kafka lag and the month's ledger figures."""

from __future__ import annotations

import re
import urllib.request

import asyncpg
import msgspec
import pytest

from deploy.services import service_specs
from loadtest.his import GatewayClient, Stay
from schemas.codes import MED_TYPE_PHARMACY
from services.clearing.cli import submit_claims
from services.clearing.store import rates_recomputed
from services.common.config import Settings
from services.common.tls import client_session
from services.monitor.ledger import month_bounds
from tests.integration.conftest import Ledger
from tests.integration.monitoring_data import (
    CHIFENG,
    INSURED,
    INSURED_PROV,
    INTRA_KEY,
    RETRY_FOR_S,
    SUZHOU,
    TREATING_CROSS_PROV,
    Samples,
    Traffic,
    claims_in,
    ensure_traffic,
    exclusive,
    lines,
    manual_claim,
    mpsn,
    scrape,
    stay_start,
    value,
    wait_for,
)

pytestmark = pytest.mark.integration

FUNDS = ("hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay")
CROSS = {"insured_prov": INSURED_PROV, "treating_prov": TREATING_CROSS_PROV, "scope": "cross_province",
         "visit_type": "inpatient"}


@pytest.fixture(scope="module")
async def traffic(refdata: dict, services: Settings, db: asyncpg.Pool, tmp_path_factory: pytest.TempPathFactory):
    return await ensure_traffic(services, db, tmp_path_factory.mktemp("monitoring-refdata"))


async def _snapshot(s: Settings) -> dict[str, Samples]:
    out = {}
    for name, port in (("settle", s.settle_metrics_port), ("gateway", s.gateway_metrics_port),
                       ("clearing", s.clearing_metrics_port)):
        out[name] = (await scrape(port))[1]
    return out


def _start_times(snap: dict[str, Samples]) -> dict[str, float]:
    return {name: value(samples, "process_start_time_seconds") for name, samples in snap.items()}


async def test_settlements_reversals_and_funds_follow_the_ledger(traffic: object, services: Settings,
                                                                  db: asyncpg.Pool, ledger: Ledger) -> None:
    """One intra-province and one cross-province stay, the second reversed: the settle service's counters
    move by exactly what the ledger recorded."""
    async with exclusive(db, "counters"):
        await _settle_and_compare(services, ledger)


async def _settle_and_compare(services: Settings, ledger: Ledger) -> None:
    intra_n, cross_n = 10, 25
    before = await _snapshot(services)
    async with client_session(services) as session:
        client = GatewayClient(services.gateway_url, session, retry_for_s=RETRY_FOR_S)
        intra = Stay(SUZHOU, mpsn(intra_n), INSURED, "390", stay_start(70))
        r1 = await client.run_stay(intra, lines(intra_n))
        cross = Stay(CHIFENG, mpsn(cross_n), INSURED, "390", stay_start(70))
        r2 = await client.run_stay(cross, lines(cross_n), reverse=True)
    assert r1["infcode"] == 0 and r2["infcode"] == 0, (r1["err_msg"], r2["err_msg"])
    after = await _snapshot(services)
    assert _start_times(before) == _start_times(after), "a service restarted during the test"
    s0, s1 = before["settle"], after["settle"]

    def delta(name: str, a: Samples = s0, b: Samples = s1, /, **labels: str) -> float:
        return value(b, name, **labels) - value(a, name, **labels)

    assert delta("xs_settlements_total", kind="settle", **INTRA_KEY) == 1
    assert delta("xs_settlements_total", kind="reverse", **INTRA_KEY) == 0
    assert delta("xs_settlements_total", kind="settle", **CROSS) == 1
    assert delta("xs_settlements_total", kind="reverse", **CROSS) == 1
    rows = await ledger.fetch("SELECT kind, " + ", ".join(FUNDS) + " FROM settlement WHERE mdtrt_id = $1",
                              cross.mdtrt_id)
    assert sorted(r["kind"] for r in rows) == ["reverse", "settle"]
    for row in rows:
        for fund in FUNDS:
            got = delta("xs_fund_paid_yuan_total", fund=fund, kind=row["kind"], insured_prov=INSURED_PROV,
                        treating_prov=TREATING_CROSS_PROV)
            assert got == pytest.approx(abs(row[fund]) / 100), (fund, row["kind"])
    # The run owns its services and tests run one at a time: nothing else moves these counters.
    assert delta("xs_settlement_requests_total", infno="2304", scope="intra_province", visit_type="inpatient",
                 outcome="settled") == 1
    assert delta("xs_settlement_requests_total", infno="2305", scope="cross_province", visit_type="inpatient",
                 outcome="reversed") == 1
    assert delta("xs_settlement_end_to_end_seconds_count", infno="2304") == 2
    g0, g1 = before["gateway"], after["gateway"]
    assert delta("xs_gateway_request_seconds_count", g0, g1, infno="2304") == 2
    assert delta("xs_requests_total", g0, g1, stage="gateway", infno="2305", outcome="ok") == 1


async def test_refusals_counted_by_error_code_and_scope(traffic: object, services: Settings) -> None:
    before = (await scrape(services.settle_metrics_port))[1]
    async with client_session(services) as session:
        client = GatewayClient(services.gateway_url, session, retry_for_s=RETRY_FOR_S)
        stay = Stay(SUZHOU, mpsn(36), INSURED, "390", stay_start())
        r = await client.run_stay(stay, lines(36))
    assert r["err_msg"].startswith("FILING_REQUIRED")
    after = (await scrape(services.settle_metrics_port))[1]
    assert value(after, "process_start_time_seconds") == value(before, "process_start_time_seconds")
    labels = {"infno": "2304", "scope": "intra_province", "visit_type": "inpatient", "outcome": "FILING_REQUIRED"}
    assert value(after, "xs_settlement_requests_total", **labels) - value(
        before, "xs_settlement_requests_total", **labels) == 1
    dl = {"stage": "router", "reason": "FILING_REQUIRED"}
    assert value(after, "xs_dead_letters_total", **dl) - value(before, "xs_dead_letters_total", **dl) == 1


async def test_manual_claims_counted_once(traffic: object, services: Settings, db: asyncpg.Pool,
                                          ledger: Ledger) -> None:
    """The clearing service counts each manual claim it records (the rate's denominator) once, however often
    it is submitted, and the monitor exports the month's count from the ledger, the same as the clearing
    service's rate query."""
    # Its own claims, on a line no other test counts (intra-province pharmacy): the session's traffic may
    # be older than the clearing process (a fault test may have restarted it since), its counts not.
    own = [msgspec.structs.replace(manual_claim(30 + n, 900 + n), med_type=MED_TYPE_PHARMACY) for n in range(3)]
    key = {**INTRA_KEY, "visit_type": "pharmacy"}
    _, before = await scrape(services.clearing_metrics_port)
    await submit_claims(services, own[:2], operator="test.metrics")
    await submit_claims(services, [*own[:2], own[0]], operator="test.metrics")  # resent: not counted again
    # Same person as own[0], so the same partition: once it is recorded the resent claims were read before it.
    await submit_claims(services, [msgspec.structs.replace(own[2], psn_no=own[0].psn_no)], operator="test.metrics")
    await wait_for("the claims recorded", lambda: claims_in(db, [c.claim_id for c in own]), 60, 0.5)
    _, after = await scrape(services.clearing_metrics_port)
    assert value(after, "process_start_time_seconds") == value(before, "process_start_time_seconds"), \
        "the clearing service restarted during the test"
    assert value(after, "xs_manual_claims_total", **key) - value(before, "xs_manual_claims_total", **key) == 3
    start, end = month_bounds()

    async def monitor_matches() -> bool:
        lines_ = {(x["insured_prov"], x["treating_prov"], x["scope"], x["visit_type"]): x
                  for x in await rates_recomputed(db, ledger.shards, start.date(), end.date())}  # type: ignore[arg-type]
        want = lines_[(INSURED_PROV, INSURED_PROV, "intra_province", "inpatient")]
        _, mon = await scrape(services.monitor_metrics_port)
        return (value(mon, "xs_ledger_month_person_times", kind="manual", **INTRA_KEY) == want["manual"]
                and value(mon, "xs_ledger_month_person_times", kind="direct", **INTRA_KEY) == want["direct"])

    await wait_for("the monitor's month figures to match the ledger", monitor_matches, timeout=30)


async def test_monitor_reports_consumer_lag_and_targets(traffic: object, services: Settings) -> None:
    _, mon = await scrape(services.monitor_metrics_port)
    groups = {dict(labels)["group"] for (name, labels) in mon if name == "xs_kafka_consumer_lag_messages"}
    assert "xsettle-settle" in groups and "xsettle-router" not in groups  # one consumer of fsi.ingress
    assert any(g.startswith("xsettle-clearing") for g in groups)
    partitions = {dict(labels)["partition"] for (name, labels) in mon
                  if name == "xs_kafka_consumer_lag_messages" and dict(labels)["group"] == "xsettle-settle"}
    assert len(partitions) == 8
    assert value(mon, "xs_direct_settlement_target_ratio", insured_prov="150000", scope="cross_province",
                 visit_type="inpatient") == 0.70
    _, settle = await scrape(services.settle_metrics_port)
    assert value(settle, "xs_kafka_rebalances_total", group="xsettle-settle") >= 1


# Label values must come from bounded code sets; no label may carry a person, visit or settlement id.
BOUNDED = {
    "insured_prov": r"\d{2}0000|unknown", "treating_prov": r"\d{2}0000|unknown",
    "scope": r"local|intra_province|cross_province|unknown",
    "visit_type": r"inpatient|general_outpatient|chronic_outpatient|pharmacy|outpatient|other",
    "kind": r"settle|reverse|direct|manual|other", "infno": r"\d{4}|unknown|[a-z_]+",
    "outcome": r"[A-Z_]+|ok|duplicate|settled|reversed", "reason": r"[A-Z_]+", "stage": r"[a-z0-9_]+",
    "fund": r"hifp_pay|hifmi_pay|hifob_pay|maf_pay|fund_pay_sumamt|other",
    "partition": r"\d{1,3}", "group": r"[a-z][a-z0-9.-]*", "topic": r"[a-z][a-z0-9._-]*",
}
FORBIDDEN_LABELS = {"psn_no", "setl_id", "mdtrt_id", "msgid", "certno", "psn_name", "claim_id", "fixmedins_code"}


async def test_labels_bounded_and_free_of_personal_identifiers(traffic: Traffic, services: Settings) -> None:
    ids = {p for stay in (*traffic.intra, *traffic.cross) for p in (stay.psn_no, stay.mdtrt_id, stay.setl_id)}
    ids |= {c.claim_id for c in traffic.claims}
    for spec in service_specs(services):
        text, samples = await scrape(spec.ready_port)
        leaked = [i for i in ids if i and i in text]
        assert not leaked, f"{spec.name} exposes identifiers in /metrics"
        for (name, labels) in samples:
            if not name.startswith("xs_"):
                continue
            for key, val in labels:
                assert key not in FORBIDDEN_LABELS, (spec.name, name, key)
                pattern = BOUNDED.get(key)
                if pattern is not None:
                    assert re.fullmatch(pattern, val), (spec.name, name, key, val)


def test_metric_names_follow_conventions(services: Settings) -> None:
    """Counters end in _total, durations are _seconds histograms, money is _yuan; no millisecond units."""
    types: dict[str, str] = {}
    for spec in service_specs(services):
        with urllib.request.urlopen(f"http://127.0.0.1:{spec.ready_port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                m = re.match(r"# TYPE (xs_\w+) (\w+)", line)
                if m:
                    types[m.group(1)] = m.group(2)
    assert {"xs_settlements_total", "xs_manual_claims_total", "xs_kafka_consumer_lag_messages",
            "xs_gateway_request_seconds", "xs_deposit_balance_yuan"} <= set(types)
    for name, kind in types.items():
        assert not re.search(r"_(ms|milliseconds|fen)(_|$)", name), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        if "yuan" in name:
            assert name.endswith(("_yuan", "_yuan_total")), name
