"""Messages between the broker's own services (Kafka values other than the national envelope)."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

from schemas.codes import Scope
from schemas.correction import Input2601
from schemas.inpatient import (
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
)
from schemas.monitoring import Gender, VisitFacts
from schemas.outpatient import Input2201, Input2202, Input2203, Input2204, Input2205, Input2206, Input2207, Input2208
from schemas.pharmacy import Input2101, Input2102, Input2103
from schemas.prescreen import Input3101, Input3102, Input3103
from schemas.query import QueryBody

# Bodies the settlement engine handles (the router answers 1101, the gateway 9001), queries 5201–5206 and the
# monitoring checks 3101–3103 included.
VisitBody = (
    Input2401 | Input2402 | Input2403 | Input2404 | Input2405 | Input2301 | Input2302 | Input2303 | Input2304
    | Input2305 | Input2201 | Input2202 | Input2203 | Input2204 | Input2205 | Input2206 | Input2207 | Input2208
    | Input2101 | Input2102 | Input2103 | Input2601 | Input3101 | Input3102 | Input3103 | QueryBody
)


class HospitalCtx(msgspec.Struct, kw_only=True):
    fixmedins_code: str
    admdvs: str
    prov_admdvs: str
    pool_admdvs: str
    hosp_lv: int


class PersonCtx(msgspec.Struct, kw_only=True):
    psn_no: str
    insured_admdvs: str
    insured_prov: str
    insured_pool: str
    insutype: str
    psn_type: str
    assistance: str | None
    acct_balc_fen: int
    chronic: list[str] = []
    gend: Gender = ""  # from the person's certificate (17th digit); "" unknown — the number never travels


class CatalogCtx(msgspec.Struct, kw_only=True, array_like=True):
    chrgitm_lv: str
    selfpay_prop: Decimal
    pric_uplmt_fen: int | None
    # Smart monitoring: the catalog's monitoring fields (hub catalog_item, 0009), stored on fee_item.
    once_per_day: bool = False
    gender_only: Gender = ""
    supply_days: Decimal = Decimal(1)


class RoutedRequest(msgspec.Struct, kw_only=True):
    """A validated request, resolved against reference data, for the settlement engine."""

    msgid: str
    infno: str
    fixmedins_code: str
    inf_time: str
    received_ns: int
    reply_topic: str
    reply_partition: int | None
    hospital: HospitalCtx
    person: PersonCtx
    scope: Scope
    # The filing in force for the treating province at routing time; None for local care or none found.
    filing_type: str | None
    body: VisitBody
    catalog: list[CatalogCtx] = []  # 2301/2204/2101/2102: one entry per fee item, same order


class DeadLetter(msgspec.Struct, kw_only=True):
    stage: str  # gateway | router | settle
    err_code: str
    err_msg: str
    msgid: str | None
    infno: str | None
    fixmedins_code: str | None
    at_ns: int
    original: bytes  # the record as received (base64 in JSON)


class SettlementEvent(msgspec.Struct, kw_only=True):
    """One ledger row as an event, for clearing and metrics. Money in fen."""

    setl_id: str
    kind: Literal["settle", "reverse"]
    orig_setl_id: str | None
    msgid: str
    mdtrt_id: str
    psn_no: str
    fixmedins_code: str
    insutype: str
    med_type: str
    scope: Scope
    filing_type: str | None
    insured_admdvs: str
    treating_admdvs: str
    setl_time: str
    medfee_sumamt: int
    hifp_pay: int
    hifmi_pay: int
    hifob_pay: int
    maf_pay: int
    fund_pay_sumamt: int
    acct_pay: int
    psn_cash_pay: int
    # Mid-stay settlement and policy versions (issue 12): the policy version the row used, and whether it
    # is a mid-stay part (not a person-time of its own: the stay counts once, with its discharge settlement).
    policy_version: str = ""
    mid_setl: bool = False
    # Smart monitoring (issue 13): the visit's facts on a settle row; None on reversals.
    visit: VisitFacts | None = None
