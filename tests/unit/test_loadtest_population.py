"""The load generator's pure parts: scenario picking, fee lines, error codes, percentiles, histograms."""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta
from decimal import Decimal

from loadtest.bench import Hist, _psn_no
from loadtest.his import FeeLine, Hospital, Stay
from loadtest.population import (
    INPATIENT_ONLY,
    CatalogInfo,
    HospitalInfo,
    PersonInfo,
    Population,
    Scenario,
    error_code,
    fee_lines,
    percentile,
)
from services.refdata.regions import SEED_REGIONS, classify_scope, region_of
from services.refdata.store import Filing

NOW = datetime(2026, 11, 23, 10, 0, 0)


def _hospital(code: str, admdvs: str, lv: int = 3) -> HospitalInfo:
    r = region_of(admdvs)
    return HospitalInfo(Hospital(code, "医院", admdvs), admdvs, lv, r.prov_admdvs, r.pool_admdvs)


def _catalog() -> dict[str, list[CatalogInfo]]:
    items = [
        CatalogInfo("XJ01CAA040A001001", "01", None),
        CatalogInfo("XC10AAA055A001001", "02", None),
        CatalogInfo("XA11JAV008A001001", "03", None),
        CatalogInfo("002201000010000", "01", 6000),
        CatalogInfo("C1401010020100200001", "02", 720_000),
        CatalogInfo("ZA06AAL001A001001", "01", None),
        CatalogInfo("001103000010000", "01", None),
        CatalogInfo("003105010010000", "02", 18_000),
    ] * 2  # 16 entries, so 15 distinct picks are possible
    return {"150000": items[:], "510000": items[:], "110000": items[:]}


def _population(filings: dict[str, list[Filing]] | None = None) -> Population:
    hospitals = [
        _hospital("H15040000001", "150400"),  # seed region 赤峰
        _hospital("H15010000001", "150100"),  # 呼和浩特: intra-province for 赤峰 persons
        _hospital("H11010100001", "110101"),  # 北京: cross-province
        _hospital("H51010000001", "510100"),  # 成都: neither side is a seed region for 北京 persons
    ]
    persons = [PersonInfo(f"P150400{i:08d}", "150400", "390") for i in range(1, 6)]
    persons += [PersonInfo(f"P110101{i:08d}", "110101", "310") for i in range(1, 3)]
    return Population(hospitals, persons, filings or {}, _catalog())


def test_scenarios_have_consistent_scope_and_a_seed_side() -> None:
    pop = _population()
    rng = random.Random(1)
    seen = set()
    for _ in range(300):
        scn = pop.scenario(rng, now=NOW, kinds=INPATIENT_ONLY)
        assert scn is not None
        pop.release(scn)
        assert scn.scope == classify_scope(scn.person.insuplc, scn.hospital.admdvs)
        assert scn.hospital.admdvs in SEED_REGIONS or scn.person.insuplc in SEED_REGIONS
        seen.add(scn.scope)
        lines = [line for upload in scn.uploads for line in upload]
        assert 3 <= len(lines) <= 15
        assert len(scn.uploads) in (1, 2)
        codes = {c.code for c in pop.catalog[scn.hospital.prov]}
        assert all(line.med_list_codg in codes for line in lines)
        if scn.scope == "local":
            assert scn.filing == "local"
        assert (scn.expect_refusal == "FILING_REQUIRED") == (scn.filing == "unfiled")
        settle_at = scn.start + timedelta(days=3, hours=1)
        assert NOW - timedelta(hours=12) < settle_at <= NOW
        assert scn.start + timedelta(days=3, hours=2) <= NOW  # the reversal too: inf_time is never ahead
    assert seen == {"local", "intra_province", "cross_province"}


def test_busy_persons_are_not_picked_twice() -> None:
    pop = _population()
    rng = random.Random(2)
    taken: list[Scenario] = []
    while (scn := pop.scenario(rng, now=NOW, kinds=INPATIENT_ONLY)) is not None:
        assert scn.person.psn_no not in {s.person.psn_no for s in taken}
        taken.append(scn)
        if len(taken) > 50:
            break
    assert len(taken) <= len(pop.persons)
    for scn in taken:
        pop.release(scn)
    assert not pop.busy


def test_filed_persons_need_no_promise_and_promises_are_remembered() -> None:
    filed = PersonInfo("P15040000000001", "150400", "390")
    filing = Filing("F1", "LONG_TERM", date(2026, 1, 1), date(2026, 12, 31), "110000")
    pop = _population({filed.psn_no: [filing]})
    rng = random.Random(3)
    for _ in range(400):
        scn = pop.scenario(rng, now=NOW, kinds=INPATIENT_ONLY)
        assert scn is not None
        pop.release(scn)
        if scn.person.psn_no == filed.psn_no and scn.hospital.prov == "110000":
            assert scn.filing == "filed"
        if scn.filing in ("promise", "emergency"):
            # The router makes a filing on the spot when it accepts the admission; from then on it is known.
            assert scn.on_admitted is not None
            scn.on_admitted()
            assert pop.filing_status(scn.person, scn.hospital.prov, NOW.date())
        else:
            assert scn.on_admitted is None


def test_a_day_mixes_visit_types() -> None:
    pop = _population()
    pop.pharmacies = [_hospital("P15040000001", "150400")]
    pop.pharmacy_pairs = pop._pairs(pop.pharmacies)
    pop.groups["150400"][0] = PersonInfo("P15040000000001", "150400", "390", ("DM",))
    rng = random.Random(5)
    kinds = []
    for _ in range(400):
        scn = pop.scenario(rng, now=NOW)
        assert scn is not None
        pop.release(scn)
        kinds.append(scn.kind)
        lines = [line for upload in scn.uploads for line in upload]
        if scn.kind == "pharmacy":
            assert scn.hospital.his.fixmedins_code.startswith("P") and 1 <= len(lines) <= 4
            assert not scn.resettle
        else:
            assert scn.hospital.his.fixmedins_code.startswith("H")
        if scn.kind == "chronic":
            assert scn.chronic_disease in scn.person.chronic
        if scn.kind in ("outpatient", "chronic"):
            assert 1 <= len(lines) <= 5 and NOW - timedelta(hours=2) < scn.start <= NOW
        assert scn.filing != "emergency" or scn.kind == "inpatient"
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert set(counts) == {"outpatient", "chronic", "inpatient", "pharmacy"}
    assert counts["outpatient"] > counts["inpatient"]  # most visits are outpatient


def test_fee_lines_are_exact_two_decimal_amounts() -> None:
    rng = random.Random(4)
    items = _catalog()["150000"]
    for n in (3, 8, 15):
        lines = fee_lines(rng, items, n)
        assert len(lines) == n
        assert len({line.med_list_codg for line in lines}) <= n
        for line in lines:
            assert line.cnt == line.cnt.to_integral_value() and line.cnt >= 1
            assert line.pric > 0 and line.pric == line.pric.quantize(Decimal("0.01"))
            assert line.amount == line.cnt * line.pric


def test_error_code() -> None:
    assert error_code({"infcode": 0, "err_msg": ""}) == "ok"
    assert error_code({"infcode": -1, "err_msg": "FILING_REQUIRED: non-local care needs ..."}) == "FILING_REQUIRED"
    assert error_code({"infcode": -1, "err_msg": "something odd"}) == "UNKNOWN"
    assert error_code({"infcode": -1}) == "UNKNOWN"


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    random.Random(5).shuffle(values)
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) != percentile([], 50)  # nan


def test_histogram_quantile_interpolates_and_subtracts() -> None:
    before = Hist({0.01: 10, 0.1: 10, float("inf"): 10}, 10, 0.05)
    after = Hist({0.01: 10, 0.1: 110, float("inf"): 110}, 110, 5.05)
    d = after.minus(before)
    assert d.count == 100 and abs(d.total - 5.0) < 1e-9
    assert abs(d.quantile(0.5) - 0.055) < 1e-9  # half-way through the (0.01, 0.1] bucket
    assert d.quantile(1.0) == 0.1


def test_kafka_key_is_the_person() -> None:
    stay = Stay(Hospital("H15040000001", "医院", "150400"), "P15040000000001", "150400", "390", NOW)
    stay.mdtrt_id, stay.setl_id = "M1", "S1"
    envelopes = [stay.admit(), stay.upload([FeeLine("X", Decimal(1), Decimal("1.00"))]), stay.discharge(),
                 stay.settle(pre=True), stay.settle(), stay.reverse()]
    assert {_psn_no(e) for e in envelopes} == {"P15040000000001"}
