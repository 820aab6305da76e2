"""Dashboard shell: aiohttp serving the page, its local assets and `/api/overview` to signed-in users.

Sign-in (README "Security"): every page, asset (the style sheet excepted) and `/api/*` needs a session —
pages redirect to `/login`, the API answers 401; every POST carries the session's CSRF token (403
without it); `/users` and `POST /sessions/end-all` are the operators' (403 for a viewer). Sessions live in
this process (a restart signs everybody out). `/metrics` is on its own plain port (serve_metrics).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import msgspec
from aiohttp import web
from prometheus_client import Counter, Histogram

from services.common import audit
from services.common.config import Settings
from services.common.consumer import FailureKind, classify
from services.common.metrics import LATENCY_BUCKETS_S
from services.common.shards import ShardPools
from services.dashboard import pages, review, users
from services.dashboard.auth import DUMMY_HASH, Session, Sessions, Throttle, csrf_matches, sign_in_csrf, verify_password
from services.dashboard.data import Prometheus, assemble, fetch_clearing, fetch_live
from services.dashboard.judgements import JR_ID, PAGE_SIZE, REVIEW_ROLES, BadFilter, mask_psn, parse_filters
from services.monitor.ledger import month_figures
from services.monitor.targets import Target, load_targets
from services.refdata.regions import PROVINCES

log = logging.getLogger("dashboard")
STATIC_DIR: Final = Path(__file__).with_name("static")
CACHE_S: Final = 2.0  # every viewer within 2 s shares one set of queries
TREND_HOURS_DEFAULT: Final = 6
_encoder = msgspec.json.Encoder()

OVERVIEW_SECONDS = Histogram("xs_dashboard_overview_seconds", "Time to build /api/overview (uncached)",
                             buckets=LATENCY_BUCKETS_S)
OVERVIEW_ERRORS = Counter("xs_dashboard_overview_errors_total", "Failed builds of /api/overview", ["source"])
SIGN_INS = Counter("xs_dashboard_sign_ins_total", "Dashboard sign-in attempts by outcome", ["outcome"])

SESSION_COOKIE: Final = "xs_session"
PRE_SESSION_COOKIE: Final = "xs_presession"  # binds the sign-in form's CSRF token before a session exists
USER_RECHECK_S: Final = 30.0  # a session re-reads its user's role and disabled flag this often
ADMIN_RETRY_S: Final = 5.0
# Reachable without a session: the sign-in form and the style sheet it uses.
OPEN_PATHS: Final = frozenset({"/login", "/static/style.css"})
SECURITY_HEADERS: Final = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Dashboard:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.targets: list[Target] = load_targets(PROVINCES)
        self.pool: asyncpg.Pool | None = None
        self.shards: ShardPools | None = None
        self.session: aiohttp.ClientSession | None = None
        self.prom: Prometheus | None = None
        self._cache: dict[int, tuple[float, bytes]] = {}
        self._lock = asyncio.Lock()
        self.sessions = Sessions(s.dashboard_session_idle_s, s.dashboard_session_max_s)
        self.throttle = Throttle()
        self.csrf_key = secrets.token_bytes(32)
        self.secure_cookies = not s.plain_http
        self._admin_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # No connection at start: the page (and live figures) must come up while PostgreSQL is away;
        # the pool connects on the first query and reconnects after a restart.
        self.pool = await asyncpg.create_pool(self.s.pg_dsn, min_size=0, max_size=2)
        self.shards = await ShardPools.connect(self.s, 2)
        self.session = aiohttp.ClientSession()
        self.prom = Prometheus(f"http://127.0.0.1:{self.s.prometheus_port}", self.session)
        self._admin_task = asyncio.create_task(self._ensure_admin())

    async def _ensure_admin(self) -> None:
        """First start creates the operator `admin` — once PostgreSQL answers (the page comes up without it)."""
        assert self.pool is not None
        while True:
            try:
                async with self.pool.acquire() as conn:
                    if await users.ensure_admin(conn, self.s):
                        log.info("created the dashboard operator admin; its password is in %s",
                                 users.admin_password_file(self.s))
                return
            except Exception as e:
                if classify(e) is not FailureKind.INFRASTRUCTURE:
                    raise
                await asyncio.sleep(ADMIN_RETRY_S)

    async def stop(self) -> None:
        if self._admin_task:
            self._admin_task.cancel()
        if self.session:
            await self.session.close()
        if self.shards:
            await self.shards.close()
        if self.pool:
            await self.pool.close()

    async def overview(self, hours: int) -> bytes:
        async with self._lock:
            cached = self._cache.get(hours)
            if cached and time.monotonic() - cached[0] < CACHE_S:
                return cached[1]
            started = time.perf_counter()
            assert self.pool is not None and self.shards is not None and self.prom is not None
            month, live = await asyncio.gather(month_figures(self.pool, self.shards), fetch_live(self.prom, hours))
            positions, deposits = await fetch_clearing(self.pool, month.month)
            if live.error:
                OVERVIEW_ERRORS.labels("prometheus").inc()
                log.warning("%s", live.error)
            doc: dict[str, Any] = assemble(month, self.targets, positions, deposits, live, time.time())
            body = _encoder.encode(doc)
            self._cache[hours] = (time.monotonic(), body)
            OVERVIEW_SECONDS.observe(time.perf_counter() - started)
            return body

    async def handle_overview(self, request: web.Request) -> web.Response:
        try:
            hours = int(request.query.get("hours", TREND_HOURS_DEFAULT))
        except ValueError:
            raise web.HTTPBadRequest(text="hours must be an integer") from None
        hours = max(1, min(hours, 48))
        try:
            body = await self.overview(hours)
        except Exception as e:
            if classify(e) is not FailureKind.INFRASTRUCTURE:
                raise
            OVERVIEW_ERRORS.labels("ledger").inc()
            log.warning("ledger query failed: %s", type(e).__name__)
            raise web.HTTPServiceUnavailable(text=f"ledger unavailable: {type(e).__name__}") from None
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})


    # --- sign-in ---------------------------------------------------------------------------------------

    async def current_session(self, request: web.Request) -> Session | None:
        """The request's live session; its user's role and disabled flag re-read every USER_RECHECK_S
        (while the hub is unreachable the last known state stands)."""
        token = request.cookies.get(SESSION_COOKIE)
        now = time.monotonic()
        session = self.sessions.get(token, now)
        if session is None or now - session.checked < USER_RECHECK_S:
            return session
        assert self.pool is not None
        try:
            user = await users.fetch_user(self.pool, session.username)
        except Exception as e:
            if classify(e) is not FailureKind.INFRASTRUCTURE:
                raise
            return session
        if user is None or user.disabled:
            self.sessions.end_user(session.username)
            return None
        session.role, session.checked = user.role, now
        return session

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        session = await self.current_session(request)
        if session is None:
            if request.method == "GET" and not request.path.startswith("/api/"):
                raise web.HTTPSeeOther("/login")
            raise web.HTTPUnauthorized(text="sign in first: /login")
        if request.method not in ("GET", "HEAD"):
            form = await request.post()
            given = form.get("csrf")
            if not csrf_matches(session.csrf, given if isinstance(given, str) else None):
                raise web.HTTPForbidden(text="missing or wrong CSRF token; reload the page")
        request["session"] = session
        return await handler(request)

    def _sign_in_form(self, request: web.Request, message: str = "", status: int = 200) -> web.Response:
        pre = request.cookies.get(PRE_SESSION_COOKIE) or secrets.token_urlsafe(24)
        resp = web.Response(text=pages.sign_in_page(sign_in_csrf(self.csrf_key, pre), message),
                            content_type="text/html", status=status)
        self._set_cookie(resp, PRE_SESSION_COOKIE, pre)
        return resp

    def _set_cookie(self, resp: web.StreamResponse, name: str, value: str) -> None:
        resp.set_cookie(name, value, path="/", secure=self.secure_cookies, httponly=True, samesite="Strict")

    async def handle_sign_in_form(self, request: web.Request) -> web.Response:
        if await self.current_session(request) is not None:
            raise web.HTTPSeeOther("/")
        return self._sign_in_form(request)

    async def handle_sign_in(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        pre = request.cookies.get(PRE_SESSION_COOKIE, "")
        given = form.get("csrf")
        if not pre or not csrf_matches(sign_in_csrf(self.csrf_key, pre), given if isinstance(given, str) else None):
            SIGN_INS.labels("csrf").inc()
            raise web.HTTPForbidden(text="missing or wrong CSRF token; reload the sign-in page")
        username, password = str(form.get("username") or "")[:64], str(form.get("password") or "")[:256]
        address, now = request.remote or "?", time.monotonic()
        if self.throttle.blocked(username, address, now):
            SIGN_INS.labels("throttled").inc()
            return self._sign_in_form(request, "尝试次数过多，请稍后再试 Too many failed sign-ins; try again later",
                                      status=429)
        assert self.pool is not None
        try:
            user = await users.fetch_user(self.pool, username)
        except Exception as e:
            if classify(e) is not FailureKind.INFRASTRUCTURE:
                raise
            raise web.HTTPServiceUnavailable(text="user directory unavailable; try again shortly") from None
        stored = user.password_hash if user is not None else DUMMY_HASH
        ok = await asyncio.to_thread(verify_password, password, stored)
        if not ok or user is None or user.disabled:
            self.throttle.failed(username, address, now)
            SIGN_INS.labels("refused").inc()
            return self._sign_in_form(request, "用户名或密码错误 Wrong username or password", status=401)
        self.throttle.succeeded(username)
        self.sessions.prune(now)
        token, _ = self.sessions.create(user.username, user.role, now)
        SIGN_INS.labels("ok").inc()
        resp = web.HTTPSeeOther("/")
        self._set_cookie(resp, SESSION_COOKIE, token)
        resp.del_cookie(PRE_SESSION_COOKIE, path="/")
        raise resp

    async def handle_sign_out(self, request: web.Request) -> web.StreamResponse:
        self.sessions.end(request.cookies.get(SESSION_COOKIE))
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(SESSION_COOKIE, path="/")
        raise resp

    async def handle_index(self, request: web.Request) -> web.Response:
        session: Session = request["session"]
        page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        page = page.replace("{{user_bar}}", pages.user_bar(session.username, session.role, session.csrf))
        return web.Response(text=page, content_type="text/html")

    @staticmethod
    def _operator(request: web.Request) -> Session:
        session: Session = request["session"]
        if session.role != "operator":
            raise web.HTTPForbidden(text="operators only")
        return session

    async def handle_users(self, request: web.Request) -> web.Response:
        session = self._operator(request)
        assert self.pool is not None
        rows = await users.list_users(self.pool)
        return web.Response(text=pages.users_page(rows, session.username, session.csrf, len(self.sessions)),
                            content_type="text/html")

    async def handle_end_all(self, request: web.Request) -> web.StreamResponse:
        """An operator signs everybody out (e.g. after a password leak); audited."""
        session = self._operator(request)
        assert self.pool is not None
        await audit.record(self.pool, session.username, "dashboard.sessions.end_all", "",
                           {"sessions": len(self.sessions)}, {"sessions": 0})
        self.sessions.end_all()
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(SESSION_COOKIE, path="/")
        raise resp

    # --- judgements: list, hits, detail, review (README "Review and deductions") -------------------------

    async def handle_judgements(self, request: web.Request) -> web.Response:
        session: Session = request["session"]
        try:
            f = parse_filters(request.query)
        except BadFilter as e:
            raise web.HTTPBadRequest(text=f"bad filter: {e}") from None
        assert self.pool is not None
        (total, rows), counts = await asyncio.gather(review.list_judgements(self.pool, f),
                                                     review.hit_counts(self.pool, f))
        if request.path.startswith("/api/"):
            return web.Response(body=_encoder.encode({
                "total": total, "page": f.page, "page_size": PAGE_SIZE,
                "items": [_judgement_json(r) for r in rows],
                "counts": [{"rule_id": c["rule_id"], "status": c["status"], "n": c["n"],
                            "suspect_amt": c["suspect_amt"]} for c in counts]}),
                content_type="application/json")
        return web.Response(text=pages.judgements_page(rows, total, counts, f, PAGE_SIZE, session.username,
                                                       session.role, mask_psn), content_type="text/html")

    async def _judgement(self, request: web.Request) -> asyncpg.Record:
        jr_id = request.match_info["jr_id"]
        assert self.pool is not None
        row = await review.judgement(self.pool, jr_id) if JR_ID.match(jr_id) else None
        if row is None:
            raise web.HTTPNotFound(text="no such judgement")
        return row

    async def handle_judgement(self, request: web.Request) -> web.Response:
        session: Session = request["session"]
        row = await self._judgement(request)
        if request.path.startswith("/api/"):
            return web.Response(body=_encoder.encode(_judgement_json(row, detail=True)),
                                content_type="application/json")
        return self._judgement_page(row, session)

    def _judgement_page(self, row: asyncpg.Record, session: Session, message: str = "",
                        status: int = 200) -> web.Response:
        return web.Response(text=pages.judgement_page(row, session.username, session.role, session.csrf,
                                                      session.role in REVIEW_ROLES, mask_psn, message),
                            content_type="text/html", status=status)

    async def handle_review(self, request: web.Request) -> web.StreamResponse:
        """Confirm or dismiss (form: decision, reason); the guard checked the CSRF token already."""
        session: Session = request["session"]
        if session.role not in REVIEW_ROLES:
            raise web.HTTPForbidden(text="only operators review judgements")
        row = await self._judgement(request)
        form = await request.post()
        decision, reason = form.get("decision"), form.get("reason")
        assert self.pool is not None
        try:
            done = await review.review(self.pool, row["jr_id"], decision if isinstance(decision, str) else "",
                                       reason if isinstance(reason, str) else "", session.username)
        except review.ReviewRefused as e:
            return self._judgement_page(await self._judgement(request), session, e.message, e.status)
        except ValueError as e:
            return self._judgement_page(row, session, str(e), 400)
        log.info("judgement %s %s by %s", done.jr_id, done.status, session.username)
        raise web.HTTPSeeOther(f"/judgements/{done.jr_id}")


def _judgement_json(r: asyncpg.Record, *, detail: bool = False) -> dict[str, Any]:
    """A judgement for the API: psn_no masked; dates as text; money in fen."""
    out: dict[str, Any] = {k: r[k] for k in ("jr_id", "rule_id", "rule_version", "severity", "insured_admdvs",
                                             "insured_prov", "treating_admdvs", "treating_prov", "fixmedins_code",
                                             "suspect_amt", "status", "deduct_month", "detected_at")}
    out.update(psn_no=mask_psn(r["psn_no"]), window_begin=str(r["window_begin"]), window_end=str(r["window_end"]))
    if detail:
        out.update({k: r[k] for k in ("mdtrt_ids", "setl_ids", "items", "detail", "reviewed_by", "review_reason",
                                      "reviewed_at")})
    return out


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")
    if request.secure:
        response.headers["Strict-Transport-Security"] = "max-age=31536000"


def build_app(d: Dashboard) -> web.Application:
    app = web.Application(middlewares=[d.guard], client_max_size=64 * 1024)
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", d.handle_index)
    app.router.add_get("/login", d.handle_sign_in_form)
    app.router.add_post("/login", d.handle_sign_in)
    app.router.add_post("/logout", d.handle_sign_out)
    app.router.add_get("/users", d.handle_users)
    app.router.add_post("/sessions/end-all", d.handle_end_all)
    app.router.add_get("/api/overview", d.handle_overview)
    app.router.add_get("/judgements", d.handle_judgements)
    app.router.add_get("/api/judgements", d.handle_judgements)
    app.router.add_get("/judgements/{jr_id}", d.handle_judgement)
    app.router.add_get("/api/judgements/{jr_id}", d.handle_judgement)
    app.router.add_post("/judgements/{jr_id}/review", d.handle_review)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app
