"""The facts monitoring reads of a settle row (schemas/monitoring.VisitFacts), pure.

Built from the visit and the fee items the row settled (a mid-stay part: its own items), with the
hospital's level and the person's gender the router resolved. The same function serves a fresh row and
a replayed one (rebuilt from the ledger), so a replay republishes the same facts.
"""

from __future__ import annotations

from collections.abc import Iterable

from schemas.codes import MED_TYPE_INPATIENT, MED_TYPE_PHARMACY
from schemas.monitoring import Gender, ItemFact, VisitFacts, VisitType
from services.settle.state import Fee, Visit

_TIME = "%Y-%m-%d %H:%M:%S"


def visit_type(med_type: str) -> VisitType:
    if med_type == MED_TYPE_INPATIENT:
        return "inpatient"
    if med_type == MED_TYPE_PHARMACY:
        return "pharmacy"
    return "outpatient"


def main_diagnosis(diseinfo: list[dict[str, object]], dise_codg: str | None) -> str:
    """The main diagnosis: the diagnosis list's main one (maindiag_flag 1) first, else the visit's code."""
    for d in diseinfo:
        if d.get("maindiag_flag", "1") == "1" and d.get("vali_flag", "1") == "1" and d.get("diag_code"):
            return str(d["diag_code"])
    return dise_codg or ""


def item_fact(f: Fee) -> ItemFact:
    gender_only: Gender = f.gender_only if f.gender_only in ("1", "2") else ""  # type: ignore[assignment]
    return ItemFact(med_list_codg=f.med_list_codg, day=f.fee_ocur_time.date().isoformat(), cnt=f.cnt,
                    sumamt=f.fee_fen, once_per_day=f.once_per_day, gender_only=gender_only,
                    supply_days=f.supply_days)


def visit_facts(visit: Visit, items: Iterable[Fee], *, gend: Gender, hosp_lv: int, treating_prov: str) -> VisitFacts:
    ordered = sorted(items, key=lambda f: f.feedetl_sn)
    return VisitFacts(
        visit_type=visit_type(visit.med_type), gend=gend, begntime=visit.begntime.strftime(_TIME),
        endtime=visit.endtime.strftime(_TIME) if visit.endtime is not None else "",
        main_dise=main_diagnosis(visit.diseinfo, visit.dise_codg), hosp_lv=hosp_lv, treating_prov=treating_prov,
        items=[item_fact(f) for f in ordered if not f.cancelled],
    )


def settled_items(fees: Iterable[Fee], setl_id: str) -> list[Fee]:
    return [f for f in fees if f.setl_id == setl_id and not f.cancelled]
