"""python -m services.gateway — the HTTPS gateway (default https://127.0.0.1:8080; plain HTTP only with
XS_PLAIN_HTTP=1, for development)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.common.metrics import serve_metrics
from services.common.tls import server_ssl_context
from services.gateway.app import Gateway, build_app


async def main(stop: asyncio.Event) -> None:
    s = load_settings()
    gw = Gateway(s)
    await gw.start()
    runner = web.AppRunner(build_app(gw), access_log=None)
    await runner.setup()
    log = logging.getLogger("gateway")
    if s.plain_http:
        log.warning("XS_PLAIN_HTTP=1: serving plain HTTP without TLS (development only)")
    ssl_context = None if s.plain_http else server_ssl_context(s, s.gateway_client_certs)
    site = web.TCPSite(runner, s.gateway_host, s.gateway_port, backlog=1024, ssl_context=ssl_context)
    await site.start()
    serve_metrics(s.gateway_metrics_port, stage="gateway")
    log.info("listening on %s (client certificates: %s)", s.gateway_url,
             "n/a" if s.plain_http else s.gateway_client_certs)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await gw.stop()


if __name__ == "__main__":
    run_service("gateway", main)
