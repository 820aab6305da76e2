"""Institution signatures over the national envelope (REFERENCE §9), and keys sealed at rest.

Convention (README "Security"): `signtype` is `"SM3"` and `cainfo` is the base64 HMAC-SM3
(GB/T 32905 hash, OpenSSL 3's implementation through `hmac`) of the request body's exact bytes
with `cainfo` empty — the sender writes `"cainfo":""`, signs those bytes, then puts the signature
between the quotes. The receiver verifies by putting the quotes back together (`signed_bytes`).
Every byte counts, unknown fields and whitespace included: one byte changed after signing fails.

An institution may hold several keys at once (a rotation's overlap): a signature made with any live
key verifies. Key secrets are stored sealed (AES-256-GCM under the deployment's key-encryption key,
`<state_dir>/secrets/key-encryption.key`), so a database dump does not reveal them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.common.config import Settings
from services.common.secrets import secret_bytes

SIGNTYPE = "SM3"
DIGEST = "sm3"
SIGNATURE_CHARS = 44  # base64 of a 32-byte SM3 HMAC
_CAINFO_EMPTY = b'"cainfo":""'
KEK_FILE = "key-encryption.key"


def compute(secret: bytes, data: bytes) -> str:
    return base64.b64encode(hmac.digest(secret, data, DIGEST)).decode()


def sign(unsigned: bytes, secret: bytes) -> bytes:
    """`unsigned` (a JSON body with `"cainfo":""` exactly once, e.g. from `schemas.codec.encode`)
    with its signature filled in."""
    if unsigned.count(_CAINFO_EMPTY) != 1:
        raise ValueError('the body must contain "cainfo":"" exactly once')
    return unsigned.replace(_CAINFO_EMPTY, b'"cainfo":"' + compute(secret, unsigned).encode() + b'"', 1)


def signed_bytes(raw: bytes, cainfo: str) -> bytes | None:
    """The bytes the sender signed: `raw` with the cainfo value emptied, or None when `raw` does not
    carry `"cainfo":"<cainfo>"` (a signature must be exactly that field)."""
    field = b'"cainfo":"' + cainfo.encode() + b'"'
    if raw.count(field) != 1:
        return None
    return raw.replace(field, _CAINFO_EMPTY, 1)


@dataclass(frozen=True, slots=True)
class InstitutionKey:
    key_id: str
    secret: bytes
    expires_at: datetime | None = None  # the end of a rotation's overlap
    revoked: bool = False

    def live(self, now: datetime) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)


class Verdict(Enum):
    OK = "ok"
    MISSING = "SIGNATURE_MISSING"  # no cainfo, or signtype is not SM3
    INVALID = "SIGNATURE_INVALID"  # matches no key of the institution
    NO_KEY = "KEY_UNKNOWN"  # the institution has no live key
    REVOKED = "KEY_REVOKED"  # made with a key that is revoked or past its overlap


def verify(raw: bytes, signtype: str, cainfo: str, keys: Iterable[InstitutionKey], now: datetime) -> Verdict:
    """Whether `raw` carries a valid signature of one of `keys` (the named institution's)."""
    if not cainfo or signtype != SIGNTYPE:
        return Verdict.MISSING
    keys = tuple(keys)
    try:
        given = base64.b64decode(cainfo, validate=True)
    except (binascii.Error, ValueError):
        given = b""
    data = signed_bytes(raw, cainfo) if len(given) == 32 else None
    live = [k for k in keys if k.live(now)]
    if data is not None:
        for key in live:
            if hmac.compare_digest(hmac.digest(key.secret, data, DIGEST), given):
                return Verdict.OK
        for key in keys:
            if not key.live(now) and hmac.compare_digest(hmac.digest(key.secret, data, DIGEST), given):
                return Verdict.REVOKED
    return Verdict.INVALID if live else Verdict.NO_KEY


def content_digest(infno: str, fixmedins_code: str, insuplc_admdvs: str, mdtrtarea_admvs: str,
                   input_raw: bytes) -> bytes:
    """What a msgid stands for: the transaction, the institution, the regions and the `input` body's
    bytes — not inf_time, sign_no or the signature, which a careful resend may renew (16 bytes of SM3)."""
    head = "\x1f".join((infno, fixmedins_code, insuplc_admdvs, mdtrtarea_admvs)).encode()
    return hashlib.new(DIGEST, head + b"\x1e" + input_raw).digest()[:16]


# Sealing key secrets at rest -------------------------------------------------------------------------


def key_encryption_key(s: Settings) -> bytes:
    return secret_bytes(s, KEK_FILE, 32)


def seal(kek: bytes, secret: bytes, key_id: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(kek).encrypt(nonce, secret, key_id.encode())


def unseal(kek: bytes, sealed: bytes, key_id: str) -> bytes:
    return AESGCM(kek).decrypt(sealed[:12], sealed[12:], key_id.encode())
