"""Routing decisions, pure: a decoded request plus reference data in, a decision out.

The router resolves the hospital and the person, classifies the scope, checks
the cross-region filing (备案) for non-local care, enriches fee items with the
treating region's catalog, and hands the request to the settlement engine under
key psn_no. 1101 (person info) is answered here. Errors raise BrokerError.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from schemas.codec import Request
from schemas.codes import FILING_EMERGENCY, FILING_PREFERENCE, FILING_TEMPORARY, SCOPE_LOCAL
from schemas.correction import Input2601
from schemas.errors import BrokerError
from schemas.filing import Input2501, Input2502, Input2503, Input2504, Input5301
from schemas.inpatient import Input2401
from schemas.internal import CatalogCtx, HospitalCtx, PersonCtx, RoutedRequest
from schemas.money import to_yuan
from schemas.monitoring import Gender
from schemas.person import Input1101, Input9001, Input9002, cum_info
from schemas.prescreen import Input3101, Input3102
from schemas.refdata import certno_gender
from schemas.transactions import TRANSACTIONS, may_send
from schemas.wire import parse_wire_time
from services.refdata.agency import agency_pool, is_agency_code
from services.refdata.regions import UnknownRegion, classify_scope, region_of
from services.refdata.store import CatalogEntry, Filing, RefData, filing_in_force

# How long a filing created on the spot stays valid (promise system / declared emergency).
PROMISE_FILING_DAYS = 180
EMERGENCY_FILING_DAYS = 90
_CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class IngressMeta:
    reply_topic: str
    reply_partition: int | None
    received_ns: int


@dataclass(frozen=True, slots=True)
class NewFiling:
    psn_no: str
    filing: Filing


@dataclass(frozen=True, slots=True)
class Routed:
    request: RoutedRequest
    new_filing: NewFiling | None


@dataclass(frozen=True, slots=True)
class ForwardClearing:
    """A reconciliation / clearing request (32xx): the hospital (or agency) is known; the clearing service
    answers."""

    fixmedins_code: str


@dataclass(frozen=True, slots=True)
class Answer:
    """A request answered by the router itself from its reference data (5301)."""

    output: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PersonQuery:
    """1101: the person is found; the router adds ledger facts (balance, accumulators) and answers."""

    psn_no: str


@dataclass(frozen=True, slots=True)
class RefdataChange:
    """2501–2504: a filing or chronic eligibility change, applied to PostgreSQL before the answer."""

    psn_no: str
    output: dict[str, Any]
    new_filing: Filing | None = None
    revoke_filing_id: str | None = None
    chronic: frozenset[str] | None = None  # the person's eligibility after the change
    chronic_disease: str | None = None  # 2503 / 2504: the disease registered online ...
    chronic_grant: bool = False  # ... granted (2503) or withdrawn (2504)


@dataclass(frozen=True, slots=True)
class Session:
    """9001 opens a sign-in session of the institution's operator; 9002 ends `sign_no`."""

    sign_in: bool
    opter: str
    sign_no: str = ""


Decision = Routed | Answer | PersonQuery | RefdataChange | ForwardClearing | Session


def route(req: Request, ref: RefData, meta: IngressMeta, fee_items_max: int) -> Decision:
    env = req.envelope
    transaction = TRANSACTIONS.get(env.infno)
    hospital = ref.hospitals.get(env.fixmedins_code)
    if hospital is None and is_agency_code(env.fixmedins_code):
        # The treating region's agency has no hospital row: its region is its code's.
        try:
            treating = _region(agency_pool(env.fixmedins_code) or "")
        except UnknownRegion:
            raise BrokerError("REGION_UNKNOWN", "the agency code names no known pooling region") from None
    elif hospital is None:
        raise BrokerError("HOSPITAL_UNKNOWN", "fixmedins_code is not a connected hospital")
    else:
        treating = _region(hospital.admdvs)
    if _region(env.mdtrtarea_admvs).pool_admdvs != treating.pool_admdvs:
        raise BrokerError("MDTRTAREA_MISMATCH", "mdtrtarea_admvs is not the hospital's pooling region")
    if not may_send(env.infno, env.fixmedins_code):
        raise BrokerError("INSTITUTION_NOT_ALLOWED", f"infno {env.infno} is not sent by this kind of institution")
    if isinstance(req.body, Input1101):
        return PersonQuery(find_person(req.body, ref))
    if isinstance(req.body, Input9001):
        return Session(True, req.body.signIn.opter_no)
    if isinstance(req.body, Input9002):
        return Session(False, req.body.signOut.opter_no, req.body.signOut.sign_no)
    if transaction is not None and transaction.stage == "clearing":
        return ForwardClearing(env.fixmedins_code)
    if hospital is None:  # an agency: may_send let only sessions and clearing through
        raise BrokerError("INSTITUTION_NOT_ALLOWED", f"infno {env.infno} is not sent by an agency")

    psn_no = req.psn_no
    if transaction is None or transaction.stage not in ("router", "engine") or psn_no is None:
        # Every other body the router or the engine answers carries psn_no.
        raise BrokerError("INFNO_UNSUPPORTED", f"infno {env.infno} is not routed to settlement")
    if isinstance(req.body, Input2601):
        check_correction(req.body, env.fixmedins_code)
    person = ref.person_in(psn_no, env.insuplc_admdvs)  # only the shard of the region named is asked
    if person is None:
        raise BrokerError("PERSON_UNKNOWN", "no insured person with that psn_no")
    if env.insuplc_admdvs != person.insuplc_admdvs:
        raise BrokerError("INSUPLC_MISMATCH", "insuplc_admdvs differs from the person's insured region")
    for part in ("mdtrtinfo", "data"):
        insutype = getattr(getattr(req.body, part, None), "insutype", None)
        if insutype is not None and insutype != person.insutype:
            raise BrokerError("INSUTYPE_MISMATCH", "insutype differs from the person's insurance")
    insured = _region(person.insuplc_admdvs)
    scope = classify_scope(insured.admdvs, treating.admdvs)
    on = parse_wire_time("inf_time", env.inf_time).date()
    if transaction.stage == "router":
        return filing_transaction(req.body, psn_no, person, ref, env.msgid, on)

    catalog: list[CatalogCtx] = []
    if transaction.one_visit_items:
        _check_same_visit(getattr(req.body, transaction.one_visit_items))
    if transaction.priced_items:
        catalog = _enrich_fees(getattr(req.body, transaction.priced_items), ref, treating.prov_admdvs,
                               fee_items_max)

    if isinstance(req.body, Input3101 | Input3102):
        catalog = _enrich_orders(req.body, ref, treating.prov_admdvs, fee_items_max)

    filing_type: str | None = None
    new_filing: NewFiling | None = None
    if scope != SCOPE_LOCAL:
        found = filing_in_force(ref.filings.get(psn_no, []), on, treating.prov_admdvs)
        new_filing = _filing_on_the_spot(req, psn_no, treating.prov_admdvs, on)
        if new_filing is not None:
            if found is None or FILING_PREFERENCE.index(new_filing.filing.filing_type) < FILING_PREFERENCE.index(
                found.filing_type
            ):
                found = new_filing.filing
            else:
                new_filing = None  # a filing in force already covers it as well or better: create nothing
        filing_type = found.filing_type if found else None
        if found is None and transaction.needs_filing:
            raise BrokerError(
                "FILING_REQUIRED",
                "non-local care needs a cross-region filing in force for the treating province",
            )

    routed = RoutedRequest(
        msgid=env.msgid,
        infno=env.infno,
        fixmedins_code=env.fixmedins_code,
        inf_time=env.inf_time,
        received_ns=meta.received_ns,
        reply_topic=meta.reply_topic,
        reply_partition=meta.reply_partition,
        hospital=HospitalCtx(
            fixmedins_code=env.fixmedins_code,
            admdvs=treating.admdvs,
            prov_admdvs=treating.prov_admdvs,
            pool_admdvs=treating.pool_admdvs,
            hosp_lv=hospital.hosp_lv,
        ),
        person=PersonCtx(
            psn_no=psn_no,
            insured_admdvs=insured.admdvs,
            insured_prov=insured.prov_admdvs,
            insured_pool=insured.pool_admdvs,
            insutype=person.insutype,
            psn_type=person.psn_type,
            assistance=person.assistance,
            acct_balc_fen=person.acct_balc_fen,
            chronic=sorted(person.chronic),
            gend=gender_of(person.certno),
        ),
        scope=scope,
        filing_type=filing_type,
        body=req.body,
        catalog=catalog,
    )
    return Routed(routed, new_filing)


def check_correction(body: Input2601, fixmedins_code: str) -> None:
    """A correction (2601) names a transaction a correction can undo, sent by the same institution."""
    original = TRANSACTIONS.get(body.data.oinfno)
    if original is None or original.undo is None:
        raise BrokerError("CORRECTION_NOT_SUPPORTED", f"infno {body.data.oinfno} cannot be corrected by 2601")
    if not body.data.omsgid.startswith(fixmedins_code):
        raise BrokerError("ORIGINAL_OTHER_INSTITUTION", "omsgid is not a msgid of the sending institution")


def _region(admdvs: str) -> Any:
    try:
        return region_of(admdvs)
    except UnknownRegion:
        raise BrokerError("REGION_UNKNOWN", "a region code is not in the region table") from None


def _filing_on_the_spot(req: Request, psn_no: str, treating_prov: str, on: date) -> NewFiling | None:
    """Promise system (承诺制) creates a TEMPORARY filing; a declared emergency counts as filed."""
    body = req.body
    info = getattr(body, "mdtrtinfo", None) or getattr(body, "data", None)
    if info is None or isinstance(info, list):
        return None
    if isinstance(body, Input2401) and body.mdtrtinfo.emergency_flag == "1":
        kind, days = FILING_EMERGENCY, EMERGENCY_FILING_DAYS
    elif getattr(info, "promise_filing_flag", "0") == "1":
        kind, days = FILING_TEMPORARY, PROMISE_FILING_DAYS
    else:
        return None
    source = "emergency" if kind == FILING_EMERGENCY else "promise"
    filing_id = "F" + hashlib.sha256(f"{req.envelope.msgid}|{kind}".encode()).hexdigest()[:31]
    filing = Filing(
        filing_id=filing_id,
        filing_type=kind,
        begndate=on,
        enddate=on + timedelta(days=days),
        target_admdvs=treating_prov,
        source=source,
        revoked=False,
    )
    return NewFiling(psn_no, filing)


def _check_same_visit(items: list[Any]) -> None:
    first = items[0]
    for item in items[1:]:
        if item.mdtrt_id != first.mdtrt_id or item.psn_no != first.psn_no:
            raise BrokerError("FEE_ITEM_INCONSISTENT", "all items of one request must belong to one visit")


def _enrich_fees(items: list[Any], ref: RefData, treating_prov: str, items_max: int) -> list[CatalogCtx]:
    if len(items) > items_max:
        raise BrokerError("TOO_MANY_FEE_ITEMS", f"at most {items_max} fee items per upload")
    out = []
    for i, item in enumerate(items):
        entry = ref.catalog.get((treating_prov, item.med_list_codg))
        if entry is None:
            raise BrokerError(
                "CATALOG_ITEM_UNKNOWN",
                f"feedetail[{i}].med_list_codg is not in the treating region's catalog",
            )
        if (item.cnt * item.pric).quantize(_CENT, ROUND_HALF_UP) != item.det_item_fee_sumamt:
            raise BrokerError("FEE_ITEM_INCONSISTENT", f"feedetail[{i}]: det_item_fee_sumamt != cnt × pric")
        out.append(catalog_ctx(entry))
    return out


def _enrich_orders(body: Input3101 | Input3102, ref: RefData, treating_prov: str, items_max: int) -> list[CatalogCtx]:
    """3101/3102: every encounter's orders, in order, priced like fee items (hilist_code = med_list_codg)."""
    orders = [o for e in body.data.patient_dtos[0].fsi_encounter_dtos for o in e.fsi_order_dtos]
    if len(orders) > items_max:
        raise BrokerError("TOO_MANY_FEE_ITEMS", f"at most {items_max} orders per analysis")
    out = []
    for i, order in enumerate(orders):
        entry = ref.catalog.get((treating_prov, order.hilist_code))
        if entry is None:
            raise BrokerError("CATALOG_ITEM_UNKNOWN", f"order {i}: hilist_code is not in the treating region's catalog")
        if (order.cnt * order.pric).quantize(_CENT, ROUND_HALF_UP) != order.sumamt:
            raise BrokerError("FEE_ITEM_INCONSISTENT", f"order {i}: sumamt != cnt × pric")
        out.append(catalog_ctx(entry))
    return out


def catalog_ctx(entry: CatalogEntry) -> CatalogCtx:
    gender_only = entry.gender_only if entry.gender_only in ("1", "2") else ""
    return CatalogCtx(chrgitm_lv=entry.chrgitm_lv, selfpay_prop=entry.selfpay_prop,
                      pric_uplmt_fen=entry.pric_uplmt_fen, once_per_day=entry.once_per_day,
                      gender_only=gender_only, supply_days=entry.supply_days)  # type: ignore[arg-type]


def gender_of(certno: str | None) -> Gender:
    """The national gender code from a GB 11643 certificate (17th digit odd = male); "" when unknown."""
    if certno is None or len(certno) != 18 or not certno[:17].isdigit():
        return ""
    return certno_gender(certno)


def find_person(body: Input1101, ref: RefData) -> str:
    q = body.data
    psn_no = ref.persons_by_cert.get(q.certno or q.mdtrt_cert_no)
    if psn_no is None and q.mdtrt_cert_no in ref.persons:
        psn_no = q.mdtrt_cert_no
    if psn_no is None or psn_no not in ref.persons:
        raise BrokerError("PERSON_UNKNOWN", "no insured person with that certificate")
    return psn_no


@dataclass(frozen=True, slots=True)
class LedgerFacts:
    """What 1101 shows from the ledger: the account balance now and this year's accumulators (fen)."""

    balance_fen: int | None
    year: int
    accumulators: dict[str, Any]


def person_info(psn_no: str, ref: RefData, inf_time: str, facts: LedgerFacts) -> dict[str, Any]:
    """1101 output: identity, insurance, filings in force, chronic eligibility, balance, this year's totals.
    Nothing about visits or settlements at other hospitals."""
    person = ref.persons[psn_no]
    today = parse_wire_time("inf_time", inf_time).date()
    certno = person.certno or ""
    birth, gend, age = _from_certno(certno, today)
    idet = []
    if person.assistance:
        idet.append({"psn_idet_type": person.assistance, "memo": {"1": "低保", "2": "特困"}[person.assistance]})
    balance = facts.balance_fen if facts.balance_fen is not None else person.acct_balc_fen
    return {
        "baseinfo": {
            "psn_no": psn_no, "psn_cert_type": "01", "certno": certno, "psn_name": person.psn_name or "",
            "gend": gend, "brdy": birth, "age": age,
        },
        "insuinfo": [{
            "insutype": person.insutype, "psn_type": person.psn_type, "balc": to_yuan(balance),
            "insuplc_admdvs": person.insuplc_admdvs, "psn_insu_stas": "1",
        }],
        "idetinfo": idet,
        "filinginfo": [_filing_view(f, with_id=False) for f in _in_force(ref.filings.get(psn_no, []), today)],
        "chronicinfo": [{"chronic_disease": d} for d in sorted(person.chronic)],
        "cuminfo": cum_info(facts.year, facts.accumulators),
    }


def _in_force(filings: list[Filing], on: date) -> list[Filing]:
    return [f for f in filings if not f.revoked and f.begndate <= on <= f.enddate]


def _filing_view(f: Filing, *, with_id: bool) -> dict[str, Any]:
    view: dict[str, Any] = {"filing_type": f.filing_type, "begndate": f.begndate.isoformat(),
                            "enddate": f.enddate.isoformat(), "target_admdvs": f.target_admdvs or ""}
    if with_id:
        view = {"filing_id": f.filing_id, **view, "source": f.source}
    return view


def filing_transaction(body: Any, psn_no: str, person: Any, ref: RefData, msgid: str,
                       on: date) -> Answer | RefdataChange:
    """2501 create / 2502 revoke a filing, 2503 / 2504 chronic eligibility, 5301 query."""
    filings = ref.filings.get(psn_no, [])
    match body:
        case Input5301():
            return Answer({
                "filinginfo": [_filing_view(f, with_id=True) for f in filings if not f.revoked],
                "chronicinfo": [{"chronic_disease": d} for d in sorted(person.chronic)],
            })
        case Input2501(data=d):
            filing = Filing(
                filing_id="F" + hashlib.sha256(f"{msgid}|online".encode()).hexdigest()[:31],
                filing_type=d.filing_type, begndate=d.begndate, enddate=d.enddate, target_admdvs=d.target_admdvs,
                source="promise" if d.promise_flag == "1" else "online", revoked=False,
            )
            return RefdataChange(psn_no, {"filinginfo": _filing_view(filing, with_id=True)}, new_filing=filing)
        case Input2502(data=d):
            target = next((f for f in filings if f.filing_id == d.filing_id), None)
            if target is None:
                raise BrokerError("FILING_UNKNOWN", "no filing with that filing_id for this person")
            return RefdataChange(psn_no, {"filing_id": d.filing_id, "revoked": True},
                                 revoke_filing_id=d.filing_id)
        case Input2503(data=d):
            chronic = frozenset(person.chronic) | {d.chronic_disease}
            return RefdataChange(psn_no, {"chronicinfo": [{"chronic_disease": c} for c in sorted(chronic)]},
                                 chronic=chronic, chronic_disease=d.chronic_disease, chronic_grant=True)
        case Input2504(data=d):
            chronic = frozenset(person.chronic) - {d.chronic_disease}
            return RefdataChange(psn_no, {"chronicinfo": [{"chronic_disease": c} for c in sorted(chronic)]},
                                 chronic=chronic, chronic_disease=d.chronic_disease, chronic_grant=False)
    raise BrokerError("INFNO_UNSUPPORTED", "not a filing transaction")


def _from_certno(certno: str, today: date) -> tuple[str, str, int]:
    """Birth date, gender and age from an 18-digit resident ID (digits 7–14 and 17)."""
    if len(certno) != 18 or not certno[:17].isdigit():
        return "", "9", 0
    try:
        born = date(int(certno[6:10]), int(certno[10:12]), int(certno[12:14]))
    except ValueError:
        return "", "9", 0
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    return born.isoformat(), "1" if int(certno[16]) % 2 else "2", age
