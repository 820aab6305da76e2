"""PostgreSQL authentication and per-service roles (README "Security" › PostgreSQL), on the run's own
hub and shard databases in the shared cluster.

Each role attempts what its service must not do and gets PostgreSQL's refusal, SQLSTATE 42501
(insufficient_privilege); a connection without the password or with a wrong one is refused with
28P01; the grants of every table are exactly the expected ones; and each role can do what its service
does (in transactions rolled back: the run's data is unchanged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from deploy.common import Paths
from deploy.db import (
    GROUP_ROLES,
    LOGIN_ROLES,
    MEMBERSHIPS,
    OWNER_ROLE,
    PG_ADMIN_ROLE,
    ROLES,
    ROUTER_ROLE,
    SERVICE_ROLES,
)
from deploy.postgres import PG_OS_USER, _as_pg_user, start_postgres, stop_postgres
from deploy.supervisor import Supervisor
from services.common.config import PG_PASSFILE, Settings
from services.common.shards import shard_dsns
from tests.conftest import _free_ports

pytestmark = pytest.mark.integration

INSUFFICIENT_PRIVILEGE = "42501"
INVALID_PASSWORD = "28P01"
SETTLE, CLEARING, MONITOR, DASHBOARD = (SERVICE_ROLES[n] for n in ("settle", "clearing", "monitor", "dashboard"))
# The router's grants (hub 0007, shard 0003) stay on their own role, which still logs in; no process connects
# as it: the settlement stage routes, and its role is a member of the router's (deploy/db.py MEMBERSHIPS).
ROUTER = ROUTER_ROLE
GRANTEES = (*SERVICE_ROLES.values(), ROUTER)  # every role holding grants of its own
LEDGER = ("settlement", "settlement_key", "ledger_daily", "visit", "fee_item", "accumulator", "account",
          "processed_request")
WRITES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
PRIVILEGES = ("SELECT", *WRITES, "REFERENCES", "TRIGGER")

def _each(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    """Every key with its own copy of `value`."""
    return {k: value.copy() for k in keys}


SEL, INS, UPD, DEL = "SELECT", "INSERT", "UPDATE", "DELETE"
# Table-level privileges per role (every other table: none). Column-level ones are checked apart.
HUB_GRANTS: dict[str, dict[str, set[str]]] = {
    ROUTER: {
        **_each(("region", "hospital", "catalog_item", "refdata_change", "person_index",
                 "institution_key"), {SEL}),
        "sign_session": {SEL, INS, UPD}, "msgid_seen": {SEL, INS},
    },
    SETTLE: {},
    CLEARING: {
        **_each(("clearing_month", "clearing_entry", "clearing_position", "clearing_deposit",
                 "clearing_deposit_txn", "clearing_outbox", "clearing_request", "clearing_application",
                 "clearing_confirmation", "manual_claim"), {SEL, INS, UPD, DEL}),
        "clearing_statement": {SEL, INS}, "region": {SEL}, "hospital": {SEL}, "audit_log": {SEL},
        "audit_publish": {SEL, INS, UPD},
        # Clearing at national shape (hub 0008): 3261 batches' rows; operator adjustments (the owner writes them).
        "clearing_confirmed_row": {SEL, INS, UPD, DEL}, "clearing_adjustment": {SEL},
    },
    **_each((MONITOR, DASHBOARD), _each(
        ("region", "hospital", "catalog_item", "refdata_change", "refdata_load", "refdata_load_step",
         "clearing_month", "clearing_entry", "clearing_position", "clearing_statement", "clearing_deposit",
         "clearing_deposit_txn", "clearing_outbox", "clearing_request", "clearing_application",
         "clearing_confirmation", "manual_claim"), {SEL})),
}
HUB_GRANTS[DASHBOARD] = {**HUB_GRANTS[DASHBOARD], "dashboard_user": {SEL, INS}, "audit_log": {SEL, INS}}
for _role in (MONITOR, DASHBOARD):  # clearing at national shape (hub 0008)
    HUB_GRANTS[_role] = {**HUB_GRANTS[_role], "clearing_confirmed_row": {SEL}, "clearing_adjustment": {SEL}}
# Smart monitoring (hub 0009): the clearing service's sink writes judgements, the dashboard reviews them;
# deductions (hub 0010): the dashboard records one when its operator confirms, the others read them.
HUB_GRANTS[CLEARING] = {**HUB_GRANTS[CLEARING], "judgement": {SEL, INS, UPD}, "clearing_deduction": {SEL}}
HUB_GRANTS[DASHBOARD] = {**HUB_GRANTS[DASHBOARD], "judgement": {SEL, UPD}, "clearing_deduction": {SEL, INS}}
HUB_GRANTS[MONITOR] = {**HUB_GRANTS[MONITOR], "judgement": {SEL}, "clearing_deduction": {SEL}}
SHARD_GRANTS: dict[str, dict[str, set[str]]] = {
    ROUTER: {"person": {SEL}, "filing": {SEL, INS}, "account": {SEL}, "accumulator": {SEL}},
    SETTLE: {
        **_each(("visit", "fee_item", "accumulator", "account", "ledger_daily"), {SEL, INS, UPD}),
        **_each(("settlement", "settlement_key", "processed_request"), {SEL, INS}),
        "correction": {SEL, INS},  # 2601 (shard 0005)
        **_each(("warning_issued", "warning_disposal"), {SEL, INS}),  # 3101-3103 (shard 0008)
    },
    **_each((CLEARING, MONITOR, DASHBOARD), {"settlement": {SEL}, "ledger_daily": {SEL}}),
}
for _role in (MONITOR, DASHBOARD):  # issued warnings and their disposals (shard 0008): read only
    SHARD_GRANTS[_role] = {**SHARD_GRANTS[_role], **_each(("warning_issued", "warning_disposal"), {SEL})}


def _effective(grants: dict[str, dict[str, set[str]]], role: str) -> dict[str, set[str]]:
    """What `role` may do: its own grants and those of every role it is a member of (it inherits them)."""
    tables: dict[str, set[str]] = {t: set(p) for t, p in grants.get(role, {}).items()}
    for granted, member in MEMBERSHIPS:
        if member == role:
            for table, privileges in grants.get(granted, {}).items():
                tables.setdefault(table, set()).update(privileges)
    return tables


class Cluster:
    """Connections to the run's databases as any role (passwords: the state dir's pgpass)."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.hub = s.pg_database
        self.shards = [dsn.rsplit("/", 1)[1] for dsn in shard_dsns(s).values()]

    async def connect(self, role: str, database: str, **kw: Any) -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=self.s.pg_port, user=role, database=database,
                                     timeout=10, **kw)

    @asynccontextmanager
    async def as_role(self, role: str, database: str) -> AsyncIterator[asyncpg.Connection]:
        """Logged in as `role`; a group role (no login) through a member of it and SET ROLE, which leaves
        exactly the group role's privileges."""
        member = next((m for granted, m in MEMBERSHIPS if granted == role), None) if role in GROUP_ROLES else None
        conn = await self.connect(member or role, database)
        try:
            if member is not None:
                await conn.execute(f'SET ROLE "{role}"')
            yield conn
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def cluster(stack: Settings) -> Cluster:
    return Cluster(stack)


async def _tables(c: Cluster, database: str) -> list[str]:
    """Every table and partitioned table of the database but yoyo's (their owner's alone)."""
    async with c.as_role(OWNER_ROLE, database) as conn:
        rows = await conn.fetch("SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                                " AND relkind IN ('r', 'p') AND relname NOT LIKE '%yoyo%' ORDER BY 1")
    return [r["relname"] for r in rows]


async def _first_column(conn: asyncpg.Connection, table: str) -> str:
    name: str = await conn.fetchval("SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass"
                                    " AND attnum = 1", table)
    return name


async def _refused(conn: asyncpg.Connection, statement: str, *args: object) -> asyncpg.PostgresError:
    """Run `statement` in a transaction that is rolled back whatever happens; it must be refused."""
    tx = conn.transaction()
    await tx.start()
    try:
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.execute(statement, *args)
    finally:
        await tx.rollback()
    return caught.value


async def _assert_writes_refused(conn: asyncpg.Connection, table: str, writes: tuple[str, ...] = WRITES) -> None:
    col = await _first_column(conn, table)
    statements = {
        "INSERT": f"INSERT INTO {table} DEFAULT VALUES",
        "UPDATE": f"UPDATE {table} SET {col} = {col}",
        "DELETE": f"DELETE FROM {table}",
        "TRUNCATE": f"TRUNCATE {table}",
    }
    for write in writes:
        err = await _refused(conn, statements[write])
        assert (err.sqlstate, err.message) == (INSUFFICIENT_PRIVILEGE, f"permission denied for table {table}"), write


# --- authentication -------------------------------------------------------------------------------


def test_pg_hba_has_only_scram_lines(stack: Settings) -> None:
    hba = Paths.of(stack).pg_data / "pg_hba.conf"
    rules = [line.split() for line in hba.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules == [["local", "all", "all", "scram-sha-256"],
                     ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"]]
    assert "trust" not in hba.read_text()


async def test_scram_only_passwords_and_no_service_is_superuser(cluster: Cluster) -> None:
    async with cluster.as_role(PG_ADMIN_ROLE, "postgres") as conn:
        # The file as the server parses it (the refusals below prove the loaded rules).
        rules = await conn.fetch("SELECT auth_method, error FROM pg_hba_file_rules")
        assert [tuple(r) for r in rules] == [("scram-sha-256", None), ("scram-sha-256", None)]
        assert await conn.fetchval("SHOW password_encryption") == "scram-sha-256"
        roles = await conn.fetch("SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolpassword"
                                 " FROM pg_authid WHERE rolname = ANY($1) ORDER BY 1", [PG_ADMIN_ROLE, *ROLES])
    assert sorted(r["rolname"] for r in roles) == sorted([PG_ADMIN_ROLE, *ROLES])
    for r in roles:
        if r["rolname"] in GROUP_ROLES:  # nobody logs in as a group role: no password
            assert r["rolpassword"] is None, r["rolname"]
        else:
            assert r["rolpassword"].startswith("SCRAM-SHA-256$4096:"), r["rolname"]
        assert (r["rolsuper"], r["rolcreatedb"], r["rolcreaterole"]) == ((True, True, True) if r["rolname"] ==
                                                                         PG_ADMIN_ROLE else (False, False, False))


async def test_no_password_or_a_wrong_one_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    empty = tmp_path / "pgpass"
    empty.write_text("")
    empty.chmod(0o600)
    for role in (PG_ADMIN_ROLE, *LOGIN_ROLES):
        database = "postgres" if role == PG_ADMIN_ROLE else cluster.hub if role != SETTLE else cluster.shards[0]
        for attempt in ({"passfile": str(empty)}, {"password": "not-the-password"}):
            with pytest.raises(asyncpg.InvalidPasswordError) as caught:
                await cluster.connect(role, database, **attempt)
            assert caught.value.sqlstate == INVALID_PASSWORD
            assert caught.value.message == f'password authentication failed for user "{role}"'
        conn = await cluster.connect(role, database)  # and the right one (the pgpass file) works
        assert await conn.fetchval("SELECT current_user") == role
        await conn.close()


async def test_a_service_connects_only_to_the_databases_it_uses(cluster: Cluster) -> None:
    for role in LOGIN_ROLES:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
            await cluster.connect(role, "postgres")
        assert caught.value.message == 'permission denied for database "postgres"'
    # The hub grants CONNECT to the router's role, not the engine's: the settlement stage reaches the hub (its
    # sessions, msgid registry, reference data) only as a member of xs_router.
    async with cluster.as_role(OWNER_ROLE, cluster.hub) as conn:
        grantees = {r[0] for r in await conn.fetch(
            "SELECT a.grantee::regrole::text FROM pg_database d, aclexplode(d.datacl) a"
            " WHERE d.datname = current_database() AND a.privilege_type = 'CONNECT'")}
    assert grantees == {OWNER_ROLE, ROUTER, CLEARING, MONITOR, DASHBOARD}
    async with cluster.as_role(SETTLE, cluster.hub) as conn:
        assert await conn.fetchval("SELECT current_user") == SETTLE


# --- grants ---------------------------------------------------------------------------------------


async def test_the_settlement_stage_role_is_a_member_of_the_routers_and_nothing_else(cluster: Cluster) -> None:
    """Role membership is the cluster's: the only one among the project's roles is xs_settle in xs_router,
    inheriting its privileges (no SET ROLE needed), without the right to grant it on (no ADMIN OPTION)."""
    assert MEMBERSHIPS == ((ROUTER, SETTLE),)
    async with cluster.as_role(PG_ADMIN_ROLE, "postgres") as conn:
        rows = await conn.fetch(
            "SELECT roleid::regrole::text AS role, member::regrole::text AS member, admin_option FROM pg_auth_members"
            " WHERE roleid = ANY($1::regrole[]) OR member = ANY($1::regrole[]) ORDER BY 1, 2", list(ROLES))
        assert [tuple(r) for r in rows] == [(ROUTER, SETTLE, False)]
        assert await conn.fetchval("SELECT rolinherit FROM pg_roles WHERE rolname = $1", SETTLE) is True
        assert await conn.fetchval("SELECT pg_has_role($1, $2, 'USAGE')", SETTLE, ROUTER) is True  # inherits
        assert await conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", ROUTER, SETTLE) is False  # one way
        # A group role: nobody logs in as the router's role, and it has no password to leak.
        assert tuple(await conn.fetchrow("SELECT rolcanlogin, rolpassword IS NULL FROM pg_authid WHERE rolname = $1",
                                         ROUTER)) == (False, True)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await cluster.connect(ROUTER, cluster.hub, password="anything")


async def test_every_table_has_exactly_the_expected_grants(cluster: Cluster) -> None:
    for database, expected in [(cluster.hub, HUB_GRANTS), *((d, SHARD_GRANTS) for d in cluster.shards)]:
        tables = await _tables(cluster, database)
        async with cluster.as_role(OWNER_ROLE, database) as conn:
            # What each role may do (membership included: xs_settle has the router's rights too) ...
            got = {
                (role, table): {p for p in PRIVILEGES
                                if await conn.fetchval("SELECT has_table_privilege($1, $2, $3)", role, table, p)}
                for role in GRANTEES for table in tables
            }
            want = {(role, table): _effective(expected, role).get(table, set()) for role in GRANTEES
                    for table in tables}
            assert got == want, database
            # ... and what is granted to each role itself: the router's rights stay xs_router's (hub 0007, shard
            # 0003), the ledger's stay xs_settle's alone (membership is one way).
            rows = await conn.fetch(
                "SELECT a.grantee::regrole::text AS role, c.relname, a.privilege_type FROM pg_class c,"
                " aclexplode(c.relacl) a WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')"
                " AND a.grantee = ANY($1::regrole[])", list(GRANTEES))
            direct: dict[tuple[str, str], set[str]] = {}
            for r in rows:
                direct.setdefault((r["role"], r["relname"]), set()).add(r["privilege_type"])
            assert direct == {(role, table): privileges for role in GRANTEES
                              for table, privileges in expected.get(role, {}).items()}, database
            if database in cluster.shards:
                # Column grants: the router flags a filing revoked and a person's online eligibility.
                cols = await conn.fetch(
                    "SELECT grantee, table_name, column_name FROM information_schema.column_privileges"
                    " WHERE grantee = ANY($1) AND privilege_type = 'UPDATE' ORDER BY 1, 2, 3", list(GRANTEES))
                assert [tuple(r) for r in cols if (r["grantee"], r["table_name"]) not in
                        {(SETTLE, t) for t in SHARD_GRANTS[SETTLE]}] == [
                    (ROUTER, "filing", "revoked"), (ROUTER, "person", "chronic"),
                    (ROUTER, "person", "chronic_online")]
                # The settlement stage routes: those columns are its too, and no other column of a person.
                columns = (("filing", "revoked", True), ("person", "chronic", True),
                           ("person", "chronic_online", True), ("person", "acct_balc_fen", False),
                           ("person", "psn_no", False), ("filing", "enddate", False))
                for role in (ROUTER, SETTLE):
                    for table, column, allowed in columns:
                        assert await conn.fetchval("SELECT has_column_privilege($1, $2, $3, 'UPDATE')", role, table,
                                                   column) is allowed, (role, table, column)


async def test_the_router_can_not_write_the_ledger(cluster: Cluster) -> None:
    for database in cluster.shards:
        async with cluster.as_role(ROUTER, database) as conn:
            for table in LEDGER:
                await _assert_writes_refused(conn, table)
    await _assert_router_limits(cluster, ROUTER)


async def test_the_settlement_stage_routes_within_the_routers_limits(cluster: Cluster) -> None:
    """xs_settle inherits the router's rights and no more: the person columns and filings the router writes,
    nothing else of a person or a filing, and nothing of clearing or the hub's reference data and keys."""
    await _assert_router_limits(cluster, SETTLE)


async def _assert_router_limits(cluster: Cluster, role: str) -> None:
    for database in cluster.shards:
        async with cluster.as_role(role, database) as conn:
            # Of a person it may change the online eligibility only.
            err = await _refused(conn, "UPDATE person SET acct_balc_fen = 0")
            assert (err.sqlstate, err.message) == (INSUFFICIENT_PRIVILEGE, "permission denied for table person")
            for table in ("person", "filing"):
                await _assert_writes_refused(conn, table, ("DELETE", "TRUNCATE"))
    async with cluster.as_role(role, cluster.hub) as conn:
        for table in ("clearing_entry", "clearing_position", "clearing_deposit", "manual_claim", "person_index",
                      "hospital", "institution_key"):
            await _assert_writes_refused(conn, table)


async def test_monitor_and_dashboard_write_nothing(cluster: Cluster) -> None:
    """...but what the dashboard is granted: its own sign-in (its users, the first `admin`), its operators'
    audit rows, and its review of judgements (the judgement's review, the deduction it records). Every write
    not granted is refused."""
    for database in [cluster.hub, *cluster.shards]:
        tables = await _tables(cluster, database)
        assert "audit_log" in tables or "settlement" in tables
        for role in (MONITOR, DASHBOARD):
            granted = HUB_GRANTS[role] if database == cluster.hub else SHARD_GRANTS.get(role, {})
            async with cluster.as_role(role, database) as conn:
                for table in tables:
                    await _assert_writes_refused(conn, table, tuple(w for w in WRITES
                                                                    if w not in granted.get(table, set())))


async def test_clearing_can_not_write_persons(cluster: Cluster) -> None:
    for database in cluster.shards:
        async with cluster.as_role(CLEARING, database) as conn:
            for table in ("person", "filing", "account", "accumulator", *LEDGER):
                await _assert_writes_refused(conn, table)
    async with cluster.as_role(CLEARING, cluster.hub) as conn:
        await _assert_writes_refused(conn, "person_index")


async def test_nobody_updates_deletes_or_truncates_the_audit_log(cluster: Cluster) -> None:
    for role in GRANTEES:  # xs_settle reaches the hub as a member of xs_router
        async with cluster.as_role(role, cluster.hub) as conn:
            await _assert_writes_refused(conn, "audit_log", ("UPDATE", "DELETE", "TRUNCATE"))
    # The owner holds every privilege of its table: the trigger refuses, with the same SQLSTATE.
    async with cluster.as_role(OWNER_ROLE, cluster.hub) as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("INSERT INTO audit_log (actor, action, target) VALUES ('test', 'pg-roles', 'x')")
            for statement, op in [("UPDATE audit_log SET actor = 'someone else'", "UPDATE"),
                                  ("DELETE FROM audit_log", "DELETE"), ("TRUNCATE audit_log", "TRUNCATE")]:
                savepoint = conn.transaction()  # the refusal undoes only this statement
                await savepoint.start()
                with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
                    await conn.execute(statement)
                await savepoint.rollback()
                assert caught.value.message == f"audit_log is append-only ({op} refused)"
        finally:
            await tx.rollback()


async def test_no_service_creates_objects(cluster: Cluster) -> None:
    for database in [cluster.hub, *cluster.shards]:
        for role in GRANTEES:
            async with cluster.as_role(role, database) as conn:
                err = await _refused(conn, "CREATE TABLE planted (x int)")
                assert (err.sqlstate, err.message) == (INSUFFICIENT_PRIVILEGE, "permission denied for schema public")
                err = await _refused(conn, "CREATE TEMPORARY TABLE planted (x int)")
                assert err.sqlstate == INSUFFICIENT_PRIVILEGE
                if database in cluster.shards and role != MONITOR:
                    err = await _refused(conn, "SELECT ensure_ledger_partitions('2030-01-01', '2030-02-01')")
                    assert err.message == "permission denied for function ensure_ledger_partitions"


# --- what each service does -----------------------------------------------------------------------


@asynccontextmanager
async def _rolled_back(c: Cluster, role: str, database: str) -> AsyncIterator[asyncpg.Connection]:
    async with c.as_role(role, database) as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            yield conn
        finally:
            await tx.rollback()


async def test_each_role_can_do_what_its_service_does(cluster: Cluster) -> None:
    shard = cluster.shards[0]
    # Routing: as the router's own role (a group role: SET ROLE from its member) and as the settlement stage's,
    # which routes through its membership of the router's.
    for role in (ROUTER, SETTLE):
        async with _rolled_back(cluster, role, cluster.hub) as conn:
            assert await conn.fetchval("SELECT current_user") == role
            await conn.fetch("SELECT * FROM hospital LIMIT 1")
            await conn.fetch("SELECT * FROM person_index LIMIT 1")
            await conn.fetch("SELECT * FROM institution_key LIMIT 1")
            await conn.execute("INSERT INTO sign_session (sign_no, fixmedins_code, opter) VALUES ('S-PG', 'H1', 'op')")
            assert await conn.execute("UPDATE sign_session SET signed_out_at = now() WHERE sign_no = 'S-PG'"
                                      ) == "UPDATE 1"
            await conn.execute("INSERT INTO msgid_seen (msgid, digest) VALUES ('M-PG', '\\x00')"
                               " ON CONFLICT (msgid) DO NOTHING")
        async with _rolled_back(cluster, role, shard) as conn:
            await conn.fetch("SELECT * FROM person WHERE psn_no = 'P-PG'")
            await conn.execute("INSERT INTO filing (filing_id, psn_no, filing_type, begndate, enddate, source)"
                               " VALUES ('F-PG', 'P-PG', 'TEMPORARY', $1, $1, 'online')"
                               " ON CONFLICT (filing_id) DO NOTHING", date(2026, 3, 1))
            assert await conn.execute("UPDATE filing SET revoked = true WHERE filing_id = 'F-PG' AND psn_no = 'P-PG'"
                                      ) == "UPDATE 1"
            assert await conn.execute(
                "UPDATE person SET chronic_online = chronic_online || jsonb_build_object('DM', true),"
                " chronic = person_chronic(chronic_file, chronic_online) WHERE psn_no = 'P-PG'") == "UPDATE 0"
            await conn.fetch("SELECT balc_fen FROM account WHERE psn_no = 'P-PG'")
            await conn.fetch("SELECT * FROM accumulator WHERE psn_no = 'P-PG'")
    async with _rolled_back(cluster, SETTLE, shard) as conn:
        await conn.execute("INSERT INTO processed_request (msgid, infno, fixmedins_code, infcode, response)"
                           " VALUES ('M-PG', '2207', 'H1', 0, '\\x00')")
        await conn.execute("INSERT INTO account (psn_no, balc_fen) VALUES ('P-PG', 5)"
                           " ON CONFLICT (psn_no) DO UPDATE SET balc_fen = EXCLUDED.balc_fen")
        await conn.execute("SELECT ledger_daily_add('{}'::text[])")
    async with _rolled_back(cluster, CLEARING, cluster.hub) as conn:
        await conn.execute("INSERT INTO clearing_deposit (insured_prov, balance_fen) VALUES ('990000', 1)"
                           " ON CONFLICT (insured_prov) DO UPDATE SET balance_fen = EXCLUDED.balance_fen")
    async with _rolled_back(cluster, CLEARING, shard) as conn:
        await conn.fetch("SELECT count(*) FROM settlement")
    async with _rolled_back(cluster, MONITOR, shard) as conn:
        await conn.fetch("SELECT * FROM ledger_daily LIMIT 1")
        # Through the owner's function only: the partition is the owner's, not the monitor's.
        assert await conn.fetchval("SELECT ensure_ledger_partitions('2031-05-01', '2031-05-01')") == [
            "settlement_2031_05"]
        assert await conn.fetchval("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = "
                                   "'settlement_2031_05'") == OWNER_ROLE
    async with _rolled_back(cluster, DASHBOARD, cluster.hub) as conn:
        await conn.fetch("SELECT * FROM clearing_position LIMIT 1")


# --- a cluster made before this change ------------------------------------------------------------


async def test_a_trust_cluster_made_before_is_migrated_by_the_next_start(
        stack: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state dir whose cluster was made with `trust` (as the stack did before): the next start sets the
    passwords, rewrites pg_hba.conf and reloads — no manual step — and the old owner is no superuser."""
    state = stack.run_dir.resolve() / "trust-cluster"  # the server's system user must reach it
    shutil.rmtree(state, ignore_errors=True)
    (state / "kafka").mkdir(parents=True)
    (state / "kafka" / "lib").symlink_to(Paths.of(stack).kafka_lib.resolve())  # the infra config names them
    old = dataclasses.replace(stack, state_dir=state, run_dir=state, pg_port=_free_ports(1)[0],
                              pg_database="xsettle")
    monkeypatch.setenv("PGPASSFILE", str(state / PG_PASSFILE))  # this state dir's passwords
    p = Paths.of(old)
    p.ensure()
    p.pg_data.mkdir(exist_ok=True)
    user = pwd.getpwnam(PG_OS_USER)
    os.chown(p.pg_data, user.pw_uid, user.pw_gid)
    p.pg_data.chmod(0o700)
    bindir = next(Path("/usr/lib/postgresql").glob("*/bin"))
    subprocess.run(_as_pg_user([str(bindir / "initdb"), "-D", str(p.pg_data), "-U", PG_ADMIN_ROLE, "--auth=trust",
                                "-E", "UTF8", "--locale=C"]), check=True, capture_output=True, cwd=state)
    assert "trust" in (p.pg_data / "pg_hba.conf").read_text()
    try:
        await asyncio.to_thread(start_postgres, old)
        rules = (p.pg_data / "pg_hba.conf").read_text()
        assert "trust" not in rules and rules.count("scram-sha-256") == 2
        for role in (PG_ADMIN_ROLE, *ROLES):
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(host="127.0.0.1", port=old.pg_port, user=role, database="postgres",
                                      password="not-the-password", timeout=10)
        conn = await asyncpg.connect(host="127.0.0.1", port=old.pg_port, user=OWNER_ROLE, database="xsettle",
                                     timeout=10)
        try:
            assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
            # the start granted the membership too (the settlement stage's role routes as the router's)
            assert await conn.fetchval("SELECT pg_has_role($1, $2, 'USAGE')", SETTLE, ROUTER) is True
            assert "0007.roles" in await conn.fetchval("SELECT string_agg(migration_id, ',') FROM _yoyo_migration")
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(stop_postgres, old)
        await asyncio.to_thread(Supervisor(old, infra=True).shutdown)
        shutil.rmtree(state, ignore_errors=True)
