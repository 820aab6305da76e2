"""Queries of the asking institution's own data (5201–5206), answered by the settlement engine.

National field names where they exist. Every query names the person (`psn_no`), so the router routes it
like a settlement (the person's partition and shard) and it sees what the person's earlier transactions did.
Lists that can be long (5201, 5203, 5204, 5205) are paged: `page_num` (1-based) and `page_size` (at most
PAGE_SIZE_MAX); the answer carries `page_num`, `page_size`, `total` (rows matching) and the page's rows.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from schemas.codes import MedType
from schemas.inpatient import MdtrtId, PsnNo, SetlDetail, SetlInfo
from schemas.limits import check_date_range
from schemas.wire import Flag, WireTime, check_times

PAGE_SIZE_DEFAULT = 20
PAGE_SIZE_MAX = 100
# A page number far beyond any list, small enough that page_num × page_size stays a cheap OFFSET.
PAGE_NUM_MAX = 100_000
SetlId = Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,40}$")]


class Paging(msgspec.Struct, kw_only=True):
    page_num: Annotated[int, Meta(ge=1, le=PAGE_NUM_MAX)] = 1
    page_size: Annotated[int, Meta(ge=1, le=PAGE_SIZE_MAX)] = PAGE_SIZE_DEFAULT

    @property
    def offset(self) -> int:
        return (self.page_num - 1) * self.page_size


class Page(msgspec.Struct, kw_only=True):
    """The head of a paged answer: the page asked for and how many rows match in all."""

    page_num: int
    page_size: int
    total: int


def _check_range(obj: Any, first: str, last: str) -> None:
    """Both ends valid; the first not after the last (wire times compare as text)."""
    check_times(obj, first, last)
    low, high = getattr(obj, first), getattr(obj, last)
    if low is not None and high is not None and low > high:
        raise ValueError(f"{last}: before {first}")


# 5201 visits -------------------------------------------------------------------------------------


class VisitQuery(Paging, kw_only=True):
    psn_no: PsnNo
    begntime: WireTime | None = None  # the visits that began in [begntime, endtime]
    endtime: WireTime | None = None
    med_type: MedType | None = None
    mdtrt_id: MdtrtId | None = None

    def __post_init__(self) -> None:
        _check_range(self, "begntime", "endtime")


class Input5201(msgspec.Struct, kw_only=True, tag=True):
    data: VisitQuery


class VisitRow(msgspec.Struct, kw_only=True):
    mdtrt_id: str
    psn_no: str
    fixmedins_code: str
    med_type: str
    insutype: str
    ipt_otp_no: str
    begntime: str
    endtime: str | None
    dise_codg: str | None
    chronic_disease: str | None
    state: str  # registered | admitted | discharged | settled | cancelled (README state machine)


class Output5201(Page, kw_only=True):
    mdtrtinfo: list[VisitRow]


# 5202 diagnoses -----------------------------------------------------------------------------------


class DiagnosisQuery(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    mdtrt_id: MdtrtId


class Input5202(msgspec.Struct, kw_only=True, tag=True):
    data: DiagnosisQuery


class Output5202(msgspec.Struct, kw_only=True):
    mdtrt_id: str
    diseinfo: list[dict[str, Any]]  # as stored from 2401/2402/2403/2203 (schemas.inpatient.DiseInfo's fields)


# 5203 settlements ---------------------------------------------------------------------------------


class SettlementQuery(Paging, kw_only=True):
    """Exactly one selector: `setl_id` (that row and its reversal), `mdtrt_id` (the visit's rows) or the
    range `begntime`..`endtime` on the settlement time."""

    psn_no: PsnNo
    setl_id: SetlId | None = None
    mdtrt_id: MdtrtId | None = None
    begntime: WireTime | None = None
    endtime: WireTime | None = None

    def __post_init__(self) -> None:
        _check_range(self, "begntime", "endtime")
        if (self.begntime is None) != (self.endtime is None):
            raise ValueError("endtime: a range needs both begntime and endtime")
        selectors = (self.setl_id is not None) + (self.mdtrt_id is not None) + (self.begntime is not None)
        if selectors != 1:
            raise ValueError("setl_id: give exactly one of setl_id, mdtrt_id or begntime/endtime")


class Input5203(msgspec.Struct, kw_only=True, tag=True):
    data: SettlementQuery


class SettlementRecord(msgspec.Struct, kw_only=True):
    """One ledger row: `setlinfo` and `setldetail` exactly as the settlement (or reversal) answered them."""

    setlinfo: SetlInfo
    setldetail: list[SetlDetail]
    refd_setl_flag: Flag  # 1: a reversal (退费结算) of `orig_setl_id`
    orig_setl_id: str | None
    reversed_flag: Flag  # 1: a settlement that has been reversed


class Output5203(Page, kw_only=True):
    setlinfo: list[SettlementRecord]


# 5204 fee details ---------------------------------------------------------------------------------


class FeeQuery(Paging, kw_only=True):
    psn_no: PsnNo
    mdtrt_id: MdtrtId
    setl_id: SetlId | None = None  # must be a settlement of that visit


class Input5204(msgspec.Struct, kw_only=True, tag=True):
    data: FeeQuery


class FeeRow(msgspec.Struct, kw_only=True):
    feedetl_sn: str
    mdtrt_id: str
    med_list_codg: str
    medins_list_codg: str
    fee_ocur_time: str
    det_item_fee_sumamt: Decimal
    cnt: Decimal
    pric: Decimal
    pric_uplmt_amt: Decimal | None
    chrgitm_lv: str
    selfpay_prop: Decimal
    vali_flag: Flag  # 0: cancelled (2205/2302)
    setl_id: str | None = None  # the settlement (or mid-stay part) that settled the item; None: not settled


class Output5204(Page, kw_only=True):
    feedetail: list[FeeRow]


# 5205 chronic-disease drug records ----------------------------------------------------------------


class ChronicDrugQuery(Paging, kw_only=True):
    psn_no: PsnNo
    begndate: date  # the items that occurred on begndate..enddate, both included
    enddate: date

    def __post_init__(self) -> None:
        check_date_range("begndate", self.begndate)
        check_date_range("enddate", self.enddate)
        if self.enddate < self.begndate:
            raise ValueError("enddate: before begndate")


class Input5205(msgspec.Struct, kw_only=True, tag=True):
    data: ChronicDrugQuery


class DrugRow(msgspec.Struct, kw_only=True):
    mdtrt_id: str
    med_type: str  # 14 chronic outpatient, 41 pharmacy purchase
    chronic_disease: str | None
    feedetl_sn: str
    med_list_codg: str
    medins_list_codg: str
    fee_ocur_time: str
    det_item_fee_sumamt: Decimal
    cnt: Decimal
    pric: Decimal
    chrgitm_lv: str


class Output5205(Page, kw_only=True):
    druginfo: list[DrugRow]


# 5206 accumulators ---------------------------------------------------------------------------------


class AccumulatorQuery(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    year: Annotated[int, Meta(ge=2000, le=2100)] | None = None  # default: the year of inf_time


class Input5206(msgspec.Struct, kw_only=True, tag=True):
    data: AccumulatorQuery


class Output5206(msgspec.Struct, kw_only=True):
    psn_no: str
    year: int
    cuminfo: list[dict[str, Any]]  # schemas.person.cum_info: the codes of 1101


QueryBody = Input5201 | Input5202 | Input5203 | Input5204 | Input5205 | Input5206
