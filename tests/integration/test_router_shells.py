"""Both router shells route the same way: the faust-streaming agent, selectable, settles a stay too."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest

from deploy import stack as stack_ctl
from loadtest.his import FeeLine, GatewayClient, Stay
from services.common.config import Settings
from tests.integration.conftest import HOSPITALS, ITEM_A, PERSONS, STAY_START

pytestmark = pytest.mark.integration


async def test_faust_shell_routes_a_stay(refdata: dict, gateway: GatewayClient, services: Settings,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XS_ROUTER_SHELL", "faust")
    stack_ctl.restart_service("router", services)
    try:
        gateway.retry_for_s = 60  # the faust worker joins the group after its start-up
        p = PERSONS["plain"].person
        stay = Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype, STAY_START.replace(month=10))
        r = await gateway.run_stay(stay, [FeeLine(ITEM_A, Decimal(2), Decimal("150.00"))])
        assert r["infcode"] == 0, r["err_msg"]
        assert r["output"]["setlinfo"]["medfee_sumamt"] == Decimal(300)
        log = (services.run_dir / "logs" / "router.log").read_text(errors="replace")
        assert "faust" in log.lower()
    finally:
        monkeypatch.delenv("XS_ROUTER_SHELL")
        assert "XS_ROUTER_SHELL" not in os.environ
        stack_ctl.restart_service("router", services)
