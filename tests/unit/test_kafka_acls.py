"""The broker's security configuration and the ACL table (pure: no broker; the real refusals are in
tests/integration/test_kafka_security.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from deploy import kafka as cluster
from deploy.common import Paths
from services.common.config import Settings, load_settings
from services.common.kafka import SERVICE_PRINCIPALS
from topics.acls import institution_acls, prefix_acls, user
from topics.catalog import catalog
from topics.security import GROUP, LITERAL, OP_DESCRIBE, OP_READ, OP_WRITE, PREFIXED, TOPIC, Acl


def settings(tmp_path: Path, prefix: str = "t1.") -> Settings:
    return dataclasses.replace(load_settings(), state_dir=tmp_path, topic_prefix=prefix, kafka_port=25000,
                               kafka_controller_port=25001)


def grants(acls: list[Acl], principal: str, resource_type: int, operation: int) -> set[str]:
    return {a.name for a in acls if a.principal == user(principal) and a.resource_type == resource_type
            and a.operation == operation and a.pattern == LITERAL}


def test_each_service_gets_exactly_its_topics_and_groups(tmp_path: Path) -> None:
    acls = prefix_acls(settings(tmp_path))
    # The settlement stage (routes and settles): reads the requests, writes answers, clearing requests (32xx),
    # ledger rows' events and dead letters; its one group. No router principal, group or routed topic any more.
    assert grants(acls, "settle", TOPIC, OP_READ) == {"t1.fsi.ingress"}
    assert grants(acls, "settle", TOPIC, OP_WRITE) == {"t1.fsi.replies", "t1.fsi.clearing", "t1.fsi.settlements",
                                                       "t1.fsi.deadletter"}
    assert grants(acls, "settle", GROUP, OP_READ) == {"t1.xsettle-settle"}
    assert [a for a in acls if a.principal == user("router")] == []
    assert not [a for a in acls if "routed" in a.name or a.name == "t1.xsettle-router"]
    assert grants(acls, "gateway", TOPIC, OP_WRITE) == {"t1.fsi.ingress", "t1.fsi.deadletter"}
    assert grants(acls, "ops", TOPIC, OP_WRITE) == {"t1.fsi.ingress", "t1.fsi.clearing", "t1.fsi.settlements",
                                                    "t1.fsi.manual_claims", "t1.fsi.deposits", "t1.fsi.alerts",
                                                    "t1.fsi.audit"}
    assert grants(acls, "clearing", GROUP, OP_READ) == {"t1.xsettle-clearing-requests", "t1.xsettle-clearing-positions",
                                                         "t1.xsettle-clearing-claims", "t1.xsettle-clearing-judgements"}
    changelogs = {"t1.xsettle-smartmon-persons-changelog", "t1.xsettle-smartmon-cost_groups-changelog"}
    assert grants(acls, "smartmon", TOPIC, OP_READ) == {"t1.fsi.settlements", "t1.fsi.monitor.stays", *changelogs}
    assert grants(acls, "smartmon", TOPIC, OP_WRITE) == {"t1.fsi.judgements", "t1.fsi.monitor.stays",
                                                         "t1.fsi.deadletter", *changelogs}
    assert grants(acls, "smartmon", GROUP, OP_READ) == {"t1.xsettle-smartmon"}
    assert grants(acls, "gateway", TOPIC, OP_READ) == {"t1.fsi.replies"}
    assert grants(acls, "gateway", GROUP, OP_READ) == set()
    assert [a for a in acls if a.principal == user("his")] == [
        Acl(user("his"), TOPIC, "t1.fsi.ingress", LITERAL, OP_WRITE)]
    assert {a.operation for a in acls if a.principal == user("monitor")} == {OP_DESCRIBE}
    assert {(a.name, a.pattern) for a in acls if a.principal == user("monitor")} == {("t1.", PREFIXED)}
    # every topic a rule names is one of the catalog's
    named = {a.name for a in acls if a.resource_type == TOPIC and a.pattern == LITERAL}
    assert named <= {t.name for t in catalog(settings(tmp_path))}


def test_dead_letters_are_read_by_ops_only(tmp_path: Path) -> None:
    acls = prefix_acls(settings(tmp_path))
    letters = "t1.fsi.deadletter"
    readers = {a.principal for a in acls if a.operation == OP_READ and a.resource_type == TOPIC
               and (a.name == letters or (a.pattern == PREFIXED and letters.startswith(a.name)))}
    assert readers == {user("ops")}
    assert {a.principal for a in acls} <= {user(p) for p in SERVICE_PRINCIPALS}


def test_no_prefix_means_literal_names_and_a_wildcard_for_the_monitor(tmp_path: Path) -> None:
    acls = prefix_acls(settings(tmp_path, prefix=""))
    assert grants(acls, "his", TOPIC, OP_WRITE) == {"fsi.ingress"}
    assert {(a.name, a.pattern) for a in acls if a.principal == user("monitor")} == {("*", LITERAL)}
    assert all(a.name for a in acls)


def test_an_institution_may_only_produce_requests(tmp_path: Path) -> None:
    assert institution_acls(settings(tmp_path), "H15040200001") == [
        Acl("User:inst-H15040200001", TOPIC, "t1.fsi.ingress", LITERAL, OP_WRITE)]


def test_broker_properties_authenticate_everything(tmp_path: Path) -> None:
    s = settings(tmp_path)
    props = cluster.kafka_properties(s, Paths.of(s)).splitlines()
    for line in ("listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT",
                 "listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-512",
                 "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
                 "sasl.mechanism.controller.protocol=PLAIN",
                 "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                 "allow.everyone.if.no.acl.found=false",
                 "super.users=User:admin;User:broker;User:controller"):
        assert line in props
    assert not [p for p in props if "PLAINTEXT://" in p]
    # passwords come from the state dir's secrets (0600), generated once
    secret = (tmp_path / "secrets" / "kafka-broker.password").read_text()
    assert any(f'username="broker" password="{secret}"' in p for p in props)
    assert (tmp_path / "secrets" / "kafka-broker.password").stat().st_mode & 0o777 == 0o600
    # the one start that adds the first users has no security at all
    plain = cluster.kafka_properties(s, Paths.of(s), secured=False)
    assert "SASL" not in plain and "authorizer" not in plain and "password" not in plain


def test_java_tools_get_a_private_client_config(tmp_path: Path) -> None:
    s = settings(tmp_path)
    path = cluster.client_config(s, "ops")
    assert path.parent == tmp_path / "secrets" and path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\n" in text
    assert 'username="ops"' in text
