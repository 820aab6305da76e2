"""Inpatient transactions: 2401/2402/2404 (stay), 2301/2302 (fees), 2303/2304/2305 (settlement)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import msgspec
from msgspec import Meta

from schemas.codes import InsuType, MedType
from schemas.wire import Code, Flag, MdtrtCertType, Text, WireTime, check_amounts, check_fee_item, check_times

PsnNo = Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,30}$")]
Short = Annotated[str, Meta(max_length=30)]
MdtrtId = Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,40}$")]
Count = Annotated[Decimal, Meta()]


class DiseInfo(msgspec.Struct, kw_only=True):
    """One diagnosis of a visit (2401, 2402, 2403, 2203 `diseinfo`); stored per visit as sent (visit.diseinfo)."""

    diag_type: Annotated[str, Meta(max_length=6)] = "1"
    diag_srt_no: Annotated[int, Meta(ge=0, le=999)] = 1
    diag_code: Code
    diag_name: Text = ""
    maindiag_flag: Flag = "1"
    diag_dept: Annotated[str, Meta(max_length=64)] = ""
    dise_dor_no: Annotated[str, Meta(max_length=64)] = ""
    dise_dor_name: Text = ""
    diag_time: WireTime | None = None
    vali_flag: Flag = "1"

    def __post_init__(self) -> None:
        check_times(self, "diag_time")


# A visit's diagnosis list: at most this many entries per message.
DISEINFO_MAX = 50
DiseInfoList = Annotated[list[DiseInfo], Meta(max_length=DISEINFO_MAX)]


class AdmissionInfo(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    insutype: InsuType
    mdtrt_cert_type: MdtrtCertType
    mdtrt_cert_no: Annotated[str, Meta(max_length=64)]
    med_type: MedType
    ipt_otp_no: Code
    begntime: WireTime
    atddr_no: Code
    chfpdr_name: Text = ""
    adm_diag_dscr: Text = ""
    dise_codg: Code
    dise_name: Text = ""
    medrcdno: Short = ""
    adm_dept_codg: Short = ""
    adm_dept_name: Text = ""
    adm_bed: Short = ""
    main_cond_dscr: Annotated[str, Meta(max_length=1000)] = ""
    # Extensions of this broker (REFERENCE §3): promise-system filing and declared emergency rescue.
    promise_filing_flag: Flag = "0"
    emergency_flag: Flag = "0"

    def __post_init__(self) -> None:
        check_times(self, "begntime")


class Input2401(msgspec.Struct, kw_only=True, tag=True):
    mdtrtinfo: AdmissionInfo
    diseinfo: DiseInfoList = []


class DischargeInfo(msgspec.Struct, kw_only=True):
    mdtrt_id: MdtrtId
    psn_no: PsnNo
    insutype: InsuType
    endtime: WireTime
    dscg_way: Annotated[str, Meta(max_length=6)] = "1"
    dise_codg: Code | None = None

    def __post_init__(self) -> None:
        check_times(self, "endtime")


class Input2402(msgspec.Struct, kw_only=True, tag=True):
    dscginfo: DischargeInfo
    diseinfo: DiseInfoList = []


class AdmissionChange(msgspec.Struct, kw_only=True):
    """2403 `adminfo`: what the national interface lets a hospital change in a stay; an absent field is kept.

    The stay's times, numbers, doctor, department, bed, diagnoses and disease. Not kept: the contact person
    and telephone (`coner_name`, `tel` — personal data the broker has no use for) and the maternity fields
    (maternity med_types are not settled here); they are accepted and dropped.
    """

    mdtrt_id: MdtrtId
    psn_no: PsnNo
    begntime: WireTime | None = None
    endtime: WireTime | None = None  # only for a discharged stay
    med_type: MedType | None = None
    ipt_otp_no: Code | None = None
    dise_codg: Code | None = None
    dise_name: Text | None = None
    adm_diag_dscr: Text | None = None
    medrcdno: Short | None = None
    atddr_no: Code | None = None
    chfpdr_name: Text | None = None
    adm_dept_codg: Short | None = None
    adm_dept_name: Text | None = None
    adm_bed: Short | None = None
    dscg_maindiag_code: Short | None = None
    dscg_maindiag_name: Text | None = None
    main_cond_dscr: Annotated[str, Meta(max_length=1000)] | None = None
    oprn_oprt_code: Short | None = None
    oprn_oprt_name: Text | None = None

    def __post_init__(self) -> None:
        check_times(self, "begntime", "endtime")


# The stay's particulars kept in `visit.adm_info` (2401 sets those it carries, 2403 changes any of them).
ADM_INFO_FIELDS = (
    "atddr_no", "chfpdr_name", "adm_diag_dscr", "dise_name", "medrcdno", "adm_dept_codg", "adm_dept_name",
    "adm_bed", "dscg_maindiag_code", "dscg_maindiag_name", "main_cond_dscr", "oprn_oprt_code", "oprn_oprt_name",
)


class Input2403(msgspec.Struct, kw_only=True, tag=True):
    adminfo: AdmissionChange
    diseinfo: DiseInfoList = []


class VisitRef(msgspec.Struct, kw_only=True):
    mdtrt_id: MdtrtId
    psn_no: PsnNo


class Input2404(msgspec.Struct, kw_only=True, tag=True):
    data: VisitRef


class Input2405(msgspec.Struct, kw_only=True, tag=True):
    data: VisitRef


class FeeDetail(msgspec.Struct, kw_only=True):
    feedetl_sn: Annotated[str, Meta(pattern=r"^[0-9A-Za-z_-]{1,30}$")]
    mdtrt_id: MdtrtId
    psn_no: PsnNo
    med_type: MedType
    fee_ocur_time: WireTime
    med_list_codg: Annotated[str, Meta(min_length=1, max_length=50)]
    medins_list_codg: Annotated[str, Meta(min_length=1, max_length=50)]
    det_item_fee_sumamt: Decimal
    cnt: Decimal
    pric: Decimal
    bilg_dept_codg: Code = "-"
    bilg_dr_codg: Code = "-"

    def __post_init__(self) -> None:
        check_fee_item(self)


class Input2301(msgspec.Struct, kw_only=True, tag=True):
    feedetail: Annotated[list[FeeDetail], Meta(min_length=1)]


class FeeCancel(msgspec.Struct, kw_only=True):
    feedetl_sn: Annotated[str, Meta(pattern=r"^[0-9A-Za-z_-]{1,30}$")]  # "0000" cancels all of the visit's
    mdtrt_id: MdtrtId
    psn_no: PsnNo


class Input2302(msgspec.Struct, kw_only=True, tag=True):
    data: Annotated[list[FeeCancel], Meta(min_length=1)]


class SettleInfo(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    mdtrt_cert_type: MdtrtCertType
    mdtrt_cert_no: Annotated[str, Meta(max_length=64)]
    medfee_sumamt: Decimal
    psn_setlway: Annotated[str, Meta(max_length=6)] = "01"
    mdtrt_id: MdtrtId
    insutype: InsuType
    acct_used_flag: Flag = "0"
    mid_setl_flag: Flag = "0"
    promise_filing_flag: Flag = "0"

    def __post_init__(self) -> None:
        check_amounts(self, "medfee_sumamt")


class Input2303(msgspec.Struct, kw_only=True, tag=True):
    mdtrtinfo: SettleInfo


class Input2304(msgspec.Struct, kw_only=True, tag=True):
    mdtrtinfo: SettleInfo


class ReverseRef(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    mdtrt_id: MdtrtId
    setl_id: Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,40}$")]


class Input2305(msgspec.Struct, kw_only=True, tag=True):
    data: ReverseRef


# Outputs ---------------------------------------------------------------------


class VisitResult(msgspec.Struct, kw_only=True):
    mdtrt_id: str
    psn_no: str
    ipt_otp_no: str


class Output2401(msgspec.Struct, kw_only=True):
    result: VisitResult


class FeeResult(msgspec.Struct, kw_only=True):
    feedetl_sn: str
    det_item_fee_sumamt: Decimal
    cnt: Decimal
    pric: Decimal
    selfpay_prop: Decimal
    fulamt_ownpay_amt: Decimal
    preselfpay_amt: Decimal
    inscp_scp_amt: Decimal
    chrgitm_lv: str


class Output2301(msgspec.Struct, kw_only=True):
    result: list[FeeResult]


class SetlInfo(msgspec.Struct, kw_only=True):
    setl_id: str
    mdtrt_id: str
    psn_no: str
    insutype: str
    med_type: str
    medins_setl_id: str
    setl_time: str
    medfee_sumamt: Decimal
    fulamt_ownpay_amt: Decimal
    overlmt_selfpay: Decimal
    preselfpay_amt: Decimal
    inscp_scp_amt: Decimal
    act_pay_dedc: Decimal
    hifp_pay: Decimal
    pool_prop_selfpay: Decimal
    hifmi_pay: Decimal
    hifob_pay: Decimal
    maf_pay: Decimal
    fund_pay_sumamt: Decimal
    psn_part_amt: Decimal
    acct_pay: Decimal
    psn_cash_pay: Decimal
    balc: Decimal
    clr_type: str
    clr_way: str
    clr_optins: str


class SetlDetail(msgspec.Struct, kw_only=True):
    fund_pay_type: str
    fund_pay_type_name: str
    inscp_scp_amt: Decimal
    fund_payamt: Decimal


class OutputSettlement(msgspec.Struct, kw_only=True):
    setlinfo: SetlInfo
    setldetail: list[SetlDetail]
