"""python -m services.router — the routing stream processor (a batch processor in the shared shell)."""

from __future__ import annotations

import asyncio

from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.router import consumer


async def main(stop: asyncio.Event) -> None:
    await consumer.run(load_settings(), stop)


if __name__ == "__main__":
    run_service("router", main)
