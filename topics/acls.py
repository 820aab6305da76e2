"""Who may do what on the broker: the ACLs of one topic prefix (a deployment's, or a test run's).

The broker denies whatever no rule allows (`allow.everyone.if.no.acl.found=false`); `admin` (and the
brokers' own principals) are super users and need no rule. Each service gets exactly the topics it
reads or writes (LITERAL names, prefix included) and its own consumer groups; no service may read the
dead letters (they hold the original bytes of refused requests) — only `ops` and `admin`.
Idempotent producers need no IDEMPOTENT_WRITE grant since Kafka 3.0: WRITE on a topic implies it.
No client uses Kafka transactions, so there is no transactional-id rule.

README "Security" has the same table for people.
"""

from __future__ import annotations

from services.common.config import Settings
from topics.catalog import SMARTMON_APP, catalog
from topics.security import GROUP, LITERAL, OP_DESCRIBE, OP_READ, OP_WRITE, PREFIXED, TOPIC, Acl

# Consumer groups (without the prefix), as the services name them.
SETTLE_GROUP = "xsettle-settle"
CLEARING_GROUPS = ("xsettle-clearing-requests", "xsettle-clearing-positions", "xsettle-clearing-claims",
                   "xsettle-clearing-judgements")
SMARTMON_GROUP = SMARTMON_APP  # faust's consumer group is its app id

INGRESS, REPLIES, SETTLEMENTS, CLEARING, DEADLETTER, MANUAL_CLAIMS, DEPOSITS, ALERTS, AUDIT = (
    "fsi.ingress", "fsi.replies", "fsi.settlements", "fsi.clearing", "fsi.deadletter",
    "fsi.manual_claims", "fsi.deposits", "fsi.alerts", "fsi.audit",
)
JUDGEMENTS, MONITOR_STAYS = "fsi.judgements", "fsi.monitor.stays"
SMARTMON_CHANGELOGS = (f"{SMARTMON_APP}-persons-changelog", f"{SMARTMON_APP}-cost_groups-changelog")

# principal -> (topics read, topics written, consumer groups)
SERVICES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # the reply consumer is assigned its partition (no group); refused requests go to the dead letters
    "gateway": ((REPLIES,), (INGRESS, DEADLETTER), ()),
    # the settlement stage routes and settles: answers, clearing requests (32xx), ledger rows' events
    "settle": ((INGRESS,), (REPLIES, CLEARING, SETTLEMENTS, DEADLETTER), (SETTLE_GROUP,)),
    # clearing also publishes its outbox (the CLI's manual claims) and the audit rows left by commands
    "clearing": ((CLEARING, SETTLEMENTS, MANUAL_CLAIMS, JUDGEMENTS),
                 (REPLIES, DEPOSITS, ALERTS, DEADLETTER, MANUAL_CLAIMS, AUDIT), CLEARING_GROUPS),
    # smart monitoring (faust): settlements in, judgements out; its repartition topic and its tables'
    # changelogs both ways (a restart reads the changelogs back); undecodable records to the dead letters
    "smartmon": ((SETTLEMENTS, MONITOR_STAYS, *SMARTMON_CHANGELOGS),
                 (JUDGEMENTS, MONITOR_STAYS, *SMARTMON_CHANGELOGS, DEADLETTER), (SMARTMON_GROUP,)),
    # operator tools: dead letters (list, replay to the topic a letter came from), the clearing CLI's
    # manual claims and deposit events, the audit trail (each command publishes its row; ops reads the
    # trail); group offsets (below)
    "ops": ((DEADLETTER, AUDIT), (INGRESS, CLEARING, SETTLEMENTS, MANUAL_CLAIMS, DEPOSITS, ALERTS, AUDIT), ()),
    # the HIS simulator writes requests, nothing else
    "his": ((), (INGRESS,), ()),
}


def user(name: str) -> str:
    return f"User:{name}"


def institution_principal(fixmedins_code: str) -> str:
    return f"inst-{fixmedins_code}"


def _everything(prefix: str) -> tuple[str, int]:
    """A pattern for every topic or group of this prefix; the whole broker when there is none
    (a PREFIXED pattern must not be empty)."""
    return (prefix, PREFIXED) if prefix else ("*", LITERAL)


def prefix_acls(s: Settings) -> list[Acl]:
    """Every rule of the topic prefix of `s` (topics.apply creates them, teardown deletes them)."""
    p = s.topic_prefix
    known = {t.name for t in catalog(s)}
    acls: list[Acl] = []
    for principal, (reads, writes, groups) in SERVICES.items():
        for topic in reads:
            acls.append(Acl(user(principal), TOPIC, p + topic, LITERAL, OP_READ))
        for topic in writes:
            acls.append(Acl(user(principal), TOPIC, p + topic, LITERAL, OP_WRITE))
        for group in groups:
            acls.append(Acl(user(principal), GROUP, p + group, LITERAL, OP_READ))
    assert {a.name for a in acls if a.resource_type == TOPIC} <= known, "a rule names a topic not in the catalog"
    everything, pattern = _everything(p)
    # The monitor: offsets and lag of every topic and group (DESCRIBE: names and offsets, no records).
    acls.append(Acl(user("monitor"), TOPIC, everything, pattern, OP_DESCRIBE))
    acls.append(Acl(user("monitor"), GROUP, everything, pattern, OP_DESCRIBE))
    # ops: inspect and reset any group's offsets (a reset commits offsets: READ on the group and its topics)
    acls.append(Acl(user("ops"), GROUP, everything, pattern, OP_READ))
    acls.append(Acl(user("ops"), TOPIC, everything, pattern, OP_DESCRIBE))
    acls.append(Acl(user("ops"), TOPIC, everything, pattern, OP_READ))
    return sorted(set(acls))


def institution_acls(s: Settings, fixmedins_code: str) -> list[Acl]:
    """An institution writing straight to Kafka: produce to the ingress topic, nothing else."""
    return [Acl(user(institution_principal(fixmedins_code)), TOPIC, s.topic_prefix + INGRESS, LITERAL, OP_WRITE)]
