"""Schemas: strict decoding that names the field, exact money, and a JSON Schema for every message."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from schemas.codec import BODY_TYPES, decode_request, encode
from schemas.errors import BrokerError
from schemas.export import MESSAGES, export
from schemas.money import AmountError, check_yuan, to_fen, to_yuan


def test_every_message_exports_a_json_schema(tmp_path: Path) -> None:
    written = export(tmp_path)
    assert len(written) == len(MESSAGES)
    assert {f"input_{infno}" for infno in BODY_TYPES} <= set(MESSAGES)
    for path in written:
        schema = json.loads(path.read_text())
        assert "$defs" in schema or "type" in schema or "$ref" in schema, path.name


def test_money_is_exact() -> None:
    assert to_fen(Decimal("52500.00")) == 5250000
    assert to_fen(Decimal("0.1") + Decimal("0.2")) == 30
    assert str(to_yuan(-166)) == "-1.66"
    check_yuan("x", Decimal("1.50"))
    with pytest.raises(AmountError, match="x: more than 2 decimal places"):
        check_yuan("x", Decimal("1.005"))
    with pytest.raises(AmountError, match="negative"):
        check_yuan("x", Decimal("-1"))


def _env(body: dict, infno: str = "2402") -> bytes:
    return encode({
        "infno": infno, "msgid": "H15040000001202611230000000001", "mdtrtarea_admvs": "150400",
        "insuplc_admdvs": "150400", "recer_sys_code": "FSI", "infver": "V1.0", "opter_type": "1", "opter": "1",
        "opter_name": "x", "inf_time": "2026-11-23 10:00:00", "fixmedins_code": "H15040000001",
        "fixmedins_name": "x", "input": body,
    })


def test_amounts_arrive_as_numbers_and_stay_exact() -> None:
    req = decode_request(_env({"mdtrtinfo": {
        "psn_no": "P1", "mdtrt_cert_type": "02", "mdtrt_cert_no": "-", "medfee_sumamt": 0.1, "mdtrt_id": "M1",
        "insutype": "310"}}, "2304"))
    assert req.body.mdtrtinfo.medfee_sumamt == Decimal("0.1")


@pytest.mark.parametrize(("body", "fragment"), [
    ({"dscginfo": {"mdtrt_id": "M1", "psn_no": "P1", "insutype": "999", "endtime": "2026-11-23 10:00:00"}},
     "$.input.dscginfo.insutype"),
    ({"dscginfo": {"mdtrt_id": "M1", "psn_no": "P1", "insutype": "310", "endtime": "2026-11-31 10:00:00"}},
     "endtime"),
    ({"dscginfo": {"mdtrt_id": "M1", "insutype": "310", "endtime": "2026-11-23 10:00:00"}}, "psn_no"),
    ({"dscginfo": {"mdtrt_id": 7, "psn_no": "P1", "insutype": "310", "endtime": "2026-11-23 10:00:00"}},
     "$.input.dscginfo.mdtrt_id"),
])
def test_body_errors_name_the_field(body: dict, fragment: str) -> None:
    with pytest.raises(BrokerError) as e:
        decode_request(_env(body))
    assert e.value.code == "BODY_MALFORMED" and fragment in e.value.err_msg


@pytest.mark.parametrize("value", ["2026-11-23 10:00:00", "2024-02-29 23:59:59", "2026-01-01 00:00:00",
                                   "2000-01-01 00:00:00", "9998-12-31 23:59:59"])
def test_wire_time_parses_like_strptime(value: str) -> None:
    from datetime import datetime

    from schemas.wire import WIRE_TIME_FORMAT, parse_wire_time

    assert parse_wire_time("t", value) == datetime.strptime(value, WIRE_TIME_FORMAT)


@pytest.mark.parametrize("value", ["2026-02-29 10:00:00", "2026-13-01 00:00:00", "2026-11-23T10:00:00",
                                   "2026-11-23 24:00:00", "2026-11-23 10:00", "２０２６-11-23 10:00:00", "",
                                   "2026-+1-23 10:00:00", "2026-11-23 10:00:0a", "2026-11-23 10:00:00Z",
                                   "2026-11-23 10:00:00.5", "0000-01-01 00:00:00", "2026-11-23 1:00:00 "])
def test_wire_time_refuses_what_is_not_a_real_date_time(value: str) -> None:
    from schemas.wire import parse_wire_time

    with pytest.raises(ValueError, match="t: not a valid date-time"):
        parse_wire_time("t", value)


@pytest.mark.parametrize("value", ["1999-12-31 23:59:59", "9999-01-01 00:00:00", "1970-01-01 08:00:00"])
def test_wire_time_outside_the_date_range_is_refused(value: str) -> None:
    from schemas.wire import parse_wire_time

    with pytest.raises(ValueError, match=r"^t: outside 2000-01-01\.\.9998-12-31$"):
        parse_wire_time("t", value)
