"""Watchdogs that end a process which stopped working, so that its supervisor starts it afresh.

Two ways a service has been seen to stop without dying (README, Failures: "A service that stops without
dying"), each with its own check:

- **A consumer group that no longer moves.** After a broker restart an aiokafka consumer can stay alive
  without ever rejoining its group or fetching again (aio-libs/aiokafka#1154), and faust's stream can stall
  on some partitions after a rebalance. `ProgressWatchdog` asks the broker — not the stuck client — for the
  group's committed offsets and the partitions' ends: records waiting on a partition whose committed offset
  has not moved for `stall_s` mean the group is stuck. The process exits; static membership gets the
  restarted process its partitions back at once, and every stage is idempotent, so the replay changes nothing.
- **An event loop that no longer runs.** `loop_watchdog` re-arms `faulthandler.dump_traceback_later` every
  few seconds; a loop blocked for `timeout_s` gets every thread's stack dumped into the service's log (what
  one needs to find the cause) and the process ended.

A process that waits on purpose — its shell retrying a database that is down — says so through `exempt`,
and is left alone while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.common.config import Settings
from services.common.kafka import client_auth, make_admin

log = logging.getLogger("watchdog")

# The exit status of a process the watchdog ends (EX_SOFTWARE): supervisord restarts it (autorestart=true).
EXIT_STALLED: Final = 70
CHECK_EVERY_S: Final = 10.0
LOOP_TIMEOUT_S: Final = 60.0
LOOP_REARM_S: Final = 5.0
PARTITIONS_EVERY_S: Final = 600.0
# faulthandler writes to a file descriptor; the descriptor itself, since faust (mode) replaces sys.stderr
# with a logging proxy that has none. supervisord sends it to the service's log.
STDERR_FD: Final = 2

TP = tuple[str, int]


@dataclass
class Progress:
    """Per partition, the committed offset last seen and since when it has been the same (pure)."""

    stall_s: float
    seen: dict[TP, tuple[int, float]] = field(default_factory=dict)

    def update(self, committed: Mapping[TP, int], begin: Mapping[TP, int], end: Mapping[TP, int],
               now: float) -> list[TP]:
        """Record one look at the group; the partitions with records waiting behind a committed offset that
        has not moved for `stall_s` (a partition never committed counts from its log start)."""
        stalled = []
        for tp, last in end.items():
            offset = committed.get(tp, -1)
            if offset < 0:
                offset = begin.get(tp, 0)
            previous = self.seen.get(tp)
            if previous is None or previous[0] != offset or offset >= last:
                self.seen[tp] = (offset, now)  # moved, new, or caught up: the clock starts again
                continue
            if now - previous[1] >= self.stall_s:
                stalled.append(tp)
        return stalled

    def restart_clock(self, now: float) -> None:
        """While the process waits on purpose nothing it holds counts as stalled."""
        self.seen = {tp: (offset, now) for tp, (offset, _) in self.seen.items()}


def task_stacks() -> list[str]:
    """Where each task of the running loop waits: its coroutine's suspended frame (a stuck await shows here,
    not in a thread's stack). Code locations only, no values."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no running loop
        return []
    out = []
    for task in sorted(tasks, key=lambda t: t.get_name()):
        where = " ".join(f"{f.f_code.co_name} ({os.path.basename(f.f_code.co_filename)}:{f.f_lineno})"
                         for f in task.get_stack())
        out.append(f"task {task.get_name()}: {where or 'running'}")
    return out


def exit_for_restart(reason: str) -> None:
    """Log why, where every task waits and every thread's stack (the stuck client's state), and end the
    process at once: a clean stop could wait on the very client that is stuck."""
    log.error("%s; exiting (status %d) for the supervisor to start this service afresh", reason, EXIT_STALLED)
    for line in task_stacks():
        log.error("  %s", line)
    faulthandler.dump_traceback(file=STDERR_FD, all_threads=True)
    logging.shutdown()
    os._exit(EXIT_STALLED)


class ProgressWatchdog:
    """Watches consumer groups of one process through the broker (one admin client and one offsets reader,
    shared by every group the process watches)."""

    def __init__(self, s: Settings, principal: str, *, stall_s: float | None = None,
                 check_every_s: float = CHECK_EVERY_S,
                 on_stall: Callable[[str], None] = exit_for_restart) -> None:
        self.s = s
        self.principal = principal
        self.stall_s = float(s.watchdog_stall_s if stall_s is None else stall_s)
        self.check_every_s = check_every_s
        self.on_stall = on_stall
        self._clients: tuple[AIOKafkaAdminClient, AIOKafkaConsumer] | None = None
        self._starting = asyncio.Lock()
        self._partitions_seen: dict[tuple[str, ...], tuple[list[TopicPartition], float]] = {}

    async def _started(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        async with self._starting:
            if self._clients is None:
                admin = make_admin(self.s, self.principal, request_timeout_ms=10_000)
                offsets = AIOKafkaConsumer(bootstrap_servers=self.s.kafka_bootstrap, enable_auto_commit=False,
                                           isolation_level="read_committed", request_timeout_ms=10_000,
                                           **client_auth(self.s, self.principal))
                await admin.start()
                try:
                    await offsets.start()
                except BaseException:
                    await admin.close()
                    raise
                self._clients = (admin, offsets)
            return self._clients

    async def _partitions(self, admin: AIOKafkaAdminClient, topics: tuple[str, ...]) -> list[TopicPartition]:
        """The topics' partitions, described again every PARTITIONS_EVERY_S (they change only when an
        operator adds some): each look costs the broker three requests, not four."""
        known = self._partitions_seen.get(topics)
        if known is None or time.monotonic() - known[1] >= PARTITIONS_EVERY_S:
            tps = [TopicPartition(meta["topic"], p["partition"]) for meta in await admin.describe_topics(list(topics))
                   if meta["error_code"] == 0 for p in meta["partitions"]]
            if not tps:  # not described (yet): ask again at the next look rather than watching nothing for long
                return tps
            known = (tps, time.monotonic())
            self._partitions_seen[topics] = known
        return known[0]

    async def look(self, group_id: str, topics: Iterable[str]
                   ) -> tuple[dict[TP, int], dict[TP, int], dict[TP, int]]:
        """The group's committed offsets, the topics' (last stable) ends, and the log starts of the partitions
        the group never committed on — from the broker."""
        admin, offsets = await self._started()
        tps = await self._partitions(admin, tuple(topics))
        end = {(tp.topic, tp.partition): o for tp, o in (await offsets.end_offsets(tps)).items()}
        committed = {(tp.topic, tp.partition): om.offset
                     for tp, om in (await admin.list_consumer_group_offsets(group_id, partitions=tps)).items()}
        never = [tp for tp in tps if committed.get((tp.topic, tp.partition), -1) < 0]
        begin: dict[TP, int] = {}
        if never:
            begin = {(tp.topic, tp.partition): o for tp, o in (await offsets.beginning_offsets(never)).items()}
        return committed, begin, end

    async def guard(self, group_id: str, topics: list[str], stop: asyncio.Event,
                    exempt: Callable[[], bool] = lambda: False) -> None:
        """Until `stop`: look at the group (named as make_group_consumer names it: without the deployment's
        prefix) every `check_every_s`; `on_stall` once it is stuck. A look that fails (the broker away)
        proves nothing either way and is tried again."""
        full_group_id = self.s.topic_prefix + group_id
        progress = Progress(self.stall_s)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.check_every_s)
                return
            except TimeoutError:
                pass
            try:
                committed, begin, end = await self.look(full_group_id, topics)
            except Exception as e:
                log.debug("watchdog look at %s failed (%s)", group_id, type(e).__name__)
                continue
            now = time.monotonic()
            if exempt():
                progress.restart_clock(now)
                continue
            stalled = progress.update(committed, begin, end, now)
            if stalled:
                waiting = sum(end[tp] - max(committed.get(tp, -1), begin.get(tp, 0)) for tp in stalled)
                self.on_stall(f"consumer group {group_id}: {len(stalled)} "
                              f"partition(s) with {waiting} record(s) waiting and no committed progress for "
                              f"{self.stall_s:.0f} s")
                return

    async def close(self) -> None:
        if self._clients is not None:
            admin, offsets = self._clients
            self._clients = None
            await offsets.stop()
            await admin.close()


async def loop_watchdog(stop: asyncio.Event, timeout_s: float = LOOP_TIMEOUT_S,
                        rearm_s: float = LOOP_REARM_S) -> None:
    """Until `stop`: a loop that does not come back here within `timeout_s` gets the process's stacks dumped
    and the process ended (faulthandler's timer runs in its own thread, so it fires while the loop is stuck)."""
    try:
        while not stop.is_set():
            faulthandler.dump_traceback_later(timeout_s, exit=True, file=STDERR_FD)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rearm_s)
    finally:
        faulthandler.cancel_dump_traceback_later()
