"""The gateway during a broker outage: it answers TIMEOUT within its time limit (the produce counts inside
it), reports not-ready on GET /health/ready, still refuses bad input at once, and recovers by itself when
the broker returns. Runs a gateway of its own (instance 2, 2 s limit) with the default clock window, which
is checked here too (the suite's services run with a wide one: tests/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy import stack as stack_ctl
from loadtest.his import GatewayClient
from services.common.config import GATEWAY_PATH, PROJECT_ROOT, Settings
from services.common.tls import client_session, client_ssl_context
from tests.integration.conftest import HOSPITALS, PERSONS

pytestmark = pytest.mark.integration
TIMEOUT_MS = 2000
SLACK_S = 1.0  # HTTP and scheduling on a busy 2-core machine
READY_PATH = "/health/ready"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _ready_status(session: aiohttp.ClientSession, base: str) -> int:
    try:
        async with session.get(base + READY_PATH, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return resp.status
    except (aiohttp.ClientError, OSError, TimeoutError):
        return 0


async def _wait_ready_status(session: aiohttp.ClientSession, base: str, status: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    last = await _ready_status(session, base)
    while last != status and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        last = await _ready_status(session, base)
    assert last == status, f"{READY_PATH} answered {last}, expected {status} within {within_s} s"


def _ready_now(s: Settings, base: str) -> bool:
    try:
        context = None if s.plain_http else client_ssl_context(s)
        with urllib.request.urlopen(base + READY_PATH, timeout=3, context=context) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture
def own_gateway(services: Settings, tmp_path: Path) -> Iterator[str]:
    """A second gateway (its own reply partition) with a 2 s limit and the default clock window."""
    port, metrics_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XS_TIME_")}
    env.update(XS_GATEWAY_INSTANCE="2", XS_GATEWAY_PORT=str(port), XS_GATEWAY_METRICS_PORT=str(metrics_port),
               XS_GATEWAY_TIMEOUT_MS=str(TIMEOUT_MS))
    log_path = tmp_path / "gateway2.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=PROJECT_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"{services.http_scheme}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _ready_now(services, base):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway 2 did not start: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def _query(at: datetime | None = None) -> dict[str, Any]:
    """5301 (a person's filings): answered by the router, so it crosses Kafka both ways."""
    p = PERSONS["info"].person
    return HOSPITALS["chifeng"].envelope("5301", {"data": {"psn_no": p.psn_no}}, insuplc=p.insuplc, inf_time=at)


async def _timed(client: GatewayClient, request: dict[str, Any] | bytes) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    answer = await client.call(request)
    return answer, time.monotonic() - started


async def test_default_clock_window_refuses_implausible_settlement_dates(refdata: dict, services: Settings,
                                                                        own_gateway: str) -> None:
    async with client_session(services) as session:
        client = GatewayClient(own_gateway + GATEWAY_PATH, session, retry_for_s=30)
        assert (await client.call(_query()))["infcode"] == 0
        for at in (datetime(2100, 1, 1), datetime(1970, 1, 1, 8), datetime.now().replace(year=2024)):
            answer = await client.call(_query(at))
            assert answer["infcode"] == -1 and answer["err_msg"].startswith("ENVELOPE_MALFORMED: "), answer
            assert "`$.inf_time`" in answer["err_msg"], answer["err_msg"]


async def test_broker_outage_answers_timeout_in_time_and_recovers(refdata: dict, services: Settings,
                                                                  own_gateway: str) -> None:
    async with client_session(services) as session:
        client = GatewayClient(own_gateway + GATEWAY_PATH, session, retry_for_s=30)
        assert (await client.call(_query()))["infcode"] == 0
        client.retry_for_s = 0
        stack_ctl.stop_kafka(services)
        try:
            for answer, elapsed in await asyncio.gather(*(_timed(client, _query()) for _ in range(5))):
                assert answer["infcode"] == -1 and answer["err_msg"].startswith("TIMEOUT: "), answer
                assert elapsed < TIMEOUT_MS / 1000 + SLACK_S, f"answered after {elapsed:.1f} s"
            refused, elapsed = await _timed(client, b'{"infno": "2401", "input": ' + b"[" * 1000)
            assert refused["err_msg"].startswith("ENVELOPE_MALFORMED: ") and elapsed < SLACK_S, (refused, elapsed)
            await _wait_ready_status(session, own_gateway, 503, 15)
        finally:
            stack_ctl.start_kafka(services)
        await _wait_ready_status(session, own_gateway, 200, 60)
        client.retry_for_s = 60  # the router reconnects too; a careful HIS resends
        answer = await client.call(_query())
        assert answer["infcode"] == 0, answer["err_msg"]
