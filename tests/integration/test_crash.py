"""Kill -9 a stream processor mid-stream: no accepted settlement is lost or applied twice.

Hospitals behave as the national interface expects after a timeout: they resend
the same msgid until answered. Afterwards the ledger must hold exactly one
settlement per settled stay, one reversal per reversed one, and every person's
accumulators and account must equal the sums of their ledger rows.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import pytest

from deploy import stack as stack_ctl
from loadtest.his import FeeLine, GatewayClient, Stay
from services.common.config import Settings
from services.common.tls import client_session
from tests.integration.conftest import HOSPITALS, ITEM_A, ITEM_B10, PERSONS, STAY_START, Ledger

pytestmark = pytest.mark.integration
D = Decimal
CRASH_PERSONS = [PERSONS[f"crash{i}"][0] for i in range(40)]
ROUNDS = 3


async def _drive(s: Settings, day0: int) -> tuple[list[tuple[Stay, dict, bool]], int]:
    """ROUNDS stays per person, persons in parallel; every 4th stay is reversed after settling.
    Returns the results and how many times the HIS had to resend."""
    results: list[tuple[Stay, dict, bool]] = []

    async with client_session(s) as session:
        client = GatewayClient(s.gateway_url, session, retry_for_s=90)

        async def person_stays(i: int) -> None:
            p = CRASH_PERSONS[i]
            for k in range(ROUNDS):
                stay = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype,
                            STAY_START + timedelta(days=day0 + k * 5), use_account=True)
                reverse = (i + k) % 4 == 0
                lines = [FeeLine(ITEM_A, D(3), D("210.50")), FeeLine(ITEM_B10, D(1), D("333.33"))]
                r = await client.run_stay(stay, lines, reverse=reverse)
                results.append((stay, r, reverse))

        await asyncio.gather(*(person_stays(i) for i in range(len(CRASH_PERSONS))))
        return results, client.retries


async def _kill_and_restart(s: Settings, name: str, after_s: float, drive: asyncio.Task) -> bool:
    """Kill `name` after `after_s`, start it again; returns whether `drive` was running at the kill."""
    await asyncio.sleep(after_s)
    running_at_kill = not drive.done()
    stopped = await asyncio.to_thread(stack_ctl.stop_service, name, True, s)
    assert stopped
    await asyncio.sleep(0.5)
    await asyncio.to_thread(stack_ctl.start_service, name, s)
    return running_at_kill


async def _assert_ledger_consistent(ledger: Ledger, results: list[tuple[Stay, dict, bool]]) -> None:
    for stay, r, reverse in results:
        assert r["infcode"] == 0, r["err_msg"]
        rows = await ledger.fetch("SELECT kind FROM settlement WHERE mdtrt_id = $1 ORDER BY kind", stay.mdtrt_id)
        assert [x["kind"] for x in rows] == (["reverse", "settle"] if reverse else ["settle"]), stay.mdtrt_id
    visits = await ledger.total(
        "SELECT count(*) FROM visit WHERE mdtrt_id = ANY($1)", [stay.mdtrt_id for stay, _, _ in results]
    )
    assert visits == len(results)
    persons = [p.psn_no for p in CRASH_PERSONS]
    mismatched = await ledger.fetch(
        """
        SELECT a.psn_no FROM accumulator a
        LEFT JOIN (SELECT psn_no, acc_year, sum(hifp_pay) AS hifp, sum((accum_delta->>'supplementary_paid')::bigint)
                   AS supp FROM settlement GROUP BY psn_no, acc_year) s USING (psn_no, acc_year)
        WHERE a.psn_no = ANY($1)
          AND (a.basic_paid <> coalesce(s.hifp, 0) OR a.supplementary_paid <> coalesce(s.supp, 0))
        """,
        persons,
    )
    assert mismatched == []
    accounts = await ledger.fetch(
        """
        SELECT p.psn_no, p.acct_balc_fen - coalesce(sum(s.acct_pay), 0) AS expected, a.balc_fen
        FROM person p JOIN account a USING (psn_no) LEFT JOIN settlement s USING (psn_no)
        WHERE p.psn_no = ANY($1) GROUP BY p.psn_no, p.acct_balc_fen, a.balc_fen
        """,
        persons,
    )
    assert len(accounts) == len(persons)
    assert all(row["expected"] == row["balc_fen"] for row in accounts)


# The settlement stage (routing and settling in one process) killed at two moments of the stream: among the
# first admissions, and when many stays are further on.
@pytest.mark.parametrize(("victim", "day0", "after_s"), [("settle", 100, 0.4), ("settle", 140, 0.15)])
async def test_kill_processor_mid_stream(refdata: dict, services: Settings, ledger: Ledger, victim: str,
                                         day0: int, after_s: float) -> None:
    drive = asyncio.create_task(_drive(services, day0))
    hit_in_flight = await _kill_and_restart(services, victim, after_s, drive)
    # Every person's stays are sequential without pause: while the drive runs, each has a request in
    # flight. With static group membership the restarted process resumes before the gateway's timeout,
    # so the hospitals need not resend (resends > 0 says the same on a slower restart).
    results, resends = await asyncio.wait_for(drive, timeout=180)
    assert hit_in_flight or resends > 0, "the kill hit no request in flight: the test proved nothing"
    assert len(results) == len(CRASH_PERSONS) * ROUNDS
    await _assert_ledger_consistent(ledger, results)
