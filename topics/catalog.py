"""Every Kafka topic of the broker, declared once.

Keys: everything about one person travels under key `psn_no`, so one partition
(and one consumer) sees a person's messages in order — the year-to-date
accumulators depend on it. Records without a person (1101, 9001) use msgid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from schemas.envelope import RequestEnvelope, ResponseEnvelope
from schemas.internal import DeadLetter, RoutedRequest, SettlementEvent

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int
    cleanup_policy: str
    key: str
    value: type
    doc: str

    @property
    def replication_factor(self) -> int:
        return int(os.environ.get("XS_REPLICATION_FACTOR", "1"))

    @property
    def configs(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


# Partitions bound the parallelism of each stage; 8 leaves room to add workers on one host.
PARTITIONS = int(os.environ.get("XS_PARTITIONS", "8"))
# Gateway instance i reads replies from partition i.
REPLY_PARTITIONS = 4

INGRESS = TopicSpec(
    "fsi.ingress", PARTITIONS, 7 * DAY_MS, "delete", "psn_no (msgid when none)", RequestEnvelope,
    "requests in the national envelope, from the HTTP gateway or written straight by HIS; "
    "headers reply_topic / reply_partition say where the answer goes",
)
ROUTED = TopicSpec(
    "fsi.routed", PARTITIONS, 7 * DAY_MS, "delete", "psn_no", RoutedRequest,
    "validated requests resolved to hospital, person, scope and filing, for the settlement engine",
)
REPLIES = TopicSpec(
    "fsi.replies", REPLY_PARTITIONS, 1 * DAY_MS, "delete", "msgid", ResponseEnvelope,
    "the response envelope for each request, on the partition the requester named",
)
SETTLEMENTS = TopicSpec(
    "fsi.settlements", PARTITIONS, 30 * DAY_MS, "delete", "psn_no", SettlementEvent,
    "every ledger row (settlement or reversal) after it is committed in PostgreSQL",
)
CLEARING = TopicSpec(
    "fsi.clearing", PARTITIONS, 7 * DAY_MS, "delete", "fixmedins_code", RequestEnvelope,
    "reconciliation and clearing requests (32xx), validated by the router, for the clearing service; "
    "same headers as fsi.ingress",
)
DEADLETTER = TopicSpec(
    "fsi.deadletter", 1, 30 * DAY_MS, "delete", "msgid", DeadLetter,
    "every rejected request with its error code, reason and the original bytes",
)

ALL_TOPICS: tuple[TopicSpec, ...] = (INGRESS, ROUTED, REPLIES, SETTLEMENTS, CLEARING, DEADLETTER)
