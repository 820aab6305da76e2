"""Bytes → typed request, in one place, with errors that name the field.

Used by the gateway (to answer bad HTTP requests at once) and by the router
(for records written straight into Kafka). One decoder per type, built once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.clearing import CLEARING_BODY_TYPES
from schemas.envelope import RequestEnvelope, ResponseEnvelope
from schemas.errors import BrokerError
from schemas.filing import Input2501, Input2502, Input2503, Input2504, Input5301
from schemas.inpatient import (
    Input2301,
    Input2302,
    Input2303,
    Input2304,
    Input2305,
    Input2401,
    Input2402,
    Input2403,
    Input2404,
    Input2405,
)
from schemas.outpatient import Input2201, Input2202, Input2203, Input2204, Input2205, Input2206, Input2207, Input2208
from schemas.person import Input1101, Input9001
from schemas.pharmacy import Input2101, Input2102, Input2103

BODY_TYPES: dict[str, type] = {
    "9001": Input9001,
    "1101": Input1101,
    "2101": Input2101,
    "2102": Input2102,
    "2103": Input2103,
    "2201": Input2201,
    "2202": Input2202,
    "2203": Input2203,
    "2204": Input2204,
    "2205": Input2205,
    "2206": Input2206,
    "2207": Input2207,
    "2208": Input2208,
    "2301": Input2301,
    "2302": Input2302,
    "2303": Input2303,
    "2304": Input2304,
    "2305": Input2305,
    "2401": Input2401,
    "2402": Input2402,
    "2403": Input2403,
    "2404": Input2404,
    "2405": Input2405,
    "2501": Input2501,
    "2502": Input2502,
    "2503": Input2503,
    "2504": Input2504,
    "5301": Input5301,
    **CLEARING_BODY_TYPES,  # reconciliation and clearing (services/clearing)
}

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


def _field_error(code: str, err: msgspec.ValidationError | msgspec.DecodeError, prefix: str) -> BrokerError:
    text = str(err)
    # msgspec paths start at `$`; re-root them so the hospital sees e.g. `$.input.mdtrtinfo.psn_no`.
    if prefix:
        text = text.replace("`$", f"`$.{prefix}")
        if "- at `" not in text:
            text = f"{text} - at `$.{prefix}`"
    return BrokerError(code, text)


def decode_envelope(raw: bytes) -> RequestEnvelope:
    try:
        env = _envelope_decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise _field_error("ENVELOPE_MALFORMED", e, "") from None
    except msgspec.DecodeError as e:
        raise BrokerError("ENVELOPE_MALFORMED", f"not a JSON object: {e}") from None
    if not env.msgid.startswith(env.fixmedins_code):
        raise BrokerError("MSGID_MALFORMED", "msgid must start with fixmedins_code")
    return env


def decode_body(env: RequestEnvelope) -> Any:
    decoder = _body_decoders.get(env.infno)
    if decoder is None:
        raise BrokerError("INFNO_UNSUPPORTED", f"infno {env.infno} is not handled by this broker")
    try:
        return decoder.decode(env.input)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise _field_error("BODY_MALFORMED", e, "input") from None


def decode_request(raw: bytes) -> Request:
    env = decode_envelope(raw)
    body = decode_body(env)
    psn_no = body_psn_no(body)
    if psn_no is not None and not env.insuplc_admdvs:
        raise BrokerError("INSUPLC_REQUIRED", "insuplc_admdvs is required when the body carries psn_no")
    return Request(env, body)


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
