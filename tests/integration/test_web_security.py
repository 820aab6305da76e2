"""TLS of the gateway and the dashboard, and the dashboard's sign-in, on the run's real services.

TLS: plain HTTP is refused, the certificate verifies against the deployment's CA for 127.0.0.1, a client
that does not trust the CA fails, client certificates (mutual TLS) are issued by the audited CLI.
Sign-in: no session → the sign-in page (pages) or 401 (API); POSTs need the CSRF token (403); wrong
passwords are refused and throttled; disabled users are refused; viewers cannot do operators' actions;
sessions expire (a dashboard of the test's own with short limits)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from loadtest.his import GatewayClient
from services.common import tls
from services.common.config import PROJECT_ROOT, Settings
from services.dashboard import users
from services.dashboard.app import PRE_SESSION_COOKIE, SESSION_COOKIE
from tests.integration.conftest import HOSPITALS, PERSONS, SIGNER
from tests.integration.dashboard_client import (
    TEST_OPERATOR,
    dashboard_session,
    make_user,
    post_sign_in,
    sign_in,
    sign_in_form,
)

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _plain_http_answer(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        sock.settimeout(5)
        chunks = []
        try:
            while chunk := sock.recv(4096):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def _envelope() -> dict:
    p = PERSONS["plain"].person
    return HOSPITALS["chifeng"].envelope("2404", {"data": {"mdtrt_id": "NONE", "psn_no": p.psn_no}}, insuplc=p.insuplc)


# --- TLS ---------------------------------------------------------------------------------------------------

async def test_gateway_and_dashboard_refuse_plain_http(services: Settings) -> None:
    assert services.gateway_url.startswith("https://") and services.dashboard_url.startswith("https://")
    for port in (services.gateway_port, services.dashboard_port):
        answer = _plain_http_answer(port)
        assert not answer.startswith(b"HTTP/"), (port, answer[:80])
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                    await resp.read()


def test_certificate_verifies_against_the_ca_for_127_0_0_1(services: Settings) -> None:
    ctx = tls.client_ssl_context(services)  # check_hostname on, the CA only
    for port in (services.gateway_port, services.dashboard_port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            assert conn.version() in ("TLSv1.2", "TLSv1.3")
            cert = conn.getpeercert()
            assert cert is not None
            assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
    # The same through urllib (the deploy readiness check's way) for the gateway's readiness path.
    url = f"https://127.0.0.1:{services.gateway_port}/health/ready"
    with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
        assert resp.status == 200


async def test_client_that_does_not_trust_the_ca_fails(services: Settings) -> None:
    async with aiohttp.ClientSession() as session:  # the system's trust store: our CA is not in it
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await GatewayClient(services.gateway_url, session).call(_envelope())
    other = replace(services, state_dir=services.run_dir / "stranger-state")  # another deployment's CA
    async with tls.client_session(other) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await GatewayClient(services.gateway_url, session).call(_envelope())


async def test_client_certificate_from_the_audited_cli_is_accepted(refdata: dict, services: Settings,
                                                                   db: asyncpg.Pool) -> None:
    code = HOSPITALS["chifeng"].fixmedins_code
    cmd = [sys.executable, "-m", "services.common.tls", "client-cert", code]
    refused = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "operator" in refused.stderr
    before = await db.fetchval("SELECT coalesce(max(audit_id), 0) FROM audit_log")
    done = subprocess.run([*cmd, "--operator", TEST_OPERATOR, "--days", "30"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    rows = await db.fetch("SELECT actor, action, target FROM audit_log WHERE audit_id > $1"
                          " AND action = 'tls.client_cert.issue'", before)
    assert [tuple(r) for r in rows] == [(TEST_OPERATOR, "tls.client_cert.issue", code)]
    async with tls.client_session(services, client_cert=tls.client_paths(services, code)) as session:
        client = GatewayClient(services.gateway_url, session, retry_for_s=30)
        answer = await client.call(_envelope())
        assert answer["err_msg"].startswith("VISIT_UNKNOWN: "), answer["err_msg"]  # through to the engine
        # The certificate names the institution: a request of another one on this connection is refused.
        p = PERSONS["plain"].person
        other = HOSPITALS["miyi"].envelope("2404", {"data": {"mdtrt_id": "NONE", "psn_no": p.psn_no}},
                                           insuplc=p.insuplc)
        answer = await client.call(SIGNER.sign({**other, "sign_no": "ANY"}))  # the gateway refuses it at once
        assert answer["err_msg"].startswith("CLIENT_CERT_MISMATCH: "), answer["err_msg"]
    # A certificate another CA issued is refused at the handshake, even though certificates are optional.
    stranger = replace(services, state_dir=services.run_dir / "stranger-state")
    foreign, _ = tls.issue_client_cert(stranger, code)
    async with tls.client_session(services, client_cert=foreign) as session:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await GatewayClient(services.gateway_url, session).call(_envelope())


# --- dashboard sign-in ---------------------------------------------------------------------------------------

async def test_without_a_session_pages_redirect_and_the_api_answers_401(services: Settings) -> None:
    base = services.dashboard_url
    async with dashboard_session(services) as session:
        for path in ("", "users", "static/app.js"):
            async with session.get(base + path, allow_redirects=False) as resp:
                assert (resp.status, resp.headers.get("Location")) == (303, "/login"), path
        async with session.get(base + "api/overview") as resp:
            assert resp.status == 401
        for path in ("logout", "sessions/end-all"):
            async with session.post(base + path, data={"csrf": "x"}, allow_redirects=False) as resp:
                assert resp.status == 401, path
        async with session.get(base + "login") as resp:
            assert resp.status == 200 and 'data-test="sign-in"' in await resp.text()
            cookie = next(c for c in resp.headers.getall("Set-Cookie") if c.startswith(PRE_SESSION_COOKIE))
            assert {"Secure", "HttpOnly", "SameSite=Strict"} <= {p.strip() for p in cookie.split(";")}
            assert resp.headers["X-Frame-Options"] == "DENY" and "Strict-Transport-Security" in resp.headers


async def test_sign_in_sets_a_strict_cookie_and_sign_out_needs_the_csrf_token(services: Settings,
                                                                               db: asyncpg.Pool) -> None:
    base = services.dashboard_url
    username, password = await make_user(db, "viewer")
    async with dashboard_session(services) as session:
        resp = await post_sign_in(services, session, username, password, await sign_in_form(services, session))
        assert resp.status == 303
        cookie = next(c for c in resp.headers.getall("Set-Cookie") if c.startswith(SESSION_COOKIE + "="))
        assert {"Secure", "HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
        token = cookie.split(";")[0].split("=", 1)[1]
        async with session.get(base) as page:
            html = await page.text()
        csrf = html.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        for form in ({}, {"csrf": "wrong" + csrf[5:]}):
            async with session.post(base + "logout", data=form, allow_redirects=False) as r:
                assert r.status == 403, form
        async with session.get(base + "api/overview") as r:
            assert r.status == 200  # still signed in
        async with session.post(base + "logout", data={"csrf": csrf}, allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (303, "/login")
        async with session.get(base + "api/overview") as r:
            assert r.status == 401
    async with tls.client_session(services) as fresh, fresh.get(  # the old token replayed by hand
            base + "api/overview", headers={"Cookie": f"{SESSION_COOKIE}={token}"}) as r:
        assert r.status == 401


async def test_sign_in_form_needs_its_csrf_token(services: Settings, db: asyncpg.Pool) -> None:
    username, password = await make_user(db, "viewer")
    async with dashboard_session(services) as session, dashboard_session(services) as other:
        mine = await sign_in_form(services, session)
        theirs = await sign_in_form(services, other)
        for csrf in ("", theirs, mine[:-2] + "00"):
            resp = await post_sign_in(services, session, username, password, csrf)
            assert resp.status == 403, csrf
        assert (await post_sign_in(services, session, username, password, mine)).status == 303
    async with tls.client_session(services) as no_cookies, no_cookies.post(  # no pre-session cookie
            f"{services.dashboard_url}login", allow_redirects=False,
            data={"username": username, "password": password, "csrf": mine}) as r:
        assert r.status == 403


async def test_wrong_password_is_refused_and_then_throttled(services: Settings, db: asyncpg.Pool) -> None:
    username, password = await make_user(db, "viewer")
    async with dashboard_session(services) as session:
        csrf = await sign_in_form(services, session)
        for i in range(5):
            resp = await post_sign_in(services, session, username, f"wrong-password-{i}", csrf)
            assert resp.status == 401
        resp = await post_sign_in(services, session, username, password, csrf)
        assert resp.status == 429  # the right password too, until the window has passed
        async with session.get(services.dashboard_url + "api/overview") as r:
            assert r.status == 401
        unknown = await post_sign_in(services, session, f"{username}x", password, csrf)
        assert unknown.status == 401
    other, other_password = await make_user(db, "viewer")  # another user is not locked out
    async with dashboard_session(services) as session:
        await sign_in(services, session, other, other_password)


async def test_disabled_user_cannot_sign_in(services: Settings, db: asyncpg.Pool) -> None:
    username, password = await make_user(db, "viewer")
    async with db.acquire() as conn:
        await users.set_disabled(conn, username, True, TEST_OPERATOR)
    async with dashboard_session(services) as session:
        resp = await post_sign_in(services, session, username, password, await sign_in_form(services, session))
        assert resp.status == 401


async def test_operator_actions_are_refused_to_viewers(services: Settings, db: asyncpg.Pool) -> None:
    base = services.dashboard_url
    viewer = await make_user(db, "viewer")
    operator = await make_user(db, "operator")
    async with dashboard_session(services) as session:
        csrf = await sign_in(services, session, *viewer)
        async with session.get(base + "users") as r:
            assert r.status == 403
        async with session.post(base + "sessions/end-all", data={"csrf": csrf}, allow_redirects=False) as r:
            assert r.status == 403
        async with session.get(base) as r:
            assert 'data-test="users-link"' not in await r.text()
    async with dashboard_session(services) as session:
        await sign_in(services, session, *operator)
        async with session.get(base + "users") as r:
            text = await r.text()
            assert r.status == 200 and f'data-user="{viewer[0]}"' in text and 'data-test="end-all"' in text


async def test_first_start_created_the_admin_operator(services: Settings, db: asyncpg.Pool) -> None:
    row = await db.fetchrow("SELECT role, disabled FROM dashboard_user WHERE username = 'admin'")
    assert tuple(row) == ("operator", False)
    secret = Path(users.admin_password_file(services))
    assert secret.stat().st_mode & 0o777 == 0o600
    async with dashboard_session(services) as session:
        await sign_in(services, session, "admin", secret.read_text().strip())


def test_users_cli_is_audited_and_reads_the_password_from_stdin(services: Settings) -> None:
    name = f"cli{os.getpid() % 100000}{int(time.time()) % 100000}"
    cli = [sys.executable, "-m", "services.dashboard.users"]
    refused = subprocess.run([*cli, "add", name, "--role", "viewer"], input="a-long-password-1\n",
                             cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "operator" in refused.stderr
    for args in (["add", name, "--role", "viewer"], ["passwd", name], ["disable", name]):
        done = subprocess.run([*cli, *args, "--operator", TEST_OPERATOR], input="a-long-password-2\n",
                              cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert "a-long-password" not in done.stdout + done.stderr
    listed = subprocess.run([*cli, "list"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert any(line.split()[:3] == [name, "viewer", "disabled"] for line in listed.stdout.splitlines())

    async def audited() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(services.pg_dsn)
        try:
            rows = await conn.fetch("SELECT actor, action FROM audit_log WHERE target = $1 ORDER BY audit_id", name)
            stored = await conn.fetchval("SELECT password_hash FROM dashboard_user WHERE username = $1", name)
        finally:
            await conn.close()
        assert stored.startswith("scrypt$") and "a-long-password" not in stored
        return [tuple(r) for r in rows]

    assert asyncio.run(audited()) == [(TEST_OPERATOR, "dashboard.user.add"), (TEST_OPERATOR, "dashboard.user.passwd"),
                                      (TEST_OPERATOR, "dashboard.user.disable")]


# --- session expiry, on a dashboard of the test's own --------------------------------------------------------

IDLE_S, MAX_S = 2, 5


@pytest.fixture
async def short_sessions_dashboard(services: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    s = replace(services, dashboard_port=_free_port(), dashboard_metrics_port=_free_port(),
                dashboard_session_idle_s=IDLE_S, dashboard_session_max_s=MAX_S)
    env = {**os.environ, "XS_DASHBOARD_PORT": str(s.dashboard_port),
           "XS_DASHBOARD_METRICS_PORT": str(s.dashboard_metrics_port),
           "XS_DASHBOARD_SESSION_IDLE_S": str(IDLE_S), "XS_DASHBOARD_SESSION_MAX_S": str(MAX_S)}
    log_path = tmp_path / "dashboard2.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.dashboard"], cwd=PROJECT_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        async with tls.client_session(s) as probe:
            while True:
                try:
                    async with probe.get(f"{s.dashboard_url}login") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dashboard 2 did not start: {log_path.read_text(errors='replace')[-2000:]}")
                await asyncio.sleep(0.3)
        yield s
    finally:
        proc.terminate()
        proc.wait(10)


async def test_sessions_expire_idle_and_absolute(short_sessions_dashboard: Settings, db: asyncpg.Pool) -> None:
    s = short_sessions_dashboard
    api = s.dashboard_url + "api/overview"
    credentials = await make_user(db, "viewer")
    async with dashboard_session(s) as session:
        await sign_in(s, session, *credentials)
        await asyncio.sleep(IDLE_S + 1)
        async with session.get(api) as r:
            assert r.status == 401  # idle
        async with session.get(s.dashboard_url, allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (303, "/login")
    async with dashboard_session(s) as session:
        # The session's age on the server lies between these two clocks' readings.
        signing_in = time.monotonic()
        await sign_in(s, session, *credentials)
        signed_in = time.monotonic()
        seen: list[tuple[float, float, int]] = []
        while time.monotonic() - signing_in < MAX_S + 1.5:  # every 0.5 s: the idle limit never hits
            async with session.get(s.dashboard_url, allow_redirects=False) as r:
                seen.append((time.monotonic() - signing_in, time.monotonic() - signed_in, r.status))
            await asyncio.sleep(0.5)
        assert all(status == 200 for upper, _, status in seen if upper < MAX_S - 0.2), seen
        late = [status for _, lower, status in seen if lower > MAX_S + 0.2]
        assert late and all(status == 303 for status in late), seen


async def test_operator_signs_everybody_out_audited(short_sessions_dashboard: Settings, db: asyncpg.Pool) -> None:
    s = short_sessions_dashboard
    viewer, operator = await make_user(db, "viewer"), await make_user(db, "operator")
    async with dashboard_session(s) as a, dashboard_session(s) as b:
        await sign_in(s, a, *viewer)
        csrf = await sign_in(s, b, *operator)
        before = await db.fetchval("SELECT coalesce(max(audit_id), 0) FROM audit_log")
        async with b.post(s.dashboard_url + "sessions/end-all", data={"csrf": csrf}, allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (303, "/login")
        for session in (a, b):
            async with session.get(s.dashboard_url + "api/overview") as r:
                assert r.status == 401
        rows = await db.fetch("SELECT actor, action FROM audit_log WHERE audit_id > $1", before)
        assert [tuple(r) for r in rows] == [(operator[0], "dashboard.sessions.end_all")]
