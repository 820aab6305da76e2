"""python -m services.router — the routing stream processor (a batch processor in the shared shell)."""

from __future__ import annotations

import asyncio

from schemas.limits import clock_window
from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.router import consumer


async def main(stop: asyncio.Event) -> None:
    clock_window()  # XS_TIME_PAST_DAYS / XS_TIME_FUTURE_MINUTES: a bad value stops the router before any record
    await consumer.run(load_settings(), stop)


if __name__ == "__main__":
    run_service("router", main)
