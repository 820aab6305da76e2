"""Bytes → typed request, in one place, with errors that name the field.

Used by the gateway (to answer bad HTTP requests at once) and by the router
(for records written straight into Kafka). One decoder per type, built once.
Beyond the types, the bounds of `schemas.limits` (bytes, nesting, text, dates
and the clock window). `decode_request` raises nothing but BrokerError.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import msgspec.inspect

from schemas.envelope import RequestEnvelope, ResponseEnvelope
from schemas.errors import BrokerError
from schemas.filing import Input2501
from schemas.limits import (
    EVENT_AFTER_INF,
    EVENT_BEFORE_INF,
    FILING_START_FROM_INF,
    NESTING_MAX,
    LimitError,
    check_text_tree,
    clock_window,
    may_hold_forbidden_text,
    nesting_depth_exceeds,
    now_shanghai,
)
from schemas.transactions import BODY_TYPES
from schemas.wire import parse_wire_time

_envelope_decoder = msgspec.json.Decoder(RequestEnvelope)
_body_decoders: dict[str, msgspec.json.Decoder] = {infno: msgspec.json.Decoder(t) for infno, t in BODY_TYPES.items()}
_encoder = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True, slots=True)
class Request:
    envelope: RequestEnvelope
    body: Any  # one of Body

    @property
    def psn_no(self) -> str | None:
        return body_psn_no(self.body)


# msgspec quotes the offending value of a Literal; the value may be personal, so it is cut out.
_QUOTED_VALUE = re.compile(r"(Invalid enum value) .*? - at `", re.DOTALL)
# Visit and fee times in any body, checked against the envelope's inf_time.
EVENT_TIME_FIELDS = frozenset({"begntime", "endtime", "fee_ocur_time"})


# A __post_init__ check says "<field>: <what>"; msgspec adds the struct's path (none at the root).
_OWN_CHECK = re.compile(r"^(\w+): (.*?)(?: - at `(\$[^`]*)`)?$", re.DOTALL)


def _field_error(code: str, err: msgspec.ValidationError | msgspec.DecodeError, prefix: str) -> BrokerError:
    text = _QUOTED_VALUE.sub(r"\1 - at `", str(err))
    if isinstance(err, msgspec.ValidationError) and (own := _OWN_CHECK.match(text)):
        field, what, path = own.groups()
        text = f"{what} - at `{path or '$'}.{field}`"  # name the field in the path, like msgspec does
    # msgspec paths start at `$`; re-root them so the hospital sees e.g. `$.input.mdtrtinfo.psn_no`.
    if prefix:
        text = text.replace("`$", f"`$.{prefix}")
        if "- at `" not in text:
            text = f"{text} - at `$.{prefix}`"
    return BrokerError(code, text)


def decode_envelope(raw: bytes, now: datetime | None = None) -> RequestEnvelope:
    """The envelope, its texts clean and its inf_time within the clock window (schemas.limits)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BrokerError("ENVELOPE_MALFORMED", f"not valid UTF-8 (byte {e.start})") from None
    if nesting_depth_exceeds(raw):
        raise BrokerError("ENVELOPE_MALFORMED", f"JSON nested deeper than {NESTING_MAX} levels")
    try:
        env = _envelope_decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise _field_error("ENVELOPE_MALFORMED", e, "") from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
        text = str(e) if isinstance(e, msgspec.DecodeError) else type(e).__name__
        raise BrokerError("ENVELOPE_MALFORMED", f"not a JSON object: {text}") from None
    try:
        if may_hold_forbidden_text(raw):  # else no string in it can be refused: no walk
            check_text_tree(env, "$")
        clock_window().check("$.inf_time", parse_wire_time("inf_time", env.inf_time),
                             now if now is not None else now_shanghai())
    except LimitError as e:
        raise BrokerError("ENVELOPE_MALFORMED", str(e)) from None
    if not env.msgid.startswith(env.fixmedins_code):
        raise BrokerError("MSGID_MALFORMED", "msgid must start with fixmedins_code")
    return env


def decode_body(env: RequestEnvelope) -> Any:
    decoder = _body_decoders.get(env.infno)
    if decoder is None:
        raise BrokerError("INFNO_UNSUPPORTED", f"infno {env.infno} is not handled by this broker")
    try:
        body = decoder.decode(env.input)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise _field_error("BODY_MALFORMED", e, "input") from None
    except (RecursionError, UnicodeDecodeError) as e:  # decode_envelope checked both: a second guard
        raise BrokerError("BODY_MALFORMED", f"not a JSON object: {type(e).__name__} - at `$.input`") from None
    try:
        if may_hold_forbidden_text(bytes(env.input)):
            check_text_tree(body, "$.input")
        _check_times_near(body, "$.input", parse_wire_time("inf_time", env.inf_time))
    except LimitError as e:
        raise BrokerError("BODY_MALFORMED", str(e)) from None
    return body


def _check_times_near(obj: Any, path: str, inf_time: datetime) -> None:
    """Visit and fee times near inf_time; a filing (2501) starting near it (bounds in schemas.limits)."""
    if isinstance(obj, Input2501):
        f = obj.data
        on = inf_time.date()
        if not on - FILING_START_FROM_INF <= f.begndate <= on + FILING_START_FROM_INF:
            raise LimitError(f"{path}.data.begndate", f"more than {FILING_START_FROM_INF.days} days from inf_time")
        return
    if isinstance(obj, msgspec.Struct):
        for name, is_time in _time_walk(type(obj)):
            value = getattr(obj, name)
            if is_time:
                if isinstance(value, str):
                    t = parse_wire_time(name, value)  # valid: the struct checked it
                    if not inf_time - EVENT_BEFORE_INF <= t <= inf_time + EVENT_AFTER_INF:
                        raise LimitError(f"{path}.{name}", f"more than {EVENT_BEFORE_INF.days} days before or "
                                         f"{_days_or_hours(EVENT_AFTER_INF)} after inf_time")
            elif isinstance(value, msgspec.Struct | list):
                _check_times_near(value, f"{path}.{name}", inf_time)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            _check_times_near(item, f"{path}[{i}]", inf_time)


@functools.cache
def _time_walk(cls: type[msgspec.Struct]) -> tuple[tuple[str, bool], ...]:
    """The fields of a struct type _check_times_near must look at, in order: (name, True) for an event time,
    (name, False) for one whose type may hold a struct or a list. Worked out once per type from its
    annotations, so the many fields that are plain text, numbers or dates are not read at all."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return tuple((f.name, f.name in EVENT_TIME_FIELDS) for f in info.fields
                 if f.name in EVENT_TIME_FIELDS or _may_hold_struct_or_list(f.type))


def _may_hold_struct_or_list(t: msgspec.inspect.Type) -> bool:
    if isinstance(t, msgspec.inspect.StructType | msgspec.inspect.ListType | msgspec.inspect.AnyType):
        return True
    if isinstance(t, msgspec.inspect.UnionType):
        return any(_may_hold_struct_or_list(u) for u in t.types)
    if isinstance(t, msgspec.inspect.Metadata):
        return _may_hold_struct_or_list(t.type)
    return False


def _days_or_hours(d: timedelta) -> str:
    return f"{d.days} day{'s' if d.days != 1 else ''}" if d.days else f"{d.seconds // 3600} hours"


def decode_request(raw: bytes, now: datetime | None = None) -> Request:
    """Bytes → Request, or BrokerError (nothing else) naming the field. `now` (Asia/Shanghai wall
    time) defaults to the broker's clock."""
    env = decode_envelope(raw, now)
    body = decode_body(env)
    psn_no = body_psn_no(body)
    if psn_no is not None and not env.insuplc_admdvs:
        raise BrokerError("INSUPLC_REQUIRED", "insuplc_admdvs is required when the body carries psn_no")
    return Request(env, body)


def peek_ids(raw: bytes) -> tuple[str | None, str | None, str | None]:
    """msgid, infno and fixmedins_code of a request that may be hostile (for its dead letter); never
    raises: invalid UTF-8, deep nesting or anything else gives Nones."""
    if nesting_depth_exceeds(raw):
        return None, None, None
    try:
        partial = msgspec.json.decode(raw)
    except Exception:  # hostile bytes: whatever fails, there is nothing to peek
        return None, None, None
    if not isinstance(partial, dict):
        return None, None, None
    return tuple(_short_id(partial.get(k)) for k in ("msgid", "infno", "fixmedins_code"))  # type: ignore[return-value]


def _short_id(value: object) -> str | None:
    """An id for a dead letter: a short string of letters and digits, else None."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.isascii() and value.isalnum():
        return value
    return None


def body_psn_no(body: Any) -> str | None:
    """The person a body is about (its partition key), or None (sign-in, person query, clearing)."""
    for part in ("mdtrtinfo", "dscginfo", "adminfo", "data"):
        value = getattr(body, part, None)
        if isinstance(value, list):
            value = value[0] if value else None
        psn_no = getattr(value, "psn_no", None)
        if isinstance(psn_no, str):
            return psn_no
    items = getattr(body, "feedetail", None)
    if items:
        return str(items[0].psn_no)
    return None


def encode(obj: Any) -> bytes:
    """JSON with decimals as numbers (the national interface sends amounts as numbers)."""
    return _encoder.encode(obj)


_response_decoder = msgspec.json.Decoder(ResponseEnvelope)


def decode_response(raw: bytes) -> ResponseEnvelope:
    return _response_decoder.decode(raw)
