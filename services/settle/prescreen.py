"""Pre- and in-event monitoring checks in the engine, pure: 3101/3102 answers, 3103 disposals, and the
warnings of 2206/2303 (`warn_msg`).

The rules (services/smartmon/rules.py) run over the person's settled history (loaded for the batch by
services/settle/monitoring.py) plus the candidate visit(s) — the facts known so far — each a rules
`Episode` whose setl_id is "P" + msgid (the first, current encounter) or "P" + msgid + "E" + n (the
request's other encounters). Only the judgements that involve a candidate are answered. A warning never
blocks anything: it is advice, stored so the hospital can dispose of it (3103).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from schemas.errors import BrokerError
from schemas.internal import CatalogCtx, RoutedRequest
from schemas.money import to_fen, to_yuan
from schemas.monitoring import Gender, ItemFact, Judgement, VisitFacts
from schemas.prescreen import (
    AnalysisResult,
    FsiEncounter,
    Input3101,
    Input3102,
    Input3103,
    OutputAnalysis,
    OutputDisposal,
)
from schemas.wire import parse_wire_time
from services.refdata.regions import province_of
from services.settle.facts import visit_facts, visit_type
from services.settle.state import BatchState, Disposal, Fee, IssuedWarning, Visit
from services.smartmon.rules import Episode, RuleBook, person_judgements

_TIME = "%Y-%m-%d %H:%M:%S"
# warn_msg stays short: the first warnings, each text cut (the full list is a 3102 away).
WARN_MSG_MAX = 5
WARN_TEXT_MAX = 120


def candidate_id(msgid: str, n: int = 0) -> str:
    return "P" + msgid if n == 0 else f"P{msgid}E{n}"


def involving(judgements: Sequence[Judgement], candidates: set[str]) -> list[Judgement]:
    """The judgements whose evidence names a candidate visit, in a stable order."""
    hits = [j for j in judgements if not j.withdrawn and candidates.intersection(j.setl_ids)]
    return sorted(hits, key=lambda j: (j.rule_id, j.jr_id))


# --- 3101 / 3102 ---------------------------------------------------------------------------------


def analyse(msg: RoutedRequest, body: Input3101 | Input3102, st: BatchState, book: RuleBook) -> OutputAnalysis:
    data = body.data
    patient = data.patient_dtos[0]
    gend: Gender = msg.person.gend or patient.gend  # the certificate decides; the hospital's word otherwise
    catalog = iter(msg.catalog)  # the router priced the orders in request order
    by_encounter = {e.mdtrt_id: [next(catalog) for _ in e.fsi_order_dtos] for e in patient.fsi_encounter_dtos}
    encounters = sorted(patient.fsi_encounter_dtos, key=lambda e: e.mdtrt_id != patient.curr_mdtrt_id)
    candidates = [_encounter_episode(msg, e, by_encounter[e.mdtrt_id], candidate_id(msg.msgid, n), gend)
                  for n, e in enumerate(encounters)]
    history = st.history.get(msg.person.psn_no, [])
    judged = person_judgements([*history, *candidates], book, data.rule_ids or None)
    ids = {c.setl_id for c in candidates}
    mdtrt_of = {c.setl_id: c.mdtrt_id for c in candidates}
    results = []
    for j in involving(judged, ids):
        mdtrt_id = next((mdtrt_of[s] for s in j.setl_ids if s in mdtrt_of), patient.curr_mdtrt_id)
        results.append(AnalysisResult(
            jr_id=j.jr_id, rule_id=j.rule_id, rule_name=j.rule_name, vola_cont=j.detail, sev_deg=j.severity,
            vola_amt=to_yuan(j.suspect_amt), mdtrt_id=mdtrt_id, patn_id=patient.patn_id,
        ))
        _issue(st, msg, j, mdtrt_id)
    return OutputAnalysis(result=results)


def _encounter_episode(msg: RoutedRequest, e: FsiEncounter, catalog: list[CatalogCtx], setl_id: str,
                       gend: Gender) -> Episode:
    items = []
    for order, cat in zip(e.fsi_order_dtos, catalog, strict=True):
        gender_only: Gender = cat.gender_only
        items.append(ItemFact(med_list_codg=order.hilist_code, day=order.drord_begn_date[:10], cnt=order.cnt,
                              sumamt=to_fen(order.sumamt), once_per_day=cat.once_per_day, gender_only=gender_only,
                              supply_days=cat.supply_days))
    main = next((d.dise_codg for d in e.fsi_diagnose_dtos if d.maindise_flag == "1"), "")
    facts = VisitFacts(
        visit_type=visit_type(e.med_type), gend=gend, begntime=e.adm_date, endtime=e.dscg_date or "",
        main_dise=main, hosp_lv=msg.hospital.hosp_lv if e.medins_id == msg.fixmedins_code else 0,
        treating_prov=msg.hospital.prov_admdvs, items=items,
    )
    # dated by its discharge, else its latest order, else its admission: where it would settle
    setl_time = e.dscg_date or max([o.drord_begn_date for o in e.fsi_order_dtos] + [e.adm_date])
    return Episode(
        setl_id=setl_id, mdtrt_id=e.mdtrt_id, psn_no=msg.person.psn_no, fixmedins_code=e.medins_id,
        insured_admdvs=msg.person.insured_admdvs, treating_admdvs=msg.hospital.admdvs, med_type=e.med_type,
        setl_time=setl_time, medfee=sum(i.sumamt for i in items), mid_setl=False, facts=facts,
    )


def _issue(st: BatchState, msg: RoutedRequest, j: Judgement, mdtrt_id: str) -> None:
    warning = IssuedWarning(jr_id=j.jr_id, msgid=msg.msgid, infno=msg.infno, fixmedins_code=msg.fixmedins_code,
                            psn_no=msg.person.psn_no, rule_id=j.rule_id, mdtrt_id=mdtrt_id,
                            vola_amt_fen=j.suspect_amt)
    if j.jr_id not in st.warnings:  # issued before (or earlier in this batch): the first row stays
        st.warnings[j.jr_id] = warning
        st.new_warnings.append(warning)


# --- 3103 ------------------------------------------------------------------------------------------


def dispose(msg: RoutedRequest, body: Input3103, st: BatchState) -> OutputDisposal:
    """Record the hospital's disposal of a warning; a repeat of the msgid is answered from processed_request
    before this runs, so every call here records once."""
    d = body.data
    warning = st.warnings.get(d.jr_id)
    if warning is None or warning.psn_no != msg.person.psn_no:
        raise BrokerError("WARNING_UNKNOWN", "no warning with that jr_id was issued for this person")
    if warning.fixmedins_code != msg.fixmedins_code:
        raise BrokerError("WARNING_OTHER_INSTITUTION", "the warning was issued to another institution")
    st.new_disposals.append(Disposal(msgid=msg.msgid, jr_id=d.jr_id, fixmedins_code=msg.fixmedins_code,
                                     dspo_way=d.dspo_way, dspo_way_rea=d.dspo_way_rea))
    return OutputDisposal(jr_id=d.jr_id, dspo_way=d.dspo_way)


# --- 2206 / 2303 -----------------------------------------------------------------------------------


def settlement_warnings(msg: RoutedRequest, visit: Visit, fees: Sequence[Fee], medfee_fen: int, st: BatchState,
                        book: RuleBook) -> str:
    """warn_msg of a pre-settlement: the rules over the person's history and this visit as if it settled now
    with the items not yet settled. Empty when nothing involves it."""
    candidate = Episode(
        setl_id=candidate_id(msg.msgid), mdtrt_id=visit.mdtrt_id, psn_no=visit.psn_no,
        fixmedins_code=visit.fixmedins_code, insured_admdvs=visit.insured_admdvs,
        treating_admdvs=visit.treating_admdvs, med_type=visit.med_type, setl_time=_wire(msg.inf_time),
        medfee=medfee_fen, mid_setl=False,
        facts=visit_facts(visit, fees, gend=msg.person.gend, hosp_lv=msg.hospital.hosp_lv,
                          treating_prov=province_of(visit.treating_admdvs)),
    )
    history = st.history.get(msg.person.psn_no, [])
    hits = involving(person_judgements([*history, candidate], book), {candidate.setl_id})
    for j in hits:
        _issue(st, msg, j, visit.mdtrt_id)
    return warn_text(hits)


def warn_text(hits: Sequence[Judgement]) -> str:
    """`[rule_id rule_name jr_id] text; ...` — codes, numbers and dates only (the detail never names a person)."""
    parts = [f"[{j.rule_id} {j.rule_name} {j.jr_id}] {j.detail[:WARN_TEXT_MAX]}" for j in hits[:WARN_MSG_MAX]]
    if len(hits) > WARN_MSG_MAX:
        parts.append(f"(+{len(hits) - WARN_MSG_MAX} more)")
    return "; ".join(parts)


def _wire(inf_time: str) -> str:
    parsed: datetime = parse_wire_time("inf_time", inf_time)
    return parsed.strftime(_TIME)
