"""2601 冲正 (correction), pure: find the original a correction names and decide what undoing it means.

A hospital whose call timed out does not know whether its transaction went through; it sends 2601 with
the original's msgid (`omsgid`), infno (`oinfno`) and person. The original is found by msgid among the
batch state the ledger loaded (`ledger.load_batch`: its processed_request row, the visit it created,
the fee items it uploaded, the settlement it wrote) or among this batch's own requests, and undone by
the same engine function as the transaction that undoes it by hand (the registry's `undone_as`:
2207 → 2208, 2201 → 2202, 2402 → 2405, 2204 → 2205, ...; `logic._correct` applies it).

Each omsgid is corrected once: the first correction's answer is kept (table `correction`), a later
correction of it answers the same, and an original that arrives after its correction is refused
(ORIGINAL_CORRECTED) — a hospital that corrected is never charged later. README "Corrections (2601)".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.codec import encode
from schemas.correction import CorrectionRef, CorrectionResult, Output2601, Undone
from schemas.errors import BrokerError
from schemas.internal import RoutedRequest
from schemas.transactions import TRANSACTIONS, Undo, correctable
from services.settle.state import BatchState, Correction, Original, Visit

CORRECTABLE = correctable()
ALL_FEES = "0000"


@dataclass(frozen=True, slots=True)
class Undoing:
    """What to undo: `undo` applied as transaction `undone_as` to the original's visit."""

    undo: Undo
    undone_as: str
    visit: Visit
    setl_id: str = ""  # reverse: the original's settlement
    feedetl_sns: tuple[str, ...] = ()  # withdraw_fees: the upload's items still active


@dataclass(frozen=True, slots=True)
class Answered:
    """Nothing to undo now: the answer (an earlier correction's, or "nothing was undone")."""

    output: Any


def check_original(msg: RoutedRequest, st: BatchState) -> None:
    """An original whose msgid was corrected before it arrived is refused, never applied."""
    if msg.infno in CORRECTABLE and msg.msgid in st.corrections:
        raise BrokerError("ORIGINAL_CORRECTED", "this msgid was corrected (2601) before it arrived; it is not applied")


def plan(msg: RoutedRequest, ref: CorrectionRef, st: BatchState) -> Undoing | Answered:
    """What correcting `ref.omsgid` means now, or a refusal (BrokerError). Changes nothing but the record
    of a correction whose original is unknown or changed nothing (answered at once)."""
    earlier = st.corrections.get(ref.omsgid)
    if earlier is not None:
        return _repeat(earlier)
    if not ref.omsgid.startswith(msg.fixmedins_code):  # the router checks it first
        raise BrokerError("ORIGINAL_OTHER_INSTITUTION", "omsgid is not a msgid of the sending institution")
    original = _original(ref.omsgid, st)
    if original is None:
        err = BrokerError("ORIGINAL_UNKNOWN", "no transaction with that omsgid reached the settlement engine; "
                                              "it is recorded as corrected and will not be applied")
        record(st, msg, ref, "unknown", err_msg=err.err_msg)
        raise err
    if original.fixmedins_code != msg.fixmedins_code:
        raise BrokerError("ORIGINAL_OTHER_INSTITUTION", "omsgid is not a msgid of the sending institution")
    if original.infno != ref.oinfno:
        raise BrokerError("ORIGINAL_MISMATCH", "oinfno differs from the original's infno")
    transaction = TRANSACTIONS[original.infno]
    if transaction.undo is None or transaction.undone_as is None:
        raise BrokerError("CORRECTION_NOT_SUPPORTED", f"infno {original.infno} cannot be corrected")
    if original.infcode != 0:  # refused: it changed nothing
        answer = Output2601(data=CorrectionResult(omsgid=ref.omsgid, oinfno=ref.oinfno, undone="none"))
        record(st, msg, ref, "none", output=answer)
        return Answered(answer)
    undo, undone_as = transaction.undo, transaction.undone_as
    if undo == "reverse":
        row = next((s for s in st.settlements.values() if s.msgid == ref.omsgid and s.kind == "settle"), None)
        visit = st.visits.get(row.mdtrt_id) if row is not None else None
        visit = _checked(visit, ref)
        assert row is not None
        if row.reversed:
            raise BrokerError("ORIGINAL_UNDONE", "the settlement was already reversed")
        return Undoing(undo, undone_as, visit, setl_id=row.setl_id)
    visit = _checked(_visit_of(original, st), ref)
    if visit.state == "cancelled":
        raise BrokerError("ORIGINAL_UNDONE", "the visit was cancelled")
    if visit.state == "settled":
        raise BrokerError("CORRECTION_NOT_ALLOWED", "the visit is settled; reverse the settlement first")
    if undo == "cancel_visit":
        return Undoing(undo, undone_as, visit)
    if undo == "cancel_discharge":
        if visit.state != "discharged":
            raise BrokerError("ORIGINAL_UNDONE", "the discharge was already cancelled")
        return Undoing(undo, undone_as, visit)
    sns = tuple(sorted(f.feedetl_sn for f in st.active_fees(visit.mdtrt_id) if f.upload_msgid == ref.omsgid))
    if not sns:
        raise BrokerError("ORIGINAL_UNDONE", "the upload's fee items were already cancelled")
    if ALL_FEES in sns:  # 2205/2302 read feedetl_sn "0000" as every item of the visit
        raise BrokerError("CORRECTION_NOT_ALLOWED", 'an item numbered "0000" cannot be withdrawn alone; cancel '
                                                    "the upload's items by hand")
    return Undoing(undo, undone_as, visit, feedetl_sns=sns)


def answer_of(undoing: Undoing, ref: CorrectionRef, fees_cancelled: int = 0) -> Output2601:
    """The answer of a correction that was not a settlement's (a settlement's answers its reversal)."""
    return Output2601(data=CorrectionResult(omsgid=ref.omsgid, oinfno=ref.oinfno, undone=undoing.undo,
                                            mdtrt_id=undoing.visit.mdtrt_id, fees_cancelled=fees_cancelled))


def record(st: BatchState, msg: RoutedRequest, ref: CorrectionRef, undone: Undone | str, *,
           output: Any = None, err_msg: str | None = None) -> None:
    """Keep the first correction of `ref.omsgid` and its answer (written with the batch)."""
    st.corrections[ref.omsgid] = Correction(
        omsgid=ref.omsgid, msgid=msg.msgid, oinfno=ref.oinfno, fixmedins_code=msg.fixmedins_code, undone=undone,
        output=None if output is None else encode(output), err_msg=err_msg,
    )
    st.new_corrections.append(ref.omsgid)


def _repeat(earlier: Correction) -> Answered:
    """A later correction of the same omsgid answers exactly what the first answered."""
    if earlier.err_msg is not None:
        code, _, text = earlier.err_msg.partition(": ")
        raise BrokerError(code, text)
    assert earlier.output is not None
    return Answered(msgspec.Raw(earlier.output))


def _original(omsgid: str, st: BatchState) -> Original | None:
    """The original's answer: from an earlier batch (loaded) or from this one."""
    if omsgid in st.responses:
        infno, hospital, infcode, _ = st.responses[omsgid]
        return Original(omsgid, infno, hospital, infcode, st.request_visits.get(omsgid))
    return st.originals.get(omsgid)


def _visit_of(original: Original, st: BatchState) -> Visit | None:
    """The visit a registration/admission created, a discharge or fee upload acted on."""
    for visit in st.visits.values():
        if visit.created_msgid == original.msgid:
            return visit
    for mdtrt_id, fees in st.fees.items():
        if any(f.upload_msgid == original.msgid for f in fees.values()):
            return st.visits.get(mdtrt_id)
    return st.visits.get(original.mdtrt_id) if original.mdtrt_id else None


def _checked(visit: Visit | None, ref: CorrectionRef) -> Visit:
    if visit is None:  # accepted, yet none of its rows is found: written before the engine recorded visits
        raise BrokerError("CORRECTION_NOT_ALLOWED", "the original's visit is not recorded; undo it by hand")
    if visit.psn_no != ref.psn_no:
        raise BrokerError("ORIGINAL_MISMATCH", "psn_no differs from the original's")
    return visit
