"""Money at the edge: decimal yuan on the wire, integer fen inside.

Amounts arrive as JSON numbers or strings and are decoded by msgspec straight
into Decimal (no float on the way), then checked and converted here.
"""

from __future__ import annotations

from decimal import Decimal

# 10 billion yuan: far above any hospital's period totals (3201/3203), far below int64 fen.
YUAN_MAX = Decimal("10000000000")
# One settlement or fee line: 100 million yuan, far above any single stay or item.
FEE_YUAN_MAX = Decimal("100000000")
# A fee line's quantity: positive, at most 4 decimals (the ledger's numeric(16, 4)), at most a million.
CNT_MAX = Decimal("1000000")
CNT_DECIMALS_MAX = 4
# Digits in a wire amount, leading and trailing zeros included: bounds the arithmetic on hostile input
# (1E+999999999 or 30 digits with 3 decimals must be refused, not overflow the decimal context).
AMOUNT_DIGITS_MAX = 24
_CENT = Decimal("0.01")


class AmountError(ValueError):
    pass


def _bounded_digits(field: str, value: Decimal) -> None:
    if not value.is_finite():
        raise AmountError(f"{field}: not a finite number")
    digits = value.as_tuple().digits
    # adjusted() is the exponent of the leading digit: checks magnitude without any arithmetic.
    if len(digits) > AMOUNT_DIGITS_MAX or value.adjusted() > 12 or value.adjusted() < -AMOUNT_DIGITS_MAX:
        raise AmountError(f"{field}: number out of range")


def check_yuan(field: str, value: Decimal, *, allow_negative: bool = False, maximum: Decimal = YUAN_MAX) -> None:
    """Raise AmountError naming `field` unless value is a finite amount with at most 2 decimals,
    not negative (unless allowed) and at most `maximum` in absolute value."""
    _bounded_digits(field, value)
    if abs(value) > maximum:
        raise AmountError(f"{field}: amount out of range (at most {maximum} yuan)")
    # Bounded above, so quantize stays within the default 28-digit context.
    if value != value.quantize(_CENT):
        raise AmountError(f"{field}: more than 2 decimal places")
    if not allow_negative and value < 0:
        raise AmountError(f"{field}: negative amount")


def check_cnt(field: str, value: Decimal) -> None:
    """A fee line's quantity: positive, at most CNT_MAX, at most CNT_DECIMALS_MAX decimals."""
    _bounded_digits(field, value)
    if value <= 0 or value > CNT_MAX:
        raise AmountError(f"{field}: must be a positive count of at most {CNT_MAX}")
    if value != value.quantize(Decimal(1).scaleb(-CNT_DECIMALS_MAX)):
        raise AmountError(f"{field}: more than {CNT_DECIMALS_MAX} decimal places")


def to_fen(value: Decimal) -> int:
    """Exact yuan → fen. Call check_yuan first; a sub-fen remainder here is a bug."""
    fen = value * 100
    if fen != fen.to_integral_value():
        raise AmountError("amount has a sub-fen remainder")
    return int(fen)


def to_yuan(fen: int) -> Decimal:
    """Integer fen → Decimal yuan with exactly 2 places (encoded as a JSON number)."""
    return (Decimal(fen) / 100).quantize(_CENT)
