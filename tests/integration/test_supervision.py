"""The run's services under supervisord: a crash is repaired by the manager itself, and each run's
services are its own (ports, database, topic prefix)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

from deploy import stack as stack_ctl
from deploy.db import SERVICE_ROLES
from deploy.services import SupervisorPaths
from services.common.config import Settings, settings_env

pytestmark = pytest.mark.integration


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)


async def test_a_service_killed_with_sigkill_is_restarted_by_the_manager(services: Settings) -> None:
    old = stack_ctl.service_pid("clearing", services)
    assert old is not None
    os.kill(old, signal.SIGKILL)  # behind the stack's back: only supervisord can bring it back
    deadline = time.monotonic() + 30
    while (new := stack_ctl.service_pid("clearing", services)) in (None, old) or not stack_ctl.is_healthy(
            "clearing", services):
        assert time.monotonic() < deadline, "supervisord did not restart the killed clearing service"
        await asyncio.sleep(0.2)
    assert new != old
    log = SupervisorPaths.of(services).log("supervisord").read_text()
    assert "exited: clearing (terminated by SIGKILL; not expected)" in log


def test_restart_service_kill_returns_the_new_answering_pid(services: Settings) -> None:
    old = stack_ctl.service_pid("monitor", services)
    new = stack_ctl.restart_service("monitor", services, kill=True)
    assert old is not None and new != old
    assert stack_ctl.service_pid("monitor", services) == new and stack_ctl.is_healthy("monitor", services)


def test_stop_service_keeps_it_stopped_until_started(services: Settings) -> None:
    assert stack_ctl.stop_service("dashboard", kill=True, settings=services)
    time.sleep(3)  # longer than supervisord's restart of a crashed program takes
    assert not stack_ctl.is_running("dashboard", services)
    pid = stack_ctl.start_service("dashboard", services)
    assert stack_ctl.service_pid("dashboard", services) == pid


def test_the_runs_services_use_its_own_settings(services: Settings) -> None:
    assert services.pg_database.startswith("xsettle_t") and services.topic_prefix.startswith("t")
    assert services.run_dir != services.state_dir
    for name in ("settle", "gateway", "clearing", "monitor", "dashboard"):
        # Each service connects to PostgreSQL as its own role (the gateway has no database code).
        wanted = {**settings_env(services), "XS_PG_USER": SERVICE_ROLES.get(name, services.pg_user)}
        pid = stack_ctl.service_pid(name, services)
        assert pid is not None, name
        env = _environ(pid)
        assert {k: env.get(k) for k in wanted} == wanted, name


def test_restart_service_with_a_changed_setting_restarts_that_service_only(services: Settings) -> None:
    names = ("settle", "gateway", "clearing", "monitor", "dashboard", "smartmon")
    before = {name: stack_ctl.service_pid(name, services) for name in names}
    changed = dataclasses.replace(services, request_gather_ms=services.request_gather_ms + 7)
    try:
        new = stack_ctl.restart_service("monitor", changed)
        assert new != before["monitor"]
        assert _environ(new)["XS_REQUEST_GATHER_MS"] == str(changed.request_gather_ms)
        for name in names:
            if name != "monitor":
                pid = stack_ctl.service_pid(name, services)
                assert pid is not None and pid == before[name], f"{name} was restarted too"
                assert _environ(pid)["XS_REQUEST_GATHER_MS"] == str(services.request_gather_ms), name
    finally:
        stack_ctl.restart_service("monitor", services)
    assert _environ(stack_ctl.service_pid("monitor", services) or 0)["XS_REQUEST_GATHER_MS"] == str(
        services.request_gather_ms)
