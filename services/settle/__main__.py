"""python -m services.settle — the settlement stage: routes and settles the requests of fsi.ingress."""

from __future__ import annotations

import asyncio

from schemas.limits import set_clock_window
from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.policy.policies import PolicyBook
from services.settle import stage
from services.settle.handler import SettleEngine


async def main(stop: asyncio.Event) -> None:
    s = load_settings()
    set_clock_window(s.time_past_days, s.time_future_minutes)
    await stage.run(s, SettleEngine(s, PolicyBook.load()), stop)


if __name__ == "__main__":
    run_service("settle", main)
