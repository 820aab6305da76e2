"""What a batch's new ledger rows add to `ledger_daily` (shard migrations 0002, 0006), pure.

The same sums as the shard's SQL function `ledger_daily_add`, computed from the rows the engine holds in
memory: that function finds each new row again by setl_id in the partitioned `settlement` table (every
month's index probed, the statement planned anew per call), which cost PostgreSQL more than all of the
batch's other statements together. Per day (of setl_time), insured and treating province, scope and
med_type: rows settled and reversed, net money, and `direct` — +1 for a settlement that is not a mid-stay
part, −1 for its reversal on the settlement's own day and keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date

from services.settle.state import Settlement

DailyKey = tuple[date, str, str, str, str]  # day, insured_prov, treating_prov, scope, med_type
MONEY = ("medfee_sumamt", "fund_pay_sumamt", "hifp_pay", "hifmi_pay", "hifob_pay", "maf_pay")
COUNTS = ("settled", "reversed", "direct")
COLUMNS = ("day", "insured_prov", "treating_prov", "scope", "med_type", *COUNTS, *MONEY)


def _key(row: Settlement) -> DailyKey:
    return (row.setl_time.date(), row.insured_admdvs[:2] + "0000", row.treating_admdvs[:2] + "0000", row.scope,
            row.med_type)


def daily_sums(rows: Iterable[Settlement], settlements: Mapping[str, Settlement]) -> list[tuple[object, ...]]:
    """One row per key (`COLUMNS`), in key order (two transactions of a shard upsert in the same order, so
    they never deadlock). `settlements` holds each reversal's original (the engine reverses only loaded rows);
    KeyError when one is missing."""
    sums: dict[DailyKey, list[int]] = {}

    def add(key: DailyKey) -> list[int]:
        return sums.setdefault(key, [0] * (len(COUNTS) + len(MONEY)))

    for row in rows:
        acc = add(_key(row))
        settle = row.kind == "settle"
        acc[0] += settle
        acc[1] += not settle
        acc[2] += settle and not row.mid_setl
        for i, name in enumerate(MONEY, start=len(COUNTS)):
            acc[i] += row.amounts[name]
        if not settle:
            original = settlements[row.orig_setl_id or ""]
            if not original.mid_setl:
                add(_key(original))[2] -= 1
    return [(*key, *values) for key, values in sorted(sums.items())]
