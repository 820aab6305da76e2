"""The catalog's monitoring fields (issue 13) in `schemas.refdata.CatalogRow`: optional, validated."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from schemas.refdata import CatalogRow

BASE = b'{"admdvs":"440000","med_list_codg":"XA10BA02","name":"drug","chrgitm_lv":"02","selfpay_prop":"0.1"'


def _row(extra: bytes = b"") -> CatalogRow:
    return msgspec.json.decode(BASE + extra + b"}", type=CatalogRow)


def test_without_the_fields_the_defaults_of_the_hub_columns() -> None:
    row = _row()
    assert (row.once_per_day, row.gender_only, row.supply_days) == (False, None, Decimal(1))


def test_with_the_fields() -> None:
    row = _row(b',"once_per_day":true,"gender_only":"2","supply_days":"7.5"')
    assert (row.once_per_day, row.gender_only, row.supply_days) == (True, "2", Decimal("7.5"))
    assert _row(b',"supply_days":30').supply_days == Decimal(30)  # a JSON number is read exactly
    assert msgspec.json.decode(msgspec.json.encode(row), type=CatalogRow) == row


@pytest.mark.parametrize(("extra", "message"), [
    (b',"supply_days":"0"', "supply_days must be > 0 and <= 99999.99 - at `$.supply_days`"),
    (b',"supply_days":"-1"', "supply_days must be > 0 and <= 99999.99 - at `$.supply_days`"),
    (b',"supply_days":"100000"', "supply_days must be > 0 and <= 99999.99 - at `$.supply_days`"),
    (b',"supply_days":"NaN"', "supply_days must be > 0 and <= 99999.99 - at `$.supply_days`"),
    (b',"supply_days":"1.005"', "supply_days has more than 2 decimal places - at `$.supply_days`"),
    (b',"gender_only":"F"', "Invalid enum value 'F' - at `$.gender_only`"),
    (b',"gender_only":""', "Invalid enum value '' - at `$.gender_only`"),
    (b',"once_per_day":"yes"', "Expected `bool`, got `str` - at `$.once_per_day`"),
])
def test_bad_values_name_the_field(extra: bytes, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as exc:
        _row(extra)
    assert str(exc.value) == message
