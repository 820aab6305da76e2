"""Monitoring checks on the settlement path, pure: 3101/3102/3103 validation, routing (orders priced with the
catalog's monitoring fields, gender from the certificate), the engine's answers over a crafted history, the
disposal's refusals, warn_msg, and the facts of a settle row."""

from __future__ import annotations

import copy
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from schemas.codec import decode_request
from schemas.errors import BrokerError
from schemas.internal import RoutedRequest
from schemas.monitoring import ItemFact, Judgement, VisitFacts
from schemas.prescreen import OutputAnalysis
from schemas.refdata import certno_check_char
from services.refdata.store import CatalogEntry, Person
from services.router.logic import IngressMeta, Routed, gender_of, route
from services.settle import prescreen
from services.settle.facts import visit_facts
from services.settle.logic import handle
from services.settle.state import BatchState, Fee, IssuedWarning, Visit
from services.smartmon.rules import Episode, load_rules
from tests.unit.test_transactions import ANALYSED, EXAMPLES, HOSPITAL, T, envelope, refdata

META = IngressMeta(reply_topic="fsi.replies", reply_partition=0, received_ns=0)
BOOK = load_rules()
MALE = "15040019800101" + "001"
FEMALE = "15040019800101" + "002"


def _routed(infno: str, body: dict[str, Any], *, certno: str | None = MALE) -> RoutedRequest:
    ref = refdata()
    ref.persons["P1"] = Person("150400", "390", "1501", None, 0, frozenset(), certno and certno + certno_check_char(
        certno), None)
    ref.catalog[("150000", "OBS1")] = CatalogEntry("01", Decimal(0), None, "产科", gender_only="2")
    ref.catalog[("150000", "ONCE1")] = CatalogEntry("01", Decimal(0), None, "每日一次", once_per_day=True)
    decision = route(decode_request(envelope(infno, body)), ref, META, fee_items_max=10)
    assert isinstance(decision, Routed)
    return decision.request


def _analysis(orders: list[tuple[str, int]], *, rule_ids: list[str] | None = None,
              encounters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    patient = copy.deepcopy(ANALYSED)
    patient["fsi_encounter_dtos"][0]["fsi_order_dtos"] = [
        {"rx_id": f"R{i}", "hilist_code": code, "cnt": cnt, "pric": 10, "sumamt": 10 * cnt, "drord_begn_date": T}
        for i, (code, cnt) in enumerate(orders)]
    patient["fsi_encounter_dtos"] += encounters or []
    return {"data": {"rule_ids": rule_ids or [], "patient_dtos": [patient]}}


def _refused(infno: str, body: dict[str, Any]) -> str:
    with pytest.raises(BrokerError) as refused:
        decode_request(envelope(infno, body))
    return refused.value.code


# --- validation ------------------------------------------------------------------------------------


def _mutated(path: list[Any], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(EXAMPLES["3102"])
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


ENC = ["data", "patient_dtos", 0, "fsi_encounter_dtos"]


@pytest.mark.parametrize(("path", "value"), [
    (["data", "rule_ids"], ["GENDER_RESTRICTED"] * 21),  # at most 20 rules
    (["data", "rule_ids"], ["not a rule"]),
    (["data", "patient_dtos"], [ANALYSED, ANALYSED]),  # exactly one patient
    (["data", "patient_dtos"], []),
    (ENC, []),
    (ENC, [ANALYSED["fsi_encounter_dtos"][0]] * 2),  # an mdtrt_id twice
    (ENC, [{**ANALYSED["fsi_encounter_dtos"][0], "mdtrt_id": f"M{i}"} for i in range(21)]),  # at most 20
    (["data", "patient_dtos", 0, "curr_mdtrt_id"], "M9"),  # names no encounter
    ([*ENC, 0, "dscg_date"], "2026-04-30 08:00:00"),  # before admission
    ([*ENC, 0, "fsi_order_dtos", 0, "cnt"], 0),
    ([*ENC, 0, "fsi_order_dtos", 0, "sumamt"], "1.005"),
    ([*ENC, 0, "fsi_order_dtos"], [ANALYSED["fsi_encounter_dtos"][0]["fsi_order_dtos"][0]] * 101),
    ([*ENC, 0, "fsi_diagnose_dtos"], [{"dise_codg": "X"}] * 21),
    ([*ENC, 0, "fsi_diagnose_dtos"], [{"dise_codg": "X\u0000"}]),  # control characters, like every body
    (["data", "patient_dtos", 0, "gend"], "3"),
])
def test_analysis_bodies_are_bounded_and_checked(path: list[Any], value: Any) -> None:
    assert _refused("3102", _mutated(path, value)) == "BODY_MALFORMED"


@pytest.mark.parametrize(("field", "value"), [
    ("jr_id", "0" * 31), ("jr_id", "G" * 32), ("dspo_way", "3"), ("dspo_way_rea", ""), ("dspo_way_rea", "x" * 501),
    ("dspo_way_rea", "a\u0007b"), ("patn_id", ""),
])
def test_disposal_bodies_are_checked(field: str, value: str) -> None:
    body = {"data": {**EXAMPLES["3103"]["data"], field: value}}
    assert _refused("3103", body) == "BODY_MALFORMED"


# --- routing -----------------------------------------------------------------------------------------


def test_gender_comes_from_the_certificate_and_never_the_number() -> None:
    assert gender_of(MALE + "X") == "1" and gender_of(FEMALE + "X") == "2"
    assert gender_of(None) == gender_of("12345") == gender_of("1504001980010100X1") == ""
    msg = _routed("3102", _analysis([("A1", 1)]), certno=FEMALE)
    assert msg.person.gend == "2"
    assert FEMALE not in msgspec.json.encode(msg).decode()


def test_orders_are_priced_with_the_catalogs_monitoring_fields() -> None:
    msg = _routed("3101", _analysis([("A1", 1), ("OBS1", 1), ("ONCE1", 2)]))
    assert [(c.gender_only, c.once_per_day) for c in msg.catalog] == [("", False), ("2", False), ("", True)]
    with pytest.raises(BrokerError) as unknown:
        _routed("3101", _analysis([("NOPE", 1)]))
    assert unknown.value.code == "CATALOG_ITEM_UNKNOWN"
    body = _analysis([("A1", 1)])
    body["data"]["patient_dtos"][0]["fsi_encounter_dtos"][0]["fsi_order_dtos"][0]["sumamt"] = 11
    with pytest.raises(BrokerError) as inconsistent:
        _routed("3101", body)
    assert inconsistent.value.code == "FEE_ITEM_INCONSISTENT"
    with pytest.raises(BrokerError) as too_many:
        _routed("3101", _analysis([("A1", 1)] * 11))
    assert too_many.value.code == "TOO_MANY_FEE_ITEMS"


# --- the engine's answers ----------------------------------------------------------------------------


def _answer(msg: RoutedRequest, st: BatchState) -> OutputAnalysis:
    effect = handle(msg, st, policies=None, book=BOOK)  # type: ignore[arg-type]  # 31xx never settle
    assert isinstance(effect.output, OutputAnalysis)
    return effect.output


def test_3102_answers_the_hits_that_involve_the_request_and_stores_them() -> None:
    msg = _routed("3102", _analysis([("OBS1", 1), ("A1", 1)]))
    st = BatchState()
    [hit] = _answer(msg, st).result
    assert (hit.rule_id, hit.sev_deg, hit.vola_amt, hit.mdtrt_id, hit.patn_id) == (
        "GENDER_RESTRICTED", "high", Decimal("10.00"), "M1", "P1")
    assert "OBS1" in hit.vola_cont and "P1" not in hit.vola_cont
    assert [(w.jr_id, w.infno, w.fixmedins_code, w.rule_id, w.vola_amt_fen) for w in st.new_warnings] == [
        (hit.jr_id, "3102", HOSPITAL, "GENDER_RESTRICTED", 1000)]
    # Issued before (by an earlier batch, loaded): not stored again.
    st2 = BatchState(warnings={hit.jr_id: st.new_warnings[0]})
    assert [r.jr_id for r in _answer(msg, st2).result] == [hit.jr_id] and st2.new_warnings == []


def test_3101_rule_filter_and_misses() -> None:
    twice = _analysis([("ONCE1", 1), ("ONCE1", 1), ("OBS1", 1)])
    assert sorted(r.rule_id for r in _answer(_routed("3101", twice), BatchState()).result) == [
        "DUPLICATE_CHARGE", "GENDER_RESTRICTED"]
    only = _analysis([("ONCE1", 1), ("ONCE1", 1), ("OBS1", 1)], rule_ids=["DUPLICATE_CHARGE"])
    assert [r.rule_id for r in _answer(_routed("3101", only), BatchState()).result] == ["DUPLICATE_CHARGE"]
    # A woman may have the obstetric item; once is once.
    assert _answer(_routed("3101", _analysis([("ONCE1", 1), ("OBS1", 1)]), certno=FEMALE), BatchState()).result == []


def _history_stay(setl_id: str, fixmedins: str, begin: str, end: str) -> Episode:
    facts = VisitFacts(visit_type="inpatient", gend="1", begntime=begin, endtime=end, main_dise="I10", hosp_lv=0,
                       treating_prov="150000", items=[])
    return Episode(setl_id=setl_id, mdtrt_id="H" + setl_id, psn_no="P1", fixmedins_code=fixmedins,
                   insured_admdvs="150400", treating_admdvs="150400", med_type="21", setl_time=end, medfee=50000,
                   mid_setl=False, facts=facts)


def test_history_hits_involve_the_candidate_only() -> None:
    # History: two overlapping stays elsewhere (a hit that does not involve the request: not answered) and
    # the request's outpatient visit during one of them (answered).
    st = BatchState(history={"P1": [_history_stay("S1", "H1", "2026-04-25 08:00:00", "2026-05-03 08:00:00"),
                                    _history_stay("S2", "H2", "2026-04-28 08:00:00", "2026-05-02 08:00:00")]})
    result = _answer(_routed("3102", _analysis([("A1", 1)])), st).result
    assert [r.rule_id for r in result] == ["OUTPATIENT_DURING_STAY", "OUTPATIENT_DURING_STAY"]
    # An encounter of the request at another hospital overlapping a stay counts as a candidate too.
    other = {"mdtrt_id": "M2", "medins_id": "H9", "med_type": "21", "adm_date": "2026-04-20 08:00:00",
             "dscg_date": "2026-04-26 08:00:00"}
    result = _answer(_routed("3102", _analysis([("A1", 1)], rule_ids=["OVERLAP_INPATIENT"], encounters=[other])),
                     BatchState(history=st.history)).result
    assert [(r.rule_id, r.mdtrt_id) for r in result] == [("OVERLAP_INPATIENT", "M2")]


def test_disposal_refuses_unknown_foreign_and_other_persons_warnings() -> None:
    jr_id = "0" * 32
    msg = _routed("3103", EXAMPLES["3103"])
    for warnings, code in (({}, "WARNING_UNKNOWN"),
                           ({jr_id: _warning(jr_id, psn_no="P2")}, "WARNING_UNKNOWN"),
                           ({jr_id: _warning(jr_id, fixmedins="H15040000002")}, "WARNING_OTHER_INSTITUTION")):
        with pytest.raises(BrokerError) as refused:
            handle(msg, BatchState(warnings=warnings), policies=None, book=BOOK)  # type: ignore[arg-type]
        assert refused.value.code == code
    st = BatchState(warnings={jr_id: _warning(jr_id)})
    effect = handle(msg, st, policies=None, book=BOOK)  # type: ignore[arg-type]
    assert msgspec.to_builtins(effect.output) == {"jr_id": jr_id, "dspo_way": "1"}
    assert [(d.jr_id, d.dspo_way, d.dspo_way_rea) for d in st.new_disposals] == [(jr_id, "1", "x")]


def _warning(jr_id: str, *, psn_no: str = "P1", fixmedins: str = HOSPITAL) -> IssuedWarning:
    return IssuedWarning(jr_id=jr_id, msgid="X", infno="3102", fixmedins_code=fixmedins, psn_no=psn_no,
                         rule_id="GENDER_RESTRICTED", mdtrt_id="M1", vola_amt_fen=0)


# --- warn_msg and facts ------------------------------------------------------------------------------


def test_warn_text_is_short_and_bounded() -> None:
    hits = [Judgement(jr_id=f"{n:032x}", rule_id="DUPLICATE_CHARGE", rule_name="重复收费", rule_version=1,
                      severity="low", psn_no="P1", insured_admdvs="150400", treating_admdvs="150400",
                      fixmedins_code=HOSPITAL, mdtrt_ids=["M1"], setl_ids=["PX"], items=[], window_begin="2026-05-01",
                      window_end="2026-05-01", suspect_amt=0, detail="x" * 500) for n in range(8)]
    parts = prescreen.warn_text(hits).split("; ")
    assert parts[0] == f"[DUPLICATE_CHARGE 重复收费 {0:032x}] " + "x" * prescreen.WARN_TEXT_MAX
    assert len(parts) == prescreen.WARN_MSG_MAX + 1 and parts[-1] == "(+3 more)"
    assert "P1" not in prescreen.warn_text(hits)
    assert prescreen.warn_text([]) == ""


def test_facts_of_a_settle_row_are_its_own_items_with_the_catalog_fields() -> None:
    at = datetime(2026, 5, 1, 9, 0)
    visit = Visit(mdtrt_id="M1", psn_no="P1", fixmedins_code=HOSPITAL, med_type="21", insutype="390", scope="local",
                  insured_admdvs="150400", treating_admdvs="150400", ipt_otp_no="1", begntime=at,
                  endtime=datetime(2026, 5, 3, 9, 0), dise_codg="I10",
                  diseinfo=[{"diag_code": "K35", "maindiag_flag": "0"}, {"diag_code": "O80", "maindiag_flag": "1"}],
                  state="discharged", created_msgid="X")

    def fee(sn: str, cancelled: bool = False) -> Fee:
        return Fee(mdtrt_id="M1", feedetl_sn=sn, med_list_codg="OBS1", medins_list_codg="h", chrgitm_lv="01",
                   selfpay_prop=Decimal(0), pric_uplmt_fen=None, fee_fen=1000, cnt=Decimal(1), pric_fen=1000,
                   fee_ocur_time=at, upload_msgid="U", cancelled=cancelled, setl_id="S1", gender_only="2",
                   supply_days=Decimal(7), once_per_day=True)

    facts = visit_facts(visit, [fee("2"), fee("1"), fee("3", cancelled=True)], gend="1", hosp_lv=3,
                        treating_prov="150000")
    item = ItemFact(med_list_codg="OBS1", day="2026-05-01", cnt=Decimal(1), sumamt=1000, once_per_day=True,
                    gender_only="2", supply_days=Decimal(7))
    assert facts == VisitFacts(visit_type="inpatient", gend="1", begntime="2026-05-01 09:00:00",
                               endtime="2026-05-03 09:00:00", main_dise="O80", hosp_lv=3, treating_prov="150000",
                               items=[item, item])
