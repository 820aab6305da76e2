"""Dashboard shell: aiohttp serving the page, its local assets, `/api/overview` and `/metrics`."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from services.common.config import Settings
from services.common.consumer import FailureKind, classify
from services.common.metrics import LATENCY_BUCKETS_S
from services.common.shards import ShardPools
from services.dashboard.data import Prometheus, assemble, fetch_clearing, fetch_live
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

    async def start(self) -> None:
        # No connection at start: the page (and live figures) must come up while PostgreSQL is away;
        # the pool connects on the first query and reconnects after a restart.
        self.pool = await asyncpg.create_pool(self.s.pg_dsn, min_size=0, max_size=2)
        self.shards = await ShardPools.connect(self.s, 2)
        self.session = aiohttp.ClientSession()
        self.prom = Prometheus(f"http://127.0.0.1:{self.s.prometheus_port}", self.session)

    async def stop(self) -> None:
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


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(d: Dashboard) -> web.Application:
    app = web.Application()
    app.router.add_get("/", _index)
    app.router.add_get("/api/overview", d.handle_overview)
    app.router.add_get("/metrics", _metrics)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    return app
