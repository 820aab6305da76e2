"""Kafka's own ceiling measured on the test stack's broker, and py-spy attached to the run's services
(loadtest/ceiling.py, loadtest/profile.py): bounded in records and seconds."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from pathlib import Path

import pytest

from deploy import stack as stack_ctl
from loadtest.ceiling import CeilingError, measure_ceiling
from loadtest.profile import STAGES, StageProfiler, parse_folded
from services.common.config import Settings
from services.common.kafka import make_admin

pytestmark = pytest.mark.integration


async def _scratch_topics(s: Settings) -> list[str]:
    admin = make_admin(s)
    await admin.start()
    try:
        mine = f"{s.topic_prefix}xsettle.bench.ceiling-{os.getpid()}-"
        return [t for t in await admin.list_topics() if t.startswith(mine)]
    finally:
        await admin.close()


async def test_ceiling_on_the_stack_broker(stack: Settings) -> None:
    records = 20_000
    ceiling = await asyncio.to_thread(measure_ceiling, stack, 600, records, 120.0)
    assert (ceiling.records, ceiling.record_bytes) == (records, 600)
    assert ceiling.produce_records_per_s > 0 and ceiling.consume_records_per_s > 0
    assert ceiling.lines[0].startswith(f"Kafka's own tools on this broker ({records:,} records of 600 B")
    assert ceiling.lines[1].startswith("  ProducerPerformance (acks=all")
    assert f"{records:,} records in" in ceiling.lines[2]
    for _ in range(50):  # deleted after the measurement (the metadata may lag the deletion a moment)
        if not await _scratch_topics(stack):
            break
        await asyncio.sleep(0.2)
    assert await _scratch_topics(stack) == []


async def test_ceiling_without_a_broker_says_so(stack: Settings) -> None:
    nowhere = dataclasses.replace(stack, kafka_port=_closed_port())
    with pytest.raises(CeilingError, match=f"Kafka does not answer on 127.0.0.1:{nowhere.kafka_port}"):
        await asyncio.to_thread(measure_ceiling, nowhere, 600, 10, 30.0)


def test_stage_profiles_of_the_running_services(services: Settings, tmp_path: Path) -> None:
    # Mode idle: every thread's samples, so even services without load have stacks to show.
    profiler = StageProfiler(mode="idle", top=3)
    profiler.start(services, tmp_path, seconds=2)
    time.sleep(2.5)  # the load a caller would run meanwhile; py-spy stops itself after 2 s
    lines = profiler.stop()
    assert "2.0 s" in lines[0]
    assert lines[0].startswith("stage profiles (py-spy 100 Hz,") and "mode idle" in lines[0]
    assert (tmp_path / "summary.txt").read_text() == "\n".join(lines) + "\n"
    for stage in STAGES:
        pid = stack_ctl.service_pid(stage, services)
        header = next(line for line in lines if line.startswith(f"  {stage} "))
        assert header.startswith(f"  {stage} (pid {pid}): "), header
        stacks = parse_folded((tmp_path / f"{stage}.folded").read_text())
        assert sum(stacks.values()) > 0
        assert any(f"services/{stage}/__main__.py" in frame for frames in stacks for frame in frames)


def test_stage_profile_of_a_stage_that_is_not_running(services: Settings, tmp_path: Path) -> None:
    stack_ctl.stop_service("monitor", False, services)
    try:
        profiler = StageProfiler(stages=("monitor",))
        profiler.start(services, tmp_path, seconds=1)
        assert profiler.stop()[1:] == ["  monitor: no profile: not running"]
    finally:
        stack_ctl.start_service("monitor", services)


def _closed_port() -> int:
    with socket.socket() as sock:  # bound, never listening: nothing answers there
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
