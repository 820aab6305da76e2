"""Institution signatures, the clock window, sessions and the 1101 rate limit — the pure parts."""

from __future__ import annotations

import base64
import hmac
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.his import Hospital, Signer
from schemas.codec import decode_envelope, encode
from services.common.signing import (
    InstitutionKey,
    Verdict,
    content_digest,
    seal,
    sign,
    signed_bytes,
    unseal,
    verify,
)
from services.router.auth import RateLimiter, authenticate, session_of, sign_no_for

HOSPITAL = Hospital("H51042199901", "米易县测试医院", "510421")
SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
NOW = datetime(2026, 6, 1, 1, 0, 0, tzinfo=UTC)
WALL = datetime(2026, 6, 1, 9, 0, 0)  # NOW in Shanghai, as inf_time is written
KEYS = {HOSPITAL.fixmedins_code: (InstitutionKey("K1", SECRET),)}


def _signed(secret: bytes = SECRET, **envelope: object) -> bytes:
    env = HOSPITAL.envelope("2401", {"mdtrtinfo": {"psn_no": "P1"}}, inf_time=datetime(2026, 6, 1, 9, 0, 0))
    env.update(envelope, signtype="SM3", sign_no="S1")
    return sign(encode(env), secret)


def test_sign_is_hmac_sm3_of_the_body_with_cainfo_empty() -> None:
    raw = _signed()
    env = decode_envelope(raw, now=WALL)
    unsigned = raw.replace(env.cainfo.encode(), b"")
    assert base64.b64decode(env.cainfo) == hmac.digest(SECRET, unsigned, "sm3")
    assert signed_bytes(raw, env.cainfo) == unsigned


def test_verify_accepts_the_key_and_tells_the_failures_apart() -> None:
    raw = _signed()
    env = decode_envelope(raw, now=WALL)
    live = InstitutionKey("K1", SECRET)
    assert verify(raw, "SM3", env.cainfo, [live], NOW) is Verdict.OK
    # a rotation: the old key and the new one both verify while both are live
    assert verify(raw, "SM3", env.cainfo, [InstitutionKey("K2", OTHER), live], NOW) is Verdict.OK
    assert verify(raw, "SM3", env.cainfo, [InstitutionKey("K2", OTHER)], NOW) is Verdict.INVALID
    assert verify(raw, "SM3", env.cainfo, [], NOW) is Verdict.NO_KEY
    assert verify(raw, "SM3", env.cainfo, [InstitutionKey("K1", SECRET, revoked=True)], NOW) is Verdict.REVOKED
    assert verify(raw, "SM3", env.cainfo, [InstitutionKey("K2", OTHER, revoked=True)], NOW) is Verdict.NO_KEY
    revoked_and_new = [InstitutionKey("K1", SECRET, revoked=True), InstitutionKey("K2", OTHER)]
    assert verify(raw, "SM3", env.cainfo, revoked_and_new, NOW) is Verdict.REVOKED
    expired = [InstitutionKey("K1", SECRET, expires_at=NOW - timedelta(seconds=1)), InstitutionKey("K2", OTHER)]
    assert verify(raw, "SM3", env.cainfo, expired, NOW) is Verdict.REVOKED
    overlapping = [InstitutionKey("K1", SECRET, expires_at=NOW + timedelta(hours=1)), InstitutionKey("K2", OTHER)]
    assert verify(raw, "SM3", env.cainfo, overlapping, NOW) is Verdict.OK
    assert verify(raw, "", env.cainfo, [live], NOW) is Verdict.MISSING
    assert verify(raw, "SM3", "", [live], NOW) is Verdict.MISSING
    assert verify(raw, "SM3", "not base64!", [live], NOW) is Verdict.INVALID


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_one_byte_changed_after_signing_fails(data: st.DataObject) -> None:
    raw = _signed()
    env = decode_envelope(raw, now=WALL)
    sig_at = raw.index(env.cainfo.encode())
    position = data.draw(st.integers(0, len(raw) - 1).filter(lambda i: not sig_at <= i < sig_at + len(env.cainfo)))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(raw)
    tampered[position] ^= flip
    assert verify(bytes(tampered), "SM3", env.cainfo, KEYS[HOSPITAL.fixmedins_code], NOW) is not Verdict.OK


def test_authenticate_codes_and_the_clock_window() -> None:
    def check(raw: bytes, window_s: int = 300, now: datetime = NOW) -> str | None:
        env = decode_envelope(raw, now=WALL)
        err = authenticate(env, raw, KEYS, now, window_s)
        return None if err is None else err.code

    assert check(_signed()) is None
    assert check(_signed(OTHER)) == "SIGNATURE_INVALID"
    assert check(encode(HOSPITAL.envelope("2401", {}, inf_time=datetime(2026, 6, 1, 9)))) == "SIGNATURE_MISSING"
    assert check(_signed(fixmedins_code="H99999999999", msgid="H99999999999" + "0" * 18)) == "KEY_UNKNOWN"
    assert check(_signed(), now=NOW + timedelta(seconds=300)) is None
    assert check(_signed(), now=NOW + timedelta(seconds=301)) == "INF_TIME_OUT_OF_WINDOW"
    assert check(_signed(), now=NOW - timedelta(seconds=301)) == "INF_TIME_OUT_OF_WINDOW"
    assert check(_signed(), window_s=0, now=NOW + timedelta(days=30)) is None  # off: replaying history


def test_session_of_and_sign_no() -> None:
    sign_in = decode_envelope(encode(HOSPITAL.envelope("9001", {"signIn": {"opter_no": "OP1"}})))
    assert session_of(sign_in, None) is None
    at = datetime(2026, 6, 1, 9, 0, 0)
    assert sign_no_for("M" * 30, at) == sign_no_for("M" * 30, at)
    assert sign_no_for("M" * 30, at) != sign_no_for("N" * 30, at)
    assert sign_no_for("M" * 30, at).startswith("20260601090000")


def test_content_digest_ignores_what_a_resend_renews() -> None:
    a = content_digest("2401", "H1", "510421", "510421", b'{"x":1}')
    assert a == content_digest("2401", "H1", "510421", "510421", b'{"x":1}')
    assert a != content_digest("2401", "H1", "510421", "510421", b'{"x":2}')
    assert a != content_digest("2402", "H1", "510421", "510421", b'{"x":1}')
    assert a != content_digest("2401", "H2", "510421", "510421", b'{"x":1}')


def test_sealed_keys_open_only_with_their_kek_and_id() -> None:
    kek = bytes(32)
    sealed = seal(kek, SECRET, "K1")
    assert SECRET not in sealed and unseal(kek, sealed, "K1") == SECRET
    with pytest.raises(InvalidTag):
        unseal(bytes([1] * 32), sealed, "K1")
    with pytest.raises(InvalidTag):
        unseal(kek, sealed, "K2")  # a sealed secret moved to another key id does not open


def test_rate_limiter_refills_per_minute() -> None:
    limiter = RateLimiter(per_minute=60)
    assert all(limiter.allow("H1", 0.0) for _ in range(60))
    assert not limiter.allow("H1", 0.0)
    assert limiter.allow("H2", 0.0)  # per institution
    assert limiter.allow("H1", 1.0) and not limiter.allow("H1", 1.0)  # one a second back


def test_signer_signs_with_the_session() -> None:
    signer = Signer({HOSPITAL.fixmedins_code: SECRET})
    signer.sessions[HOSPITAL.fixmedins_code] = "S9"
    raw = signer.sign(HOSPITAL.envelope("2401", {"a": 1}))
    decoded = msgspec.json.decode(raw)
    assert decoded["sign_no"] == "S9" and decoded["signtype"] == "SM3"
    assert verify(raw, "SM3", decoded["cainfo"], KEYS[HOSPITAL.fixmedins_code], NOW) is Verdict.OK


def test_the_router_answers_only_on_the_replies_topic() -> None:
    """A HIS writing into Kafka names where its answer goes; it cannot make the router write elsewhere."""
    from services.router.core import ingress_meta
    from topics.catalog import REPLIES, SETTLEMENTS

    meta = ingress_meta({"reply_topic": SETTLEMENTS.name.encode(), "reply_partition": b"1", "received_ns": b"5"})
    assert (meta.reply_topic, meta.reply_partition, meta.received_ns) == (REPLIES.name, 1, 5)
    for partition in (b"99", b"-1", b"x", b""):
        assert ingress_meta({"reply_partition": partition}).reply_partition is None
    assert ingress_meta({"received_ns": b"soon"}).received_ns > 0
