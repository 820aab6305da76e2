"""The gateway's reply reader: its fetch waits up to REPLY_FETCH_WAIT_MS at the broker when no reply comes (it
only bounds the idle polling), and a reply must end that wait at once. After a quiet spell, when the reader's
fetch is parked at the broker, requests sent one at a time are each answered well within the wait."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from loadtest.his import GatewayClient
from services.gateway.app import REPLY_FETCH_WAIT_MS
from tests.integration.conftest import HOSPITALS

pytestmark = pytest.mark.integration
# A little longer than one idle fetch: the next one has just started waiting at the broker, so a reply that had
# to wait for the fetch's time limit would take most of REPLY_FETCH_WAIT_MS.
QUIET_S = 1.1 * REPLY_FETCH_WAIT_MS / 1000


def unknown_person_lookup() -> dict[str, Any]:
    # Answered by the router (PERSON_UNKNOWN) through fsi.replies, like every answer the gateway waits for.
    return HOSPITALS["chifeng"].envelope("1101", {"data": {"mdtrt_cert_type": "02",
                                                          "mdtrt_cert_no": "000000000000000000"}})


async def test_a_reply_ends_the_readers_idle_fetch_wait(refdata: dict, gateway: GatewayClient) -> None:
    first = await gateway.call(unknown_person_lookup())  # the connection and the sign-in session, once
    assert first["infcode"] == -1 and first["err_msg"].startswith("PERSON_UNKNOWN: "), first
    took = []
    for _ in range(5):
        await asyncio.sleep(QUIET_S)
        started = time.monotonic()
        r = await gateway.call(unknown_person_lookup())
        took.append(time.monotonic() - started)
        assert r["infcode"] == -1 and r["err_msg"].startswith("PERSON_UNKNOWN: "), r
    # The median of five stays clear of a busy machine's outliers (an answer takes tens of milliseconds).
    assert sorted(took)[2] < REPLY_FETCH_WAIT_MS / 1000 / 4, took
