"""Every Kafka topic of the broker, declared once.

Keys: everything about one person travels under key `psn_no`, so one partition
(and one consumer) sees a person's messages in order — the year-to-date
accumulators depend on it. Records without a person (1101, 9001) use msgid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from schemas.clearing import DepositAlert, DepositEvent, ManualClaim
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

MANUAL_CLAIMS = TopicSpec(
    "fsi.manual_claims", PARTITIONS, 30 * DAY_MS, "delete", "psn_no", ManualClaim,
    "non-local visits reimbursed by hand (手工零星报销), from insured regions; the clearing service stores them "
    "for the direct-settlement-rate denominator (deduped by claim_id)",
)
DEPOSITS = TopicSpec(
    "fsi.deposits", 1, 30 * DAY_MS, "delete", "insured_prov", DepositEvent,
    "every movement of an insured province's advance deposit (top-up, a month's draw-down)",
)
ALERTS = TopicSpec(
    "fsi.alerts", 1, 30 * DAY_MS, "delete", "insured_prov", DepositAlert,
    "operational alerts, e.g. an advance deposit at or below its warning line",
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    INGRESS, ROUTED, REPLIES, SETTLEMENTS, CLEARING, DEADLETTER, MANUAL_CLAIMS, DEPOSITS, ALERTS,
)
