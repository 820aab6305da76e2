"""python -m services.settle — the policy engine and ledger writer."""

from __future__ import annotations

import asyncio

from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.policy.policies import PolicyBook
from services.settle.handler import SettleEngine


async def main(stop: asyncio.Event) -> None:
    engine = SettleEngine(load_settings(), PolicyBook.load())
    await engine.run(stop)


if __name__ == "__main__":
    run_service("settle", main)
