"""Money at the edge: decimal yuan on the wire, integer fen inside.

Amounts arrive as JSON numbers or strings and are decoded by msgspec straight
into Decimal (no float on the way), then checked and converted here.
"""

from __future__ import annotations

from decimal import Decimal

# 10 billion yuan: far above any single settlement, far below int64 overflow.
YUAN_MAX = Decimal("10000000000")
_CENT = Decimal("0.01")


class AmountError(ValueError):
    pass


def check_yuan(field: str, value: Decimal, *, allow_negative: bool = False) -> None:
    """Raise AmountError naming `field` unless value is a finite amount with at most 2 decimals."""
    if not value.is_finite():
        raise AmountError(f"{field}: not a finite amount")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2 and value != value.quantize(_CENT):
        raise AmountError(f"{field}: more than 2 decimal places")
    if not allow_negative and value < 0:
        raise AmountError(f"{field}: negative amount")
    if abs(value) > YUAN_MAX:
        raise AmountError(f"{field}: amount out of range")


def to_fen(value: Decimal) -> int:
    """Exact yuan → fen. Call check_yuan first; a sub-fen remainder here is a bug."""
    fen = value * 100
    if fen != fen.to_integral_value():
        raise AmountError("amount has a sub-fen remainder")
    return int(fen)


def to_yuan(fen: int) -> Decimal:
    """Integer fen → Decimal yuan with exactly 2 places (encoded as a JSON number)."""
    return (Decimal(fen) / 100).quantize(_CENT)
