"""The settlement engine's decisions, pure: one routed request against the batch state.

Visit state machine per mdtrt_id:

  outpatient (11/14)  2201 → registered --2207--> settled --2208--> registered (may settle again)
                      registered --2202--> cancelled; 2203 sets med_type/diagnosis; fees 2204/2205
  inpatient (21)      2401 → admitted --2402--> discharged --2304--> settled --2305--> discharged
                      discharged --2405--> admitted; admitted/discharged --2404--> cancelled;
                      2403 changes admission data; fees 2301/2302
                      admitted --2304 mid_setl_flag 1--> admitted (a mid-stay part; 2305 of the latest
                      part leaves the state as it is); the discharge settlement (mid_setl_flag 0) is the
                      last part; 2404 is refused while parts are settled (VISIT_PART_SETTLED)
  pharmacy (41)       2102 creates the visit settled at once; 2103 reverses it (→ cancelled)

A settlement settles the visit's active fee items not yet settled (fee.setl_id marks the part that
settled each; medfee_sumamt must be their sum) and records the insured region's policy version in
force on its settlement date. Only the latest settlement of a visit not yet reversed may be reversed
(MID_SETTLEMENT_NOT_LATEST); the reversal unmarks its items and restores exactly its stored
accum_delta, whatever policy version is in force by then. The inpatient deductible applies once per
stay (later parts pay what the earlier parts left of it). Fees and cancellations only before the
final settlement; an item a part settled cannot be cancelled (FEE_ITEM_SETTLED); pre-settlement
(2206/2303/2101) computes without effect. A correction (2601, services/settle/correction.py) undoes an
original by its msgid through the function of the transaction that undoes it by hand (2207 → `_reverse`
as 2208, ...). The machine is data in the transaction registry (schemas/transactions.py: each
infno's visit kind, allowed-from states and resulting state); `_visit` and `_enter` apply it.
Each handler returns the response `output` or raises BrokerError; state changes are recorded
on the BatchState for the ledger to write.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import msgspec.structs

from schemas.codes import (
    FUND_PAY_TYPES,
    FUND_TOTAL,
    FUNDS,
    INSUTYPE_EMPLOYEE,
    MED_TYPE_CHRONIC_OUTPATIENT,
    MED_TYPE_GENERAL_OUTPATIENT,
    MED_TYPE_INPATIENT,
    MED_TYPE_PHARMACY,
    SCOPE_LOCAL,
    VISIT_KIND_MED_TYPES,
)
from schemas.correction import CorrectionRef, Input2601
from schemas.errors import BrokerError
from schemas.inpatient import (
    ADM_INFO_FIELDS,
    AdmissionChange,
    AdmissionInfo,
    DiseInfo,
    FeeDetail,
    FeeResult,
    Input2301,
    Input2302,
    Input2303,
    Input2304,
    Input2305,
    Input2401,
    Input2402,
    Input2403,
    Input2404,
    Input2405,
    Output2301,
    Output2401,
    OutputSettlement,
    SetlDetail,
    SetlInfo,
    VisitResult,
)
from schemas.internal import CatalogCtx, RoutedRequest
from schemas.money import to_fen, to_yuan
from schemas.outpatient import (
    FeeBatchCancel,
    Input2201,
    Input2202,
    Input2203,
    Input2204,
    Input2205,
    Input2206,
    Input2207,
    Input2208,
)
from schemas.pharmacy import DrugDetail, Input2101, Input2102, Input2103
from schemas.prescreen import Input3101, Input3102, Input3103
from schemas.transactions import STATE_REFUSALS, TRANSACTIONS, VisitEffect
from schemas.wire import parse_wire_time
from services.policy.logic import (
    Accumulators,
    FeeItem,
    FundSplit,
    PolicyError,
    SettlementInput,
    apply_delta,
    catalog_split,
    compute_split,
    delta_from_json,
    delta_to_json,
    revert_delta,
)
from services.policy.policies import PolicyBook
from services.settle import correction, prescreen
from services.settle.state import AMOUNT_FIELDS, BatchState, Fee, Settlement, Visit
from services.smartmon.rules import RuleBook, load_rules

# Policy refusals the hospital can act on; anything else from the policy engine is a bug (INTERNAL).
_POLICY_CODES = {"CHRONIC_DISEASE_NOT_COVERED", "MED_TYPE_UNSUPPORTED"}


@dataclass(frozen=True, slots=True)
class Effect:
    """What the handler produced: the response output and, for a settlement or reversal, the ledger row."""

    output: Any
    settlement: Settlement | None = None
    warn_msg: str = ""  # in-event warnings (2206/2303): advice, never a refusal


def handle(msg: RoutedRequest, st: BatchState, policies: PolicyBook, book: RuleBook | None = None) -> Effect:
    effect = _handle(msg, st, policies, book)
    if book is not None and isinstance(msg.body, Input2206 | Input2303):
        # the pre-settlement passed: its answer is as before, with the warnings that involve the visit
        info = msg.body.data if isinstance(msg.body, Input2206) else msg.body.mdtrtinfo
        visit = st.visits[info.mdtrt_id]
        fees = [f for f in st.active_fees(visit.mdtrt_id) if f.setl_id is None]
        warn = prescreen.settlement_warnings(msg, visit, fees, to_fen(info.medfee_sumamt), st, book)
        return Effect(effect.output, effect.settlement, warn)
    return effect


def _handle(msg: RoutedRequest, st: BatchState, policies: PolicyBook, book: RuleBook | None) -> Effect:
    body = msg.body
    correction.check_original(msg, st)
    match body:
        case Input2201():
            return _register(msg, body, st)
        case Input2202():
            return _cancel_visit(msg, st, body.data.mdtrt_id)
        case Input2203():
            return _outpatient_info(msg, body, st)
        case Input2204() | Input2301():
            return _upload_fees(msg, body.feedetail, st)
        case Input2205() | Input2302():
            return _cancel_fees(msg, body.data, st)
        case Input2206() | Input2207():
            return _settle_outpatient(msg, body, st, policies, effective=isinstance(body, Input2207))
        case Input2303() | Input2304():
            return _settle_inpatient(msg, body, st, policies, effective=isinstance(body, Input2304))
        case Input2208() | Input2305():
            return _reverse(msg, st, body.data.setl_id, _visit(msg, st, body.data.mdtrt_id))
        case Input2401():
            return _admit(msg, body, st)
        case Input2402():
            return _discharge(msg, body, st)
        case Input2403():
            return _change_admission(msg, body, st)
        case Input2404():
            return _cancel_visit(msg, st, body.data.mdtrt_id)
        case Input2405():
            return _cancel_discharge(msg, st, body.data.mdtrt_id)
        case Input2101() | Input2102():
            return _pharmacy(msg, body, st, policies, effective=isinstance(body, Input2102))
        case Input2103():
            return _reverse_pharmacy(msg, body, st)
        case Input2601():
            return _correct(msg, body, st)
        case Input3101() | Input3102():
            return Effect(prescreen.analyse(msg, body, st, book or default_rules()))
        case Input3103():
            return Effect(prescreen.dispose(msg, body, st))
    raise BrokerError("INFNO_UNSUPPORTED", f"infno {msg.infno} is not handled by the settlement engine")


@functools.cache
def default_rules() -> RuleBook:
    """The rules file the engine reads when it is given none (services/smartmon/rules.toml)."""
    return load_rules()


def mdtrt_id_for(msgid: str) -> str:
    """Deterministic, so a replayed registration or admission creates the same visit."""
    return "M" + msgid


def setl_id_for(msgid: str, kind: str) -> str:
    return ("S" if kind == "settle" else "R") + msgid


def _time(field: str, value: str) -> datetime:
    try:
        return parse_wire_time(field, value)
    except ValueError as e:
        raise BrokerError("BODY_MALFORMED", str(e)) from None


# --- visits ------------------------------------------------------------------------------------


def _effect(msg: RoutedRequest) -> VisitEffect:
    """The transaction's visit effect from the registry (schemas.transactions): kind, states, result."""
    effect = TRANSACTIONS[msg.infno].visit
    if effect is None:
        raise RuntimeError(f"infno {msg.infno} has no visit effect in the transaction registry")
    return effect


def _visit(msg: RoutedRequest, st: BatchState, mdtrt_id: str) -> Visit:
    """The visit the request names, if it is of the transaction's kind and in one of its allowed states."""
    effect = _effect(msg)
    visit = st.visits.get(mdtrt_id)
    if visit is None or visit.psn_no != msg.person.psn_no or visit.fixmedins_code != msg.fixmedins_code:
        raise BrokerError("VISIT_UNKNOWN", "no visit with that mdtrt_id for this person and hospital")
    if visit.med_type not in VISIT_KIND_MED_TYPES[effect.kind]:
        raise BrokerError("VISIT_TYPE_MISMATCH", f"the visit is not an {effect.kind} visit")
    if visit.state not in effect.from_states:
        code, text = STATE_REFUSALS[visit.state]
        raise BrokerError(code, f"{TRANSACTIONS[msg.infno].title}: {text}")
    st.request_visits[msg.msgid] = mdtrt_id  # what a correction (2601) of this request undoes
    return visit


def _enter(msg: RoutedRequest, st: BatchState, visit: Visit) -> None:
    """Move the visit to the transaction's resulting state (if it has one) and mark it for writing."""
    to_state = _effect(msg).to_state
    if to_state is not None:
        visit.state = to_state
    _changed(st, visit)


def _new_visit(msg: RoutedRequest, st: BatchState, *, med_type: str, ipt_otp_no: str, begntime: datetime,
               dise_codg: str | None) -> Visit:
    effect = _effect(msg)
    if not effect.creates or effect.to_state is None:
        raise RuntimeError(f"infno {msg.infno} does not create a visit in the transaction registry")
    state = effect.to_state
    mdtrt_id = mdtrt_id_for(msg.msgid)
    visit = Visit(
        mdtrt_id=mdtrt_id, psn_no=msg.person.psn_no, fixmedins_code=msg.fixmedins_code, med_type=med_type,
        insutype=msg.person.insutype, scope=msg.scope, insured_admdvs=msg.person.insured_admdvs,
        treating_admdvs=msg.hospital.admdvs, ipt_otp_no=ipt_otp_no, begntime=begntime, endtime=None,
        dise_codg=dise_codg, state=state, created_msgid=msg.msgid,
    )
    st.visits[mdtrt_id] = visit
    st.fees.setdefault(mdtrt_id, {})
    st.new_visits.append(mdtrt_id)
    st.request_visits[msg.msgid] = mdtrt_id
    return visit


def _changed(st: BatchState, visit: Visit) -> None:
    st.changed_visits.add(visit.mdtrt_id)


def _set_diagnoses(visit: Visit, diseinfo: Sequence[DiseInfo]) -> None:
    """A message's diagnosis list replaces the visit's; an empty (absent) list leaves it as it is."""
    if diseinfo:
        visit.diseinfo = msgspec.to_builtins(list(diseinfo))


def _register(msg: RoutedRequest, body: Input2201, st: BatchState) -> Effect:
    d = body.data
    visit = _new_visit(msg, st, med_type=MED_TYPE_GENERAL_OUTPATIENT, ipt_otp_no=d.ipt_otp_no,
                       begntime=_time("begntime", d.begntime), dise_codg=None)
    return Effect({"data": VisitResult(mdtrt_id=visit.mdtrt_id, psn_no=d.psn_no, ipt_otp_no=d.ipt_otp_no)})


def _outpatient_info(msg: RoutedRequest, body: Input2203, st: BatchState) -> Effect:
    info = body.mdtrtinfo
    visit = _visit(msg, st, info.mdtrt_id)
    if info.med_type == MED_TYPE_CHRONIC_OUTPATIENT and info.chronic_disease not in msg.person.chronic:
        raise BrokerError("CHRONIC_DISEASE_NOT_COVERED", "the person has no eligibility for that chronic disease")
    visit.med_type, visit.dise_codg = info.med_type, info.dise_codg
    visit.chronic_disease = info.chronic_disease if info.med_type == MED_TYPE_CHRONIC_OUTPATIENT else None
    visit.begntime = _time("begntime", info.begntime)
    _set_diagnoses(visit, body.diseinfo)
    _changed(st, visit)
    return Effect({})


def _admit(msg: RoutedRequest, body: Input2401, st: BatchState) -> Effect:
    info = body.mdtrtinfo
    if info.med_type != MED_TYPE_INPATIENT:
        raise BrokerError("MED_TYPE_UNSUPPORTED", f"admission (2401) needs med_type {MED_TYPE_INPATIENT}")
    visit = _new_visit(msg, st, med_type=MED_TYPE_INPATIENT, ipt_otp_no=info.ipt_otp_no,
                       begntime=_time("begntime", info.begntime), dise_codg=info.dise_codg)
    _set_adm_info(visit, info)
    _set_diagnoses(visit, body.diseinfo)
    return Effect(Output2401(result=VisitResult(mdtrt_id=visit.mdtrt_id, psn_no=info.psn_no,
                                                ipt_otp_no=info.ipt_otp_no)))


def _discharge(msg: RoutedRequest, body: Input2402, st: BatchState) -> Effect:
    visit = _visit(msg, st, body.dscginfo.mdtrt_id)
    endtime = _time("endtime", body.dscginfo.endtime)
    if endtime < visit.begntime:
        raise BrokerError("BODY_MALFORMED", "endtime: before the admission time")
    visit.endtime = endtime
    _set_diagnoses(visit, body.diseinfo)
    _enter(msg, st, visit)
    return Effect({})


def _change_admission(msg: RoutedRequest, body: Input2403, st: BatchState) -> Effect:
    """2403: change what the national interface lets a hospital change in a stay; absent fields are kept."""
    info = body.adminfo
    visit = _visit(msg, st, info.mdtrt_id)
    if info.med_type is not None and info.med_type != MED_TYPE_INPATIENT:
        raise BrokerError("MED_TYPE_UNSUPPORTED", f"a stay's med_type can only be {MED_TYPE_INPATIENT}")
    begntime = _time("begntime", info.begntime) if info.begntime is not None else visit.begntime
    endtime = visit.endtime
    if info.endtime is not None:
        if visit.state != "discharged":
            raise BrokerError("VISIT_NOT_DISCHARGED", "endtime: the stay is not discharged; send the discharge (2402)")
        endtime = _time("endtime", info.endtime)
    if endtime is not None and endtime < begntime:
        raise BrokerError("BODY_MALFORMED", "begntime: after the discharge time")
    visit.begntime, visit.endtime = begntime, endtime
    if info.ipt_otp_no is not None:
        visit.ipt_otp_no = info.ipt_otp_no
    if info.dise_codg is not None:
        visit.dise_codg = info.dise_codg
    _set_adm_info(visit, info)
    _set_diagnoses(visit, body.diseinfo)
    _changed(st, visit)
    return Effect({})


def _set_adm_info(visit: Visit, info: AdmissionInfo | AdmissionChange) -> None:
    """The stay's particulars (ADM_INFO_FIELDS) the message carries replace the visit's."""
    changed = {f: v for f in ADM_INFO_FIELDS if (v := getattr(info, f, None))}
    if changed:
        visit.adm_info = {**visit.adm_info, **changed}


def _cancel_discharge(msg: RoutedRequest, st: BatchState, mdtrt_id: str) -> Effect:
    visit = _visit(msg, st, mdtrt_id)
    visit.endtime = None
    _enter(msg, st, visit)
    return Effect({})


def _cancel_visit(msg: RoutedRequest, st: BatchState, mdtrt_id: str) -> Effect:
    visit = _visit(msg, st, mdtrt_id)
    if st.open_settlements(visit.mdtrt_id):  # mid-stay parts: the money was paid, reverse them first
        raise BrokerError("VISIT_PART_SETTLED", "the stay has settled mid-stay parts; reverse them first (2305)")
    _enter(msg, st, visit)
    return Effect({})


# --- fees --------------------------------------------------------------------------------------


def _fee(mdtrt_id: str, item: FeeDetail | DrugDetail, cat: CatalogCtx, msgid: str) -> Fee:
    return Fee(
        mdtrt_id=mdtrt_id, feedetl_sn=item.feedetl_sn, med_list_codg=item.med_list_codg,
        medins_list_codg=item.medins_list_codg, chrgitm_lv=cat.chrgitm_lv, selfpay_prop=cat.selfpay_prop,
        pric_uplmt_fen=cat.pric_uplmt_fen, fee_fen=to_fen(item.det_item_fee_sumamt), cnt=item.cnt,
        pric_fen=to_fen(item.pric), fee_ocur_time=_time("fee_ocur_time", item.fee_ocur_time), upload_msgid=msgid,
        once_per_day=cat.once_per_day, gender_only=cat.gender_only, supply_days=cat.supply_days,
    )


def _upload_fees(msg: RoutedRequest, items: Sequence[FeeDetail], st: BatchState) -> Effect:
    visit = _visit(msg, st, items[0].mdtrt_id)
    existing = st.fees.setdefault(visit.mdtrt_id, {})
    # Check every item before changing anything: a refused upload leaves no item behind.
    fees = [_fee(visit.mdtrt_id, item, cat, msg.msgid) for item, cat in zip(items, msg.catalog, strict=True)]
    if len({f.feedetl_sn for f in fees}) != len(fees):
        raise BrokerError("FEE_ITEM_DUPLICATE", "feedetl_sn repeats within the upload")
    for fee in fees:
        before = existing.get(fee.feedetl_sn)
        if before is not None and not before.cancelled and _fee_content(before) != _fee_content(fee):
            raise BrokerError("FEE_ITEM_DUPLICATE", "feedetl_sn already uploaded with other content")
    results = []
    for item, cat, fee in zip(items, msg.catalog, fees, strict=True):
        before = existing.get(fee.feedetl_sn)
        if before is None or before.cancelled:  # new, or a re-upload replacing a cancelled item
            key = (visit.mdtrt_id, fee.feedetl_sn)
            st.cancelled_fees = [k for k in st.cancelled_fees if k != key]
            st.new_fees.append(key)
            existing[fee.feedetl_sn] = fee
        split = catalog_split([_fee_item(fee)])
        results.append(FeeResult(
            feedetl_sn=item.feedetl_sn, det_item_fee_sumamt=item.det_item_fee_sumamt, cnt=item.cnt,
            pric=item.pric, selfpay_prop=cat.selfpay_prop, fulamt_ownpay_amt=to_yuan(split.fulamt_ownpay),
            preselfpay_amt=to_yuan(split.preselfpay), inscp_scp_amt=to_yuan(split.inscp), chrgitm_lv=cat.chrgitm_lv,
        ))
    return Effect(Output2301(result=results))


def _fee_content(f: Fee) -> tuple[Any, ...]:
    return (f.med_list_codg, f.fee_fen, f.cnt, f.pric_fen, f.fee_ocur_time)


def _fee_item(f: Fee) -> FeeItem:
    return FeeItem(fee_fen=f.fee_fen, cnt=f.cnt, chrgitm_lv=f.chrgitm_lv, selfpay_prop=f.selfpay_prop,
                   pric_uplmt_fen=f.pric_uplmt_fen)


def _cancel_fees(msg: RoutedRequest, refs: Sequence[Any], st: BatchState) -> Effect:
    visit = _visit(msg, st, refs[0].mdtrt_id)
    sns = {r.feedetl_sn for r in refs}
    if any(f.setl_id is not None and f.feedetl_sn in sns for f in st.active_fees(visit.mdtrt_id)):
        raise BrokerError("FEE_ITEM_SETTLED", "a fee item named was settled by a mid-stay part")
    # "0000" cancels every item not yet settled (a part's items stay with the part)
    targets = [f for f in st.active_fees(visit.mdtrt_id)
               if f.setl_id is None and ("0000" in sns or f.feedetl_sn in sns)]
    for f in targets:
        f.cancelled = True
        st.cancelled_fees.append((f.mdtrt_id, f.feedetl_sn))
    return Effect({"cancelled": len(targets)})


# --- settlement ----------------------------------------------------------------------------------


def _settle_inpatient(msg: RoutedRequest, body: Input2303 | Input2304, st: BatchState, policies: PolicyBook,
                      *, effective: bool) -> Effect:
    info = body.mdtrtinfo
    visit = _visit(msg, st, info.mdtrt_id)
    mid = info.mid_setl_flag == "1"
    if mid and visit.state != "admitted":
        raise BrokerError("VISIT_DISCHARGED", "mid-stay settlement needs an open stay; a discharged stay settles "
                                              "with mid_setl_flag 0")
    if not mid and effective and visit.state != "discharged":
        code, text = STATE_REFUSALS[visit.state]
        raise BrokerError(code, f"{TRANSACTIONS[msg.infno].title}: {text}")
    return _settle(msg, visit, st, policies, to_fen(info.medfee_sumamt), info.acct_used_flag == "1", effective,
                   mid=mid)


def _settle_outpatient(msg: RoutedRequest, body: Input2206 | Input2207, st: BatchState, policies: PolicyBook,
                       *, effective: bool) -> Effect:
    d = body.data
    visit = _visit(msg, st, d.mdtrt_id)
    if d.med_type != visit.med_type:
        raise BrokerError("MED_TYPE_UNSUPPORTED", "med_type differs from the visit's (declare 14 with 2203)")
    return _settle(msg, visit, st, policies, to_fen(d.medfee_sumamt), d.acct_used_flag == "1", effective)


def _settle(msg: RoutedRequest, visit: Visit, st: BatchState, policies: PolicyBook, medfee_fen: int,
            use_account: bool, effective: bool, *, mid: bool = False) -> Effect:
    fees = [f for f in st.active_fees(visit.mdtrt_id) if f.setl_id is None]  # not settled by an earlier part
    # The discharge settlement of a stay whose parts settled every item closes it with nothing left to pay.
    closes_parts = not mid and visit.med_type == MED_TYPE_INPATIENT and bool(st.open_settlements(visit.mdtrt_id))
    if not fees and not closes_parts:
        raise BrokerError("NO_FEES", "the visit has no uploaded fee items not yet settled")
    if medfee_fen != sum(f.fee_fen for f in fees):
        raise BrokerError("MEDFEE_MISMATCH", "medfee_sumamt differs from the sum of the fee items not yet settled")
    if visit.med_type == MED_TYPE_CHRONIC_OUTPATIENT and visit.chronic_disease not in msg.person.chronic:
        raise BrokerError("CHRONIC_DISEASE_NOT_COVERED", "the person has no eligibility for that chronic disease")
    row = _compute(msg, visit, st, policies, fees, use_account, effective, mid=mid)
    if effective:
        for f in fees:
            f.setl_id = row.setl_id
            st.settled_fees[(f.mdtrt_id, f.feedetl_sn)] = row.setl_id
        if not mid:  # a part leaves the stay open
            _enter(msg, st, visit)
    return Effect(settlement_output(row), row if effective else None)


def _compute(msg: RoutedRequest, visit: Visit, st: BatchState, policies: PolicyBook, fees: list[Fee],
             use_account: bool, effective: bool, *, mid: bool = False) -> Settlement:
    """The fund split against the person's year-to-date state; with `effective`, applied to the batch state."""
    person = msg.person
    setl_time = _time("inf_time", msg.inf_time)
    year = setl_time.year  # inf_time is Asia/Shanghai wall time (REFERENCE §2): the calendar year of the fund
    acc = st.accumulators.get((person.psn_no, year), Accumulators())
    balance = st.accounts.get(person.psn_no, person.acct_balc_fen)
    earlier = st.open_settlements(visit.mdtrt_id)  # the stay's parts settled so far
    inp = SettlementInput(
        med_type=visit.med_type, insutype=person.insutype, psn_type=person.psn_type, hosp_lv=msg.hospital.hosp_lv,
        assistance=person.assistance, filing_type=msg.filing_type if visit.scope != SCOPE_LOCAL else None,
        chronic_disease=visit.chronic_disease, use_account=use_account and person.insutype == INSUTYPE_EMPLOYEE,
        account_balance_fen=balance, items=[_fee_item(f) for f in fees],
        inpatient_deductible_taken_fen=sum(s.amounts["act_pay_dedc"] for s in earlier),
    )
    # the version in force on the settlement date (Asia/Shanghai wall time, like the accumulator year)
    policy = policies.for_region(person.insured_admdvs, person.insured_pool, on=setl_time.date())
    try:
        split = compute_split(policy, inp, acc)
    except PolicyError as e:
        if e.code in _POLICY_CODES:
            raise BrokerError(e.code, "the insured region's policy does not cover this settlement") from None
        raise
    row = _row(msg, visit, setl_id_for(msg.msgid, "settle") if effective else "", setl_time, year, split)
    row.policy_version, row.mid_setl, row.stay_part = policy.version, mid, len(earlier) + 1
    if effective:
        st.accumulators[(person.psn_no, year)] = apply_delta(acc, split.delta)
        st.changed_accumulators.add((person.psn_no, year))
        st.accounts[person.psn_no] = balance - split.acct_pay
        st.changed_accounts.add(person.psn_no)
        st.add_settlement(row)
    return row


def _row(msg: RoutedRequest, visit: Visit, setl_id: str, setl_time: datetime, year: int,
         split: FundSplit) -> Settlement:
    person, hospital = msg.person, msg.hospital
    non_local = visit.scope != SCOPE_LOCAL
    return Settlement(
        setl_id=setl_id, msgid=msg.msgid, kind="settle", orig_setl_id=None, mdtrt_id=visit.mdtrt_id,
        psn_no=person.psn_no, fixmedins_code=msg.fixmedins_code, insutype=person.insutype,
        med_type=visit.med_type, scope=visit.scope, filing_type=msg.filing_type if non_local else None,
        insured_admdvs=person.insured_admdvs, insured_pool=person.insured_pool,
        treating_admdvs=hospital.admdvs, treating_pool=hospital.pool_admdvs,
        clr_optins=person.insured_pool if non_local else hospital.pool_admdvs,
        setl_time=setl_time, acc_year=year, amounts={name: getattr(split, name) for name in AMOUNT_FIELDS},
        pool_prop_selfpay=split.pool_prop_selfpay, accum_delta=delta_to_json(split.delta),
    )


def _pharmacy(msg: RoutedRequest, body: Input2101 | Input2102, st: BatchState, policies: PolicyBook,
              *, effective: bool) -> Effect:
    d = body.data
    mdtrt_id = mdtrt_id_for(msg.msgid)
    fees = [_fee(mdtrt_id, item, cat, msg.msgid) for item, cat in zip(body.drugdetail, msg.catalog, strict=True)]
    if len({f.feedetl_sn for f in fees}) != len(fees):
        raise BrokerError("FEE_ITEM_DUPLICATE", "feedetl_sn repeats within the purchase")
    if to_fen(d.medfee_sumamt) != sum(f.fee_fen for f in fees):
        raise BrokerError("MEDFEE_MISMATCH", "medfee_sumamt differs from the sum of the drug items")
    begntime = _time("begntime", d.begntime)
    draft = Visit(mdtrt_id=mdtrt_id if effective else "", psn_no=msg.person.psn_no,
                  fixmedins_code=msg.fixmedins_code, med_type=MED_TYPE_PHARMACY, insutype=msg.person.insutype,
                  scope=msg.scope,
                  insured_admdvs=msg.person.insured_admdvs, treating_admdvs=msg.hospital.admdvs,
                  ipt_otp_no=msg.msgid, begntime=begntime, endtime=None, dise_codg=None, state="settled",
                  created_msgid=msg.msgid)
    use_account = d.acct_used_flag == "1"
    row = _compute(msg, draft, st, policies, fees, use_account, effective=False)  # refusals happen here
    if effective:  # nothing was changed before this point: a refused purchase leaves no trace
        _new_visit(msg, st, med_type=MED_TYPE_PHARMACY, ipt_otp_no=msg.msgid, begntime=begntime, dise_codg=None)
        for f in fees:
            st.fees[mdtrt_id][f.feedetl_sn] = f
            st.new_fees.append((mdtrt_id, f.feedetl_sn))
        row = _compute(msg, st.visits[mdtrt_id], st, policies, fees, use_account, effective=True)
        for f in fees:  # written with the items (their insert reads the fee at write time)
            f.setl_id = row.setl_id
    return Effect(settlement_output(row), row if effective else None)


# --- reversal ----------------------------------------------------------------------------------


def _reverse_pharmacy(msg: RoutedRequest, body: Input2103, st: BatchState) -> Effect:
    orig = st.settlements.get(body.data.setl_id)
    if orig is None:
        raise BrokerError("SETTLEMENT_UNKNOWN", "no settlement with that setl_id for this person and pharmacy")
    visit = _visit(msg, st, orig.mdtrt_id)
    return _reverse(msg, st, body.data.setl_id, visit)


def _reverse(msg: RoutedRequest, st: BatchState, setl_id: str, visit: Visit) -> Effect:
    orig = st.settlements.get(setl_id)
    if orig is None or orig.kind != "settle" or orig.mdtrt_id != visit.mdtrt_id:
        raise BrokerError("SETTLEMENT_UNKNOWN", "no settlement with that setl_id for this visit and hospital")
    if orig.reversed:
        raise BrokerError("SETTLEMENT_REVERSED", "the settlement was already reversed")
    if any(s.stay_part > orig.stay_part for s in st.open_settlements(orig.mdtrt_id)):
        # parts are undone newest first: a later part continued from this one's accumulators
        raise BrokerError("MID_SETTLEMENT_NOT_LATEST", "only the latest settlement of the stay not yet reversed "
                                                       "may be reversed; reverse the later parts first")
    delta = delta_from_json(orig.accum_delta)
    key = (orig.psn_no, orig.acc_year)
    st.accumulators[key] = revert_delta(st.accumulators.get(key, Accumulators()), delta)
    st.changed_accumulators.add(key)
    balance = st.accounts.get(orig.psn_no, msg.person.acct_balc_fen) + delta.account_spent
    st.accounts[orig.psn_no] = balance
    st.changed_accounts.add(orig.psn_no)
    amounts = {name: -value for name, value in orig.amounts.items()}
    amounts["balc"] = balance
    negated = {k: ({d: -v for d, v in val.items()} if isinstance(val, dict) else -val)
               for k, val in orig.accum_delta.items()}
    row = Settlement(
        setl_id=setl_id_for(msg.msgid, "reverse"), msgid=msg.msgid, kind="reverse", orig_setl_id=orig.setl_id,
        mdtrt_id=orig.mdtrt_id, psn_no=orig.psn_no, fixmedins_code=orig.fixmedins_code, insutype=orig.insutype,
        med_type=orig.med_type, scope=orig.scope, filing_type=orig.filing_type,
        insured_admdvs=orig.insured_admdvs, insured_pool=orig.insured_pool, treating_admdvs=orig.treating_admdvs,
        treating_pool=orig.treating_pool, clr_optins=orig.clr_optins, setl_time=_time("inf_time", msg.inf_time),
        acc_year=orig.acc_year, amounts=amounts, pool_prop_selfpay=orig.pool_prop_selfpay, accum_delta=negated,
        policy_version=orig.policy_version, mid_setl=orig.mid_setl, stay_part=orig.stay_part,
    )
    orig.reversed = True
    for f in st.fees.get(orig.mdtrt_id, {}).values():  # loaded items (the ledger unmarks the others too)
        if f.setl_id == orig.setl_id:
            f.setl_id = None
            st.settled_fees[(f.mdtrt_id, f.feedetl_sn)] = None
    st.unsettled_by.append((orig.mdtrt_id, orig.setl_id))
    if orig.mid_setl:  # the stay stays as it is (admitted, or discharged since)
        _changed(st, visit)
    else:
        _enter(msg, st, visit)
    st.add_settlement(row)
    return Effect(settlement_output(row), row)


# --- correction (2601) ---------------------------------------------------------------------------


def _correct(msg: RoutedRequest, body: Input2601, st: BatchState) -> Effect:
    """Undo the original by the function of the transaction that undoes it by hand (services/settle/correction.py)."""
    ref = body.data
    step = correction.plan(msg, ref, st)
    if isinstance(step, correction.Answered):
        return Effect(step.output)
    as_undoing = msgspec.structs.replace(msg, infno=step.undone_as)  # its visit rules and resulting state
    try:
        output, effect = _undo(as_undoing, ref, step, st)
    except BrokerError as e:
        if e.code in _TOO_LATE_TO_UNDO:
            raise BrokerError("CORRECTION_NOT_ALLOWED", e.message) from None
        raise
    correction.record(st, msg, ref, step.undo, output=output)
    return Effect(output, effect.settlement)


# Refusals of the undoing functions that mean "too late to undo this original" — a later mid-stay part
# continued from it, its items or its stay were settled since: a correction answers them with one code.
_TOO_LATE_TO_UNDO = frozenset({"MID_SETTLEMENT_NOT_LATEST", "FEE_ITEM_SETTLED", "VISIT_PART_SETTLED"})


def _undo(as_undoing: RoutedRequest, ref: CorrectionRef, step: correction.Undoing,
          st: BatchState) -> tuple[Any, Effect]:
    mdtrt_id = step.visit.mdtrt_id
    output: Any
    if step.undo == "reverse":
        effect = _reverse(as_undoing, st, step.setl_id, _visit(as_undoing, st, mdtrt_id))
        output = effect.output
    elif step.undo == "cancel_visit":
        effect = _cancel_visit(as_undoing, st, mdtrt_id)
        output = correction.answer_of(step, ref)
    elif step.undo == "cancel_discharge":
        effect = _cancel_discharge(as_undoing, st, mdtrt_id)
        output = correction.answer_of(step, ref)
    else:
        refs = [FeeBatchCancel(mdtrt_id=mdtrt_id, psn_no=ref.psn_no, feedetl_sn=sn) for sn in step.feedetl_sns]
        effect = _cancel_fees(as_undoing, refs, st)
        output = correction.answer_of(step, ref, fees_cancelled=len(step.feedetl_sns))
    return output, effect


# --- output ------------------------------------------------------------------------------------


def settlement_output(row: Settlement) -> OutputSettlement:
    a = row.amounts
    info = SetlInfo(
        setl_id=row.setl_id, mdtrt_id=row.mdtrt_id, psn_no=row.psn_no, insutype=row.insutype,
        med_type=row.med_type, medins_setl_id=row.msgid, setl_time=row.setl_time.strftime("%Y-%m-%d %H:%M:%S"),
        pool_prop_selfpay=row.pool_prop_selfpay, clr_type=row.med_type, clr_way="1", clr_optins=row.clr_optins,
        **{name: to_yuan(a[name]) for name in AMOUNT_FIELDS},
    )
    detail = []
    for fund in FUNDS:
        if a[fund]:
            code, name = FUND_PAY_TYPES.get((fund, row.insutype), ("999999", fund))
            detail.append(SetlDetail(fund_pay_type=code, fund_pay_type_name=name,
                                     inscp_scp_amt=to_yuan(a["inscp_scp_amt"]), fund_payamt=to_yuan(a[fund])))
    return OutputSettlement(setlinfo=info, setldetail=detail)


def check_row_invariants(row: Settlement) -> None:
    """Pair assertion at the write side (the table's CHECKs are the read side)."""
    a = row.amounts
    if a[FUND_TOTAL] != sum(a[f] for f in FUNDS):
        raise RuntimeError("ledger row: fund total is not the sum of the funds")
    if a["psn_part_amt"] != a["medfee_sumamt"] - a["fund_pay_sumamt"]:
        raise RuntimeError("ledger row: personal part is not total minus fund")
    if a["psn_cash_pay"] != a["psn_part_amt"] - a["acct_pay"]:
        raise RuntimeError("ledger row: cash is not personal part minus account")
