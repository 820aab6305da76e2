"""Per-request shortcuts of the clearing and monitoring services (issue 14): a poll of local settlements
only asks PostgreSQL for nothing, and the rules' cached properties compute once per object."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from aiokafka.structs import ConsumerRecord

from services.clearing.handler import Positions
from services.common.consumer import Outbox, Record
from services.smartmon.rules import cached_property
from tests.monitoring_events import settle


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
