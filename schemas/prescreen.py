"""Pre- and in-event analysis (事前/事中分析, 3101/3102) and the disposal of their warnings (3103),
REFERENCE §8. National field names.

3101/3102 carry one patient (`patient_dtos`, exactly one: the router routes by its `patn_id`, the psn_no,
like a settlement) with the encounters known so far and their orders; the engine runs the monitoring rules
over the person's settled history plus these encounters and answers the judgements that involve them
(`output.result`). 3103 records what the hospital did about a warning (`jr_id`); our interface asks for
`patn_id` too, so the request reaches the shard that issued the warning. Every list is bounded.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from schemas.codes import MedType
from schemas.inpatient import MdtrtId, PsnNo
from schemas.wire import Code, Flag, Text, WireTime, check_amounts, check_count, check_times

RULE_IDS_MAX = 20
ENCOUNTERS_MAX = 20
DIAGNOSES_MAX = 20
ORDERS_MAX = 100  # per encounter; the router also bounds the request's orders in all (TOO_MANY_FEE_ITEMS)
RuleId = Annotated[str, Meta(pattern=r"^[A-Z][A-Z0-9_]{0,39}$")]
JrId = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]
ListCode = Annotated[str, Meta(min_length=1, max_length=50)]
WireDate = Annotated[str, Meta(pattern=r"^([0-9]{4}-[0-9]{2}-[0-9]{2})?$")]


class FsiDiagnose(msgspec.Struct, kw_only=True):
    dise_codg: Code  # ICD-10
    dise_name: Text = ""
    maindise_flag: Flag = "1"


class FsiOrder(msgspec.Struct, kw_only=True):
    """An order (医嘱) or fee line known before the upload; its hilist_code is priced like 2204's items."""

    rx_id: Annotated[str, Meta(pattern=r"^[0-9A-Za-z_-]{1,30}$")]
    hilist_code: ListCode
    cnt: Decimal
    pric: Decimal
    sumamt: Decimal
    drord_begn_date: WireTime

    def __post_init__(self) -> None:
        check_amounts(self, "pric", "sumamt")
        check_times(self, "drord_begn_date")
        check_count(self)


class FsiEncounter(msgspec.Struct, kw_only=True):
    mdtrt_id: MdtrtId
    medins_id: Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,20}$")]
    med_type: MedType
    adm_date: WireTime
    dscg_date: WireTime | None = None
    fsi_diagnose_dtos: Annotated[list[FsiDiagnose], Meta(max_length=DIAGNOSES_MAX)] = []
    fsi_order_dtos: Annotated[list[FsiOrder], Meta(max_length=ORDERS_MAX)] = []

    def __post_init__(self) -> None:
        check_times(self, "adm_date", "dscg_date")
        if self.dscg_date is not None and self.dscg_date < self.adm_date:
            raise ValueError("dscg_date: before adm_date")


class PatientDto(msgspec.Struct, kw_only=True):
    patn_id: PsnNo  # the psn_no
    gend: Literal["1", "2", ""] = ""  # the person's certificate decides; this is what the hospital knows
    brdy: WireDate = ""
    poolarea: Annotated[str, Meta(pattern=r"^([0-9]{6})?$")] = ""
    curr_mdtrt_id: MdtrtId
    fsi_encounter_dtos: Annotated[list[FsiEncounter], Meta(min_length=1, max_length=ENCOUNTERS_MAX)]

    def __post_init__(self) -> None:
        if len({e.mdtrt_id for e in self.fsi_encounter_dtos}) != len(self.fsi_encounter_dtos):
            raise ValueError("fsi_encounter_dtos: an mdtrt_id repeats")
        if all(e.mdtrt_id != self.curr_mdtrt_id for e in self.fsi_encounter_dtos):
            raise ValueError("curr_mdtrt_id: names none of fsi_encounter_dtos")


class AnalysisData(msgspec.Struct, kw_only=True):
    rule_ids: Annotated[list[RuleId], Meta(max_length=RULE_IDS_MAX)] = []  # empty: every rule
    trig_scen: Annotated[str, Meta(pattern=r"^[0-9]{1,2}$")] = "1"  # trigger scene (national code)
    syscode: Annotated[str, Meta(max_length=64)] = ""
    patient_dtos: Annotated[list[PatientDto], Meta(min_length=1, max_length=1)]

    @property
    def psn_no(self) -> str:
        """The person the request is about (the router's key, `schemas.codec.body_psn_no`)."""
        return self.patient_dtos[0].patn_id


class Input3101(msgspec.Struct, kw_only=True, tag=True):
    """事前分析: before an order or fee upload."""

    data: AnalysisData


class Input3102(msgspec.Struct, kw_only=True, tag=True):
    """事中分析: before settlement."""

    data: AnalysisData


class Disposal(msgspec.Struct, kw_only=True):
    jr_id: JrId
    warn_rslt_id: Annotated[str, Meta(max_length=64)] = ""  # the hospital's own reference, kept as sent
    patn_id: PsnNo
    dspo_way: Literal["1", "2"]  # 1 continue as planned, 2 changed the order/fee
    dspo_way_rea: Annotated[str, Meta(min_length=1, max_length=500)]

    @property
    def psn_no(self) -> str:
        return self.patn_id


class Input3103(msgspec.Struct, kw_only=True, tag=True):
    data: Disposal


class AnalysisResult(msgspec.Struct, kw_only=True):
    """One judgement of 3101/3102 (REFERENCE §8): vola_amt in yuan on the wire."""

    jr_id: str
    rule_id: str
    rule_name: str
    vola_cont: str
    sev_deg: str
    vola_amt: Decimal
    mdtrt_id: str
    patn_id: str


class OutputAnalysis(msgspec.Struct, kw_only=True):
    result: list[AnalysisResult]


class OutputDisposal(msgspec.Struct, kw_only=True):
    jr_id: str
    dspo_way: str
