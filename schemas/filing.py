"""Cross-region filing (备案) online, and chronic-disease eligibility filing.

This broker's numbering (REFERENCE §2 lists 2501–2504 for filings):
  2501 create a cross-region filing (promise system: promise_flag=1 creates it TEMPORARY on the spot)
  2502 revoke it
  2503 register chronic-disease eligibility (慢特病备案), 2504 revoke it
  5301 query a person's filings in force and chronic eligibility
"""

from __future__ import annotations

from datetime import date
from typing import Annotated

import msgspec
from msgspec import Meta

from schemas.codes import FilingType
from schemas.inpatient import PsnNo
from schemas.limits import FILING_DAYS_MAX, check_date_range
from schemas.outpatient import ChronicDisease
from schemas.wire import Flag

FilingId = Annotated[str, Meta(pattern=r"^[0-9A-Za-z_-]{1,40}$")]


class FilingRequest(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    filing_type: FilingType
    begndate: date
    enddate: date
    # The treating province the filing is for: required (a filing for "anywhere" comes only from the
    # insured region's own records, loaded as reference data).
    target_admdvs: Annotated[str, Meta(pattern=r"^[0-9]{2}0000$")]
    promise_flag: Flag = "0"

    def __post_init__(self) -> None:
        check_date_range("begndate", self.begndate)
        check_date_range("enddate", self.enddate)
        if self.enddate < self.begndate:
            raise ValueError("enddate: before begndate")
        if (self.enddate - self.begndate).days + 1 > FILING_DAYS_MAX:
            raise ValueError(f"enddate: a filing lasts at most {FILING_DAYS_MAX} days")
        if self.promise_flag == "1" and self.filing_type != "TEMPORARY":
            raise ValueError("filing_type: the promise system files TEMPORARY only")


class Input2501(msgspec.Struct, kw_only=True, tag=True):
    data: FilingRequest


class FilingRef(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    filing_id: FilingId


class Input2502(msgspec.Struct, kw_only=True, tag=True):
    data: FilingRef


class ChronicRequest(msgspec.Struct, kw_only=True):
    psn_no: PsnNo
    chronic_disease: ChronicDisease


class Input2503(msgspec.Struct, kw_only=True, tag=True):
    data: ChronicRequest


class Input2504(msgspec.Struct, kw_only=True, tag=True):
    data: ChronicRequest


class PersonRef(msgspec.Struct, kw_only=True):
    psn_no: PsnNo


class Input5301(msgspec.Struct, kw_only=True, tag=True):
    data: PersonRef
