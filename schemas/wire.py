"""Wire-level field types shared by the message families."""

from __future__ import annotations

from datetime import datetime, time
from decimal import Decimal
from typing import Annotated, Any, Literal

from msgspec import Meta

from schemas.limits import DATE_MAX, DATE_MIN, check_date_range
from schemas.money import FEE_YUAN_MAX, AmountError, check_cnt, check_yuan

Admdvs = Annotated[str, Meta(pattern=r"^[0-9]{6}$")]
WireTime = Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$")]
Code = Annotated[str, Meta(min_length=1, max_length=64)]
Text = Annotated[str, Meta(max_length=500)]
MdtrtCertType = Literal["01", "02", "03"]
Flag = Literal["0", "1"]
Yuan = Decimal

WIRE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# DATE_MIN..DATE_MAX as date-times: one comparison instead of a date() and check_date_range per time.
_WIRE_TIME_MIN = datetime.combine(DATE_MIN, time.min)
_WIRE_TIME_MAX = datetime.combine(DATE_MAX, time.max)


def parse_wire_time(field: str, value: str) -> datetime:
    """`yyyy-MM-dd HH:mm:ss` → datetime. The shape checked by hand, then the C parser `fromisoformat` (strptime
    was a fifth of the engine's CPU, slicing and int() half of the router's time checks); anything not in that
    exact shape, not a real date, or outside DATE_MIN..DATE_MAX (schemas.limits) is refused naming the field."""
    try:
        if (len(value) != 19 or value[4] != "-" or value[7] != "-" or value[10] != " " or value[13] != ":"
                or value[16] != ":" or not value.isascii()):
            raise ValueError
        parsed = datetime.fromisoformat(value)  # the fixed shape leaves it digits only: no other ISO form
    except ValueError:
        raise ValueError(f"{field}: not a valid date-time yyyy-MM-dd HH:mm:ss") from None
    if not _WIRE_TIME_MIN <= parsed <= _WIRE_TIME_MAX:
        check_date_range(field, parsed.date())  # raises with the range's text
    return parsed


def check_amounts(obj: object, *fields: str, maximum: Decimal = FEE_YUAN_MAX) -> None:
    """Validate decimal-yuan fields of a struct in __post_init__ (msgspec reports the struct's path).
    A settlement's or fee line's amount is at most FEE_YUAN_MAX unless `maximum` says otherwise."""
    for name in fields:
        value = getattr(obj, name)
        if value is None:
            continue
        try:
            check_yuan(name, value, maximum=maximum)
        except AmountError as e:
            raise ValueError(str(e)) from None


def check_times(obj: object, *fields: str) -> None:
    for name in fields:
        value = getattr(obj, name)
        if value is not None:
            parse_wire_time(name, value)


def check_fee_item(item: Any) -> None:
    """A fee or drug line: exact bounded amounts, a valid time, a positive bounded count."""
    check_amounts(item, "det_item_fee_sumamt", "pric")
    check_times(item, "fee_ocur_time")
    check_count(item)


def check_count(item: Any) -> None:
    """The item's quantity `cnt`: a positive bounded count (raised as ValueError, which msgspec reports at
    the item's path)."""
    try:
        check_cnt("cnt", item.cnt)
    except AmountError as e:
        raise ValueError(str(e)) from None
