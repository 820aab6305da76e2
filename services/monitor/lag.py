"""Consumer lag, computed from offsets (pure: no Kafka client here).

For every group, the topics it has committed on are the topics it consumes; every
partition of those topics gets a lag, also the partitions the group never
committed on (counted from the log start, as `auto_offset_reset=earliest` would).
End offsets are the last stable offsets (read_committed), so open transactions
do not count as lag.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

TP = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None
    end: int
    lag: int


def group_lags(
    group: str,
    committed: Mapping[TP, int],
    partitions: Mapping[str, list[int]],
    begin: Mapping[TP, int],
    end: Mapping[TP, int],
) -> list[PartitionLag]:
    """Lag per partition of every topic the group committed on; a committed offset of -1 means none."""
    out: list[PartitionLag] = []
    for topic in sorted({t for t, _ in committed}):
        for p in sorted(partitions.get(topic, [])):
            tp = (topic, p)
            if tp not in end:
                continue
            offset = committed.get(tp)
            if offset is not None and offset < 0:
                offset = None
            base = offset if offset is not None else begin.get(tp, 0)
            out.append(PartitionLag(group, topic, p, offset, end[tp], max(0, end[tp] - base)))
    return out
