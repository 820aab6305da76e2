"""The shared metrics: what each record_* helper counts, in which unit, under which bounded labels."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.common import metrics as m


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


ROUTE = {"scope": "cross_province", "visit_type": "inpatient", "insured_prov": "510000", "treating_prov": "150000"}


def test_visit_type_from_med_type() -> None:
    assert [m.visit_type_of(c) for c in ("11", "14", "21", "41", "99")] == [
        "general_outpatient", "chronic_outpatient", "inpatient", "pharmacy", "other"]


def test_ledger_rows_count_person_times_and_yuan_by_route() -> None:
    before = {k: sample("xs_settlements_total", kind=k, **ROUTE) for k in ("settle", "reverse")}
    fund_before = sample("xs_fund_paid_yuan_total", fund="hifp_pay", kind="settle", insured_prov="510000",
                         treating_prov="150000")
    # Callers pass province codes (the region table maps a region to its province; metrics does not import it).
    m.record_ledger_row("settle", "cross_province", "21", "510000", "150000", {"hifp_pay": 2124000, "maf_pay": 0})
    assert sample("xs_settlements_total", kind="settle", **ROUTE) == before["settle"] + 1
    # The reversal series exists (at its old value) as soon as a settlement does: settle − reverse is defined.
    assert REGISTRY.get_sample_value("xs_settlements_total", {"kind": "reverse", **ROUTE}) == before["reverse"]
    assert sample("xs_fund_paid_yuan_total", fund="hifp_pay", kind="settle", insured_prov="510000",
                  treating_prov="150000") == pytest.approx(fund_before + 21240.00)
    m.record_ledger_row("reverse", "cross_province", "21", "510000", "150000", {"hifp_pay": -2124000})
    assert sample("xs_settlements_total", kind="reverse", **ROUTE) == before["reverse"] + 1
    assert sample("xs_fund_paid_yuan_total", fund="hifp_pay", kind="reverse", insured_prov="510000",
                  treating_prov="150000") >= 21240.00


def test_unexpected_values_fall_back_to_fixed_labels() -> None:
    m.record_ledger_row("bogus", "elsewhere", "77", "510421", "12", {"surprise": 100})  # not province codes
    labels = {"kind": "other", "scope": "unknown", "visit_type": "other", "insured_prov": "unknown",
              "treating_prov": "unknown"}
    assert sample("xs_settlements_total", **labels) >= 1
    assert sample("xs_fund_paid_yuan_total", fund="other", kind="other", insured_prov="unknown",
                  treating_prov="unknown") >= 1.0


def test_settlement_request_outcomes() -> None:
    def outcome(infno: str, scope: str, visit_type: str, out: str) -> float:
        return sample("xs_settlement_requests_total", infno=infno, scope=scope, visit_type=visit_type, outcome=out)

    base = [outcome("2304", "intra_province", "inpatient", "settled"),
            outcome("2305", "intra_province", "inpatient", "reversed"),
            outcome("2304", "cross_province", "inpatient", "FILING_REQUIRED"),
            outcome("2207", "cross_province", "chronic_outpatient", "settled"),
            outcome("2208", "cross_province", "outpatient", "OTHER")]
    m.record_settlement_request("2304", "intra_province", "ok", "21")
    m.record_settlement_request("2305", "intra_province", "ok")
    m.record_settlement_request("2304", "cross_province", "FILING_REQUIRED")
    m.record_settlement_request("2207", "cross_province", "ok", "14")
    m.record_settlement_request("2208", "cross_province", "NOT_A_CODE")
    m.record_settlement_request("2401", "cross_province", "ok")  # not a settlement: ignored
    assert [outcome("2304", "intra_province", "inpatient", "settled"),
            outcome("2305", "intra_province", "inpatient", "reversed"),
            outcome("2304", "cross_province", "inpatient", "FILING_REQUIRED"),
            outcome("2207", "cross_province", "chronic_outpatient", "settled"),
            outcome("2208", "cross_province", "outpatient", "OTHER")] == [b + 1 for b in base]
    assert REGISTRY.get_sample_value("xs_settlement_requests_total", {
        "infno": "2401", "scope": "cross_province", "visit_type": "inpatient", "outcome": "settled"}) is None


def test_manual_claims_deposits_and_positions() -> None:
    key = {"insured_prov": "350000", "treating_prov": "150000", "scope": "cross_province", "visit_type": "inpatient"}
    before = sample("xs_manual_claims_total", **key)
    m.record_manual_claim("350000", "150000", "cross_province", "inpatient")
    m.record_manual_claim("350000", "150000", "cross_province", "21")  # a med_type code works too
    assert sample("xs_manual_claims_total", **key) == before + 2
    m.set_deposit("150000", 12_345_678, 10_000_000)
    assert sample("xs_deposit_balance_yuan", insured_prov="150000") == pytest.approx(123456.78)
    assert sample("xs_deposit_warning_line_yuan", insured_prov="150000") == pytest.approx(100000.00)
    m.set_clearing_position("510000", "150000", "hifp_pay", -1234)
    m.set_clearing_position("510000", "150000", "fund_pay_sumamt", 99)
    assert sample("xs_clearing_position_yuan", insured_prov="510000", treating_prov="150000",
                  fund="hifp_pay") == pytest.approx(-12.34)
    assert sample("xs_clearing_position_yuan", insured_prov="510000", treating_prov="150000",
                  fund="fund_pay_sumamt") == pytest.approx(0.99)


def test_kafka_health_helpers() -> None:
    before = sample("xs_kafka_rebalances_total", group="g-unit")
    m.record_rebalance("g-unit", 3)
    assert sample("xs_kafka_rebalances_total", group="g-unit") == before + 1
    assert sample("xs_kafka_assigned_partitions", group="g-unit") == 3
    m.record_produce_error("fsi.replies")
    assert sample("xs_kafka_produce_errors_total", topic="fsi.replies") >= 1


def test_stage_dead_letters_exist_at_zero_for_every_code() -> None:
    m.init_stage("unit")
    for code in ("FILING_REQUIRED", "MSGID_MALFORMED", "OTHER"):
        assert REGISTRY.get_sample_value("xs_dead_letters_total", {"stage": "unit", "reason": code}) == 0.0


def test_names_and_label_names_follow_conventions() -> None:
    forbidden = {"psn_no", "setl_id", "mdtrt_id", "msgid", "certno", "psn_name", "claim_id"}
    seen = 0
    for family in REGISTRY.collect():
        if not family.name.startswith("xs_"):
            continue
        seen += 1
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples) or not family.samples, family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        assert not any(family.name.endswith(u) for u in ("_ms", "_milliseconds", "_fen")), family.name
        for s in family.samples:
            assert not forbidden & set(s.labels), (family.name, s.labels)
            assert not s.name.endswith("_created"), s.name
    assert seen >= 15


def test_latency_buckets_span_milliseconds_to_seconds() -> None:
    assert m.LATENCY_BUCKETS_S[0] <= 0.001 and m.LATENCY_BUCKETS_S[-1] >= 10
    assert list(m.LATENCY_BUCKETS_S) == sorted(m.LATENCY_BUCKETS_S)


def test_metrics_do_not_load_the_region_table() -> None:
    """Layering: shared metrics take province codes from their callers and import no reference data."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, services.common.metrics; "
                          "print(sorted(m for m in sys.modules if m.startswith('services.refdata')))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
