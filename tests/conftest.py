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
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pytest

from services.common.config import PROJECT_ROOT, Settings, load_settings

if TYPE_CHECKING:
    from tests import privacy

# The suite replays fixed dates (2026 and 2027 stays, clearing months in 2025),
# so the services it starts accept inf_time from 2000 (the static lower bound) to the year 8000.
# The default window (schemas.limits) is tested with a gateway of its own (test_fuzz_gateway.py).
os.environ.setdefault("XS_TIME_PAST_DAYS", str((datetime.now() - datetime(2000, 1, 1)).days + 1))
os.environ.setdefault("XS_TIME_FUTURE_MINUTES", str(int((datetime(8001, 1, 1) - datetime.now()).total_seconds() // 60)))

RUN_PORTS = (
    "XS_GATEWAY_PORT", "XS_GATEWAY_METRICS_PORT", "XS_SETTLE_METRICS_PORT",
    "XS_MONITOR_METRICS_PORT", "XS_CLEARING_METRICS_PORT", "XS_DASHBOARD_PORT", "XS_PROMETHEUS_PORT",
    "XS_DASHBOARD_METRICS_PORT", "XS_SMARTMON_METRICS_PORT",
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


PRIVACY_SUMMARY = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if PRIVACY_SUMMARY in config.stash:
        terminalreporter.write_line(config.stash[PRIVACY_SUMMARY])


@pytest.fixture(scope="session")
def stack(settings: Settings, infra_share: IO[str], request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The run's stack; at its end, after the teardown, the privacy log scan (tests/privacy.py) of every
    log the session wrote — a finding fails the session."""
    from tests import privacy

    shared_logs = settings.state_dir / "logs"
    shared_sizes = privacy.log_sizes(shared_logs)
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
    population = _test_population(settings, tmp_path_factory.getbasetemp())  # before the databases go
    if not os.environ.get("XS_KEEP_RUN"):
        from deploy.stack import teardown_run

        teardown_run(settings)  # the services stop: their last lines are written
    report = privacy.scan(privacy.session_logs(settings.run_dir, shared_logs, shared_sizes), population)
    request.config.stash[PRIVACY_SUMMARY] = report.summary(population)  # printed at the end of the session
    if report.findings:
        pytest.fail("personal identifiers in the logs (never echoed here):\n"
                    + "\n".join(map(str, report.findings[:200])), pytrace=False)
    if not report.files or not report.bytes or not len(population):
        pytest.fail(f"the privacy log scan would pass vacuously: {report.summary(population)}", pytrace=False)


def _test_population(s: Settings, basetemp: Path) -> privacy.Population:
    """Every person the session's tests used: conftest's PERSONS, the persons files they wrote, and the
    persons in the run's shards (loaded by fixtures and tools from files that are gone)."""
    import asyncpg

    from deploy.common import _run_async
    from services.common.shards import shard_dsns
    from tests import privacy

    population = privacy.Population()
    integration = sys.modules.get("tests.integration.conftest")
    for spec in getattr(integration, "PERSONS", {}).values():
        population.add_person(spec.person.psn_no, spec.certno, None)
    for path in sorted(basetemp.rglob("persons.jsonl")):
        population.add_persons_file(path)

    async def from_shards() -> None:
        for dsn in shard_dsns(s).values():
            try:
                conn = await asyncpg.connect(dsn, timeout=10)
            except (OSError, asyncpg.PostgresError):
                continue  # a shard that was never created holds nobody
            try:
                for r in await conn.fetch("SELECT psn_no, certno, psn_name FROM person"):
                    population.add_person(r["psn_no"], r["certno"], r["psn_name"])
            finally:
                await conn.close()

    _run_async(from_shards())
    return population
