"""The router's pure decisions: scope, filing, promise system, catalog enrichment, filing transactions."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pytest

from loadtest.his import FeeLine, Hospital, Stay
from schemas.codec import Request, decode_envelope, decode_request, encode
from schemas.errors import BrokerError
from services.refdata.store import CatalogEntry, Filing, Person, RefData
from services.refdata.store import Hospital as HospitalRef
from services.router.logic import (
    ForwardClearing,
    IngressMeta,
    PersonQuery,
    RefdataChange,
    Routed,
    route,
)

META = IngressMeta(reply_topic="fsi.replies", reply_partition=0, received_ns=0)
CHIFENG = Hospital("H15040000001", "赤峰市医院", "150400")
MIYI = Hospital("H51042100001", "米易县人民医院", "510421")


def refdata(filings: list[Filing] | None = None) -> RefData:
    ref = RefData()
    ref.hospitals = {CHIFENG.fixmedins_code: HospitalRef("150400", 3, "赤峰市医院"),
                     MIYI.fixmedins_code: HospitalRef("510421", 2, "米易县人民医院")}
    ref.persons = {"P1": Person("510421", "390", "1501", None, 0, frozenset(), "510421199001011234", "x")}
    ref.persons_by_cert = {"510421199001011234": "P1"}
    ref.filings = {"P1": filings or []}
    ref.catalog = {(prov, "A1"): CatalogEntry("01", Decimal(0), None, "甲") for prov in ("150000", "510000")}
    return ref


def decide(env: dict[str, Any], ref: RefData) -> Any:
    return route(decode_request(encode(env)), ref, META, fee_items_max=10)


def stay(hospital: Hospital = CHIFENG, **kw: Any) -> Stay:
    s = Stay(hospital, "P1", "510421", "390", datetime(2026, 5, 1, 8), **kw)
    s.mdtrt_id = "M1"
    return s


def test_scope_and_local_needs_no_filing() -> None:
    s = stay(MIYI)
    s.fees = [FeeLine("A1", Decimal(1), Decimal(10))]
    decision = decide(s.settle(), refdata())
    assert isinstance(decision, Routed)
    assert (decision.request.scope, decision.request.filing_type) == ("local", None)
    assert decision.request.person.insured_pool == "510400"


def test_cross_province_settlement_needs_a_filing_but_admission_does_not() -> None:
    s = stay()
    s.fees = [FeeLine("A1", Decimal(1), Decimal(10))]
    with pytest.raises(BrokerError) as e:
        decide(s.settle(), refdata())
    assert e.value.code == "FILING_REQUIRED" and "P1" not in e.value.err_msg
    admitted = decide(s.admit(), refdata())
    assert isinstance(admitted, Routed) and admitted.request.scope == "cross_province"


def test_filing_must_cover_the_treating_province_and_date() -> None:
    s = stay()
    s.fees = [FeeLine("A1", Decimal(1), Decimal(10))]
    elsewhere = Filing("f1", "LONG_TERM", date(2026, 1, 1), date(2026, 12, 31), "440000", "refdata", False)
    expired = Filing("f2", "REFERRAL", date(2025, 1, 1), date(2025, 12, 31), "150000", "refdata", False)
    revoked = Filing("f3", "LONG_TERM", date(2026, 1, 1), date(2026, 12, 31), None, "refdata", True)
    with pytest.raises(BrokerError):
        decide(s.settle(), refdata([elsewhere, expired, revoked]))
    good = Filing("f4", "TEMPORARY", date(2026, 4, 1), date(2026, 6, 1), "150000", "online", False)
    decision = decide(s.settle(), refdata([elsewhere, good]))
    assert isinstance(decision, Routed) and decision.request.filing_type == "TEMPORARY"


def test_promise_flag_files_temporary_on_the_spot_once() -> None:
    s = stay(promise_filing=True)
    s.fees = [FeeLine("A1", Decimal(1), Decimal(10))]
    decision = decide(s.settle(), refdata())
    assert isinstance(decision, Routed) and decision.new_filing is not None
    assert (decision.new_filing.filing.filing_type, decision.new_filing.filing.target_admdvs) == ("TEMPORARY",
                                                                                                  "150000")
    existing = Filing("f1", "LONG_TERM", date(2026, 1, 1), date(2026, 12, 31), None, "refdata", False)
    covered = decide(s.settle(), refdata([existing]))
    assert isinstance(covered, Routed) and covered.new_filing is None and covered.request.filing_type == "LONG_TERM"


def test_promise_flag_on_every_message_of_a_stay_files_once() -> None:
    """The router creates the TEMPORARY filing at the first flagged message; later ones find it in force."""
    s = stay(promise_filing=True)
    s.fees = [FeeLine("A1", Decimal(1), Decimal(10))]
    first = decide(s.admit(), refdata())
    assert isinstance(first, Routed) and first.new_filing is not None
    after = refdata([first.new_filing.filing])
    for env in (s.settle(pre=True), s.settle()):
        again = decide(env, after)
        assert isinstance(again, Routed) and again.new_filing is None and again.request.filing_type == "TEMPORARY"
    # A declared emergency is better than a TEMPORARY filing in force (no ratio cut): it is still created.
    emergency = decide(stay().admit(emergency=True), after)
    assert isinstance(emergency, Routed) and emergency.new_filing is not None
    assert emergency.request.filing_type == "EMERGENCY"


def test_declared_emergency_counts_as_filed() -> None:
    env = stay().admit(emergency=True)
    decision = decide(env, refdata())
    assert isinstance(decision, Routed) and decision.new_filing is not None
    assert decision.new_filing.filing.filing_type == "EMERGENCY" and decision.request.filing_type == "EMERGENCY"


def test_fee_upload_enriched_from_the_treating_province_catalog() -> None:
    s = stay()
    decision = decide(s.upload([FeeLine("A1", Decimal(2), Decimal("3.50"))]), refdata())
    assert isinstance(decision, Routed) and decision.request.catalog[0].chrgitm_lv == "01"
    with pytest.raises(BrokerError) as e:
        decide(s.upload([FeeLine("A1", Decimal(1), Decimal(1)), FeeLine("NOPE", Decimal(1), Decimal(1))]), refdata())
    assert e.value.code == "CATALOG_ITEM_UNKNOWN" and "feedetail[1]" in e.value.err_msg
    bad = s.upload([FeeLine("A1", Decimal(2), Decimal("3.50"))])
    bad["input"]["feedetail"][0]["det_item_fee_sumamt"] = Decimal("7.01")
    with pytest.raises(BrokerError) as e:
        decide(bad, refdata())
    assert e.value.code == "FEE_ITEM_INCONSISTENT"
    with pytest.raises(BrokerError) as e:
        decide(s.upload([FeeLine("A1", Decimal(1), Decimal(1))] * 11), refdata())
    assert e.value.code == "TOO_MANY_FEE_ITEMS"


@pytest.mark.parametrize(("mutate", "code"), [
    (lambda env: env.update(fixmedins_code="H99999900001", msgid="H99999900001" + env["msgid"][12:]),
     "HOSPITAL_UNKNOWN"),
    (lambda env: env.update(mdtrtarea_admvs="510421"), "MDTRTAREA_MISMATCH"),
    (lambda env: env.update(insuplc_admdvs="150400"), "INSUPLC_MISMATCH"),
    (lambda env: env["input"]["mdtrtinfo"].update(psn_no="P2"), "PERSON_UNKNOWN"),
    (lambda env: env["input"]["mdtrtinfo"].update(insutype="310"), "INSUTYPE_MISMATCH"),
])
def test_reference_errors(mutate: Any, code: str) -> None:
    env = stay().admit()
    mutate(env)
    with pytest.raises(BrokerError) as e:
        decide(env, refdata())
    assert e.value.code == code


def test_person_query_clearing_and_filing_transactions() -> None:
    q = CHIFENG.envelope("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": "510421199001011234"}})
    assert decide(q, refdata()) == PersonQuery("P1")
    clearing = CHIFENG.envelope("3201", {"data": {}})
    clearing["infno"] = "3201"
    assert isinstance(route(decode_request_lenient(clearing), refdata(), META, 10), ForwardClearing)
    filing = CHIFENG.envelope("2501", {"data": {"psn_no": "P1", "filing_type": "TEMPORARY", "begndate": "2026-05-01",
                                                "enddate": "2026-06-01", "target_admdvs": "150000",
                                                "promise_flag": "1"}}, insuplc="510421")
    change = decide(filing, refdata())
    assert isinstance(change, RefdataChange) and change.new_filing is not None
    assert change.new_filing.source == "promise" and change.output["filinginfo"]["filing_type"] == "TEMPORARY"
    chronic = CHIFENG.envelope("2503", {"data": {"psn_no": "P1", "chronic_disease": "HTN"}}, insuplc="510421")
    change = decide(chronic, refdata())
    assert isinstance(change, RefdataChange) and change.chronic == frozenset({"HTN"})


def decode_request_lenient(env: dict[str, Any]) -> Any:
    """A 32xx request whose body this test does not care about (the clearing service validates it)."""
    return Request(decode_envelope(encode(env)), None)
