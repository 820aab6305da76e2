"""Reference-data rows as they appear in the JSON Lines files (one struct per file).

Files: hospitals.jsonl (`HospitalRow`), persons.jsonl (`PersonRow`), filings.jsonl
(`FilingRow`), catalog.jsonl (`CatalogRow`). Decoding is strict and rejects
unknown fields. Money is decimal yuan (a JSON string such as "1234.50", a JSON
number is accepted too and read exactly); ratios are decimal strings.

Checks that msgspec constraints cannot express run in `__post_init__` and raise
`ValueError`, which msgspec reports as a `ValidationError`; their messages end in
"- at `$.field`" like msgspec's own, and never quote the offending value (rows
carry personal identifiers).

Decisions worth knowing:
- `chrgitm_lv` fixes the possible `selfpay_prop`: "01" 甲类 → 0; "02" 乙类 → 0 ≤ p < 1;
  "03" 丙类 → 1 (fully self-paid; the policy engine also goes by the class).
- `insutype` fixes `psn_type`: 310 employees are 11xx (in service) / 12xx (retired),
  390 residents are 15xx / 16xx / 17xx.
- `certno`, when present, is an 18-character resident ID number (GB 11643) with a
  valid birth date and ISO 7064 MOD 11-2 check character.

Imports nothing from services.
"""

from __future__ import annotations

import operator
from datetime import date
from decimal import Decimal
from typing import Annotated, Final, Literal

import msgspec

from schemas.codes import ChronicDisease, FilingType
from schemas.codes import InsuType as Insutype

ADMDVS_RE: Final = r"^[0-9]{6}$"
PROVINCE_RE: Final = r"^[0-9]{2}0000$"

Admdvs = Annotated[str, msgspec.Meta(pattern=ADMDVS_RE)]
ProvinceAdmdvs = Annotated[str, msgspec.Meta(pattern=PROVINCE_RE)]
ChrgitmLv = Literal["01", "02", "03"]


# Bounds on amounts (yuan): far above anything real, low enough for bigint fen.
YUAN_MAX: Final = Decimal("1000000000")

# Days of supply per catalog unit: the hub column is numeric(7, 2).
SUPPLY_DAYS_MAX: Final = Decimal("99999.99")

PSN_TYPE_PREFIXES: Final[dict[str, tuple[str, ...]]] = {"310": ("11", "12"), "390": ("15", "16", "17")}


class RowError(ValueError):
    """A row-level check failed; the message names the field, never the value."""


def _at(field: str, problem: str) -> RowError:
    return RowError(f"{problem} - at `$.{field}`")


def check_yuan(value: Decimal, field: str, *, positive: bool = False) -> None:
    """A finite, non-negative amount with at most 2 decimal places, below `YUAN_MAX`."""
    if not value.is_finite():
        raise _at(field, "amount must be a finite number")
    if value < 0 or (positive and value == 0):
        raise _at(field, "amount must be > 0" if positive else "amount must be >= 0")
    if value > YUAN_MAX:
        raise _at(field, f"amount must be <= {YUAN_MAX}")
    scaled = value * 100
    if scaled != scaled.to_integral_value():
        raise _at(field, "amount has more than 2 decimal places")


def yuan_to_fen(value: Decimal) -> int:
    """Exact conversion of a checked yuan amount to integer fen."""
    scaled = value * 100
    fen = int(scaled)
    if fen != scaled:
        raise ValueError("amount has more than 2 decimal places")
    return fen


# Resident ID number (居民身份证号码, GB 11643) -----------------------------------

_CERT_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CERT_CHECK: Final = "10X98765432"
_CERT_ZERO: Final = ord("0") * sum(_CERT_WEIGHTS)


def certno_check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character for the first 17 digits."""
    if len(first17) != 17 or not (first17.isascii() and first17.isdigit()):
        raise ValueError("need 17 digits")
    # On the ASCII codes, in C (a national load checks 13 M of them): Σ(code − 48)·w = Σ code·w − 48·Σw.
    return _CERT_CHECK[(sum(map(operator.mul, first17.encode(), _CERT_WEIGHTS)) - _CERT_ZERO) % 11]


def certno_birth_date(certno: str) -> date:
    return date(int(certno[6:10]), int(certno[10:12]), int(certno[12:14]))


def certno_gender(certno: str) -> Literal["1", "2"]:
    """National gender code: "1" male (odd sequence digit), "2" female."""
    return "1" if int(certno[16]) % 2 else "2"


def certno_problem(certno: str) -> str | None:
    """Why `certno` is not a valid 18-character ID number, or None when it is."""
    if len(certno) != 18 or not certno.isascii() or not certno[:17].isdigit():
        return "must be 17 digits and a check character"
    try:
        certno_birth_date(certno)
    except ValueError:
        return "birth date is not a valid date"
    if certno[17] != certno_check_char(certno[:17]):
        return "check character does not match"
    return None


# Rows ------------------------------------------------------------------------------


class HospitalRow(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A designated institution: hospital ('H…') or pharmacy ('P…', 定点药店; hosp_lv 1)."""

    fixmedins_code: Annotated[str, msgspec.Meta(pattern=r"^[HP][0-9]{11}$")]
    fixmedins_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    admdvs: Admdvs
    hosp_lv: Literal[1, 2, 3]

    def __post_init__(self) -> None:
        if self.fixmedins_code[1:7] != self.admdvs:
            raise _at("fixmedins_code", "code must be 'H' (or 'P' for a pharmacy) + admdvs + a 5-digit sequence")


class PersonRow(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    psn_no: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z]{1,30}$")]
    insuplc_admdvs: Admdvs
    insutype: Insutype
    psn_type: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{2,6}$")]
    assistance: Literal["1", "2"] | None
    acct_balc: Decimal
    chronic: list[ChronicDisease] = []
    certno: str | None = None
    psn_name: Annotated[str, msgspec.Meta(min_length=1, max_length=50)] | None = None

    def __post_init__(self) -> None:
        if not self.psn_type.startswith(PSN_TYPE_PREFIXES[self.insutype]):
            raise _at("psn_type", f"psn_type does not belong to insutype {self.insutype}")
        check_yuan(self.acct_balc, "acct_balc")
        if len(set(self.chronic)) != len(self.chronic):
            raise _at("chronic", "disease listed twice")
        if self.certno is not None:
            problem = certno_problem(self.certno)
            if problem is not None:
                raise _at("certno", f"certno {problem}")


class FilingRow(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    psn_no: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z]{1,30}$")]
    filing_type: FilingType
    begndate: date
    enddate: date
    target_admdvs: ProvinceAdmdvs | None = None  # a province, or None for anywhere

    def __post_init__(self) -> None:
        if self.enddate < self.begndate:
            raise _at("enddate", "enddate is before begndate")


class CatalogRow(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    admdvs: ProvinceAdmdvs  # treating province
    med_list_codg: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z\-]{1,50}$")]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    chrgitm_lv: ChrgitmLv
    selfpay_prop: Decimal
    pric_uplmt_amt: Decimal | None = None  # unit price ceiling, yuan
    # Smart monitoring (issue 13); the defaults are the hub's column defaults, so older files load unchanged.
    once_per_day: bool = False  # billable at most once per day on one visit (DUPLICATE_CHARGE)
    gender_only: Literal["1", "2"] | None = None  # only for that gender: "1" male, "2" female (GENDER_RESTRICTED)
    supply_days: Decimal = Decimal(1)  # days of supply per unit, drugs (PHARMACY_OVERSUPPLY)

    def __post_init__(self) -> None:
        p = self.selfpay_prop
        if not p.is_finite() or not Decimal(0) <= p <= Decimal(1):
            raise _at("selfpay_prop", "selfpay_prop must be between 0 and 1")
        if p * 10000 != (p * 10000).to_integral_value():
            raise _at("selfpay_prop", "selfpay_prop has more than 4 decimal places")
        lv = self.chrgitm_lv
        if (lv == "01" and p != 0) or (lv == "02" and p == 1) or (lv == "03" and p != 1):
            raise _at("selfpay_prop", f"selfpay_prop does not fit chrgitm_lv {lv} (01: 0, 02: below 1, 03: 1)")
        if self.pric_uplmt_amt is not None:
            check_yuan(self.pric_uplmt_amt, "pric_uplmt_amt", positive=True)
        days = self.supply_days
        if not days.is_finite() or not Decimal(0) < days <= SUPPLY_DAYS_MAX:
            raise _at("supply_days", f"supply_days must be > 0 and <= {SUPPLY_DAYS_MAX}")
        if days * 100 != (days * 100).to_integral_value():
            raise _at("supply_days", "supply_days has more than 2 decimal places")


# The four files ----------------------------------------------------------------------

HOSPITALS_FILE: Final = "hospitals.jsonl"
PERSONS_FILE: Final = "persons.jsonl"
FILINGS_FILE: Final = "filings.jsonl"
CATALOG_FILE: Final = "catalog.jsonl"


class RefDataSet(msgspec.Struct, kw_only=True):
    """The contents of one reference-data directory, rows in file order."""

    hospitals: list[HospitalRow] = []
    persons: list[PersonRow] = []
    filings: list[FilingRow] = []
    catalog: list[CatalogRow] = []
