"""Bytes → typed request, in one place, with errors that name the field.

Used by the gateway (to answer bad HTTP requests at once) and by the router
(for records written straight into Kafka). One decoder per type, built once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.envelope import RequestEnvelope, ResponseEnvelope
from schemas.errors import BrokerError
from schemas.transactions import BODY_TYPES

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
