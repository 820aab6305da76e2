"""The transaction registry: every registered infno is decodable, routed to its stage, handled there
and documented (README transaction table, error table); and the registry's data is consistent."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from typing import Any, get_args

import pytest

from schemas.codec import BODY_TYPES, decode_request, encode
from schemas.codes import VISIT_KIND_MED_TYPES, VISIT_STATES
from schemas.errors import ERRORS, BrokerError
from schemas.internal import VisitBody
from schemas.transactions import (
    COMMON_ERRORS,
    STATE_REFUSALS,
    TRANSACTIONS,
    VISIT_KIND_STATES,
    by_stage,
    may_send,
    transactions_column,
)
from services.common.config import PROJECT_ROOT
from services.policy.policies import PolicyBook
from services.refdata.store import CatalogEntry, Filing, Person, RefData
from services.refdata.store import Hospital as HospitalRef
from services.router.logic import (
    Answer,
    ForwardClearing,
    IngressMeta,
    PersonQuery,
    RefdataChange,
    Routed,
    Session,
    route,
)
from services.settle.logic import Effect, handle
from services.settle.queries import is_query
from services.settle.state import BatchState

HOSPITAL = "H15040000001"
PHARMACY = "P15040000001"
T = "2026-05-01 08:00:00"
FEE = {"feedetl_sn": "1", "mdtrt_id": "M1", "psn_no": "P1", "med_type": "21", "fee_ocur_time": T,
       "med_list_codg": "A1", "medins_list_codg": "A1", "det_item_fee_sumamt": 10, "cnt": 1, "pric": 10}
DRUG = {k: v for k, v in FEE.items() if k not in ("mdtrt_id", "psn_no", "med_type")}
CERT = {"mdtrt_cert_type": "02", "mdtrt_cert_no": "-"}
SETTLE = {"psn_no": "P1", **CERT, "medfee_sumamt": 10, "mdtrt_id": "M1", "insutype": "390"}
MONTH = {"trt_year": "2026", "trt_month": "4"}
STMT = {"setl_optins": "150400", "stmt_begndate": "2026-04-01", "stmt_enddate": "2026-04-30", "medfee_sumamt": 0,
        "fund_pay_sumamt": 0, "fixmedins_setl_cnt": 0}
ANALYSED: dict[str, Any] = {"patn_id": "P1", "curr_mdtrt_id": "M1", "fsi_encounter_dtos": [{
    "mdtrt_id": "M1", "medins_id": HOSPITAL, "med_type": "11", "adm_date": T,
    "fsi_order_dtos": [{"rx_id": "R1", "hilist_code": "A1", "cnt": 1, "pric": 10, "sumamt": 10, "drord_begn_date": T}],
}]}

# A minimal valid body of every registered transaction (the national field names).
EXAMPLES: dict[str, dict[str, Any]] = {
    "9001": {"signIn": {"opter_no": "1"}},
    "9002": {"signOut": {"sign_no": "S1", "opter_no": "1"}},
    "1101": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": "P1"}},
    "2101": {"data": {"psn_no": "P1", **CERT, "begntime": T, "medfee_sumamt": 10, "insutype": "390"},
             "drugdetail": [DRUG]},
    "2102": {"data": {"psn_no": "P1", **CERT, "begntime": T, "medfee_sumamt": 10, "insutype": "390"},
             "drugdetail": [DRUG]},
    "2103": {"data": {"psn_no": "P1", "setl_id": "S1"}},
    "2201": {"data": {"psn_no": "P1", "insutype": "390", "begntime": T, **CERT, "ipt_otp_no": "1", "atddr_no": "D",
                      "dept_code": "D"}},
    "2202": {"data": {"psn_no": "P1", "mdtrt_id": "M1", "ipt_otp_no": "1"}},
    "2203": {"mdtrtinfo": {"mdtrt_id": "M1", "psn_no": "P1", "med_type": "11", "begntime": T, "dise_codg": "X"}},
    "2204": {"feedetail": [{**FEE, "med_type": "11"}]},
    "2205": {"data": [{"mdtrt_id": "M1", "psn_no": "P1", "feedetl_sn": "1"}]},
    "2206": {"data": {**SETTLE, "med_type": "11"}},
    "2207": {"data": {**SETTLE, "med_type": "11"}},
    "2208": {"data": {"psn_no": "P1", "mdtrt_id": "M1", "setl_id": "S1"}},
    "2301": {"feedetail": [FEE]},
    "2302": {"data": [{"feedetl_sn": "1", "mdtrt_id": "M1", "psn_no": "P1"}]},
    "2303": {"mdtrtinfo": SETTLE},
    "2304": {"mdtrtinfo": SETTLE},
    "2305": {"data": {"psn_no": "P1", "mdtrt_id": "M1", "setl_id": "S1"}},
    "2401": {"mdtrtinfo": {"psn_no": "P1", "insutype": "390", **CERT, "med_type": "21", "ipt_otp_no": "1",
                           "begntime": T, "atddr_no": "D", "dise_codg": "X"}},
    "2402": {"dscginfo": {"mdtrt_id": "M1", "psn_no": "P1", "insutype": "390", "endtime": T}},
    "2403": {"adminfo": {"mdtrt_id": "M1", "psn_no": "P1"}},
    "2404": {"data": {"mdtrt_id": "M1", "psn_no": "P1"}},
    "2405": {"data": {"mdtrt_id": "M1", "psn_no": "P1"}},
    "2501": {"data": {"psn_no": "P1", "filing_type": "LONG_TERM", "begndate": "2026-01-01",
                      "enddate": "2026-12-31", "target_admdvs": "150000"}},
    "2502": {"data": {"psn_no": "P1", "filing_id": "F1"}},
    "2503": {"data": {"psn_no": "P1", "chronic_disease": "HTN"}},
    "2504": {"data": {"psn_no": "P1", "chronic_disease": "HTN"}},
    "5301": {"data": {"psn_no": "P1"}},
    "5201": {"data": {"psn_no": "P1"}},
    "5202": {"data": {"psn_no": "P1", "mdtrt_id": "M1"}},
    "5203": {"data": {"psn_no": "P1", "mdtrt_id": "M1"}},
    "5204": {"data": {"psn_no": "P1", "mdtrt_id": "M1"}},
    "5205": {"data": {"psn_no": "P1", "begndate": "2026-01-01", "enddate": "2026-04-30"}},
    "5206": {"data": {"psn_no": "P1"}},
    "3201": {"data": {**STMT, "insutype": "390", "clr_type": "21", "acct_pay": 0}},
    "3202": {"data": {**STMT, "cash_payamt": 0}},
    "3203": {"data": {"clr_type": "21", "setlym": "202604", "psntime": 0, "medfee_sumamt": 0, "med_sumfee": 0,
                      "fund_appy_sum": 0, "cash_payamt": 0, "acct_pay": 0, "begndate": "2026-04-01",
                      "enddate": "2026-04-30"}},
    "3204": {"data": {"clr_appy_evt_id": "A1"}},
    "3260": {"data": MONTH},
    "3261": {"data": {**MONTH, "totalrow": 0}},
    "3262": {"data": {**MONTH, "otransid": "X1"}},
    "2601": {"data": {"psn_no": "P1", "omsgid": f"{HOSPITAL}202605010700000001", "oinfno": "2207"}},
    "3101": {"data": {"patient_dtos": [ANALYSED]}},
    "3102": {"data": {"rule_ids": ["GENDER_RESTRICTED"], "patient_dtos": [ANALYSED]}},
    "3103": {"data": {"jr_id": "0" * 32, "patn_id": "P1", "dspo_way": "1", "dspo_way_rea": "x"}},
}
STAGE_DECISIONS = {"router": (Answer, PersonQuery, RefdataChange, Session), "engine": (Routed,),
                   "clearing": (ForwardClearing,)}


def envelope(infno: str, body: dict[str, Any], sender: str | None = None) -> bytes:
    """From the kind of institution that sends `infno` (a pharmacy for purchases), unless `sender` says."""
    code = sender or (HOSPITAL if may_send(infno, HOSPITAL) else PHARMACY)
    if infno == "2601":  # a correction names a msgid of its own institution
        body = {"data": {**body["data"], "omsgid": code + body["data"]["omsgid"][len(code):]}}
    return encode({
        "infno": infno, "msgid": f"{code}202605010800000001", "mdtrtarea_admvs": "150400",
        "insuplc_admdvs": "150400", "recer_sys_code": "FSI", "infver": "V1.0", "opter_type": "1", "opter": "1",
        "opter_name": "x", "inf_time": T, "fixmedins_code": code, "fixmedins_name": "x", "input": body,
    })


def refdata(*, with_filing: bool = True) -> RefData:
    ref = RefData()
    ref.hospitals = {HOSPITAL: HospitalRef("150400", 3, "x"), PHARMACY: HospitalRef("150400", 1, "x")}
    ref.persons = {"P1": Person("150400", "390", "1501", None, 0, frozenset(), None, None)}
    ref.catalog = {("150000", "A1"): CatalogEntry("01", Decimal(0), None, "甲")}
    if with_filing:
        ref.filings = {"P1": [Filing("F1", "LONG_TERM", date(2026, 1, 1), date(2026, 12, 31), None)]}
    return ref


def test_every_registered_infno_has_an_example() -> None:
    assert set(EXAMPLES) == set(TRANSACTIONS) == set(BODY_TYPES)


@pytest.mark.parametrize("infno", sorted(TRANSACTIONS))
def test_every_infno_decodes_routes_and_is_handled_by_its_stage(infno: str) -> None:
    transaction = TRANSACTIONS[infno]
    req = decode_request(envelope(infno, EXAMPLES[infno]))
    assert type(req.body) is transaction.body
    meta = IngressMeta(reply_topic="fsi.replies", reply_partition=0, received_ns=0)
    if transaction.stage == "gateway":  # answered at the gateway; the router does not forward it anywhere
        with pytest.raises(BrokerError) as refused:
            route(req, refdata(), meta, fee_items_max=10)
        assert refused.value.code == "INFNO_UNSUPPORTED"
        return
    decision = route(req, refdata(), meta, fee_items_max=10)
    assert isinstance(decision, STAGE_DECISIONS[transaction.stage]), decision
    if isinstance(decision, Routed) and is_query(decision.request):
        pass  # a query (5201–5206): the engine answers it from PostgreSQL (tests/integration/test_queries.py)
    elif isinstance(decision, Routed):
        # The engine handles it: an answer, or a refusal the registry lists (here: no such visit yet).
        try:
            effect = handle(decision.request, BatchState(), PolicyBook.load())
        except BrokerError as e:
            assert e.code in transaction.error_codes and e.code != "INFNO_UNSUPPORTED", e.err_msg
        else:
            assert isinstance(effect, Effect)
    # Without the person's filing, whatever the router refuses is a code the registry lists for it.
    try:
        route(req, refdata(with_filing=False), meta, fee_items_max=10)
    except BrokerError as e:
        assert e.code in transaction.error_codes, e.err_msg


@pytest.mark.parametrize("infno", sorted(TRANSACTIONS))
def test_the_person_and_insutype_checks_the_router_makes_are_listed(infno: str) -> None:
    transaction = TRANSACTIONS[infno]
    body = decode_request(envelope(infno, EXAMPLES[infno])).body
    names_person = transaction.stage in ("router", "engine") and infno not in ("1101", "9001", "9002")
    assert ("INSUPLC_REQUIRED" in transaction.error_codes) == names_person
    carries_insutype = names_person and any(
        getattr(getattr(body, part, None), "insutype", None) for part in ("mdtrtinfo", "data"))
    assert ("INSUTYPE_MISMATCH" in transaction.error_codes) == carries_insutype


@pytest.mark.parametrize("infno", sorted(TRANSACTIONS))
def test_each_kind_of_institution_sends_only_its_transactions(infno: str) -> None:
    meta = IngressMeta(reply_topic="fsi.replies", reply_partition=0, received_ns=0)
    for sender in (HOSPITAL, PHARMACY):
        req = decode_request(envelope(infno, EXAMPLES[infno], sender))
        allowed = infno[:2] not in ("21", "22", "23", "24") or (sender == PHARMACY) == infno.startswith("21")
        try:
            route(req, refdata(), meta, fee_items_max=10)
        except BrokerError as e:
            assert (e.code == "INSTITUTION_NOT_ALLOWED") != allowed, (sender, e.err_msg)
        else:
            assert allowed, sender


def test_registry_data_is_consistent() -> None:
    for t in TRANSACTIONS.values():
        assert t.error_codes <= set(ERRORS), (t.infno, t.error_codes - set(ERRORS))
        assert set(COMMON_ERRORS) <= t.error_codes
        if t.stage != "engine":
            assert (t.visit, t.loads, t.ledger_row) == (None, frozenset(), None), t.infno
        if t.ledger_row is not None:
            assert t.visit is not None and "money" in t.loads, t.infno
        if t.visit is not None:
            if t.ledger_row == "reverse":  # a reversal finds its visit in any state; its settlement decides
                assert "settlements" in t.loads
                assert set(t.visit.from_states) == set(VISIT_KIND_STATES[t.visit.kind]), t.infno
            assert t.visit.kind in VISIT_KIND_MED_TYPES
            for state in t.visit.refused_states():
                assert STATE_REFUSALS[state][0] in t.error_codes, (t.infno, state)
    assert {s for states in VISIT_KIND_STATES.values() for s in states} == set(VISIT_STATES)
    # The engine's message type lists the same bodies (a static union: msgspec and mypy need it written out).
    assert set(get_args(VisitBody)) == {TRANSACTIONS[i].body for i in by_stage("engine")}


def _readme() -> str:
    return (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")


def test_every_infno_is_in_the_readme_transaction_table_with_its_stage() -> None:
    section = _readme().split("## Transactions", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"\d{4}( / \d{4})*", cells[0]):
            for infno in cells[0].split(" / "):
                documented[infno] = cells[2]
    assert documented == {infno: t.stage for infno, t in TRANSACTIONS.items()}


def _listed(cell: str) -> set[str]:
    """The infnos an error table cell names (`all`, infnos, `first-last` runs of registered infnos)."""
    if cell == "all":
        return set(TRANSACTIONS)
    out: set[str] = set()
    for part in cell.split(", "):
        first, _, last = part.partition("-")
        out |= {i for i in TRANSACTIONS if first <= i <= (last or first)}
    return out


def test_every_error_code_of_a_transaction_is_in_the_readme_error_table_for_it() -> None:
    rows = {}
    for line in _readme().splitlines():
        m = re.fullmatch(r"\| `([A-Z_]+)` \| .+ \| (.+?) \| .+ \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    for t in TRANSACTIONS.values():
        for code in t.error_codes:
            assert code in rows, code
            assert t.infno in _listed(rows[code]), (code, t.infno, rows[code])
    for code, cell in rows.items():  # and the table claims nothing the registry does not list
        if transactions_column(code) is not None:
            assert _listed(cell) == {t.infno for t in TRANSACTIONS.values() if code in t.error_codes}, code
        else:  # a code no transaction answers names its other context (a CLI, a topic), never an infno
            assert not re.search(r"\b\d{4}\b", ERRORS[code].transactions), (code, ERRORS[code].transactions)
