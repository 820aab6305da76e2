"""Dashboard sign-in, pure parts (services/dashboard/auth.py): password hashes, session expiry, CSRF
tokens, throttling of failed sign-ins. Times are given, not waited for."""

from __future__ import annotations

import pytest

from services.dashboard import auth

FAST_N = 2**10  # the stored parameters are used when checking; a small n keeps the test quick


def test_password_hash_verifies_only_the_password() -> None:
    stored = auth.hash_password("correct horse battery", n=FAST_N)
    assert stored.startswith(f"scrypt${FAST_N}$8$1$")
    assert auth.verify_password("correct horse battery", stored)
    assert not auth.verify_password("correct horse batterY", stored)
    assert not auth.verify_password("", stored)
    assert auth.hash_password("correct horse battery", n=FAST_N) != stored  # salted
    assert not auth.verify_password("x", "plain$text")
    assert not auth.verify_password("x", "scrypt$notanumber$8$1$AA==$AA==")


def test_default_hash_uses_the_full_cost() -> None:
    assert auth.hash_password("correct horse battery").startswith(f"scrypt${2**15}$8$1$")


def test_policy_checks() -> None:
    assert auth.check_username("clerk.li") == "clerk.li"
    for bad in ("", "Admin", "a" * 33, "x y", "名字"):
        with pytest.raises(ValueError):
            auth.check_username(bad)
    with pytest.raises(auth.PasswordPolicyError):
        auth.check_password("short")
    with pytest.raises(ValueError):
        auth.check_role("root")


def test_session_idle_expiry() -> None:
    sessions = auth.Sessions(idle_s=1800, max_s=28_800)
    token, session = sessions.create("clerk", "viewer", now=1000.0)
    assert sessions.get(token, 1000.0 + 1799) is session  # and the idle clock restarts
    assert sessions.get(token, 1000.0 + 1799 + 1800) is session
    assert sessions.get(token, 1000.0 + 1799 + 1800 + 1801) is None
    assert sessions.get(token, 1000.0 + 1799 + 1800 + 1802) is None and len(sessions) == 0


def test_session_absolute_expiry_despite_activity() -> None:
    sessions = auth.Sessions(idle_s=1800, max_s=28_800)
    token, _ = sessions.create("clerk", "viewer", now=0.0)
    t = 0.0
    while t < 28_800:
        assert sessions.get(token, t) is not None
        t += 1000
    assert sessions.get(token, 28_801) is None


def test_session_tokens_are_random_and_only_digests_are_kept() -> None:
    sessions = auth.Sessions(idle_s=10, max_s=100)
    t1, s1 = sessions.create("a", "viewer", 0)
    t2, s2 = sessions.create("a", "operator", 0)
    assert t1 != t2 and s1.csrf != s2.csrf and len(t1) >= 40
    assert t1 not in repr(sessions._by_digest) and sessions.get("forged", 0) is None and sessions.get(None, 0) is None
    assert sessions.end_user("a") == 2 and sessions.get(t1, 1) is None


def test_end_and_end_all() -> None:
    sessions = auth.Sessions(idle_s=10, max_s=100)
    t1, _ = sessions.create("a", "viewer", 0)
    t2, _ = sessions.create("b", "viewer", 0)
    sessions.end(t1)
    assert sessions.get(t1, 1) is None and sessions.get(t2, 1) is not None
    assert sessions.end_all() == 1 and sessions.get(t2, 1) is None


def test_csrf_tokens() -> None:
    assert auth.csrf_matches("abc", "abc")
    assert not auth.csrf_matches("abc", "abd") and not auth.csrf_matches("abc", None)
    assert not auth.csrf_matches("abc", "")
    key = b"k" * 32
    assert auth.sign_in_csrf(key, "pre1") == auth.sign_in_csrf(key, "pre1") != auth.sign_in_csrf(key, "pre2")
    assert auth.sign_in_csrf(key, "pre1") != auth.sign_in_csrf(b"j" * 32, "pre1")


def test_throttle_blocks_a_user_after_repeated_failures_for_the_window() -> None:
    throttle = auth.Throttle(window_s=900, per_user=5, per_address=20)
    for i in range(5):
        assert not throttle.blocked("clerk", "127.0.0.1", float(i))
        throttle.failed("clerk", "127.0.0.1", float(i))
    assert throttle.blocked("clerk", "127.0.0.1", 10.0)
    assert not throttle.blocked("other", "127.0.0.1", 10.0)  # another user is not locked out
    assert throttle.blocked("clerk", "127.0.0.1", 900.0)  # the first failure (t=0) is exactly 900 s old
    assert not throttle.blocked("clerk", "127.0.0.1", 900.5)  # ... and now it has left the window
    throttle.succeeded("clerk")
    assert not throttle.blocked("clerk", "127.0.0.1", 10.0)


def test_throttle_blocks_an_address_trying_many_users() -> None:
    throttle = auth.Throttle(window_s=900, per_user=5, per_address=20)
    for i in range(20):
        throttle.failed(f"user{i}", "10.0.0.9", 1.0)
    assert throttle.blocked("fresh", "10.0.0.9", 2.0)
    assert not throttle.blocked("fresh", "127.0.0.1", 2.0)
