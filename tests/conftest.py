"""Shared fixtures, and the test run's own corner of the local stack.

Each pytest run owns its database (`xsettle_t<token>`, created and migrated at the start, dropped
at the end), its topics and consumer groups (prefix `t<token>.`), and its services and Prometheus
(a supervisord of its own under `.state/runs/t<token>/`, on free ports). Kafka and PostgreSQL are
shared. pytest_configure puts the run's settings into the environment before any test module is
imported, so `load_settings()`, the topic catalog and every child process see the same run.

`settings` is the run's Settings; `stack` makes sure Kafka and PostgreSQL run and the run's
database, topics and Prometheus exist (`python -m deploy.stack start --infra-only` under the run's
environment), and tears the run down at the end (XS_KEEP_RUN=1 keeps it for a post-mortem).

A test that restarts the shared Kafka or PostgreSQL asks for `infra_exclusive`: every run holds a
shared lock for its session, and that fixture trades it for the exclusive one, so the restart waits
until no other run is in progress (and other runs wait for it).
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import IO

import pytest

from services.common.config import PROJECT_ROOT, Settings, load_settings

# The suite replays fixed dates (2026 and 2027 stays, clearing months in 2025),
# so the services it starts accept inf_time from 2000 (the static lower bound) to the year 8000.
# The default window (schemas.limits) is tested with a gateway of its own (test_fuzz_gateway.py).
os.environ.setdefault("XS_TIME_PAST_DAYS", str((datetime.now() - datetime(2000, 1, 1)).days + 1))
os.environ.setdefault("XS_TIME_FUTURE_MINUTES", str(int((datetime(8001, 1, 1) - datetime.now()).total_seconds() // 60)))

RUN_PORTS = (
    "XS_GATEWAY_PORT", "XS_GATEWAY_METRICS_PORT", "XS_ROUTER_METRICS_PORT", "XS_SETTLE_METRICS_PORT",
    "XS_MONITOR_METRICS_PORT", "XS_CLEARING_METRICS_PORT", "XS_DASHBOARD_PORT", "XS_PROMETHEUS_PORT",
    "XS_DASHBOARD_METRICS_PORT",
)


def _free_ports(n: int) -> list[int]:
    """n distinct ports the kernel has free on loopback right now."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def run_environment(token: str) -> dict[str, str]:
    shared = load_settings()  # Kafka, PostgreSQL and the state dir from the caller's environment
    env = {
        "XS_TEST_RUN": token,
        "XS_RUN_DIR": str(shared.state_dir.resolve() / "runs" / f"t{token}"),
        "XS_PG_DATABASE": f"xsettle_t{token}",
        "XS_TOPIC_PREFIX": f"t{token}.",
        # The tests replay fixed dates (inf_time 2026-06-01 …): the signature's clock window is off, and
        # test_trust checks it with a router of its own.
        "XS_INF_TIME_WINDOW_S": "0",
    }
    env.update(zip(RUN_PORTS, map(str, _free_ports(len(RUN_PORTS))), strict=True))
    return env


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("XS_TEST_RUN"):
        return  # a pytest started inside a run (or by hand with a run's environment) keeps that run
    token = f"{os.getpid() % 100_000:05d}{time.time_ns() // 10**6 % 100_000:05d}"
    os.environ.update(run_environment(token))


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def infra_share(settings: Settings) -> Iterator[IO[str]]:
    """This run's shared hold on Kafka and PostgreSQL (see infra_exclusive)."""
    path = settings.state_dir / "run" / "infra-tests.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield lock


@pytest.fixture
def infra_exclusive(infra_share: IO[str]) -> Iterator[None]:
    """For a test that restarts the shared Kafka or PostgreSQL: waits until no other test run holds them
    (mark such a test with a timeout long enough for another run to finish)."""
    fcntl.flock(infra_share, fcntl.LOCK_UN)  # two runs waiting here must not hold each other's share
    fcntl.flock(infra_share, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(infra_share, fcntl.LOCK_SH)


@pytest.fixture(scope="session")
def stack(settings: Settings, infra_share: IO[str]) -> Iterator[Settings]:
    res = subprocess.run(
        [sys.executable, "-m", "deploy.stack", "start", "--infra-only"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if res.returncode != 0:
        pytest.fail(f"local stack did not start:\n{res.stdout}\n{res.stderr}", pytrace=False)
    yield settings
    if not os.environ.get("XS_KEEP_RUN"):
        from deploy.stack import teardown_run

        teardown_run(settings)
