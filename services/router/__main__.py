"""python -m services.router — the routing stream processor (a batch processor in the shared shell)."""

from __future__ import annotations

import asyncio

from schemas.limits import set_clock_window
from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.router import consumer


async def main(stop: asyncio.Event) -> None:
    s = load_settings()
    set_clock_window(s.time_past_days, s.time_future_minutes)
    await consumer.run(s, stop)


if __name__ == "__main__":
    run_service("router", main)
