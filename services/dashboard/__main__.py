"""python -m services.dashboard — the clearing staff's dashboard (default http://127.0.0.1:8090/)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.dashboard.app import Dashboard, build_app


async def main(stop: asyncio.Event) -> None:
    s = load_settings()
    d = Dashboard(s)
    await d.start()
    runner = web.AppRunner(build_app(d), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", s.dashboard_port).start()
    logging.getLogger("dashboard").info("dashboard on http://127.0.0.1:%d/", s.dashboard_port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await d.stop()


if __name__ == "__main__":
    run_service("dashboard", main)
