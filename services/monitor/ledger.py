"""Month-to-date figures from the ledger (PostgreSQL): the authoritative numbers behind
the direct-settlement rate and the money moved between provinces.

They come from the shards' daily aggregates (`ledger_daily`, kept by the settlement engine in
the ledger's own transaction, shard migration 0002): a poll reads about 31 days × keys per shard,
not the month's ledger rows.

A month is the calendar month of `settlement.setl_time` (Asia/Shanghai wall time), as
for clearing (REFERENCE §5). Person-times come from the clearing service's one
definition (`services.clearing.store.rates`): a non-local visit counts as direct once
when settled and not reversed (REFERENCE §6), a manual claim by the end of its visit.
Fund amounts are summed as stored (reversal rows are negative), so they are net.
Used by the monitor (exported to Prometheus) and by the dashboard.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from schemas.codes import FUNDS
from services.clearing.store import rates
from services.common.metrics import visit_type_of
from services.common.response import SHANGHAI
from services.common.shards import ShardPools
from services.refdata.regions import UnknownRegion, province_of

FUND_COLUMNS: Final[tuple[str, ...]] = FUNDS

_MONEY_SQL: Final = """
SELECT insured_prov, treating_prov, scope, med_type,
       sum(settled)::bigint AS settled, sum(reversed)::bigint AS reversed,
       sum(medfee_sumamt)::bigint AS medfee, sum(fund_pay_sumamt)::bigint AS fund,
       sum(hifp_pay)::bigint AS hifp_pay, sum(hifmi_pay)::bigint AS hifmi_pay,
       sum(hifob_pay)::bigint AS hifob_pay, sum(maf_pay)::bigint AS maf_pay
FROM ledger_daily
WHERE day >= $1 AND day < $2
GROUP BY 1, 2, 3, 4
"""

Key = tuple[str, str, str, str]  # insured_prov, treating_prov, scope, visit_type


@dataclass
class Cell:
    direct: int = 0  # person-times settled directly and not reversed (non-local care)
    manual: int = 0  # manual claims (non-local care)
    settled: int = 0  # ledger rows of kind settle / reverse this month
    reversed: int = 0
    medfee_fen: int = 0
    fund_fen: int = 0
    funds_fen: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FUND_COLUMNS, 0))


@dataclass
class MonthFigures:
    month: str  # yyyy-MM
    start: datetime
    end: datetime
    cells: dict[Key, Cell]


def month_bounds(now: datetime | None = None) -> tuple[datetime, datetime]:
    """[first day of this month, first day of next month) as naive Asia/Shanghai wall times."""
    local = (now or datetime.now(SHANGHAI)).astimezone(SHANGHAI).replace(tzinfo=None)
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def _prov(admdvs: str) -> str:
    try:
        return province_of(admdvs.strip())
    except UnknownRegion:
        return "unknown"


async def month_figures(hub: asyncpg.Connection | asyncpg.Pool, shards: ShardPools,
                        now: datetime | None = None) -> MonthFigures:
    start, end = month_bounds(now)
    cells: dict[Key, Cell] = defaultdict(Cell)
    rows = [r for _, shard in shards for r in await shard.fetch(_MONEY_SQL, start.date(), end.date())]
    for r in rows:
        key = (_prov(r["insured_prov"]), _prov(r["treating_prov"]), r["scope"], visit_type_of(r["med_type"]))
        c = cells[key]
        c.settled += r["settled"]
        c.reversed += r["reversed"]
        c.medfee_fen += r["medfee"]
        c.fund_fen += r["fund"]
        for f in FUND_COLUMNS:
            c.funds_fen[f] += r[f]
    for line in await rates(hub, shards, start.date(), (end - timedelta(days=1)).date()):  # type: ignore[arg-type]
        c = cells[(line["insured_prov"], line["treating_prov"], line["scope"], line["visit_type"])]
        c.direct += line["direct"]
        c.manual += line["manual"]
    return MonthFigures(start.strftime("%Y-%m"), start, end, dict(cells))
