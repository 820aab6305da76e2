"""Fuzz: the decoder over 10,000 hostile requests (tests/hostile.py) never raises anything but BrokerError
with a stable code, never quotes a personal value, and what it accepts is within every bound and
re-encodes to the same body."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings

from schemas.codec import BODY_TYPES, decode_request, encode
from schemas.errors import BrokerError
from schemas.limits import (
    DATE_MAX,
    DATE_MIN,
    TIME_FUTURE_MINUTES_DEFAULT,
    TIME_PAST_DAYS_DEFAULT,
    clock_window,
    set_clock_window,
)
from schemas.money import FEE_YUAN_MAX
from tests.hostile import NOW, PERSONAL_MARKERS, corrupted_bytes, mutated_request, random_json, valid_requests

# What decoding alone may answer; every other code needs reference data or the ledger.
DECODE_CODES = {"ENVELOPE_MALFORMED", "BODY_MALFORMED", "INFNO_UNSUPPORTED", "MSGID_MALFORMED", "INSUPLC_REQUIRED"}
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def default_window() -> Iterator[None]:
    """The default clock window (the suite widens it for the services: tests/conftest.py)."""
    before = clock_window()
    set_clock_window(TIME_PAST_DAYS_DEFAULT, TIME_FUTURE_MINUTES_DEFAULT)
    yield
    set_clock_window(before.past.days, int(before.future.total_seconds() // 60))


def _leaves(obj: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, msgspec.Struct):
        for name in obj.__struct_fields__:
            yield from _leaves(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, obj


def _assert_within_bounds(req: Any) -> None:
    for path, value in _leaves(req.body):
        if isinstance(value, str):
            assert not any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in value), path
            # 500 characters for any text; a stay's main condition (2401/2403 main_cond_dscr) may run to 1000
            assert len(value) <= (1000 if path.endswith(".main_cond_dscr") else 500), path
        elif isinstance(value, Decimal):
            assert value.is_finite() and abs(value) <= FEE_YUAN_MAX, path
            assert value == value.quantize(Decimal("0.0001")), path
        elif isinstance(value, date):
            assert DATE_MIN <= value <= DATE_MAX, path
    inf_time = datetime.strptime(req.envelope.inf_time, "%Y-%m-%d %H:%M:%S")
    assert NOW - clock_window().past <= inf_time <= NOW + clock_window().future


def _check(raw: bytes) -> str:
    """Decode; return the outcome ('ok' or the error code) after checking what the outcome promises."""
    try:
        req = decode_request(raw, now=NOW)
    except BrokerError as e:
        assert e.code in DECODE_CODES, e.err_msg
        assert not any(m in e.err_msg for m in PERSONAL_MARKERS), e.err_msg
        return e.code
    _assert_within_bounds(req)
    again: Any = msgspec.json.decode(encode(req.body), type=BODY_TYPES[req.envelope.infno])
    assert again == req.body
    return "ok"


def test_valid_samples_decode() -> None:
    assert [_check(encode(env)) for env in valid_requests()] == ["ok"] * len(valid_requests())


@settings(FUZZ, max_examples=5000)
@given(mutated_request())
def test_mutated_envelopes_and_bodies(raw: bytes) -> None:
    _check(raw)


@settings(FUZZ, max_examples=2000)
@given(corrupted_bytes())
def test_corrupted_bytes(raw: bytes) -> None:
    _check(raw)


@settings(FUZZ, max_examples=1000)
@given(random_json())
def test_random_json_and_bytes(raw: bytes) -> None:
    assert _check(raw) != "ok"
