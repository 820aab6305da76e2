"""Run a service until SIGTERM/SIGINT, then let it finish its cleanup."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Final

import uvloop

from services.common.watchdog import loop_watchdog

# While the broker is away aiokafka logs every failed reconnect at ERROR, hundreds of lines a second.
CLIENT_LOGGERS: Final = ("aiokafka",)
REPEAT_PERIOD_S: Final = 10.0


class ClientLogThrottle(logging.Filter):
    """Lets one record of each of the clients' messages through per period, at WARNING at most. A failure
    (WARNING and above) counts by its template, whatever its arguments (the reconnect flood); an INFO record by
    its text, so each group's join and assignment is there to read after a chaos run."""

    def __init__(self, period_s: float = REPEAT_PERIOD_S) -> None:
        super().__init__()
        self.period_s = period_s
        self.last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(CLIENT_LOGGERS):
            return True
        # the template: the same failure with other arguments; INFO: the text (which group joined)
        key = (record.name, record.msg if record.levelno >= logging.WARNING else record.getMessage())
        now = time.monotonic()
        if now - self.last.get(key, -math.inf) < self.period_s:
            return False
        self.last[key] = now
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def run_service(name: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {name} %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(ClientLogThrottle())

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watchdog = asyncio.create_task(loop_watchdog(stop))
        try:
            await main(stop)
        finally:
            watchdog.cancel()

    # uvloop (libuv) instead of asyncio's selector loop: less CPU per callback, socket read and timer,
    # which every service spends on each Kafka fetch and PostgreSQL round trip.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        loop_runner.run(runner())
