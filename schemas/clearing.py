"""Clearing and reconciliation (REFERENCE §5): the 32xx bodies, manual claims, deposit and alert events.

Transactions (field names as the national interface spells them; extensions of this
broker are marked):
- 3201 对总账: a hospital's totals for a period, per `insutype`, `clr_type` and
  `setl_optins`, against the ledger. Totals are net (a reversal row carries negated
  amounts and counts on the day it happened); `fixmedins_setl_cnt` counts ledger rows,
  reversals included, unless `refd_setl_flag` is "0" (then reversal rows are left out
  of counts and sums, as the national interface defines the flag).
- 3202 对明细账: the hospital's own rows inline (`detail`, an extension: the national
  platform takes them as an uploaded file) are matched to the ledger by `setl_id`; the
  answer lists every row missing on either side or differing.
- 3203 / 3204: a hospital's clearing application for a period (checked against the
  ledger) and its withdrawal.
- 3260 / 3261 / 3262: the hospital's non-local clearing details of a closed month
  (paged, 100 rows), their confirmation in batches of at most 100 rows (several 3261 per
  month, each answered with the month's confirmation state), and the rollback of one batch.
  The treating region's agency (`A` + pooling admdvs + `00000`) sends them for every
  institution of its region.

Amounts are decimal yuan on the wire (JSON numbers, 2 places; totals and reversal rows
may be negative), integer fen inside. Events on `fsi.manual_claims`, `fsi.deposits` and
`fsi.alerts` use decimal yuan as well: they leave the broker.

Imports nothing from services.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from schemas.codes import InsuType, MedType
from schemas.limits import check_date_range
from schemas.money import AmountError, check_yuan
from schemas.wire import Admdvs, Code, Flag, Text, WireTime, check_times

# Bounds (STYLE 4): a reconciliation period, rows inline in one request, a page of details.
STMT_DAYS_MAX: Final = 31
DETAIL_ROWS_MAX: Final = 10_000
CLEARING_PAGE_ROWS: Final = 100
CONFIRM_BATCH_ROWS_MAX: Final = 100  # rows of one 3261, as the national interface takes them

DateStr = Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
YearStr = Annotated[str, Meta(pattern=r"^[0-9]{4}$")]
MonthNum = Annotated[str, Meta(pattern=r"^(0?[1-9]|1[0-2])$")]  # "01" or "1"
SetlId = Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,40}$")]
Count = Annotated[int, Meta(ge=0, le=1_000_000_000)]
ClrType = Annotated[str, Meta(pattern=r"^[0-9]{2,6}$")]



def _check_signed(obj: object, *fields: str) -> None:
    """Decimal-yuan fields that may be negative (net totals, reversal rows)."""
    for name in fields:
        value = getattr(obj, name)
        if value is None:
            continue
        try:
            check_yuan(name, value, allow_negative=True)
        except AmountError as e:
            raise ValueError(str(e)) from None


def _check_positive(obj: object, *fields: str) -> None:
    for name in fields:
        try:
            check_yuan(name, getattr(obj, name))
        except AmountError as e:
            raise ValueError(str(e)) from None


def parse_date(field: str, value: str) -> date:
    try:
        parsed = datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        raise ValueError(f"{field}: not a valid date yyyy-MM-dd") from None
    check_date_range(field, parsed)
    return parsed


def _check_period(begin_field: str, begin: str, end_field: str, end: str) -> None:
    b, e = parse_date(begin_field, begin), parse_date(end_field, end)
    if e < b:
        raise ValueError(f"{end_field}: before {begin_field}")
    if (e - b).days + 1 > STMT_DAYS_MAX:
        raise ValueError(f"{end_field}: the period is longer than {STMT_DAYS_MAX} days")


def clearing_month(year: str, month: str) -> str:
    """`trt_year` + `trt_month` → 'YYYY-MM'."""
    return f"{year}-{int(month):02d}"


# 3201 -----------------------------------------------------------------------------


class StmtTotals(msgspec.Struct, kw_only=True):
    insutype: InsuType
    clr_type: ClrType
    setl_optins: Admdvs
    stmt_begndate: DateStr
    stmt_enddate: DateStr
    medfee_sumamt: Decimal
    fund_pay_sumamt: Decimal
    acct_pay: Decimal
    fixmedins_setl_cnt: Count
    refd_setl_flag: Flag = "1"

    def __post_init__(self) -> None:
        _check_signed(self, "medfee_sumamt", "fund_pay_sumamt", "acct_pay")
        _check_period("stmt_begndate", self.stmt_begndate, "stmt_enddate", self.stmt_enddate)


class Input3201(msgspec.Struct, kw_only=True, tag=True):
    data: StmtTotals


class StmtInfo(msgspec.Struct, kw_only=True):
    setl_optins: str
    stmt_rslt: Literal["0", "1"]  # 0 balanced, 1 not
    stmt_rslt_dscr: str


class StmtDiff(msgspec.Struct, kw_only=True):
    """Extension: one total that differs — the hospital's value, the ledger's, ledger minus hospital."""

    fld_name: str
    medins_val: Decimal
    ledger_val: Decimal
    diff_val: Decimal


class Output3201(msgspec.Struct, kw_only=True):
    stmtinfo: StmtInfo
    stmtdiff: list[StmtDiff] = []


# 3202 -----------------------------------------------------------------------------


class StmtDetailHead(msgspec.Struct, kw_only=True):
    setl_optins: Admdvs
    stmt_begndate: DateStr
    stmt_enddate: DateStr
    medfee_sumamt: Decimal
    fund_pay_sumamt: Decimal
    cash_payamt: Decimal
    fixmedins_setl_cnt: Count
    clr_type: Annotated[str, Meta(pattern=r"^([0-9]{2,6})?$")] = ""  # empty: every clr_type
    refd_setl_flag: Flag = "1"
    file_qury_no: Annotated[str, Meta(max_length=64)] = ""  # the national file upload; unused here

    def __post_init__(self) -> None:
        _check_signed(self, "medfee_sumamt", "fund_pay_sumamt", "cash_payamt")
        _check_period("stmt_begndate", self.stmt_begndate, "stmt_enddate", self.stmt_enddate)


class StmtDetailRow(msgspec.Struct, kw_only=True):
    setl_id: SetlId
    medfee_sumamt: Decimal
    fund_pay_sumamt: Decimal
    acct_pay: Decimal = Decimal(0)
    refd_setl_flag: Flag = "0"  # 1: the row is a reversal (退费结算)

    def __post_init__(self) -> None:
        _check_signed(self, "medfee_sumamt", "fund_pay_sumamt", "acct_pay")


class Input3202(msgspec.Struct, kw_only=True, tag=True):
    data: StmtDetailHead
    detail: Annotated[list[StmtDetailRow], Meta(max_length=DETAIL_ROWS_MAX)] = []

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for row in self.detail:
            if row.setl_id in seen:
                raise ValueError("detail: a setl_id appears twice")
            seen.add(row.setl_id)


DiffType = Literal["missing_at_medins", "missing_in_ledger", "amount_differs", "flag_differs"]


class DetailResult(msgspec.Struct, kw_only=True):
    """One row that does not balance. Ledger values are None when the ledger lacks the row,
    the hospital's (`medins_*`) when the hospital's list lacks it."""

    setl_id: str
    stmt_rslt: Literal["1"] = "1"
    memo: str
    diff_type: DiffType
    refd_setl_flag: str
    medfee_sumamt: Decimal | None
    fund_pay_sumamt: Decimal | None
    acct_pay: Decimal | None
    medins_medfee_sumamt: Decimal | None
    medins_fund_pay_sumamt: Decimal | None
    medins_acct_pay: Decimal | None


class Output3202(msgspec.Struct, kw_only=True):
    stmtinfo: StmtInfo
    stmtdiff: list[StmtDiff] = []
    matched_cnt: int = 0
    detail: list[DetailResult] = []


# 3203 / 3204 ------------------------------------------------------------------------


class ClearingAppl(msgspec.Struct, kw_only=True):
    clr_type: ClrType
    clr_way: Annotated[str, Meta(max_length=30)] = "1"
    setlym: Annotated[str, Meta(pattern=r"^[0-9]{4}(0[1-9]|1[0-2])$")]
    psntime: Count
    medfee_sumamt: Decimal
    med_sumfee: Decimal
    fund_appy_sum: Decimal
    cash_payamt: Decimal
    acct_pay: Decimal
    begndate: DateStr
    enddate: DateStr

    def __post_init__(self) -> None:
        _check_signed(self, "medfee_sumamt", "med_sumfee", "fund_appy_sum", "cash_payamt", "acct_pay")
        _check_period("begndate", self.begndate, "enddate", self.enddate)


class Input3203(msgspec.Struct, kw_only=True, tag=True):
    data: ClearingAppl


class ApplResult(msgspec.Struct, kw_only=True):
    clr_appy_evt_id: str
    clr_stas: Literal["applied", "withdrawn"]


class Output3203(msgspec.Struct, kw_only=True):
    result: ApplResult


class ClearingApplRef(msgspec.Struct, kw_only=True):
    clr_appy_evt_id: Code
    clr_optins: Annotated[str, Meta(pattern=r"^([0-9]{6})?$")] = ""


class Input3204(msgspec.Struct, kw_only=True, tag=True):
    data: ClearingApplRef


# 3260 / 3261 / 3262 --------------------------------------------------------------------


class DetailQuery(msgspec.Struct, kw_only=True):
    trt_year: YearStr
    trt_month: MonthNum
    startrow: Annotated[int, Meta(ge=1, le=1_000_000_000)] = 1


class Input3260(msgspec.Struct, kw_only=True, tag=True):
    data: DetailQuery


class ClearingDetail(msgspec.Struct, kw_only=True):
    seqno: int
    mdtrtarea: str
    medins_no: str
    mdtrt_id: str
    mdtrt_setl_time: str
    setl_sn: str  # = setl_id
    fulamt_advpay_flag: str
    medfee_sumamt: Decimal
    optins_pay_sumamt: Decimal  # the funds' part, what the insured region pays
    # Extensions: the insured region, the row's kind, its calendar month and the fund split.
    insuplc_admdvs: str
    refd_setl_flag: str
    setl_month: str
    hifp_pay: Decimal
    hifmi_pay: Decimal
    hifob_pay: Decimal
    maf_pay: Decimal


class Output3260(msgspec.Struct, kw_only=True):
    totalrow: int
    startrow: int
    data: list[ClearingDetail]


class ConfirmHead(msgspec.Struct, kw_only=True):
    trt_year: YearStr
    trt_month: MonthNum
    totalrow: Count


class ConfirmRow(msgspec.Struct, kw_only=True):
    setl_sn: SetlId
    medfee_sumamt: Decimal
    optins_pay_sumamt: Decimal
    cnfm_flag: Flag = "1"  # 0: disputed

    def __post_init__(self) -> None:
        _check_signed(self, "medfee_sumamt", "optins_pay_sumamt")


class Input3261(msgspec.Struct, kw_only=True, tag=True):
    """One batch: 1..CONFIRM_BATCH_ROWS_MAX rows (checked by the clearing service, which answers
    CONFIRMATION_BATCH_SIZE; the decoder's bound only limits what is read)."""

    data: ConfirmHead
    detail: Annotated[list[ConfirmRow], Meta(max_length=DETAIL_ROWS_MAX)] = []

    def __post_init__(self) -> None:
        if len({row.setl_sn for row in self.detail}) != len(self.detail):
            raise ValueError("detail: a setl_sn appears twice")


class ConfirmResult(msgspec.Struct, kw_only=True):
    """One batch (its counts) and, extensions, the month's confirmation state after it (the sender's
    rows: a hospital's own, an agency's region's)."""

    otransid: str  # the msgid of the 3261 batch
    totalrow: int  # the month's rows
    cnfm_cnt: int  # rows this batch confirmed
    dspt_cnt: int  # rows this batch disputed (cnfm_flag 0)
    cnfm_stas: Literal["confirmed", "rolled_back"]  # the batch's
    batch_rows: int = 0  # rows the batch listed
    dup_cnt: int = 0  # of which an earlier live batch had confirmed or disputed already (not counted again)
    month_cnfm_cnt: int = 0
    month_dspt_cnt: int = 0
    month_stas: Literal["partial", "complete"] = "partial"  # complete: every row confirmed or disputed


class Output3261(msgspec.Struct, kw_only=True):
    result: ConfirmResult


class ConfirmRef(msgspec.Struct, kw_only=True):
    trt_year: YearStr
    trt_month: MonthNum
    otransid: Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,40}$")]


class Input3262(msgspec.Struct, kw_only=True, tag=True):
    data: ConfirmRef


# Registered in schemas.codec.BODY_TYPES.
CLEARING_BODY_TYPES: Final[dict[str, type]] = {
    "3201": Input3201,
    "3202": Input3202,
    "3203": Input3203,
    "3204": Input3204,
    "3260": Input3260,
    "3261": Input3261,
    "3262": Input3262,
}


# Events ------------------------------------------------------------------------------

ClaimReason = Literal[
    "NOT_FILED",  # no filing in force (REFERENCE §3)
    "HOSPITAL_NOT_CONNECTED",  # the hospital offers no direct settlement
    "SYSTEM_FAILURE",  # the network or a system was down
    "EMERGENCY_UNDECLARED",  # emergency care not declared as such
    "ITEM_NOT_COVERED",  # care outside what direct settlement covers
    "PERSON_CHOICE",  # the person paid in full and claimed later
    "OTHER",
]


class ManualClaim(msgspec.Struct, kw_only=True):
    """A non-local visit reimbursed by hand (手工零星报销), reported by the insured region.

    Counts in the direct-settlement-rate denominator (REFERENCE §6), by `enddate`; moves no
    money through clearing. `psn_no` is a personal identifier: stored, never logged.
    """

    claim_id: Annotated[str, Meta(pattern=r"^[0-9A-Za-z_-]{1,40}$")]
    psn_no: Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,30}$")]
    insuplc_admdvs: Admdvs
    mdtrtarea_admvs: Admdvs
    fixmedins_code: Annotated[str, Meta(pattern=r"^([0-9A-Za-z]{1,20})?$")] = ""
    med_type: MedType
    begndate: WireTime
    enddate: WireTime
    medfee_sumamt: Decimal
    fund_pay_sumamt: Decimal  # what the insured region reimbursed
    reason: ClaimReason
    reason_dscr: Text = ""
    claim_time: WireTime

    def __post_init__(self) -> None:
        _check_positive(self, "medfee_sumamt", "fund_pay_sumamt")
        check_times(self, "begndate", "enddate", "claim_time")
        if self.fund_pay_sumamt > self.medfee_sumamt:
            raise ValueError("fund_pay_sumamt: more than medfee_sumamt")
        if self.enddate < self.begndate:
            raise ValueError("enddate: before begndate")


class DepositEvent(msgspec.Struct, kw_only=True):
    """One movement of an insured province's advance deposit (预付金) at the clearing hub."""

    txn_id: str
    insured_prov: str
    kind: Literal["topup", "drawdown"]
    amount: Decimal  # signed: a top-up adds, a month's clearing draws down (negative)
    balance: Decimal  # after the movement
    warning_line: Decimal
    clr_month: str | None
    at: str  # yyyy-MM-dd HH:mm:ss, Asia/Shanghai


class DepositAlert(msgspec.Struct, kw_only=True):
    """The deposit is at or below its warning line after a movement (one alert per movement)."""

    alert_id: str
    kind: Literal["deposit_below_warning_line"] = "deposit_below_warning_line"
    insured_prov: str
    balance: Decimal
    warning_line: Decimal
    txn_id: str
    at: str
