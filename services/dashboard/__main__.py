"""python -m services.dashboard — the clearing staff's dashboard (default https://127.0.0.1:8090/; its
/metrics on XS_DASHBOARD_METRICS_PORT, plain HTTP)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.common.metrics import serve_metrics
from services.common.tls import server_ssl_context
from services.dashboard.app import Dashboard, build_app


async def main(stop: asyncio.Event) -> None:
    s = load_settings()
    d = Dashboard(s)
    await d.start()
    runner = web.AppRunner(build_app(d), access_log=None)
    await runner.setup()
    log = logging.getLogger("dashboard")
    if s.plain_http:
        log.warning("XS_PLAIN_HTTP=1: serving plain HTTP without TLS (development only)")
    ssl_context = None if s.plain_http else server_ssl_context(s)
    await web.TCPSite(runner, "127.0.0.1", s.dashboard_port, ssl_context=ssl_context).start()
    serve_metrics(s.dashboard_metrics_port)
    log.info("dashboard on %s", s.dashboard_url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await d.stop()


if __name__ == "__main__":
    run_service("dashboard", main)
