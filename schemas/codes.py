"""Code tables, once: funds, insurance types, med_type and visit types, scopes, filing types, visit states.

Every other module imports these names instead of writing the literals out. The Literal
types are what the message schemas validate against; the tuples are the same values for
loops and membership tests (derived with `get_args`, so the two cannot drift apart).
Pure data: nothing here imports from `services/`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, get_args

# --- insurance types (险种) -----------------------------------------------------------------------

InsuType = Literal["310", "390"]
INSUTYPE_EMPLOYEE: Final = "310"  # 职工基本医疗保险
INSUTYPE_RESIDENT: Final = "390"  # 城乡居民基本医疗保险
INSUTYPES: Final[tuple[InsuType, ...]] = get_args(InsuType)

# --- medical type (医疗类别) and the visit type it implies ----------------------------------------

MedType = Literal["11", "14", "21", "41"]
OutpatientMedType = Literal["11", "14"]
MED_TYPE_GENERAL_OUTPATIENT: Final = "11"  # 普通门诊
MED_TYPE_CHRONIC_OUTPATIENT: Final = "14"  # 门诊慢特病
MED_TYPE_INPATIENT: Final = "21"  # 普通住院
MED_TYPE_PHARMACY: Final = "41"  # 定点药店购药
MED_TYPES: Final[tuple[MedType, ...]] = get_args(MedType)
OUTPATIENT_MED_TYPES: Final[tuple[OutpatientMedType, ...]] = get_args(OutpatientMedType)

# med_type → the `visit_type` label of metrics, dashboards and clearing statements.
VISIT_TYPES: Final[Mapping[str, str]] = MappingProxyType({
    MED_TYPE_GENERAL_OUTPATIENT: "general_outpatient",
    MED_TYPE_CHRONIC_OUTPATIENT: "chronic_outpatient",
    MED_TYPE_INPATIENT: "inpatient",
    MED_TYPE_PHARMACY: "pharmacy",
})
VISIT_TYPE_OTHER: Final = "other"


def visit_type_of(med_type: str) -> str:
    """The visit-type label of a med_type; `other` for anything not in the table (labels stay bounded)."""
    return VISIT_TYPES.get(med_type, VISIT_TYPE_OTHER)


# --- visits: kinds and states of the engine's state machine ------------------------------------

VisitKind = Literal["outpatient", "inpatient", "pharmacy"]
VISIT_KINDS: Final[tuple[VisitKind, ...]] = get_args(VisitKind)
# The med_types a visit of each kind may carry (an outpatient visit becomes 14 with 2203).
VISIT_KIND_MED_TYPES: Final[Mapping[VisitKind, tuple[str, ...]]] = MappingProxyType({
    "outpatient": OUTPATIENT_MED_TYPES,
    "inpatient": (MED_TYPE_INPATIENT,),
    "pharmacy": (MED_TYPE_PHARMACY,),
})

VisitState = Literal["registered", "admitted", "discharged", "settled", "cancelled"]
VISIT_STATES: Final[tuple[VisitState, ...]] = get_args(VisitState)

# --- chronic and special diseases (门诊慢特病) with an eligibility registration (2503) -----------------

ChronicDisease = Literal["HTN", "DM", "CANCER_TX", "ESRD_DIALYSIS", "TRANSPLANT_AR"]
CHRONIC_DISEASES: Final[tuple[ChronicDisease, ...]] = get_args(ChronicDisease)

# --- scope: where the person is insured against where they are treated ------------------------

Scope = Literal["local", "intra_province", "cross_province"]
SCOPE_LOCAL: Final = "local"  # same pooling region
SCOPE_INTRA_PROVINCE: Final = "intra_province"  # 省内异地
SCOPE_CROSS_PROVINCE: Final = "cross_province"  # 跨省异地
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)
NON_LOCAL_SCOPES: Final[tuple[Scope, ...]] = (SCOPE_INTRA_PROVINCE, SCOPE_CROSS_PROVINCE)

# --- cross-region filings (异地就医备案) -----------------------------------------------------------

FilingType = Literal["LONG_TERM", "REFERRAL", "EMERGENCY", "TEMPORARY"]
FILING_TYPES: Final[tuple[FilingType, ...]] = get_args(FilingType)
FILING_EMERGENCY: Final = "EMERGENCY"  # a declared emergency counts as filed (2401 emergency_flag)
FILING_TEMPORARY: Final = "TEMPORARY"  # the promise system (承诺制) files it on the spot
# Which filing wins when several are in force (the first: the smallest ratio cut).
FILING_PREFERENCE: Final[tuple[FilingType, ...]] = ("EMERGENCY", "REFERRAL", "LONG_TERM", "TEMPORARY")

# --- funds (基金) ---------------------------------------------------------------------------------

Fund = Literal["hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay"]
FUND_BASIC: Final = "hifp_pay"  # 基本医疗保险统筹基金
FUND_CRITICAL: Final = "hifmi_pay"  # 城乡居民大病保险
FUND_SUPPLEMENTARY: Final = "hifob_pay"  # 职工大额医疗费用补助
FUND_ASSISTANCE: Final = "maf_pay"  # 医疗救助
FUNDS: Final[tuple[Fund, ...]] = get_args(Fund)
# The sum of the funds, a column next to them in ledger rows, clearing positions and statements.
FUND_TOTAL: Final = "fund_pay_sumamt"

# Short display names (Chinese, English) for dashboards and statements.
FUND_NAMES: Final[Mapping[str, tuple[str, str]]] = MappingProxyType({
    FUND_BASIC: ("统筹基金", "basic pool"),
    FUND_CRITICAL: ("大病保险", "critical illness"),
    FUND_SUPPLEMENTARY: ("大额医疗补助", "supplementary"),
    FUND_ASSISTANCE: ("医疗救助", "medical assistance"),
})
# The national fund payment type (fund_pay_type, name) of a fund for an insurance type (setldetail).
FUND_PAY_TYPES: Final[Mapping[tuple[str, str], tuple[str, str]]] = MappingProxyType({
    (FUND_BASIC, INSUTYPE_EMPLOYEE): ("310100", "职工基本医疗保险统筹基金"),
    (FUND_BASIC, INSUTYPE_RESIDENT): ("390100", "城乡居民基本医疗保险基金"),
    (FUND_CRITICAL, INSUTYPE_RESIDENT): ("390200", "城乡居民大病医疗保险资金"),
    (FUND_SUPPLEMENTARY, INSUTYPE_EMPLOYEE): ("330200", "职工大额医疗费用补助基金"),
    (FUND_ASSISTANCE, INSUTYPE_EMPLOYEE): ("610100", "医疗救助基金"),
    (FUND_ASSISTANCE, INSUTYPE_RESIDENT): ("610100", "医疗救助基金"),
})

# --- province codes ---------------------------------------------------------------------------

_PROVINCE_CODE = re.compile(r"[1-9][0-9]0000")


def is_province_code(code: str) -> bool:
    """A province-level region code `XX0000` (its shape only; the region table knows which exist)."""
    return isinstance(code, str) and _PROVINCE_CODE.fullmatch(code) is not None
