"""Smart monitoring (智能监控): the facts the rules read and the judgements they produce.

The settlement engine attaches `VisitFacts` to every settlement event (`SettlementEvent.visit`), so the
monitoring stream needs nothing but `fsi.settlements`; the catalog's monitoring fields travel with each
item (`ItemFact`), as they were when the item was billed. Money in fen.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

VisitType = Literal["inpatient", "outpatient", "pharmacy"]
Severity = Literal["low", "medium", "high"]
Gender = Literal["1", "2", ""]  # national code: 1 male, 2 female, "" unknown
JudgementStatus = Literal["open", "withdrawn", "confirmed", "dismissed"]


class ItemFact(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """One settled fee item (or, for 3101/3102, one order), with the catalog's monitoring fields."""

    med_list_codg: str
    day: str  # the fee's date (fee_ocur_time), YYYY-MM-DD
    cnt: Decimal
    sumamt: int  # fen
    once_per_day: bool = False  # catalog: billable at most once per day on one visit
    gender_only: Gender = ""  # catalog: "1"/"2" restricts the item to that gender
    supply_days: Decimal = Decimal(1)  # catalog: days of supply per unit (drugs)


class VisitFacts(msgspec.Struct, kw_only=True, frozen=True):
    """What the rules need of a settled visit, beyond the ledger row's own fields."""

    visit_type: VisitType
    gend: Gender  # from the certificate (GB 11643, 17th digit), never the number itself
    begntime: str  # admission / visit start, "YYYY-MM-DD HH:MM:SS"
    endtime: str  # discharge / visit end ("" when the visit has none)
    main_dise: str  # ICD-10 code of the main diagnosis ("" when none)
    hosp_lv: int
    treating_prov: str  # XX0000
    items: list[ItemFact] = []  # the items this settlement settled (a mid-stay part: its own)


class Judgement(msgspec.Struct, kw_only=True, frozen=True):
    """One rule hit. `jr_id` is derived from the rule, its version and the anchor evidence, so a replay of
    the same events produces the same id; a later change of the evidence re-emits the same id."""

    jr_id: str
    rule_id: str
    rule_name: str
    rule_version: int
    severity: Severity
    psn_no: str
    insured_admdvs: str  # insured pool of the anchor settlement
    treating_admdvs: str  # treating pool of the anchor settlement (who would be deducted)
    fixmedins_code: str  # the anchor settlement's institution
    mdtrt_ids: list[str]
    setl_ids: list[str]  # evidence: the settlements involved, the anchor first
    items: list[str]  # evidence: med_list_codg involved (may be empty)
    window_begin: str  # YYYY-MM-DD: the window the rule looked at
    window_end: str
    suspect_amt: int  # fen, >= 0
    detail: str  # vola_cont: what was found, with numbers — never a name, certificate or psn_no
    withdrawn: bool = False  # True: the evidence no longer supports it (e.g. a settlement was reversed)


class StayCost(msgspec.Struct, kw_only=True, frozen=True):
    """A complete inpatient stay, for COST_OUTLIER: repartitioned by `group` (fsi.monitor.stays)."""

    group: str  # "<ICD-10 first 3 characters>|<hosp_lv>|<treating_prov>"
    mdtrt_id: str
    psn_no: str
    setl_ids: list[str]  # every settlement of the stay (mid-stay parts and the final one)
    fixmedins_code: str
    insured_admdvs: str
    treating_admdvs: str
    dscg_day: str  # YYYY-MM-DD
    medfee: int  # fen, the whole stay
    withdrawn: bool = False  # a settlement of the stay was reversed
