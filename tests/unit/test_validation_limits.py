"""Validation refuses what storage would refuse (issue 9): each case measured there, and the bounds of
schemas.limits / schemas.money, refused with a stable code naming the field and never the value."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import EVENT_TIME_FIELDS, decode_request, encode
from schemas.errors import BrokerError
from schemas.limits import (
    NESTING_MAX,
    TIME_FUTURE_MINUTES_DEFAULT,
    TIME_PAST_DAYS_DEFAULT,
    ClockWindow,
    LimitError,
    check_text_tree,
    clock_window,
    may_hold_forbidden_text,
    set_clock_window,
)
from schemas.money import AmountError, check_cnt, check_yuan
from services.common.config import ConfigError, load_settings
from tests.hostile import NOW, PERSONAL_MARKERS, valid_requests


@pytest.fixture(autouse=True)
def default_window() -> Iterator[None]:
    before = clock_window()
    set_clock_window(TIME_PAST_DAYS_DEFAULT, TIME_FUTURE_MINUTES_DEFAULT)
    yield
    set_clock_window(before.past.days, int(before.future.total_seconds() // 60))


def sample(infno: str, at: datetime = NOW) -> dict[str, Any]:
    return next(env for env in valid_requests(at) if env["infno"] == infno)


def refused(raw: bytes | dict[str, Any], code: str, path: str) -> BrokerError:
    data = raw if isinstance(raw, bytes) else encode(raw)
    with pytest.raises(BrokerError) as e:
        decode_request(data, now=NOW)
    assert e.value.code == code, e.value.err_msg
    assert f"`{path}`" in e.value.err_msg, e.value.err_msg
    assert not any(m in e.value.err_msg for m in PERSONAL_MARKERS), e.value.err_msg
    return e.value


def test_a_byte_that_is_not_utf8_is_refused() -> None:
    raw = encode(sample("2401")).replace(b'"opter_name":"operator"', b'"opter_name":"\xff"')
    with pytest.raises(BrokerError, match="ENVELOPE_MALFORMED: not valid UTF-8"):
        decode_request(raw, now=NOW)


@pytest.mark.parametrize("depth", [NESTING_MAX + 1, 1000, 100_000])
def test_nesting_beyond_the_limit_is_refused(depth: int) -> None:
    raw = encode(sample("2401")).replace(b'"input":', b'"input":' + b"[" * depth, 1) + b"]" * depth
    with pytest.raises(BrokerError, match=f"ENVELOPE_MALFORMED: JSON nested deeper than {NESTING_MAX} levels"):
        decode_request(raw, now=NOW)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    env = sample("2401")
    env["input"]["mdtrtinfo"]["adm_diag_dscr"] = "[{" * 100 + '\\"' + "]}" * 100
    assert decode_request(encode(env), now=NOW).body.mdtrtinfo.adm_diag_dscr.startswith("[{[{")


@pytest.mark.parametrize("number", ["1E+999999999", "123456789012345678901234567890.123", "1.005", "-0.01",
                                    "100000000.01", '"NaN"', '"Infinity"', '"sNaN"', "1E-999999999"])
def test_amounts_outside_range_or_precision_are_refused(number: str) -> None:
    env = sample("2304")
    env["input"]["mdtrtinfo"]["medfee_sumamt"] = "__N__"
    raw = encode(env).replace(b'"__N__"', number.encode())
    refused(raw, "BODY_MALFORMED", "$.input.mdtrtinfo.medfee_sumamt")


@pytest.mark.parametrize("cnt", ["0", "-1", "0.00001", "1000000.5", "1E+999999999", "1E-999999999"])
def test_fee_quantities_outside_bounds_are_refused(cnt: str) -> None:
    env = sample("2301")
    env["input"]["feedetail"][0]["cnt"] = "__N__"
    refused(encode(env).replace(b'"__N__"', cnt.encode()), "BODY_MALFORMED", "$.input.feedetail[0].cnt")


def test_money_bounds_hold_without_touching_the_decimal_context() -> None:
    check_yuan("x", Decimal("99999999.99"), maximum=Decimal("100000000"))
    check_yuan("x", Decimal("1.000"))  # trailing zeros are still 2 decimals
    for bad in ("1E+999999999", "123456789012345678901234567890.123", "NaN", "-Infinity", "sNaN"):
        with pytest.raises(AmountError, match="x: "):
            check_yuan("x", Decimal(bad))
    check_cnt("cnt", Decimal("0.5"))
    with pytest.raises(AmountError, match="cnt: more than 4 decimal places"):
        check_cnt("cnt", Decimal("0.00001"))


@pytest.mark.parametrize(("infno", "where", "field"), [
    ("2102", ("drugdetail", 0), "medins_list_codg"),
    ("2203", ("mdtrtinfo",), "dise_codg"),
    ("2403", ("adminfo",), "dise_codg"),
    ("2401", ("mdtrtinfo",), "chfpdr_name"),
])
@pytest.mark.parametrize("text", ["a\u0000b", "\u0000", "x\u007f", "tab\there", "\u001b[31m"])
def test_control_characters_in_stored_text_are_refused(infno: str, where: tuple, field: str, text: str) -> None:
    env = sample(infno)
    node = env["input"]
    for key in where:
        node = node[key]
    node[field] = text
    path = "$.input." + ".".join(str(k) for k in where).replace(".0", "[0]") + f".{field}"
    refused(env, "BODY_MALFORMED", path)


def test_control_characters_in_envelope_text_are_refused() -> None:
    env = sample("2401")
    env["fixmedins_name"] = "医院\u0000"
    refused(env, "ENVELOPE_MALFORMED", "$.fixmedins_name")


def test_lone_surrogates_are_refused_wherever_they_come_from() -> None:
    with pytest.raises(LimitError, match="lone surrogate"):
        check_text_tree(["ok", "\ud800"], "$")
    raw = encode(sample("2401")).replace(b'"operator"', b'"\\udc00"')
    with pytest.raises(BrokerError, match="ENVELOPE_MALFORMED"):
        decode_request(raw, now=NOW)


@pytest.mark.parametrize(("inf_time", "text"), [
    ("1970-01-01 08:00:00", "outside 2000-01-01..9998-12-31"),
    ("0001-01-01 00:00:00", "outside 2000-01-01..9998-12-31"),
    ("2100-01-01 00:00:00", "minutes in the future"),
    ("2025-10-18 09:59:59", "more than 400 days in the past"),
    ((NOW + timedelta(minutes=11)).strftime("%Y-%m-%d %H:%M:%S"), "more than 10 minutes in the future"),
])
def test_settlement_dates_outside_the_clock_window_are_refused(inf_time: str, text: str) -> None:
    env = sample("2304")
    env["inf_time"] = inf_time
    e = refused(env, "ENVELOPE_MALFORMED", "$.inf_time")
    assert text in e.message


def test_the_clock_window_edges_are_accepted() -> None:
    for at in (NOW - timedelta(days=400), NOW + timedelta(minutes=10)):
        env = sample("2304")
        env["inf_time"] = at.strftime("%Y-%m-%d %H:%M:%S")
        decode_request(encode(env), now=NOW)


def test_the_clock_window_is_a_validated_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XS_TIME_PAST_DAYS", "30")
    monkeypatch.setenv("XS_TIME_FUTURE_MINUTES", "0")
    s = load_settings()
    set_clock_window(s.time_past_days, s.time_future_minutes)
    assert clock_window() == ClockWindow(timedelta(days=30), timedelta(0))
    for name, value in (("XS_TIME_PAST_DAYS", "0"), ("XS_TIME_PAST_DAYS", "ten"), ("XS_TIME_FUTURE_MINUTES", "-1")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            load_settings()
        monkeypatch.setenv(name, "30")
    with pytest.raises(ValueError, match="outside its bounds"):
        set_clock_window(0, 10)


@pytest.mark.parametrize(("begntime", "text"), [
    ("0001-01-01 00:00:00", "outside 2000-01-01"),
    ("2023-11-22 09:00:00", "more than 731 days before"),
    ("2026-11-24 10:00:01", "1 day after inf_time"),
])
def test_visit_and_fee_times_far_from_inf_time_are_refused(begntime: str, text: str) -> None:
    env = sample("2102")
    env["input"]["data"]["begntime"] = begntime
    e = refused(env, "BODY_MALFORMED", "$.input.data.begntime")
    assert text in e.message
    env = sample("2102")
    env["input"]["drugdetail"][0]["fee_ocur_time"] = begntime
    refused(env, "BODY_MALFORMED", "$.input.drugdetail[0].fee_ocur_time")


@pytest.mark.parametrize(("change", "path", "text"), [
    ({"begndate": "1900-01-01", "enddate": "9999-12-31"}, "$.input.data.begndate", "outside 2000-01-01"),
    ({"begndate": "2026-11-01", "enddate": "9999-12-31"}, "$.input.data.enddate", "outside"),
    ({"begndate": "2026-11-01", "enddate": "2031-11-02"}, "$.input.data.enddate", "at most 1827 days"),
    ({"begndate": "2026-11-01", "enddate": "2026-10-31"}, "$.input.data.enddate", "before begndate"),
    ({"begndate": "2028-01-01", "enddate": "2028-02-01"}, "$.input.data.begndate", "more than 366 days"),
    ({"target_admdvs": None}, "$.input.data", "missing required field `target_admdvs`"),
    ({"target_admdvs": "150400"}, "$.input.data.target_admdvs", "regex"),
    ({"filing_type": "ANYWHERE"}, "$.input.data.filing_type", "Invalid enum value"),
])
def test_implausible_filings_are_refused(change: dict[str, Any], path: str, text: str) -> None:
    env = sample("2501")
    env["input"]["data"].update(change)
    env["input"]["data"] = {k: v for k, v in env["input"]["data"].items() if v is not None}
    e = refused(env, "BODY_MALFORMED", path)
    assert text in e.message


@pytest.mark.parametrize(("infno", "where", "field", "value"), [
    ("2401", "mdtrtinfo", "insutype", "99"),
    ("2401", "mdtrtinfo", "med_type", "99"),
    ("2304", "mdtrtinfo", "insutype", PERSONAL_MARKERS[0]),
    ("2203", "mdtrtinfo", "med_type", "21"),
])
def test_codes_outside_their_tables_are_refused_without_quoting_them(infno: str, where: str, field: str,
                                                                      value: str) -> None:
    env = sample(infno)
    env["input"][where][field] = value
    e = refused(env, "BODY_MALFORMED", f"$.input.{where}.{field}")
    assert value not in e.message


def test_personal_values_never_appear_in_error_texts() -> None:
    env = sample("2401")
    env["input"]["mdtrtinfo"]["psn_no"] = PERSONAL_MARKERS[0] + "!"
    refused(env, "BODY_MALFORMED", "$.input.mdtrtinfo.psn_no")
    env = json.loads(json.dumps(sample("1101")))
    env["input"]["data"]["mdtrt_cert_no"] = PERSONAL_MARKERS[2] * 10
    refused(env, "BODY_MALFORMED", "$.input.data.mdtrt_cert_no")


def _event_times(node: Any, path: str) -> Iterator[tuple[str, list[Any]]]:
    """(JSON path, the key's route from `input`) of every visit or fee time in a request's input."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in EVENT_TIME_FIELDS and isinstance(value, str):
                yield f"{path}.{key}", [key]
            for sub, route in _event_times(value, f"{path}.{key}"):
                yield sub, [key, *route]
    elif isinstance(node, list):
        for i, item in enumerate(node):
            for sub, route in _event_times(item, f"{path}[{i}]"):
                yield sub, [i, *route]


def test_every_visit_and_fee_time_of_every_sample_is_checked_against_inf_time() -> None:
    """The times-near check reads only the fields its per-type plan names: every event time of every sample
    request, however deep, is still refused when far from inf_time."""
    checked = 0
    for env in valid_requests(NOW):
        for path, route in _event_times(env["input"], "$.input"):
            bad = json.loads(json.dumps(env, default=str))
            node = bad["input"]
            for key in route[:-1]:
                node = node[key]
            # Far before inf_time, but not before a begntime (an endtime that early is the struct's refusal).
            node[route[-1]] = "2020-01-01 00:00:00" if route[-1] != "endtime" else "2026-11-30 00:00:00"
            assert "inf_time" in refused(bad, "BODY_MALFORMED", path).err_msg
            checked += 1
    assert checked >= 5  # the samples carry visit and fee times at several depths


@pytest.mark.parametrize("escaped", [rb"\u0001", rb"\u001F", rb"\u001f", rb"\u007f", rb"\u007F", rb"\b", rb"\f",
                                     rb"\n", rb"\r", rb"\t", b"\x7f", rb"\ud800", rb"\uDBFF", rb"\udc00",
                                     rb"\uDFFF", rb"\\\n"])
def test_every_way_json_can_spell_a_forbidden_character_is_refused(escaped: bytes) -> None:
    raw = encode(sample("2102")).replace(b'"medins_list_codg":"', b'"medins_list_codg":"x' + escaped, 1)
    with pytest.raises(BrokerError) as e:
        decode_request(raw, now=NOW)
    if e.value.code == "ENVELOPE_MALFORMED":  # msgspec itself refuses a lone surrogate, even inside `input`
        assert escaped.lower().startswith(rb"\ud") and "not a JSON object" in e.value.err_msg
    else:
        assert e.value.code == "BODY_MALFORMED"
        assert "- at `$.input.drugdetail[0].medins_list_codg`" in e.value.err_msg


@pytest.mark.parametrize("escaped", [rb"\"", rb"\\", rb"\/", rb"\u4e2d", rb"\ud83d\ude00", rb"\\n", rb"\\u0001"])
def test_escapes_of_clean_text_are_accepted(escaped: bytes) -> None:
    raw = encode(sample("2102")).replace(b'"medins_list_codg":"', b'"medins_list_codg":"x' + escaped, 1)
    assert may_hold_forbidden_text(raw) == (escaped not in (rb"\"", rb"\\", rb"\/", rb"\u4e2d"))  # else a "maybe"
    decode_request(raw, now=NOW)


@given(st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=40))
@settings(deadline=None, database=None)
def test_json_of_a_text_without_the_marks_holds_no_forbidden_character(text: str) -> None:
    """The pre-check never lets a refused text through, whichever encoder wrote the JSON."""
    forbidden = any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in text)
    spellings = [json.dumps(text, ensure_ascii=True).encode()]
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):  # lone surrogates cannot be written as UTF-8
        spellings += [json.dumps(text, ensure_ascii=False).encode(), msgspec.json.encode(text)]
    for raw in spellings:
        if forbidden:
            assert may_hold_forbidden_text(raw), raw
        if not may_hold_forbidden_text(raw):
            assert not forbidden
