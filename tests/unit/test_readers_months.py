"""Month arithmetic of the readers: the retention command's months ahead, the batch recomputation's
previous month (both wrap the year)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from deploy.ops import months_ahead
from services.clearing.store import _previous_month


def test_months_ahead_start_at_this_month_and_wrap_the_year() -> None:
    assert months_ahead(datetime(2026, 11, 30, 23, 59, tzinfo=UTC)) == [
        date(2026, 11, 1), date(2026, 12, 1), date(2027, 1, 1), date(2027, 2, 1)]
    assert months_ahead(datetime(2026, 1, 1, tzinfo=UTC), 0) == [date(2026, 1, 1)]


def test_previous_month_wraps_the_year() -> None:
    assert [_previous_month(m) for m in ("2026-01", "2026-03", "2026-12")] == ["2025-12", "2026-02", "2026-11"]
