"""Outpatient transactions: 2201/2202 (registration), 2203 (visit info), 2204/2205 (fees),
2206/2207/2208 (pre-settlement, settlement, reversal)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import msgspec
from msgspec import Meta

from schemas.codes import ChronicDisease, InsuType, OutpatientMedType
from schemas.inpatient import DiseInfoList, FeeDetail, MdtrtId, PsnNo
from schemas.wire import Code, Flag, MdtrtCertType, Text, WireTime, check_amounts, check_times


class Registration(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    insutype: InsuType
    begntime: WireTime
    mdtrt_cert_type: MdtrtCertType
    mdtrt_cert_no: Annotated[str, Meta(max_length=64)]
    ipt_otp_no: Code
    atddr_no: Code
    dr_name: Text = ""
    dept_code: Code
    dept_name: Text = ""
    caty: Code = "-"
    promise_filing_flag: Flag = "0"  # this broker's extension (REFERENCE §3)

    def __post_init__(self) -> None:
        check_times(self, "begntime")


class Input2201(msgspec.Struct, kw_only=True, tag=True):
    data: Registration


class RegistrationRef(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    mdtrt_id: MdtrtId
    ipt_otp_no: Code


class Input2202(msgspec.Struct, kw_only=True, tag=True):
    data: RegistrationRef


class OutpatientVisitInfo(msgspec.Struct, kw_only=True):
    mdtrt_id: MdtrtId
    psn_no: PsnNo
    med_type: OutpatientMedType
    begntime: WireTime
    main_cond_dscr: Text = ""
    dise_codg: Code
    dise_name: Text = ""
    # For med_type 14: which chronic/special disease (门诊慢特病) this visit treats.
    chronic_disease: ChronicDisease | None = None

    def __post_init__(self) -> None:
        check_times(self, "begntime")
        if self.med_type == "14" and self.chronic_disease is None:
            raise ValueError("chronic_disease: required for med_type 14")


class Input2203(msgspec.Struct, kw_only=True, tag=True):
    mdtrtinfo: OutpatientVisitInfo
    diseinfo: DiseInfoList = []


class Input2204(msgspec.Struct, kw_only=True, tag=True):
    feedetail: Annotated[list[FeeDetail], Meta(min_length=1)]


class FeeBatchCancel(msgspec.Struct, kw_only=True):
    mdtrt_id: MdtrtId
    psn_no: PsnNo
    feedetl_sn: Annotated[str, Meta(pattern=r"^[0-9A-Za-z_-]{1,30}$")]  # "0000" cancels all of the visit's


class Input2205(msgspec.Struct, kw_only=True, tag=True):
    data: Annotated[list[FeeBatchCancel], Meta(min_length=1)]


class OutpatientSettleInfo(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    mdtrt_cert_type: MdtrtCertType
    mdtrt_cert_no: Annotated[str, Meta(max_length=64)]
    med_type: OutpatientMedType
    medfee_sumamt: Decimal
    psn_setlway: Annotated[str, Meta(max_length=6)] = "01"
    mdtrt_id: MdtrtId
    insutype: InsuType
    acct_used_flag: Flag = "0"
    promise_filing_flag: Flag = "0"

    def __post_init__(self) -> None:
        check_amounts(self, "medfee_sumamt")


class Input2206(msgspec.Struct, kw_only=True, tag=True):
    data: OutpatientSettleInfo


class Input2207(msgspec.Struct, kw_only=True, tag=True):
    data: OutpatientSettleInfo


class OutpatientReverseRef(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    mdtrt_id: MdtrtId
    setl_id: Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,40}$")]


class Input2208(msgspec.Struct, kw_only=True, tag=True):
    data: OutpatientReverseRef
