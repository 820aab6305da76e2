"""9001 sign-in, 9002 sign-out and 1101 person info."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from schemas.money import to_yuan
from schemas.wire import Code, MdtrtCertType, Text, WireTime, check_times


class SignInData(msgspec.Struct, kw_only=True):
    opter_no: Code
    mac: Annotated[str, Meta(max_length=64)] = ""
    ip: Annotated[str, Meta(max_length=64)] = ""


class Input9001(msgspec.Struct, kw_only=True, tag=True):
    signIn: SignInData


class SignOutData(msgspec.Struct, kw_only=True):
    sign_no: Annotated[str, Meta(min_length=1, max_length=64)]
    opter_no: Code


class Input9002(msgspec.Struct, kw_only=True, tag=True):
    signOut: SignOutData


class PersonQuery(msgspec.Struct, kw_only=True):
    mdtrt_cert_type: MdtrtCertType
    mdtrt_cert_no: Annotated[str, Meta(min_length=1, max_length=64)]
    card_sn: Annotated[str, Meta(max_length=64)] = ""
    begntime: WireTime | None = None
    psn_cert_type: Annotated[str, Meta(max_length=6)] = "01"
    certno: Annotated[str, Meta(max_length=64)] = ""
    psn_name: Text = ""

    def __post_init__(self) -> None:
        check_times(self, "begntime")


class Input1101(msgspec.Struct, kw_only=True, tag=True):
    data: PersonQuery


class BaseInfo(msgspec.Struct, kw_only=True):
    psn_no: str
    psn_cert_type: str
    certno: str
    psn_name: str
    gend: str
    brdy: str
    age: int


class InsuInfo(msgspec.Struct, kw_only=True):
    insutype: str
    psn_type: str
    balc: Decimal
    insuplc_admdvs: str
    psn_insu_stas: str


class IdetInfo(msgspec.Struct, kw_only=True):
    psn_idet_type: str
    memo: str


class Output1101(msgspec.Struct, kw_only=True):
    baseinfo: BaseInfo
    insuinfo: list[InsuInfo]
    idetinfo: list[IdetInfo]


# `cuminfo` codes for the year-to-date accumulators (this broker's names; values in yuan), answered by 1101
# (the router) and 5206 (the settlement engine) alike; the chronic totals follow as `chronic_paid_<disease>`.
CUM_TYPES = {
    "basic_paid": "basic_pool_paid", "outpatient_dedc_used": "outpatient_deductible_used",
    "outpatient_paid": "outpatient_pool_paid", "critical_base": "critical_illness_base",
    "critical_paid": "critical_illness_paid", "supplementary_paid": "supplementary_paid",
    "assistance_paid": "assistance_paid",
}


def cum_info(year: int, accumulators: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`cuminfo` rows of one year from an accumulator row's counters (fen; `chronic_paid`: disease → fen);
    an empty mapping (no row yet) gives zeros."""
    rows = [{"year": year, "cum_type_code": code, "cum": to_yuan(int(accumulators.get(key, 0)))}
            for key, code in CUM_TYPES.items()]
    rows += [{"year": year, "cum_type_code": f"chronic_paid_{disease}", "cum": to_yuan(int(fen))}
             for disease, fen in sorted(accumulators.get("chronic_paid", {}).items())]
    return rows
