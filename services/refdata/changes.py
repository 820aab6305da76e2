"""Pure parts of the reference-data load: what changed, precedence, chunking, progress text.

The loader (`services.refdata.load`) computes the same decisions in SQL for persons and filings
(millions of rows, set-based) and with `diff_rows` for the hub's small tables; the functions here
state the rules once, and the unit tests hold the SQL to them.

Precedence (a file load never undoes what arrived online, 2501–2504):
- filings: a file filing is keyed by its content (`filing_id`); an existing filing is never
  updated, so a revocation (2502) stays, and online / promise filings (other ids) are never touched;
- chronic eligibility: the file sets `chronic_file` only; the effective set is
  `effective_chronic(chronic_file, chronic_online)` — an online grant (2503) or withdrawal (2504)
  of a disease wins over the file until the next online change of that disease.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Order in which the hub's change log lists entities (regions first: hospitals refer to them).
CHANGE_LOG_ORDER: Final = ("region", "hospital", "catalog_item")


@dataclass
class RowChanges(Generic[K, V]):
    inserts: list[tuple[K, V]] = field(default_factory=list)
    updates: list[tuple[K, V]] = field(default_factory=list)
    unchanged: int = 0

    @property
    def changed(self) -> int:
        return len(self.inserts) + len(self.updates)

    def changed_keys(self) -> list[K]:
        return [k for k, _ in self.inserts] + [k for k, _ in self.updates]


def diff_rows(current: Mapping[K, V], incoming: Iterable[tuple[K, V]], *, update: bool = True) -> RowChanges[K, V]:
    """Rows of `incoming` to insert (key absent) or update (values differ; only when `update`).
    Nothing is ever deleted: a key missing from `incoming` keeps its row."""
    changes: RowChanges[K, V] = RowChanges()
    for key, values in incoming:
        old = current.get(key, _ABSENT)
        if old is _ABSENT:
            changes.inserts.append((key, values))
        elif update and old != values:
            changes.updates.append((key, values))
        else:
            changes.unchanged += 1
    return changes


_ABSENT: Final = object()


def effective_chronic(file: Sequence[str], online: Mapping[str, bool]) -> list[str]:
    """The person's chronic eligibility: the file's diseases without the ones changed online, plus
    the online grants (sorted). Mirrors the shard schema's SQL function person_chronic()."""
    kept = {d for d in file if d not in online}
    return sorted(kept | {d for d, granted in online.items() if granted})


def change_log(changes: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """refdata_change rows (entity, key) for the changed keys, in a fixed order: versions are
    numbered in this order within one load."""
    unknown = set(changes) - set(CHANGE_LOG_ORDER)
    if unknown:
        raise ValueError(f"not a reference-data entity: {', '.join(sorted(unknown))}")
    return [(entity, key) for entity in CHANGE_LOG_ORDER for key in sorted(changes.get(entity, ()))]


def chunks(first_line: int, last_line: int, size: int) -> list[tuple[int, int]]:
    """Half-open line ranges [a, b) covering first_line..last_line, `size` lines each."""
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    if last_line < first_line:
        return []
    return [(a, min(a + size, last_line + 1)) for a in range(first_line, last_line + 1, size)]


def remaining_steps(planned: Sequence[str], done: Iterable[str]) -> list[str]:
    """The steps of `planned` not recorded as done, in plan order (a resumed load's work)."""
    finished = set(done)
    return [s for s in planned if s not in finished]


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(phase: str, rows: int, done: int, total: int, elapsed_s: float) -> str:
    """'persons.jsonl: 1,200,000 rows, 98,000 rows/s, 9.1%, ETA 2m15s' — `done`/`total` in any
    unit (bytes read, steps); the rate is rows over the elapsed time."""
    rate = rows / elapsed_s if elapsed_s > 0 else 0.0
    share = done / total if total > 0 else 1.0
    eta = elapsed_s * (1 - share) / share if share > 0 else 0.0
    return f"{phase}: {rows:,} rows, {rate:,.0f} rows/s, {100 * share:.1f}%, ETA {_duration(eta)}"
