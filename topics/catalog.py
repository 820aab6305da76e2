"""Every Kafka topic of the broker, declared once.

Keys: everything about one person travels under key `psn_no`, so one partition
(and one consumer) sees a person's messages in order — the year-to-date
accumulators depend on it. Records without a person (1101, 9001) use msgid.

Names carry Settings.topic_prefix (a test run's own topics), partition counts and the
replication factor come from Settings too: `catalog(settings)` for explicit settings,
the module constants for the process's own (validated once, at import).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from schemas.audit import AuditRecord
from schemas.clearing import DepositAlert, DepositEvent, ManualClaim
from schemas.envelope import RequestEnvelope, ResponseEnvelope
from schemas.internal import DeadLetter, SettlementEvent
from schemas.monitoring import Judgement, StayCost
from services.common.config import Settings, load_settings

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
    replication_factor: int = 1

    @property
    def configs(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


# Partition count "as Settings.partitions says" (8 by default: room to add workers on one host).
_KEYED = 0
# Gateway instance i reads replies from partition i.
REPLY_PARTITIONS = 4

_INGRESS = TopicSpec(
    "fsi.ingress", _KEYED, 7 * DAY_MS, "delete", "psn_no (msgid when none)", RequestEnvelope,
    "requests in the national envelope, from the HTTP gateway or written straight by HIS; "
    "headers reply_topic / reply_partition say where the answer goes",
)
_REPLIES = TopicSpec(
    "fsi.replies", REPLY_PARTITIONS, 1 * DAY_MS, "delete", "msgid", ResponseEnvelope,
    "the response envelope for each request, on the partition the requester named",
)
_SETTLEMENTS = TopicSpec(
    "fsi.settlements", _KEYED, 30 * DAY_MS, "delete", "psn_no", SettlementEvent,
    "every ledger row (settlement or reversal) after it is committed in PostgreSQL",
)
_CLEARING = TopicSpec(
    "fsi.clearing", _KEYED, 7 * DAY_MS, "delete", "fixmedins_code", RequestEnvelope,
    "reconciliation and clearing requests (32xx), validated by the router, for the clearing service; "
    "same headers as fsi.ingress",
)
_DEADLETTER = TopicSpec(
    "fsi.deadletter", 1, 7 * DAY_MS, "delete", "msgid", DeadLetter,
    "every rejected request with its error code, reason and the original bytes; readable only by the "
    "principals admin and ops (topics/acls.py), kept 7 days",
)

_MANUAL_CLAIMS = TopicSpec(
    "fsi.manual_claims", _KEYED, 30 * DAY_MS, "delete", "psn_no", ManualClaim,
    "non-local visits reimbursed by hand (手工零星报销), from insured regions; the clearing service stores them "
    "for the direct-settlement-rate denominator (deduped by claim_id)",
)
_DEPOSITS = TopicSpec(
    "fsi.deposits", 1, 30 * DAY_MS, "delete", "insured_prov", DepositEvent,
    "every movement of an insured province's advance deposit (top-up, a month's draw-down)",
)
_ALERTS = TopicSpec(
    "fsi.alerts", 1, 30 * DAY_MS, "delete", "insured_prov", DepositAlert,
    "operational alerts, e.g. an advance deposit at or below its warning line",
)

# One partition: the trail in one order. Kept without a time limit, like the audit_log table.
_AUDIT = TopicSpec(
    "fsi.audit", 1, -1, "delete", "audit_id", AuditRecord,
    "every operator action (audit_log row) in audit_id order; a duplicate after a publisher crash has the same key",
)

# Smart monitoring (services/smartmon, a faust app that declares no topic itself). Its id (the consumer
# group too) is SMARTMON_APP; faust names a table's changelog `<app id>-<table>-changelog` and needs it
# partitioned like the topic the table's agent reads.
SMARTMON_APP = "xsettle-smartmon"
_JUDGEMENTS = TopicSpec(
    "fsi.judgements", _KEYED, 30 * DAY_MS, "delete", "jr_id", Judgement,
    "every judgement of the monitoring rules as sent (re-sent with new evidence, or withdrawn=true), "
    "for the clearing service's judgement sink",
)
_MONITOR_STAYS = TopicSpec(
    "fsi.monitor.stays", _KEYED, 7 * DAY_MS, "delete", "group (diagnosis|hosp_lv|treating_prov)", StayCost,
    "complete inpatient stays repartitioned by cost group (withdrawn=true when one is taken back), "
    "written and read by smartmon only",
)
_PERSONS_CHANGELOG = TopicSpec(
    f"{SMARTMON_APP}-persons-changelog", _KEYED, -1, "compact", "psn_no", bytes,
    "smartmon's table `persons` (a person's history within the horizon, msgspec JSON of PersonState)",
)
_COST_GROUPS_CHANGELOG = TopicSpec(
    f"{SMARTMON_APP}-cost_groups-changelog", _KEYED, -1, "compact", "group", bytes,
    "smartmon's table `cost_groups` (a cost group's stays, msgspec JSON of CostGroupState)",
)

_BASE: tuple[TopicSpec, ...] = (
    _INGRESS, _REPLIES, _SETTLEMENTS, _CLEARING, _DEADLETTER, _MANUAL_CLAIMS, _DEPOSITS, _ALERTS, _AUDIT,
    _JUDGEMENTS, _MONITOR_STAYS, _PERSONS_CHANGELOG, _COST_GROUPS_CHANGELOG,
)


def catalog(s: Settings) -> tuple[TopicSpec, ...]:
    """Every topic as `s` names and sizes it (same order as ALL_TOPICS)."""
    return tuple(
        replace(
            t,
            name=s.topic_prefix + t.name,
            partitions=s.partitions if t.partitions == _KEYED else t.partitions,
            replication_factor=s.replication_factor,
        )
        for t in _BASE
    )


ALL_TOPICS: tuple[TopicSpec, ...] = catalog(load_settings())
(INGRESS, REPLIES, SETTLEMENTS, CLEARING, DEADLETTER, MANUAL_CLAIMS, DEPOSITS, ALERTS, AUDIT,
 JUDGEMENTS, MONITOR_STAYS, PERSONS_CHANGELOG, COST_GROUPS_CHANGELOG) = ALL_TOPICS
PARTITIONS = INGRESS.partitions
