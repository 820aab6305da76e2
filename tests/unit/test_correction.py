"""2601 冲正, the pure logic: the engine's undoing of each kind of original in one batch's state (the
handler's bookkeeping of answers imitated), originals of earlier batches, and the router's checks."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
import pytest

from schemas.codec import encode
from schemas.correction import CorrectionRef, Input2601
from schemas.errors import BrokerError
from schemas.internal import CatalogCtx, HospitalCtx, PersonCtx, RoutedRequest
from schemas.transactions import BODY_TYPES, TRANSACTIONS, correctable
from services.policy.policies import PolicyBook
from services.router.logic import check_correction
from services.settle.logic import handle, mdtrt_id_for
from services.settle.state import BatchState, Original

POLICIES = PolicyBook.load()
H, OTHER = "H15040000001", "H15040000002"
HOSPITAL = HospitalCtx(fixmedins_code=H, admdvs="150400", prov_admdvs="150000", pool_admdvs="150400", hosp_lv=3)
T = "2026-05-01 08:00:00"
CERT = {"mdtrt_cert_type": "02", "mdtrt_cert_no": "-"}
CATALOG = CatalogCtx(chrgitm_lv="01", selfpay_prop=Decimal(0), pric_uplmt_fen=None)
_seq = iter(range(1, 10_000))


def person(psn_no: str = "P1") -> PersonCtx:
    return PersonCtx(psn_no=psn_no, insured_admdvs="150400", insured_prov="150000", insured_pool="150400",
                     insutype="310", psn_type="1101", assistance=None, acct_balc_fen=100000)


def msgid(hospital: str = H) -> str:
    return f"{hospital}20260501080000{next(_seq):04d}"


def send(st: BatchState, infno: str, body: dict[str, Any], *, mid: str | None = None, psn_no: str = "P1",
         items: int = 0) -> Any:
    """Handle one request as the engine's handler does (its answer kept for later requests of the batch);
    the answer's output as JSON builtins, or the refusal's code."""
    msg = RoutedRequest(
        msgid=mid or msgid(), infno=infno, fixmedins_code=H, inf_time=T, received_ns=0, reply_topic="r",
        reply_partition=None, hospital=HOSPITAL, person=person(psn_no), scope="local", filing_type=None,
        body=msgspec.convert(body, BODY_TYPES[infno]), catalog=[CATALOG] * items)
    try:
        output = handle(msg, st, POLICIES).output
    except BrokerError as e:
        st.responses[msg.msgid] = (infno, H, -1, b"")
        return e.code
    st.responses[msg.msgid] = (infno, H, 0, b"")
    return msgspec.json.decode(encode(output))


def correct(st: BatchState, omsgid: str, oinfno: str, psn_no: str = "P1") -> Any:
    return send(st, "2601", {"data": {"psn_no": psn_no, "omsgid": omsgid, "oinfno": oinfno}}, psn_no=psn_no)


def admit(st: BatchState) -> tuple[str, str]:
    mid = msgid()
    send(st, "2401", {"mdtrtinfo": {"psn_no": "P1", "insutype": "310", **CERT, "med_type": "21", "ipt_otp_no": "1",
                                    "begntime": T, "atddr_no": "D", "dise_codg": "X"}}, mid=mid)
    return mid, mdtrt_id_for(mid)


def upload(st: BatchState, mdtrt_id: str, sns: list[str], infno: str = "2301") -> str:
    mid = msgid()
    items = [{"feedetl_sn": sn, "mdtrt_id": mdtrt_id, "psn_no": "P1", "med_type": "21", "fee_ocur_time": T,
              "med_list_codg": "A1", "medins_list_codg": "A1", "det_item_fee_sumamt": 10, "cnt": 1, "pric": 10}
             for sn in sns]
    assert send(st, infno, {"feedetail": items}, mid=mid, items=len(sns))["result"]
    return mid


def active(st: BatchState, mdtrt_id: str) -> list[str]:
    return sorted(f.feedetl_sn for f in st.active_fees(mdtrt_id))


def test_discharge_and_admission_undone_and_a_repeat_answers_the_same() -> None:
    st = BatchState()
    admission, mdtrt_id = admit(st)
    discharge = msgid()
    assert send(st, "2402", {"dscginfo": {"mdtrt_id": mdtrt_id, "psn_no": "P1", "insutype": "310", "endtime": T}},
                mid=discharge) == {}
    undone = correct(st, discharge, "2402")
    assert undone == {"data": {"omsgid": discharge, "oinfno": "2402", "undone": "cancel_discharge",
                               "mdtrt_id": mdtrt_id, "fees_cancelled": 0}}
    visit = st.visits[mdtrt_id]
    assert (visit.state, visit.endtime) == ("admitted", None)
    assert correct(st, discharge, "2402") == undone
    assert correct(st, admission, "2401")["data"]["undone"] == "cancel_visit"
    assert visit.state == "cancelled"
    assert st.new_corrections == [discharge, admission]  # each omsgid once, the repeat adds nothing


def test_a_correction_before_its_original_keeps_the_original_out() -> None:
    st = BatchState()
    early = msgid()
    assert correct(st, early, "2401") == "ORIGINAL_UNKNOWN"
    assert st.corrections[early].err_msg is not None and st.new_corrections == [early]
    assert correct(st, early, "2401") == "ORIGINAL_UNKNOWN"  # repeated: the same answer
    assert admit_with(st, early) == "ORIGINAL_CORRECTED"
    assert st.visits == {} and st.new_visits == []


def admit_with(st: BatchState, mid: str) -> Any:
    return send(st, "2401", {"mdtrtinfo": {"psn_no": "P1", "insutype": "310", **CERT, "med_type": "21",
                                           "ipt_otp_no": "1", "begntime": T, "atddr_no": "D", "dise_codg": "X"}},
                mid=mid)


def test_a_fee_upload_is_withdrawn_exactly() -> None:
    st = BatchState()
    _, mdtrt_id = admit(st)
    first = upload(st, mdtrt_id, ["1", "2"])
    second = upload(st, mdtrt_id, ["2", "3"])  # "2" re-sent unchanged: it stays the first upload's
    assert correct(st, first, "2301")["data"] | {"omsgid": ""} == {
        "omsgid": "", "oinfno": "2301", "undone": "withdraw_fees", "mdtrt_id": mdtrt_id, "fees_cancelled": 2}
    assert active(st, mdtrt_id) == ["3"]
    send(st, "2302", {"data": [{"feedetl_sn": "3", "mdtrt_id": mdtrt_id, "psn_no": "P1"}]})
    assert correct(st, second, "2301") == "ORIGINAL_UNDONE"
    # An item numbered "0000" would make 2302 cancel every item: the correction refuses instead.
    third = upload(st, mdtrt_id, ["0000", "4"])
    assert correct(st, third, "2301") == "CORRECTION_NOT_ALLOWED"
    assert active(st, mdtrt_id) == ["0000", "4"]


def test_refusals_change_nothing() -> None:
    st = BatchState()
    admission, mdtrt_id = admit(st)
    assert correct(st, admission, "2201") == "ORIGINAL_MISMATCH"
    assert correct(st, admission, "2401", psn_no="P2") == "ORIGINAL_MISMATCH"
    assert correct(st, msgid(OTHER), "2401") == "ORIGINAL_OTHER_INSTITUTION"
    assert st.visits[mdtrt_id].state == "admitted" and st.new_corrections == []
    send(st, "2404", {"data": {"mdtrt_id": mdtrt_id, "psn_no": "P1"}})
    assert correct(st, admission, "2401") == "ORIGINAL_UNDONE"


def test_a_refused_original_changed_nothing() -> None:
    st = BatchState()
    refused = msgid()
    assert send(st, "2402", {"dscginfo": {"mdtrt_id": "MNONE", "psn_no": "P1", "insutype": "310", "endtime": T}},
                mid=refused) == "VISIT_UNKNOWN"
    assert correct(st, refused, "2402") == {"data": {"omsgid": refused, "oinfno": "2402", "undone": "none",
                                                     "mdtrt_id": "", "fees_cancelled": 0}}


def test_a_pharmacy_purchase_is_reversed_as_2103_does() -> None:
    st = BatchState()
    purchase = msgid()
    drug = {"feedetl_sn": "1", "fee_ocur_time": T, "med_list_codg": "A1", "medins_list_codg": "A1",
            "det_item_fee_sumamt": 30, "cnt": 1, "pric": 30}
    s = send(st, "2102", {"data": {"psn_no": "P1", **CERT, "begntime": T, "medfee_sumamt": 30, "insutype": "310"},
                          "drugdetail": [drug]}, mid=purchase, items=1)["setlinfo"]
    assert (s["acct_pay"], s["balc"]) == (30, 970)
    r = correct(st, purchase, "2102")["setlinfo"]
    assert (r["medfee_sumamt"], r["acct_pay"], r["balc"]) == (-30, -30, 1000)
    assert st.accounts["P1"] == 100000
    assert st.visits[mdtrt_id_for(purchase)].state == "cancelled"
    assert st.settlements[s["setl_id"]].reversed


def test_an_original_of_an_earlier_batch() -> None:
    """The ledger loaded a discharge's processed_request row and its stay (ledger.load_batch)."""
    st = BatchState()
    _, mdtrt_id = admit(st)
    st.visits[mdtrt_id].state = "discharged"
    discharge = msgid()
    st.originals[discharge] = Original(discharge, "2402", H, 0, mdtrt_id)
    assert correct(st, discharge, "2402")["data"]["undone"] == "cancel_discharge"
    assert st.visits[mdtrt_id].state == "admitted"
    assert correct(st, msgid(), "2402") == "ORIGINAL_UNKNOWN"


def test_router_checks() -> None:
    def body(omsgid: str, oinfno: str) -> Input2601:
        return Input2601(data=CorrectionRef(psn_no="P1", omsgid=omsgid, oinfno=oinfno))

    check_correction(body(msgid(), "2207"), H)
    for omsgid, oinfno, code in ((msgid(), "2203", "CORRECTION_NOT_SUPPORTED"),
                                 (msgid(), "9999", "CORRECTION_NOT_SUPPORTED"),
                                 (msgid(OTHER), "2207", "ORIGINAL_OTHER_INSTITUTION")):
        with pytest.raises(BrokerError) as refused:
            check_correction(body(omsgid, oinfno), H)
        assert refused.value.code == code


def test_registry_undo() -> None:
    assert correctable() == {"2207", "2304", "2102", "2201", "2401", "2402", "2204", "2301"}
    for infno in correctable():
        t = TRANSACTIONS[infno]
        undoing = TRANSACTIONS[t.undone_as or ""]
        assert t.visit is not None and undoing.visit is not None
        assert undoing.visit.kind == t.visit.kind, infno  # the undoing transaction's rules fit the original's visit
        assert (t.undo == "reverse") == (undoing.ledger_row == "reverse"), infno
        assert "ORIGINAL_CORRECTED" in t.error_codes
