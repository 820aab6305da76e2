"""The settlement engine's decisions, pure: one routed request against the batch state.

Visit state machine per mdtrt_id (inpatient):
    2401 → admitted --2402--> discharged --2304--> settled --2305--> discharged (may settle again)
    admitted/discharged --2404--> cancelled (not once settled)
Fees (2301/2302) only before settlement; 2303 computes without effect.
Each handler returns the response `output` or raises BrokerError; state changes
are recorded on the BatchState for the ledger to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.errors import BrokerError
from schemas.inpatient import (
    FeeResult,
    Input2301,
    Input2302,
    Input2303,
    Input2304,
    Input2305,
    Input2401,
    Input2402,
    Input2404,
    Output2301,
    Output2401,
    OutputSettlement,
    SetlDetail,
    SetlInfo,
    VisitResult,
)
from schemas.internal import RoutedRequest
from schemas.money import to_fen, to_yuan
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
from services.settle.state import AMOUNT_FIELDS, BatchState, Fee, Settlement, Visit

FUND_NAMES = {
    ("hifp_pay", "310"): ("310100", "职工基本医疗保险统筹基金"),
    ("hifp_pay", "390"): ("390100", "城乡居民基本医疗保险基金"),
    ("hifmi_pay", "390"): ("390200", "城乡居民大病医疗保险资金"),
    ("hifob_pay", "310"): ("330200", "职工大额医疗费用补助基金"),
    ("maf_pay", "310"): ("610100", "医疗救助基金"),
    ("maf_pay", "390"): ("610100", "医疗救助基金"),
}


@dataclass(frozen=True, slots=True)
class Effect:
    """What the handler produced: the response output and, for 2304/2305, the ledger row."""

    output: Any
    settlement: Settlement | None = None


def handle(msg: RoutedRequest, st: BatchState, policies: PolicyBook) -> Effect:
    body = msg.body
    match body:
        case Input2401():
            return _admit(msg, body, st)
        case Input2402():
            return _discharge(msg, body, st)
        case Input2404():
            return _cancel_admission(msg, body, st)
        case Input2301():
            return _upload_fees(msg, body, st)
        case Input2302():
            return _cancel_fees(msg, body, st)
        case Input2303() | Input2304():
            return _settle(msg, body, st, policies, effective=isinstance(body, Input2304))
        case Input2305():
            return _reverse(msg, body, st)
    raise BrokerError("INFNO_UNSUPPORTED", f"infno {msg.infno} is not handled by the settlement engine")


def mdtrt_id_for(msgid: str) -> str:
    """Deterministic, so a replayed admission creates the same visit."""
    return "M" + msgid


def setl_id_for(msgid: str, kind: str) -> str:
    return ("S" if kind == "settle" else "R") + msgid


def _time(field: str, value: str) -> datetime:
    try:
        return parse_wire_time(field, value)
    except ValueError as e:
        raise BrokerError("BODY_MALFORMED", str(e)) from None


def _visit(msg: RoutedRequest, st: BatchState, mdtrt_id: str) -> Visit:
    visit = st.visits.get(mdtrt_id)
    if visit is None or visit.psn_no != msg.person.psn_no or visit.fixmedins_code != msg.fixmedins_code:
        raise BrokerError("VISIT_UNKNOWN", "no visit with that mdtrt_id for this person and hospital")
    return visit


def _require_state(visit: Visit, allowed: tuple[str, ...], action: str) -> None:
    if visit.state not in allowed:
        raise BrokerError("VISIT_STATE", f"cannot {action}: the visit is {visit.state}")


def _admit(msg: RoutedRequest, body: Input2401, st: BatchState) -> Effect:
    info = body.mdtrtinfo
    if info.med_type != "21":
        raise BrokerError("MED_TYPE_UNSUPPORTED", "admission (2401) needs med_type 21")
    mdtrt_id = mdtrt_id_for(msg.msgid)
    st.visits[mdtrt_id] = Visit(
        mdtrt_id=mdtrt_id, psn_no=info.psn_no, fixmedins_code=msg.fixmedins_code, med_type=info.med_type,
        insutype=info.insutype, scope=msg.scope, insured_admdvs=msg.person.insured_admdvs,
        treating_admdvs=msg.hospital.admdvs, ipt_otp_no=info.ipt_otp_no,
        begntime=_time("begntime", info.begntime), endtime=None, dise_codg=info.dise_codg,
        state="admitted", created_msgid=msg.msgid,
    )
    st.fees.setdefault(mdtrt_id, {})
    st.new_visits.append(mdtrt_id)
    return Effect(Output2401(result=VisitResult(mdtrt_id=mdtrt_id, psn_no=info.psn_no,
                                                ipt_otp_no=info.ipt_otp_no)))


def _discharge(msg: RoutedRequest, body: Input2402, st: BatchState) -> Effect:
    visit = _visit(msg, st, body.dscginfo.mdtrt_id)
    _require_state(visit, ("admitted",), "discharge")
    endtime = _time("endtime", body.dscginfo.endtime)
    if endtime < visit.begntime:
        raise BrokerError("BODY_MALFORMED", "endtime: before the admission time")
    visit.state, visit.endtime = "discharged", endtime
    st.changed_visits.add(visit.mdtrt_id)
    return Effect({})


def _cancel_admission(msg: RoutedRequest, body: Input2404, st: BatchState) -> Effect:
    visit = _visit(msg, st, body.data.mdtrt_id)
    _require_state(visit, ("admitted", "discharged"), "cancel the admission")
    visit.state = "cancelled"
    st.changed_visits.add(visit.mdtrt_id)
    return Effect({})


def _upload_fees(msg: RoutedRequest, body: Input2301, st: BatchState) -> Effect:
    visit = _visit(msg, st, body.feedetail[0].mdtrt_id)
    _require_state(visit, ("admitted", "discharged"), "upload fees")
    existing = st.fees.setdefault(visit.mdtrt_id, {})
    results = []
    for item, cat in zip(body.feedetail, msg.catalog, strict=True):
        fee = Fee(
            mdtrt_id=visit.mdtrt_id, feedetl_sn=item.feedetl_sn, med_list_codg=item.med_list_codg,
            medins_list_codg=item.medins_list_codg, chrgitm_lv=cat.chrgitm_lv, selfpay_prop=cat.selfpay_prop,
            pric_uplmt_fen=cat.pric_uplmt_fen, fee_fen=to_fen(item.det_item_fee_sumamt), cnt=item.cnt,
            pric_fen=to_fen(item.pric), fee_ocur_time=_time("fee_ocur_time", item.fee_ocur_time),
            upload_msgid=msg.msgid,
        )
        before = existing.get(item.feedetl_sn)
        if before is not None and not before.cancelled:
            if _fee_content(before) != _fee_content(fee):
                raise BrokerError("FEE_ITEM_DUPLICATE", "feedetl_sn already uploaded with other content")
        else:
            if before is None:
                st.new_fees.append((visit.mdtrt_id, item.feedetl_sn))
            else:  # re-upload of a cancelled item replaces it
                st.cancelled_fees = [k for k in st.cancelled_fees if k != (visit.mdtrt_id, item.feedetl_sn)]
                st.new_fees.append((visit.mdtrt_id, item.feedetl_sn))
            existing[item.feedetl_sn] = fee
        split = catalog_split([_fee_item(fee)])
        results.append(FeeResult(
            feedetl_sn=item.feedetl_sn, det_item_fee_sumamt=item.det_item_fee_sumamt, cnt=item.cnt,
            pric=item.pric, selfpay_prop=cat.selfpay_prop, fulamt_ownpay_amt=to_yuan(split.fulamt_ownpay),
            preselfpay_amt=to_yuan(split.preselfpay), inscp_scp_amt=to_yuan(split.inscp),
            chrgitm_lv=cat.chrgitm_lv,
        ))
    return Effect(Output2301(result=results))


def _fee_content(f: Fee) -> tuple[Any, ...]:
    return (f.med_list_codg, f.fee_fen, f.cnt, f.pric_fen, f.fee_ocur_time)


def _fee_item(f: Fee) -> FeeItem:
    return FeeItem(fee_fen=f.fee_fen, cnt=f.cnt, chrgitm_lv=f.chrgitm_lv, selfpay_prop=f.selfpay_prop,
                   pric_uplmt_fen=f.pric_uplmt_fen)


def _cancel_fees(msg: RoutedRequest, body: Input2302, st: BatchState) -> Effect:
    visit = _visit(msg, st, body.data[0].mdtrt_id)
    _require_state(visit, ("admitted", "discharged"), "cancel fees")
    fees = st.fees.get(visit.mdtrt_id, {})
    sns = {c.feedetl_sn for c in body.data}
    targets = [f for f in fees.values() if not f.cancelled and ("0000" in sns or f.feedetl_sn in sns)]
    for f in targets:
        f.cancelled = True
        st.cancelled_fees.append((f.mdtrt_id, f.feedetl_sn))
    return Effect({"cancelled": len(targets)})


def _acc_year(t: datetime) -> int:
    return t.year


def _settle(msg: RoutedRequest, body: Input2303 | Input2304, st: BatchState, policies: PolicyBook,
            *, effective: bool) -> Effect:
    info = body.mdtrtinfo
    visit = _visit(msg, st, info.mdtrt_id)
    if effective:
        _require_state(visit, ("discharged",), "settle (discharge first; a settled visit is reversed first)")
    else:
        _require_state(visit, ("admitted", "discharged"), "pre-settle")
    fees = st.active_fees(visit.mdtrt_id)
    if not fees:
        raise BrokerError("NO_FEES", "the visit has no uploaded fee items")
    total = sum(f.fee_fen for f in fees)
    if to_fen(info.medfee_sumamt) != total:
        raise BrokerError("MEDFEE_MISMATCH", "medfee_sumamt differs from the sum of uploaded fee items")
    person = msg.person
    setl_time = _time("inf_time", msg.inf_time)
    year = _acc_year(setl_time)
    acc = st.accumulators.get((person.psn_no, year), Accumulators())
    balance = st.accounts.get(person.psn_no, person.acct_balc_fen)
    policy = policies.for_region(person.insured_admdvs, person.insured_pool)
    try:
        split = compute_split(policy, _settlement_input(msg, visit, info.acct_used_flag == "1", balance, fees), acc)
    except PolicyError as e:
        raise BrokerError("INTERNAL" if e.code not in _POLICY_CODES else e.code, "policy rejected the settlement") \
            from None
    setl_id = setl_id_for(msg.msgid, "settle") if effective else ""
    row = _row(msg, visit, setl_id, "settle", None, setl_time, year, split)
    if effective:
        st.accumulators[(person.psn_no, year)] = apply_delta(acc, split.delta)
        st.changed_accumulators.add((person.psn_no, year))
        if split.acct_pay:
            st.accounts[person.psn_no] = balance - split.acct_pay
            st.changed_accounts.add(person.psn_no)
        elif person.psn_no not in st.accounts:
            st.accounts[person.psn_no] = balance
        visit.state = "settled"
        st.changed_visits.add(visit.mdtrt_id)
        st.settlements[setl_id] = row
        st.new_settlements.append(setl_id)
    return Effect(settlement_output(row), row if effective else None)


_POLICY_CODES = {"CHRONIC_DISEASE_NOT_COVERED", "MED_TYPE_UNSUPPORTED"}


def _settlement_input(
    msg: RoutedRequest, visit: Visit, use_account: bool, balance: int, fees: list[Fee]
) -> SettlementInput:
    return SettlementInput(
        med_type=visit.med_type, insutype=msg.person.insutype, psn_type=msg.person.psn_type,
        hosp_lv=msg.hospital.hosp_lv, assistance=msg.person.assistance,
        filing_type=msg.filing_type if visit.scope != "local" else None, chronic_disease=None,
        use_account=use_account and msg.person.insutype == "310", account_balance_fen=balance,
        items=[_fee_item(f) for f in fees],
    )


def _row(msg: RoutedRequest, visit: Visit, setl_id: str, kind: str, orig: str | None, setl_time: datetime,
         year: int, split: FundSplit) -> Settlement:
    person, hospital = msg.person, msg.hospital
    non_local = visit.scope != "local"
    return Settlement(
        setl_id=setl_id, msgid=msg.msgid, kind=kind, orig_setl_id=orig, mdtrt_id=visit.mdtrt_id,
        psn_no=person.psn_no, fixmedins_code=msg.fixmedins_code, insutype=person.insutype,
        med_type=visit.med_type, scope=visit.scope, filing_type=msg.filing_type if non_local else None,
        insured_admdvs=person.insured_admdvs, insured_pool=person.insured_pool,
        treating_admdvs=hospital.admdvs, treating_pool=hospital.pool_admdvs,
        clr_optins=person.insured_pool if non_local else hospital.pool_admdvs,
        setl_time=setl_time, acc_year=year,
        amounts={name: getattr(split, name) for name in AMOUNT_FIELDS},
        pool_prop_selfpay=split.pool_prop_selfpay, accum_delta=delta_to_json(split.delta),
    )


def _reverse(msg: RoutedRequest, body: Input2305, st: BatchState) -> Effect:
    ref = body.data
    visit = _visit(msg, st, ref.mdtrt_id)
    orig = st.settlements.get(ref.setl_id)
    if orig is None or orig.kind != "settle" or orig.mdtrt_id != visit.mdtrt_id:
        raise BrokerError("SETTLEMENT_UNKNOWN", "no settlement with that setl_id for this visit and hospital")
    if orig.reversed:
        raise BrokerError("SETTLEMENT_REVERSED", "the settlement was already reversed")
    delta = delta_from_json(orig.accum_delta)
    key = (orig.psn_no, orig.acc_year)
    try:
        st.accumulators[key] = revert_delta(st.accumulators.get(key, Accumulators()), delta)
    except PolicyError:
        raise BrokerError("INTERNAL", "accumulators do not contain the settlement being reversed") from None
    st.changed_accumulators.add(key)
    if delta.account_spent:
        balance = st.accounts.get(orig.psn_no, msg.person.acct_balc_fen)
        st.accounts[orig.psn_no] = balance + delta.account_spent
        st.changed_accounts.add(orig.psn_no)
    setl_id = setl_id_for(msg.msgid, "reverse")
    amounts = {name: -value for name, value in orig.amounts.items()}
    amounts["balc"] = st.accounts.get(orig.psn_no, msg.person.acct_balc_fen)
    negated = {k: ({d: -v for d, v in val.items()} if isinstance(val, dict) else -val)
               for k, val in orig.accum_delta.items()}
    row = Settlement(
        setl_id=setl_id, msgid=msg.msgid, kind="reverse", orig_setl_id=orig.setl_id, mdtrt_id=orig.mdtrt_id,
        psn_no=orig.psn_no, fixmedins_code=orig.fixmedins_code, insutype=orig.insutype,
        med_type=orig.med_type, scope=orig.scope, filing_type=orig.filing_type,
        insured_admdvs=orig.insured_admdvs, insured_pool=orig.insured_pool,
        treating_admdvs=orig.treating_admdvs, treating_pool=orig.treating_pool, clr_optins=orig.clr_optins,
        setl_time=_time("inf_time", msg.inf_time), acc_year=orig.acc_year, amounts=amounts,
        pool_prop_selfpay=orig.pool_prop_selfpay, accum_delta=negated,
    )
    orig.reversed = True
    visit.state = "discharged"
    st.changed_visits.add(visit.mdtrt_id)
    st.settlements[setl_id] = row
    st.new_settlements.append(setl_id)
    return Effect(settlement_output(row), row)


def settlement_output(row: Settlement) -> OutputSettlement:
    a = row.amounts
    info = SetlInfo(
        setl_id=row.setl_id, mdtrt_id=row.mdtrt_id, psn_no=row.psn_no, insutype=row.insutype,
        med_type=row.med_type, medins_setl_id=row.msgid, setl_time=row.setl_time.strftime("%Y-%m-%d %H:%M:%S"),
        pool_prop_selfpay=row.pool_prop_selfpay, clr_type=row.med_type, clr_way="1", clr_optins=row.clr_optins,
        **{name: to_yuan(a[name]) for name in AMOUNT_FIELDS},
    )
    detail = []
    for fund in ("hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay"):
        if a[fund]:
            code, name = FUND_NAMES.get((fund, row.insutype), ("999999", fund))
            detail.append(SetlDetail(fund_pay_type=code, fund_pay_type_name=name,
                                     inscp_scp_amt=to_yuan(a["inscp_scp_amt"]), fund_payamt=to_yuan(a[fund])))
    return OutputSettlement(setlinfo=info, setldetail=detail)


def check_row_invariants(row: Settlement) -> None:
    """Pair assertion at the write side (the table's CHECKs are the read side)."""
    a = row.amounts
    if a["fund_pay_sumamt"] != a["hifp_pay"] + a["hifmi_pay"] + a["hifob_pay"] + a["maf_pay"]:
        raise RuntimeError("ledger row: fund total is not the sum of the funds")
    if a["psn_part_amt"] != a["medfee_sumamt"] - a["fund_pay_sumamt"]:
        raise RuntimeError("ledger row: personal part is not total minus fund")
    if a["psn_cash_pay"] != a["psn_part_amt"] - a["acct_pay"]:
        raise RuntimeError("ledger row: cash is not personal part minus account")

