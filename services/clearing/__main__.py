"""python -m services.clearing — reconciliation (3201/3202), clearing requests (3203-3262), running
clearing positions from the settlement stream, manual claims, the deposit outbox and gauges."""

from __future__ import annotations

import asyncio

from services.clearing.handler import ClearingService
from services.common.config import load_settings
from services.common.lifecycle import run_service


async def main(stop: asyncio.Event) -> None:
    await ClearingService(load_settings()).run(stop)


if __name__ == "__main__":
    run_service("clearing", main)
