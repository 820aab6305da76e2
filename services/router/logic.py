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
from schemas.errors import BrokerError
from schemas.inpatient import (
    Input2301,
    Input2302,
    Input2303,
    Input2304,
    Input2401,
)
from schemas.internal import CatalogCtx, HospitalCtx, PersonCtx, RoutedRequest
from schemas.money import to_yuan
from schemas.person import Input1101
from schemas.wire import parse_wire_time
from services.refdata.regions import UnknownRegion, classify_scope, region_of
from services.refdata.store import Filing, RefData, filing_in_force

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
    """A reconciliation / clearing request (32xx): the hospital is known; the clearing service answers."""

    fixmedins_code: str


# Transactions answered by the clearing service (services/clearing), not the settlement engine.
CLEARING_INFNOS = frozenset({"3201", "3202", "3203", "3204", "3260", "3261", "3262"})


@dataclass(frozen=True, slots=True)
class Answer:
    """A request answered by the router itself (1101)."""

    output: dict[str, Any]


def route(req: Request, ref: RefData, meta: IngressMeta, fee_items_max: int) -> Routed | Answer | ForwardClearing:
    env = req.envelope
    hospital = ref.hospitals.get(env.fixmedins_code)
    if hospital is None:
        raise BrokerError("HOSPITAL_UNKNOWN", "fixmedins_code is not a connected hospital")
    treating = _region(hospital.admdvs)
    if _region(env.mdtrtarea_admvs).pool_admdvs != treating.pool_admdvs:
        raise BrokerError("MDTRTAREA_MISMATCH", "mdtrtarea_admvs is not the hospital's pooling region")
    if isinstance(req.body, Input1101):
        return Answer(person_info(req.body, ref, env.inf_time))
    if env.infno in CLEARING_INFNOS:
        return ForwardClearing(env.fixmedins_code)

    psn_no = req.psn_no
    if psn_no is None:  # every visit body carries psn_no (schemas.codec.body_psn_no)
        raise BrokerError("INFNO_UNSUPPORTED", f"infno {env.infno} is not routed to settlement")
    person = ref.persons.get(psn_no)
    if person is None:
        raise BrokerError("PERSON_UNKNOWN", "no insured person with that psn_no")
    if env.insuplc_admdvs != person.insuplc_admdvs:
        raise BrokerError("INSUPLC_MISMATCH", "insuplc_admdvs differs from the person's insured region")
    insutype = getattr(getattr(req.body, "mdtrtinfo", None), "insutype", None)
    if insutype is not None and insutype != person.insutype:
        raise BrokerError("INSUTYPE_MISMATCH", "insutype differs from the person's insurance")
    insured = _region(person.insuplc_admdvs)
    scope = classify_scope(insured.admdvs, treating.admdvs)
    on = parse_wire_time("inf_time", env.inf_time).date()

    catalog: list[CatalogCtx] = []
    if isinstance(req.body, Input2301):
        catalog = _enrich_fees(req.body, ref, treating.prov_admdvs, fee_items_max)
    elif isinstance(req.body, Input2302):
        _check_same_visit(req.body.data)

    filing_type: str | None = None
    new_filing: NewFiling | None = None
    if scope != "local":
        filings = ref.filings.get(psn_no, [])
        new_filing = _filing_on_the_spot(req, psn_no, treating.prov_admdvs, on)
        if new_filing is not None:
            filings = [*filings, new_filing.filing]
        found = filing_in_force(filings, on, treating.prov_admdvs)
        filing_type = found.filing_type if found else None
        if found is None and isinstance(req.body, Input2303 | Input2304):
            raise BrokerError(
                "FILING_REQUIRED",
                "non-local care needs a cross-region filing in force for the treating province",
            )
        if new_filing is not None and found is not new_filing.filing:
            new_filing = None  # an existing filing already covers it: create nothing

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
        ),
        scope=scope,
        filing_type=filing_type,
        body=req.body,
        catalog=catalog,
    )
    return Routed(routed, new_filing)


def _region(admdvs: str) -> Any:
    try:
        return region_of(admdvs)
    except UnknownRegion:
        raise BrokerError("REGION_UNKNOWN", "a region code is not in the region table") from None


def _filing_on_the_spot(req: Request, psn_no: str, treating_prov: str, on: date) -> NewFiling | None:
    """Promise system (承诺制) creates a TEMPORARY filing; a declared emergency counts as filed."""
    body = req.body
    info = getattr(body, "mdtrtinfo", None)
    if info is None:
        return None
    if isinstance(body, Input2401) and body.mdtrtinfo.emergency_flag == "1":
        kind, days = "EMERGENCY", EMERGENCY_FILING_DAYS
    elif getattr(info, "promise_filing_flag", "0") == "1":
        kind, days = "TEMPORARY", PROMISE_FILING_DAYS
    else:
        return None
    source = "emergency" if kind == "EMERGENCY" else "promise"
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


def _enrich_fees(body: Input2301, ref: RefData, treating_prov: str, items_max: int) -> list[CatalogCtx]:
    if len(body.feedetail) > items_max:
        raise BrokerError("TOO_MANY_FEE_ITEMS", f"at most {items_max} fee items per upload")
    _check_same_visit(body.feedetail)
    out = []
    for i, item in enumerate(body.feedetail):
        entry = ref.catalog.get((treating_prov, item.med_list_codg))
        if entry is None:
            raise BrokerError(
                "CATALOG_ITEM_UNKNOWN",
                f"feedetail[{i}].med_list_codg is not in the treating region's catalog",
            )
        if (item.cnt * item.pric).quantize(_CENT, ROUND_HALF_UP) != item.det_item_fee_sumamt:
            raise BrokerError("FEE_ITEM_INCONSISTENT", f"feedetail[{i}]: det_item_fee_sumamt != cnt × pric")
        out.append(CatalogCtx(chrgitm_lv=entry.chrgitm_lv, selfpay_prop=entry.selfpay_prop,
                              pric_uplmt_fen=entry.pric_uplmt_fen))
    return out


def person_info(body: Input1101, ref: RefData, inf_time: str) -> dict[str, Any]:
    q = body.data
    psn_no = ref.persons_by_cert.get(q.certno or q.mdtrt_cert_no)
    if psn_no is None and q.mdtrt_cert_no in ref.persons:
        psn_no = q.mdtrt_cert_no
    person = ref.persons.get(psn_no) if psn_no else None
    if person is None or psn_no is None:
        raise BrokerError("PERSON_UNKNOWN", "no insured person with that certificate")
    certno = person.certno or ""
    birth, gend, age = _from_certno(certno, parse_wire_time("inf_time", inf_time).date())
    idet = []
    if person.assistance:
        idet.append({"psn_idet_type": person.assistance, "memo": {"1": "低保", "2": "特困"}[person.assistance]})
    return {
        "baseinfo": {
            "psn_no": psn_no, "psn_cert_type": "01", "certno": certno, "psn_name": person.psn_name or "",
            "gend": gend, "brdy": birth, "age": age,
        },
        "insuinfo": [{
            "insutype": person.insutype, "psn_type": person.psn_type, "balc": to_yuan(person.acct_balc_fen),
            "insuplc_admdvs": person.insuplc_admdvs, "psn_insu_stas": "1",
        }],
        "idetinfo": idet,
    }


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
