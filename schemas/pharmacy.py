"""Designated-pharmacy (定点药店) transactions: 2101 pre-settlement, 2102 settlement, 2103 reversal.

A pharmacy purchase is one message: the drugs come inline and the visit (med_type 41)
is created and settled at once. Only the personal account and cash pay.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import msgspec
from msgspec import Meta

from schemas.codes import InsuType
from schemas.inpatient import PsnNo
from schemas.wire import Flag, MdtrtCertType, WireTime, check_amounts, check_fee_item, check_times


class DrugDetail(msgspec.Struct, kw_only=True):
    feedetl_sn: Annotated[str, Meta(pattern=r"^[0-9A-Za-z_-]{1,30}$")]
    fee_ocur_time: WireTime
    med_list_codg: Annotated[str, Meta(min_length=1, max_length=50)]
    medins_list_codg: Annotated[str, Meta(min_length=1, max_length=50)]
    det_item_fee_sumamt: Decimal
    cnt: Decimal
    pric: Decimal

    def __post_init__(self) -> None:
        check_fee_item(self)


class PurchaseInfo(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    mdtrt_cert_type: MdtrtCertType
    mdtrt_cert_no: Annotated[str, Meta(max_length=64)]
    begntime: WireTime
    medfee_sumamt: Decimal
    insutype: InsuType
    acct_used_flag: Flag = "1"
    psn_setlway: Annotated[str, Meta(max_length=6)] = "01"
    promise_filing_flag: Flag = "0"

    def __post_init__(self) -> None:
        check_amounts(self, "medfee_sumamt")
        check_times(self, "begntime")


class Input2101(msgspec.Struct, kw_only=True, tag=True):
    data: PurchaseInfo
    drugdetail: Annotated[list[DrugDetail], Meta(min_length=1)]


class Input2102(msgspec.Struct, kw_only=True, tag=True):
    data: PurchaseInfo
    drugdetail: Annotated[list[DrugDetail], Meta(min_length=1)]


class PurchaseReverseRef(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    setl_id: Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,40}$")]


class Input2103(msgspec.Struct, kw_only=True, tag=True):
    data: PurchaseReverseRef
