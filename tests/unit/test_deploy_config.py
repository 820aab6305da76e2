"""Deployment configuration, pure: Settings round-trips through the environment, the topic catalog
follows Settings, and supervisord's config carries the restart policy and each run's settings."""

from __future__ import annotations

import configparser
import dataclasses
import os
import shlex
import shutil
import stat
from pathlib import Path

import pytest

from deploy.db import LOGIN_ROLES, PG_ADMIN_ROLE, ROLES, role_password, write_passfile
from deploy.services import START_RETRIES, keep_other_programs, service_specs, supervisor_config
from services.common.config import ConfigError, load_settings, settings_env
from topics.catalog import catalog

RUN_ENV = {"XS_TOPIC_PREFIX": "t42.", "XS_PARTITIONS": "3", "XS_REPLICATION_FACTOR": "2",
           "XS_PG_DATABASE": "xsettle_t42", "XS_RUN_DIR": "/tmp/xs-run-t42", "XS_GATEWAY_PORT": "24001"}


@pytest.fixture
def run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in RUN_ENV.items():
        monkeypatch.setenv(key, value)


def test_settings_env_gives_a_child_the_same_settings(run_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    for field in dataclasses.fields(s):
        monkeypatch.delenv(f"XS_{field.name.upper()}", raising=False)
    for key, value in settings_env(s).items():
        monkeypatch.setenv(key, value)
    assert load_settings() == s
    assert set(settings_env(s)) == {f"XS_{f.name.upper()}" for f in dataclasses.fields(s)}


@pytest.mark.parametrize("bad", ["t 1.", "x" * 41, "t1/", "ünï"])
def test_a_bad_topic_prefix_is_refused(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("XS_TOPIC_PREFIX", bad)
    with pytest.raises(ConfigError, match="XS_TOPIC_PREFIX"):
        load_settings()


@pytest.mark.parametrize(("key", "value"), [("XS_PARTITIONS", "0"), ("XS_REPLICATION_FACTOR", "9")])
def test_partitions_and_replication_are_bounded(monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=key):
        load_settings()


def test_catalog_names_and_sizes_topics_from_settings(run_env: None) -> None:
    topics = {t.name: t for t in catalog(load_settings())}
    assert sorted(topics) == sorted([*(f"t42.fsi.{n}" for n in (
        "ingress", "replies", "settlements", "clearing", "deadletter", "manual_claims", "deposits", "alerts",
        "audit", "judgements", "monitor.stays")),
        "t42.xsettle-smartmon-cost_groups-changelog", "t42.xsettle-smartmon-persons-changelog"])
    assert {n: t.partitions for n, t in topics.items()} == {
        "t42.fsi.ingress": 3, "t42.fsi.replies": 4, "t42.fsi.settlements": 3,
        "t42.fsi.clearing": 3, "t42.fsi.deadletter": 1, "t42.fsi.manual_claims": 3, "t42.fsi.deposits": 1,
        "t42.fsi.alerts": 1, "t42.fsi.audit": 1, "t42.fsi.judgements": 3, "t42.fsi.monitor.stays": 3,
        "t42.xsettle-smartmon-persons-changelog": 3, "t42.xsettle-smartmon-cost_groups-changelog": 3}
    changelogs = [t for n, t in topics.items() if n.endswith("-changelog")]
    assert {(t.cleanup_policy, t.retention_ms) for t in changelogs} == {("compact", -1)}
    assert {t.replication_factor for t in topics.values()} == {2}


def test_supervisor_config_restarts_every_service_with_the_runs_settings(
        run_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XS_SETTLE_TRACE", "1")
    parser = configparser.RawConfigParser()
    parser.read_string(supervisor_config(load_settings()))
    assert parser.get("unix_http_server", "file") == "/tmp/xs-run-t42/supervisor/supervisor.sock"
    assert not parser.has_section("inet_http_server")  # no TCP control port at all
    assert parser.has_section("program:settle") and not parser.has_section("program:router")  # one stage
    for spec in service_specs(load_settings()):
        program = dict(parser.items(f"program:{spec.name}"))
        assert program["command"].endswith(f'"-m" "{spec.module}"')
        assert (program["autorestart"], program["startretries"], program["autostart"]) == (
            "true", str(START_RETRIES), "false")
        assert program["stdout_logfile"] == f"/tmp/xs-run-t42/logs/{spec.name}.log"
        env = program["environment"]
        assert 'XS_PG_DATABASE="xsettle_t42"' in env and 'XS_TOPIC_PREFIX="t42."' in env
        assert 'XS_GATEWAY_PORT="24001"' in env
        # A program's own switches reach only that program (a change restarts only it).
        assert ('XS_SETTLE_TRACE="1"' in env) == (spec.name == "settle")


def test_a_setting_changed_for_one_program_reaches_that_program_only(
        run_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    before = supervisor_config(load_settings())
    monkeypatch.setenv("XS_REQUEST_GATHER_MS", "0")
    everywhere = supervisor_config(load_settings())
    only_settle = keep_other_programs(everywhere, before, "settle")

    def environments(text: str) -> dict[str, str]:
        parser = configparser.RawConfigParser()
        parser.read_string(text)
        return {section: parser.get(section, "environment") for section in parser.sections()
                if section.startswith("program:")}

    old, new, mixed = environments(before), environments(everywhere), environments(only_settle)
    assert set(mixed) == set(old) and len(mixed) >= 6
    for section, env in mixed.items():
        assert env == (new if section == "program:settle" else old)[section], section
    assert 'XS_REQUEST_GATHER_MS="0"' in mixed["program:settle"]
    assert 'XS_REQUEST_GATHER_MS="10"' in mixed["program:smartmon"]
    # Nothing else moves: kept against itself, a render is the same text to the byte.
    assert keep_other_programs(everywhere, everywhere, "settle") == everywhere
    assert keep_other_programs(only_settle, before, "gateway") == before


def test_background_programs_run_niced_and_the_request_path_does_not(run_env: None) -> None:
    parser = configparser.RawConfigParser()
    parser.read_string(supervisor_config(load_settings()))
    niced = {}
    for section in parser.sections():
        if section.startswith("program:"):
            command = shlex.split(parser.get(section, "command"))
            niced[section.removeprefix("program:")] = (
                command[1:3] if Path(command[0]).name == "nice" else None)
    expected = {"clearing": ["-n", "10"], "monitor": ["-n", "10"], "smartmon": ["-n", "10"],
                "dashboard": ["-n", "10"], "settle": None, "gateway": None}
    if shutil.which("prometheus"):
        expected["prometheus"] = ["-n", "10"]
    assert niced == expected


def test_each_service_connects_to_postgresql_as_its_own_role_without_a_password_in_its_environment(
        run_env: None) -> None:
    parser = configparser.RawConfigParser()
    parser.read_string(supervisor_config(load_settings()))
    roles = {}
    for spec in service_specs(load_settings()):
        env = parser.get(f"program:{spec.name}", "environment")
        roles[spec.name] = [v for v in env.split(",") if v.startswith("XS_PG_USER=")]
        assert "PASSWORD" not in env.upper() and "PGPASS" not in env.upper()
    assert roles == {
        "settle": ['XS_PG_USER="xs_settle"'],  # it routes too: a member of xs_router (deploy/db.py MEMBERSHIPS)
        "gateway": ['XS_PG_USER="xsettle"'],  # the gateway has no database code
        "clearing": ['XS_PG_USER="xs_clearing"'], "monitor": ['XS_PG_USER="xs_monitor"'],
        "dashboard": ['XS_PG_USER="xs_dashboard"'],
        "smartmon": ['XS_PG_USER="xsettle"'],  # the monitoring stream has no database code either
    }


def test_the_pgpass_file_holds_every_roles_generated_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("PGPASSFILE", raising=False)  # load_settings points it at the state dir's
    s = load_settings()
    assert os.environ["PGPASSFILE"] == str(tmp_path / "secrets" / "pgpass")
    path = write_passfile(s)
    assert path == tmp_path / "secrets" / "pgpass"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    # Every role that logs in; the group role xs_router (the router's grants, held by xs_settle) has no password.
    assert [line.split(":")[3] for line in lines[::3]] == [PG_ADMIN_ROLE, *LOGIN_ROLES]
    assert "xs_router" not in LOGIN_ROLES and "xs_router" in ROLES
    assert {line.split(":")[0] for line in lines} == {"127.0.0.1", "localhost", str(tmp_path / "pgsock")}
    settle = role_password(s, "xs_settle")
    assert f"127.0.0.1:*:*:xs_settle:{settle}" in lines and len(settle) == 43
    assert len({line.split(":")[4] for line in lines}) == len(LOGIN_ROLES) + 1  # one password per role
    # Rotation: a deleted password file means a new password, and the pgpass follows.
    (tmp_path / "secrets" / "pg-xs_settle.password").unlink()
    write_passfile(s)
    assert f"127.0.0.1:*:*:xs_settle:{settle}" not in path.read_text()
    assert f"127.0.0.1:*:*:xs_settle:{role_password(s, 'xs_settle')}" in path.read_text()
