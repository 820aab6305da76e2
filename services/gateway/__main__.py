"""python -m services.gateway — the HTTP gateway (default http://127.0.0.1:8080)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.common.metrics import serve_metrics
from services.gateway.app import Gateway, build_app


async def main(stop: asyncio.Event) -> None:
    s = load_settings()
    gw = Gateway(s)
    await gw.start()
    runner = web.AppRunner(build_app(gw), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, s.gateway_host, s.gateway_port, backlog=1024)
    await site.start()
    serve_metrics(s.gateway_metrics_port, stage="gateway")
    logging.getLogger("gateway").info("listening on %s", s.gateway_url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await gw.stop()


if __name__ == "__main__":
    run_service("gateway", main)
