"""A gateway timeout answers TIMEOUT while the transaction may still complete; resending the same msgid
returns the stored result. Runs a second gateway instance (its own reply partition) with a short timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import stack as stack_ctl
from loadtest.his import GatewayClient, Stay
from services.common.config import GATEWAY_PATH, PROJECT_ROOT, Settings
from services.common.tls import client_session
from tests.integration.conftest import HOSPITALS, PERSONS, STAY_START

pytestmark = pytest.mark.integration
PORT, METRICS_PORT = 18081, 19181


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture
def short_timeout_gateway(services: Settings, tmp_path: os.PathLike[str]) -> Iterator[str]:
    env = {**os.environ, "XS_GATEWAY_INSTANCE": "1", "XS_GATEWAY_PORT": str(PORT),
           "XS_GATEWAY_METRICS_PORT": str(METRICS_PORT), "XS_GATEWAY_TIMEOUT_MS": "300"}
    log = open(f"{tmp_path}/gateway1.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=PROJECT_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _answers(METRICS_PORT):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-2000:]
                raise AssertionError(f"second gateway did not start: {tail}")
            time.sleep(0.2)
        yield f"{services.http_scheme}://127.0.0.1:{PORT}{GATEWAY_PATH}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def test_timeout_then_resend_returns_the_stored_result(refdata: dict, services: Settings,
                                                             short_timeout_gateway: str) -> None:
    p = PERSONS["plain"].person
    stay = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype, STAY_START.replace(month=11))
    admission = stay.admit()
    stack_ctl.stop_service("settle", kill=True, settings=services)  # nobody routes or answers
    try:
        async with client_session(services) as session:
            client = GatewayClient(short_timeout_gateway, session)
            first = await client.call(admission)
            assert first["infcode"] == -1 and first["err_msg"].startswith("TIMEOUT: "), first
            stack_ctl.start_service("settle", services)
            client.retry_for_s = 60
            answered = await client.call(admission)  # same msgid
            assert answered["infcode"] == 0, answered["err_msg"]
            again = await client.call(admission)
            assert again == answered  # the stored result, byte for byte
            stay.mdtrt_id = answered["output"]["result"]["mdtrt_id"]
            discharged = await client.call(stay.discharge())  # one visit was created, and it is usable
            assert discharged["infcode"] == 0, discharged["err_msg"]
    finally:
        stack_ctl.start_service("settle", services)
