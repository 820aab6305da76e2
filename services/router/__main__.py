"""python -m services.router — the routing stream processor.

XS_ROUTER_SHELL selects the Kafka shell around the same routing core: `aiokafka`
(default: a batch consumer) or `faust` (a faust-streaming agent). See README, Benchmark.
"""

from __future__ import annotations

import asyncio
import os
import sys

import faust

from schemas.limits import clock_window
from services.common.config import load_settings
from services.common.lifecycle import run_service
from services.router import consumer
from services.router.app import create_app


def main() -> None:
    shell = os.environ.get("XS_ROUTER_SHELL", "aiokafka")
    settings = load_settings()
    try:
        clock_window()  # XS_TIME_PAST_DAYS / XS_TIME_FUTURE_MINUTES, validated before any record
    except ValueError as e:
        sys.exit(f"router: {e}")
    if shell == "faust":
        faust.Worker(create_app(settings), loglevel="INFO").execute_from_commandline()
    elif shell == "aiokafka":

        async def serve(stop: asyncio.Event) -> None:
            await consumer.run(settings, stop)

        run_service("router", serve)
    else:
        sys.exit(f"XS_ROUTER_SHELL={shell!r}: use 'aiokafka' or 'faust'")


if __name__ == "__main__":
    main()
