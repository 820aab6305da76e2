"""What a request may contain, beyond its types: the bounds storage and the ledger rely on.

Checked at decode time (`schemas.codec.decode_request`), so the gateway and the router refuse
the same things. Errors name the field by its JSON path, never its value (it may be personal).

- Text: no C0 control character (NUL included), no DEL, no lone surrogate, in any string.
- Nesting: at most NESTING_MAX levels of JSON arrays/objects in a request.
- Dates: a wire date-time between DATE_MIN and DATE_MAX always; the envelope's `inf_time`
  within the clock window (Settings: XS_TIME_PAST_DAYS back, XS_TIME_FUTURE_MINUTES ahead of now,
  Asia/Shanghai; set by each service at start with `set_clock_window`);
  visit and fee times within EVENT_BEFORE_INF back and EVENT_AFTER_INF ahead of `inf_time`;
  a filing starting within FILING_START_FROM_INF of `inf_time` and lasting at most FILING_DAYS_MAX.
Amount bounds live in `schemas.money`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgspec

SHANGHAI: Final = ZoneInfo("Asia/Shanghai")

# JSON arrays/objects inside each other; the deepest valid request (an envelope, its input, a list
# of fee items, an item) has 4.
NESTING_MAX: Final = 16

# Any wire date or date-time, whatever the clock says (the ledger's accumulator years and PostgreSQL's
# date range stay sane; 0001-01-01 and 9999-12-31 are not dates anyone was treated on).
DATE_MIN: Final = date(2000, 1, 1)
DATE_MAX: Final = date(9998, 12, 31)

# The clock window for `inf_time` (settlement dates, accumulator years). Defaults: a hospital may
# resend up to about a year late (a reversal of last year's settlement), clocks drift by minutes.
TIME_PAST_DAYS_DEFAULT: Final = 400
TIME_FUTURE_MINUTES_DEFAULT: Final = 10
TIME_PAST_DAYS_MAX: Final = 3_650_000  # the settings' upper bounds: ~10,000 years (test stacks replay
TIME_FUTURE_MINUTES_MAX: Final = 5_300_000_000  # fixed dates far from today)

# Visit and fee times against the envelope's inf_time: a long stay's first fee, a clock a day off.
EVENT_BEFORE_INF: Final = timedelta(days=731)
EVENT_AFTER_INF: Final = timedelta(days=1)
# Filings (2501): start within a year of the request, last at most 5 years, end not before start.
FILING_START_FROM_INF: Final = timedelta(days=366)
FILING_DAYS_MAX: Final = 1827

# C0 controls (NUL..US), DEL and UTF-16 surrogates (a lone one cannot be stored as UTF-8).
_FORBIDDEN_CHAR = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


class LimitError(ValueError):
    """A bound is broken; `path` is the JSON path of the field, the text names the bound."""

    def __init__(self, path: str, text: str) -> None:
        super().__init__(f"{text} - at `{path}`")
        self.path = path
        self.text = text


@dataclass(frozen=True)
class ClockWindow:
    past: timedelta
    future: timedelta

    def check(self, path: str, t: datetime, now: datetime) -> None:
        # Differences, not now ± window: a wide window must not overflow datetime's range.
        if now - t > self.past:
            raise LimitError(path, f"more than {self.past.days} days in the past")
        if t - now > self.future:
            raise LimitError(path, f"more than {int(self.future.total_seconds() // 60)} minutes in the future")


_window = ClockWindow(timedelta(days=TIME_PAST_DAYS_DEFAULT), timedelta(minutes=TIME_FUTURE_MINUTES_DEFAULT))


def clock_window() -> ClockWindow:
    """The window in force: the defaults until a service sets its own from Settings (set_clock_window)."""
    return _window


def set_clock_window(past_days: int, future_minutes: int) -> None:
    """Called once at a service's start with its validated settings (XS_TIME_PAST_DAYS / XS_TIME_FUTURE_MINUTES)."""
    global _window
    if not 1 <= past_days <= TIME_PAST_DAYS_MAX or not 0 <= future_minutes <= TIME_FUTURE_MINUTES_MAX:
        raise ValueError(f"clock window {past_days} days / {future_minutes} minutes is outside its bounds")
    _window = ClockWindow(timedelta(days=past_days), timedelta(minutes=future_minutes))


def now_shanghai() -> datetime:
    """The broker's clock as Asia/Shanghai wall time (the wire's time zone), naive like wire times."""
    return datetime.now(SHANGHAI).replace(tzinfo=None)


def check_date_range(field: str, d: date) -> None:
    if not DATE_MIN <= d <= DATE_MAX:
        raise ValueError(f"{field}: outside {DATE_MIN.isoformat()}..{DATE_MAX.isoformat()}")


_JSON_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def nesting_depth_exceeds(raw: bytes, limit: int = NESTING_MAX) -> bool:
    """True when JSON `raw` nests arrays/objects deeper than `limit` (brackets inside strings do not
    count). Stops at the first level too deep, so hostile input costs little."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the common small request: no scan
    depth = 0
    for m in _JSON_STRING_OR_BRACKET.finditer(raw):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


# What in JSON bytes can decode to a forbidden character: DEL itself, or an escape of a C0 control
# (\b \f \n \r \t \u0000-\u001f), of DEL or of a surrogate. A raw C0 byte inside a string is not
# JSON (msgspec refuses it) and UTF-8 was checked before, so bytes without these hold clean text only.
_MAY_DECODE_TO_FORBIDDEN = re.compile(rb"\x7f|\\(?:[bfnrt]|u00[01]|u007[fF]|u[dD][89a-fA-F])")


def may_hold_forbidden_text(raw: bytes) -> bool:
    """False when the JSON bytes `raw` cannot decode to a string check_text_tree refuses: then the
    walk over the decoded tree is skipped. True is only a "maybe" (an escaped surrogate pair, an
    escaped backslash before an `n`, ...). Most requests have no backslash: two byte searches in C."""
    if b"\x7f" in raw:
        return True
    return b"\\" in raw and _MAY_DECODE_TO_FORBIDDEN.search(raw) is not None


def check_text_tree(obj: Any, path: str) -> None:
    """Every string in a decoded struct tree is free of control characters and lone surrogates."""
    if isinstance(obj, str):
        if _FORBIDDEN_CHAR.search(obj):
            raise LimitError(path, "control character or lone surrogate in text")
    elif isinstance(obj, msgspec.Struct):
        for name in obj.__struct_fields__:
            check_text_tree(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            check_text_tree(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            check_text_tree(key, f"{path}.<key>")
            check_text_tree(value, f"{path}.{key}" if isinstance(key, str) and key.isidentifier() else path)
