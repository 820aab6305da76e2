"""Dashboard sign-in, the pure parts: password hashes, server-side sessions, CSRF tokens, throttling.

No I/O here: the users live in the hub (services/dashboard/users.py), the HTTP side is app.py. Time is
passed in (monotonic seconds), so expiry and throttling are tested without waiting.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Final

ROLES: Final = ("viewer", "operator")
USERNAME: Final = re.compile(r"^[a-z0-9._-]{1,32}$")
PASSWORD_MIN: Final = 12
PASSWORD_MAX: Final = 256

# scrypt (stdlib, RFC 7914): n=2^15, r=8, p=1 — 32 MiB and some 50-100 ms per check on this machine.
SCRYPT_N: Final = 2**15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SCRYPT_MAXMEM: Final = 64 * 1024 * 1024

# Failed sign-ins: more than FAILURES_MAX for one username (or from one address) within FAILURE_WINDOW_S
# refuse every further try, right password included, until the window has passed.
FAILURES_MAX: Final = 5
FAILURE_WINDOW_S: Final = 900.0
ADDRESS_FAILURES_MAX: Final = 20


class PasswordPolicyError(ValueError):
    pass


def check_username(name: str) -> str:
    if not USERNAME.match(name):
        raise ValueError("username: 1-32 of a-z 0-9 . _ -")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise PasswordPolicyError(f"a password has {PASSWORD_MIN}-{PASSWORD_MAX} characters")
    return password


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def hash_password(password: str, *, n: int = SCRYPT_N) -> str:
    """`scrypt$n$r$p$salt$hash` (base64): parameters stored with the hash, so they can grow later."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=SCRYPT_MAXMEM, dklen=len(want))
    except ValueError:
        return False
    return hmac.compare_digest(got, want)


# Checked against when the username is unknown, so an unknown name costs as much as a wrong password.
DUMMY_HASH: Final = hash_password(secrets.token_urlsafe(16))


@dataclass
class Session:
    username: str
    role: str
    csrf: str
    created: float
    last_seen: float
    checked: float  # when the user's role and disabled flag were last read from the hub


@dataclass
class Sessions:
    """Server-side sessions keyed by a random token (the cookie). Only a digest of each token is kept,
    so a memory dump does not hand out live cookies."""

    idle_s: float
    max_s: float
    _by_digest: dict[bytes, Session] = field(default_factory=dict)

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def create(self, username: str, role: str, now: float) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(username, role, secrets.token_urlsafe(32), now, now, now)
        self._by_digest[self._digest(token)] = session
        return token, session

    def get(self, token: str | None, now: float) -> Session | None:
        """The live session of `token` (its idle clock restarted), or None: unknown, idle or too old."""
        if not token:
            return None
        key = self._digest(token)
        session = self._by_digest.get(key)
        if session is None:
            return None
        if now - session.last_seen > self.idle_s or now - session.created > self.max_s:
            del self._by_digest[key]
            return None
        session.last_seen = now
        return session

    def end(self, token: str | None) -> None:
        if token:
            self._by_digest.pop(self._digest(token), None)

    def end_user(self, username: str) -> int:
        doomed = [k for k, v in self._by_digest.items() if v.username == username]
        for k in doomed:
            del self._by_digest[k]
        return len(doomed)

    def end_all(self) -> int:
        n = len(self._by_digest)
        self._by_digest.clear()
        return n

    def prune(self, now: float) -> None:
        for k, v in list(self._by_digest.items()):
            if now - v.last_seen > self.idle_s or now - v.created > self.max_s:
                del self._by_digest[k]

    def __len__(self) -> int:
        return len(self._by_digest)


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


def sign_in_csrf(key: bytes, pre_session: str) -> str:
    """The sign-in form's CSRF token: bound to a pre-session cookie (no session exists yet)."""
    return hmac.new(key, b"sign-in:" + pre_session.encode(), hashlib.sha256).hexdigest()


@dataclass
class Throttle:
    """Counts failed sign-ins per username and per client address within a sliding window."""

    window_s: float = FAILURE_WINDOW_S
    per_user: int = FAILURES_MAX
    per_address: int = ADDRESS_FAILURES_MAX
    _fails: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._fails.get(key)
        if times is None:
            return deque()
        while times and now - times[0] > self.window_s:
            times.popleft()
        if not times:
            del self._fails[key]
        return times

    def blocked(self, username: str, address: str, now: float) -> bool:
        return (len(self._recent(f"u:{username}", now)) >= self.per_user
                or len(self._recent(f"a:{address}", now)) >= self.per_address)

    def failed(self, username: str, address: str, now: float) -> None:
        for key in (f"u:{username}", f"a:{address}"):
            self._recent(key, now)
            self._fails.setdefault(key, deque()).append(now)

    def succeeded(self, username: str) -> None:
        self._fails.pop(f"u:{username}", None)
