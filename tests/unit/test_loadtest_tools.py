"""The small measuring tools of loadtest/: what they build and parse (their numbers are for the README)."""

from __future__ import annotations

import random
import sys

import pytest

from loadtest import idle, smartmon_group
from services.smartmon.state import decode_group


def test_smartmon_group_builds_a_group_of_the_asked_size_within_its_window() -> None:
    state = decode_group(smartmon_group.group_of(120, random.Random(1)))
    assert len(state.stays) == 120
    days = sorted({s.dscg_day for s in state.stays.values()})
    assert days[0] == "2026-11-01" and days[-1] < "2026-12-01"  # spread over the 30 days before the new stays


def test_smartmon_group_prints_one_line_per_size(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["smartmon_group", "--sizes", "5,20", "--events", "2"])
    smartmon_group.main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "    5 stays" in lines[1] and "   20 stays" in lines[2]


@pytest.mark.parametrize(("duration", "seconds"), [("2s", 2.0), ("500ms", 0.5), ("1m", 60.0), ("1h", 3600.0)])
def test_idle_reads_prometheus_durations(duration: str, seconds: float) -> None:
    assert idle._seconds(duration) == seconds
