"""The Judgements page, the pure parts: filters from a query string, paging, the psn_no mask, the review's
reason and decision, and when a judgement may not be reviewed. No I/O (services/dashboard/review.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from schemas.monitoring import JudgementStatus

STATUSES: Final[tuple[JudgementStatus, ...]] = ("open", "withdrawn", "confirmed", "dismissed")
DECISIONS: Final = {"confirm": "confirmed", "dismiss": "dismissed"}
REVIEW_ROLES: Final = frozenset({"operator"})  # viewers read only (README "Review and deductions")
REASON_MAX: Final = 500
PAGE_SIZE: Final = 50
PAGE_MAX: Final = 10_000

_RULE = re.compile(r"^[A-Z][A-Z0-9_]{0,39}$")
_PROV = re.compile(r"^[0-9]{2}0000$")
_HOSPITAL = re.compile(r"^[A-Za-z0-9]{1,30}$")
_MONTH = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")
JR_ID: Final = re.compile(r"^[0-9a-f]{32}$")


class BadFilter(ValueError):
    """A filter or page the list cannot take; the message names the field, never echoes a long value."""


@dataclass(frozen=True, slots=True)
class Filters:
    rule: str | None = None
    status: str | None = None
    prov: str | None = None  # insured province, XX0000
    hospital: str | None = None  # treating institution (fixmedins_code)
    month: str | None = None  # detected in this month (Asia/Shanghai), YYYY-MM
    page: int = 1

    def query(self, **changes: object) -> str:
        """The query string of these filters (with `changes`), for links between pages."""
        values = {"rule": self.rule, "status": self.status, "prov": self.prov, "hospital": self.hospital,
                  "month": self.month, "page": self.page, **changes}
        return "&".join(f"{k}={v}" for k, v in values.items() if v is not None and not (k == "page" and v == 1))


def parse_filters(query: Mapping[str, str]) -> Filters:
    def field(name: str, pattern: re.Pattern[str], what: str) -> str | None:
        value = query.get(name, "").strip()
        if not value:
            return None
        if not pattern.match(value):
            raise BadFilter(f"{name}: {what}")
        return value

    status = query.get("status", "").strip() or None
    if status is not None and status not in STATUSES:
        raise BadFilter(f"status: one of {', '.join(STATUSES)}")
    try:
        page = int(query.get("page", "1") or "1")
    except ValueError:
        raise BadFilter("page: a number from 1") from None
    if not 1 <= page <= PAGE_MAX:
        raise BadFilter(f"page: a number from 1 to {PAGE_MAX}")
    return Filters(
        rule=field("rule", _RULE, "a rule id such as OVERLAP_INPATIENT"),
        status=status,
        prov=field("prov", _PROV, "an insured province code XX0000"),
        hospital=field("hospital", _HOSPITAL, "a treating institution code (letters and digits)"),
        month=field("month", _MONTH, "a month YYYY-MM"),
        page=page,
    )


def mask_psn(psn_no: str) -> str:
    """At most the last 4 characters show (fewer for a short number)."""
    shown = psn_no[-4:] if len(psn_no) > 4 else ""
    return "*" * max(4, len(psn_no) - len(shown)) + shown


def check_reason(reason: str | None) -> str:
    """The reviewer's reason: 1-500 characters once trimmed, no control characters."""
    text = (reason or "").strip()
    if not 1 <= len(text) <= REASON_MAX:
        raise ValueError(f"a review needs a reason of 1 to {REASON_MAX} characters")
    if any(ord(c) < 32 and c not in "\n\t" for c in text):
        raise ValueError("the reason contains control characters")
    return text


def check_decision(decision: str | None) -> str:
    if decision not in DECISIONS:
        raise ValueError("decision: confirm or dismiss")
    return decision


def refusal(status: str, reviewed_by: str | None) -> str | None:
    """Why a judgement in `status` may not be reviewed (None: it may)."""
    if status == "withdrawn":
        return "this judgement was withdrawn (its evidence no longer holds); there is nothing to review"
    if status in ("confirmed", "dismissed"):
        return f"this judgement was already reviewed ({status} by {reviewed_by or '?'}); a review is final"
    return None
