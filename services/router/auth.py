"""Who sent a request, and may it pass: the router's authentication, pure (README "Security").

Every record on the ingress topic — from the gateway or written straight by an institution — is
trusted only when:
1. it carries a valid signature of the institution it names (`services.common.signing.verify`,
   keys from the router's view, several live during a rotation);
2. its inf_time is within ± `window_s` of the broker's clock (0: off, for replaying history);
3. it names a live sign-in session of that institution (`sign_no` of 9001, until 9002), except 9001;
4. its msgid was never seen with other content (the registry in `store.py`; MSGID_CONFLICT).
1–2 are decided here from memory; 3–4 need the hub, once per batch.

`RateLimiter` is the per-institution token bucket of person look-ups (1101).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from schemas.envelope import RequestEnvelope
from schemas.errors import BrokerError
from schemas.wire import parse_wire_time
from services.common.response import SHANGHAI
from services.common.signing import InstitutionKey, Verdict, verify

_MESSAGES = {
    Verdict.MISSING: "cainfo is empty or signtype is not SM3",
    Verdict.INVALID: "the signature does not match the request with any live key of the institution",
    Verdict.NO_KEY: "the institution named has no live key",
    Verdict.REVOKED: "the request is signed with a revoked or expired key",
}
SIGN_IN = "9001"
SIGN_OUT = "9002"


def authenticate(env: RequestEnvelope, raw: bytes, keys: Mapping[str, tuple[InstitutionKey, ...]],
                 now: datetime, window_s: int) -> BrokerError | None:
    """The refusal of a request that is not signed by the institution it names, or is out of the clock
    window; None when it passes. `now` is the broker's clock (timezone-aware); inf_time is Asia/Shanghai
    wall time."""
    verdict = verify(raw, env.signtype, env.cainfo, keys.get(env.fixmedins_code, ()), now)
    if verdict is not Verdict.OK:
        return BrokerError(verdict.value, _MESSAGES[verdict])
    if window_s:
        wall = now.astimezone(SHANGHAI).replace(tzinfo=None)
        skew = (parse_wire_time("inf_time", env.inf_time) - wall).total_seconds()
        if abs(skew) > window_s:
            return BrokerError("INF_TIME_OUT_OF_WINDOW",
                               f"inf_time is {abs(skew):.0f} s {'behind' if skew < 0 else 'ahead of'} the broker's "
                               f"clock; the window is ±{window_s} s")
    return None


def session_of(env: RequestEnvelope, body: object) -> str | None:
    """The sign_no a request must hold a live session for: none for 9001, the one it ends for 9002."""
    if env.infno == SIGN_IN:
        return None
    if env.infno == SIGN_OUT:
        return str(body.signOut.sign_no)  # type: ignore[attr-defined]
    return env.sign_no


def sign_no_for(msgid: str, signed_in: datetime) -> str:
    """The sign_no a 9001 opens: its time and a digest of its msgid — the same for a resent 9001, so a
    replayed batch opens no second session."""
    return signed_in.strftime("%Y%m%d%H%M%S") + hashlib.new("sm3", msgid.encode()).hexdigest()[:16].upper()


@dataclass
class RateLimiter:
    """A token bucket per institution: `per_minute` look-ups a minute, up to a minute's worth at once."""

    per_minute: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # code → (tokens, at monotonic s)

    def allow(self, fixmedins_code: str, now: float) -> bool:
        tokens, at = self._buckets.get(fixmedins_code, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - at) * self.per_minute / 60.0)
        allowed = tokens >= 1.0
        self._buckets[fixmedins_code] = (tokens - 1.0 if allowed else tokens, now)
        return allowed
