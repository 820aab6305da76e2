"""Signing in to the dashboard from a test: users of the test's own (created in the run's hub, audited as
the test), and a session over TLS that went through the sign-in form with its CSRF token."""

from __future__ import annotations

import itertools
import re
import secrets

import aiohttp
import asyncpg

from services.common.config import Settings
from services.common.tls import client_session
from services.dashboard.users import add_user
from tests.integration.conftest import RUN_TOKEN

TEST_OPERATOR = "pytest"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_serial = itertools.count(1)


def dashboard_session(s: Settings) -> aiohttp.ClientSession:
    """TLS with the CA, and a cookie jar that keeps cookies of 127.0.0.1 (aiohttp's default jar drops
    cookies of IP-address hosts)."""
    return client_session(s, cookie_jar=aiohttp.CookieJar(unsafe=True))


async def make_user(db: asyncpg.Pool, role: str) -> tuple[str, str]:
    """A new user of the test run with `role`: (username, password)."""
    username = f"t{RUN_TOKEN}-{role[:2]}{next(_serial)}"
    password = secrets.token_urlsafe(16)
    async with db.acquire() as conn:
        await add_user(conn, username, role, password, TEST_OPERATOR)
    return username, password


def csrf_token(html: str) -> str:
    m = _CSRF.search(html)
    assert m, f"no CSRF field in the page: {html[:500]}"
    return m.group(1)


async def sign_in_form(s: Settings, session: aiohttp.ClientSession) -> str:
    """GET /login: the form's CSRF token (and the pre-session cookie in the session's jar)."""
    async with session.get(f"{s.dashboard_url}login") as resp:
        assert resp.status == 200, resp.status
        return csrf_token(await resp.text())


async def post_sign_in(s: Settings, session: aiohttp.ClientSession, username: str, password: str,
                       csrf: str) -> aiohttp.ClientResponse:
    async with session.post(f"{s.dashboard_url}login", allow_redirects=False,
                            data={"username": username, "password": password, "csrf": csrf}) as resp:
        await resp.read()
        return resp


async def sign_in(s: Settings, session: aiohttp.ClientSession, username: str, password: str) -> str:
    """Sign in through the form; returns the session's CSRF token (from the overview page)."""
    resp = await post_sign_in(s, session, username, password, await sign_in_form(s, session))
    assert resp.status == 303 and resp.headers["Location"] == "/", resp.status
    async with session.get(s.dashboard_url) as page:
        assert page.status == 200
        return csrf_token(await page.text())
