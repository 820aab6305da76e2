"""Per-request shortcuts of the clearing and monitoring services (issue 14): a poll of local settlements
only asks PostgreSQL for nothing, the rules' cached properties compute once per object, and clearing decodes
only its own fields of a settlement event."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

import msgspec
import pytest
from aiokafka.structs import ConsumerRecord

from schemas.event_views import ClearingEventView
from services.clearing.handler import Positions
from services.clearing.store import JudgementRow, row_from_event
from services.common.consumer import Outbox, Record
from services.smartmon.rules import cached_property
from tests.monitoring_events import drug, settle


class _NoDatabase:
    """A pool that fails the test if anything acquires a connection."""

    def acquire(self) -> Any:
        raise AssertionError("a poll of local settlements acquired a PostgreSQL connection")


def _record(value: Any) -> Record[Any]:
    raw = ConsumerRecord(topic="fsi.settlements", partition=0, offset=0, timestamp=0, timestamp_type=0, key=None,
                         value=b"{}", checksum=None, serialized_key_size=0, serialized_value_size=2, headers=())
    return Record(raw, value)


def test_a_poll_of_local_settlements_only_opens_no_transaction() -> None:
    local = [msgspec.structs.replace(settle(f"s-local-{i}", "mon001"), scope="local") for i in range(3)]
    outbox = Outbox("clearing")
    asyncio.run(Positions(_NoDatabase()).process([_record(ev) for ev in local], outbox))
    assert outbox.records == []


def test_a_poll_with_a_non_local_settlement_still_writes() -> None:
    ev = settle("s-remote-1", "mon001", hospital="H15040000001")
    assert ev.scope != "local"
    with pytest.raises(AssertionError, match="acquired a PostgreSQL connection"):
        asyncio.run(Positions(_NoDatabase()).process([_record(ev)], Outbox("clearing")))


@dataclass(frozen=True)
class _Counted:
    calls: list[int]

    @cached_property
    def value(self) -> int:
        self.calls.append(1)
        return 42


def test_cached_property_computes_once_per_object_even_on_a_frozen_dataclass() -> None:
    calls: list[int] = []
    a, b = _Counted(calls), _Counted(calls)
    assert (a.value, a.value, b.value, b.value) == (42, 42, 42, 42)
    assert len(calls) == 2
    assert isinstance(_Counted.value, cached_property)


def test_clearing_decodes_only_the_ledger_rows_fields_and_makes_the_same_row() -> None:
    ev = settle("s-view-1", "mon001", hospital="H15040000001", items=[drug("XA10BA02", "2026-03-02", 2, 6000)])
    raw = msgspec.json.encode(ev)
    view = Positions.decoder(raw)
    assert isinstance(view, ClearingEventView)
    assert not hasattr(view, "psn_no") and not hasattr(view, "visit")  # no person identifier, no facts
    row = row_from_event(view)
    assert (row.setl_id, row.kind, row.scope, row.insured_admdvs, row.treating_admdvs, row.treating_prov) == (
        "s-view-1", "settle", "cross_province", "320100", "150400", "150000")
    assert (row.amounts.medfee_sumamt, row.amounts.hifp_pay, row.amounts.fund_pay_sumamt) == (100_000, 50_000, 50_000)
    # What the full type refuses in these fields, the view refuses alike (dead-lettered by the shell).
    for bad in (raw.replace(b'"kind":"settle"', b'"kind":"refund"'),
                raw.replace(b'"hifp_pay":50000', b'"hifp_pay":"x"')):
        assert bad != raw
        with pytest.raises(msgspec.ValidationError):
            Positions.decoder(bad)


def test_a_judgement_rows_values_are_its_fields_in_order_and_not_copies() -> None:
    row = JudgementRow(
        jr_id="0" * 32, rule_id="PHARMACY_OVERSUPPLY", rule_version=1, severity="high", psn_no="mon001",
        insured_admdvs="320100", insured_prov="320000", treating_admdvs="150400", treating_prov="150000",
        fixmedins_code="P15040000001", mdtrt_ids=["v-1"], setl_ids=["s-1", "s-0"], items=["XA10BA02"],
        window_begin=date(2026, 3, 1), window_end=date(2026, 3, 30), suspect_amt=5000, detail="drug XA10BA02")
    values = row.values()
    assert values == list(asdict(row).values())  # the upsert's parameter order: the dataclass's fields
    assert values[11] is row.setl_ids
