"""python -m services.monitor — Kafka lag, month-to-date ledger figures and targets for Prometheus."""

from __future__ import annotations

import asyncio

from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.monitor.exporter import Monitor


async def main(stop: asyncio.Event) -> None:
    await Monitor(load_settings()).run(stop)


if __name__ == "__main__":
    run_service("monitor", main)
