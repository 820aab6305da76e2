"""PostgreSQL for the local stack: our own cluster in .state/pg (initdb once, as the system user
xsettle-pg: initdb/postgres refuse to run as root), run on XS_PG_PORT by the state dir's supervisord
(program `postgres`, as xsettle-pg, no autorestart), then the roles, databases and migrations
(deploy/db.py) of the Settings.

Authentication is scram-sha-256 only (pg_hba.conf: the unix socket and 127.0.0.1, no trust line). The
superuser `postgres` gets its generated password at initdb (through a file, never a command line); a
cluster made before with `trust` is migrated at start: the password is set while trust still lets us in,
then pg_hba.conf is rewritten and reloaded."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.common import Paths, StackError, _port_open, _run_async, say, tail, warn
from deploy.db import PG_ADMIN_ROLE, admin_dsn, owner_settings, role_password, set_password, write_passfile
from deploy.services import infra_program
from deploy.supervisor import Supervisor
from services.common.config import Settings, load_settings

PG_OS_USER = "xsettle-pg"  # initdb/postgres refuse to run as root
# Password authentication only: nothing is trusted for being local.
PG_HBA_CONF = """\
# Written by deploy/postgres.py (rewritten at every start): SCRAM passwords only, the unix socket and loopback.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
"""
PG_READY_TIMEOUT_S = 60.0
# XS_PG_STAT_STATEMENTS=1: load pg_stat_statements (calls, time and rows per statement) for measuring only; the
# server restarts when it changes. Off by default: it hashes and counts every statement.
PG_STAT_STATEMENTS_ENV = "XS_PG_STAT_STATEMENTS"


def _pg_bindirs() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for postgres in Path("/usr/lib/postgresql").glob("*/bin/postgres"):
        found[postgres.parent.parent.name] = postgres.parent
    return found


def _pg_bindir(p: Paths) -> Path:
    found = _pg_bindirs()
    if not found:
        raise StackError("no PostgreSQL server in /usr/lib/postgresql/*/bin: run deploy/bootstrap.sh")
    version_file = p.pg_data / "PG_VERSION"
    if version_file.exists():
        version = version_file.read_text().strip()
        if version not in found:
            raise StackError(
                f"{p.pg_data} was made by PostgreSQL {version}, but only {sorted(found)} is installed: "
                f"stop the stack and delete {p.pg_data} to start afresh"
            )
        return found[version]
    return found[max(found, key=lambda v: [int(x) for x in v.split(".") if x.isdigit()])]


def _ensure_os_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise StackError(f"system user {PG_OS_USER} is missing and only root can create it")
    say(f"postgres: creating system user {PG_OS_USER}")
    nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            nologin,
            PG_OS_USER,
        ],
        check=True,
    )
    return pwd.getpwnam(PG_OS_USER)


def _as_pg_user(cmd: Sequence[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_OS_USER, "--", *cmd]
    return list(cmd)


def _chown(path: Path, user: pwd.struct_passwd) -> None:
    if os.geteuid() == 0:
        os.chown(path, user.pw_uid, user.pw_gid)


def pg_pid(s: Settings | None = None) -> int | None:
    """The postmaster's pid while the state dir's supervisord runs it."""
    return Supervisor(s or load_settings(), infra=True).pid("postgres")


def postgres_programs(s: Settings) -> list[str]:
    """The infrastructure supervisord's `postgres` program (none when PostgreSQL is not installed): the
    postmaster in the foreground, as PG_OS_USER when supervisord runs as root. SIGINT is PostgreSQL's
    fast shutdown; only the postmaster is signalled (it stops its backends itself)."""
    p = Paths.of(s)
    if not _pg_bindirs():
        return []
    user = _ensure_os_user().pw_name if os.geteuid() == 0 else None
    command = [
        str(_pg_bindir(p) / "postgres"),
        "-D",
        str(p.pg_data),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        f"port={s.pg_port}",
        "-c",
        f"unix_socket_directories={p.pg_sock}",
        "-c",
        "max_connections=200",
        "-c",
        "password_encryption=scram-sha-256",
        # Bulk loads (13 M persons) write GBs of WAL: with the default 1 GB a checkpoint every few
        # seconds rewrites the same pages again and again.
        "-c",
        "max_wal_size=8GB",
        "-c",
        "checkpoint_timeout=15min",
        "-c",
        "shared_buffers=512MB",
        "-c",
        "maintenance_work_mem=256MB",
        # No personal data in the server log: the DETAIL of an error quotes the row's values (a unique
        # violation on a person-keyed table names the psn_no), so errors are logged without it.
        "-c",
        "log_error_verbosity=terse",
    ]
    if os.environ.get(PG_STAT_STATEMENTS_ENV) == "1":
        command += ["-c", "shared_preload_libraries=pg_stat_statements", "-c", "pg_stat_statements.track=all",
                    "-c", "pg_stat_statements.track_planning=on"]
    return [infra_program("postgres", command, p.pg_data, p.log("postgres"), stop_signal="INT",
                          stop_wait_secs=int(PG_READY_TIMEOUT_S), as_group=False, user=user)]


def _pg_ctl(p: Paths, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_pg_user([str(_pg_bindir(p) / "pg_ctl"), "-D", str(p.pg_data), *args]),
        capture_output=True, text=True, cwd=p.state, stdin=subprocess.DEVNULL, check=False,
    )


def stop_legacy_postgres(s: Settings) -> bool:
    """Stop a server of this data dir that supervisord does not run (started by pg_ctl before PostgreSQL
    became a supervisord program): once, when the stack takes over. Returns whether there was one."""
    p = Paths.of(s)
    if not (p.pg_data / "postmaster.pid").exists() or not _pg_bindirs() or pg_pid(s) is not None:
        return False
    if _pg_ctl(p, "status").returncode != 0:
        return False  # a stale postmaster.pid (start_postgres removes it)
    say(f"postgres: stopping the server in {p.pg_data} started before supervisord ran PostgreSQL")
    res = _pg_ctl(p, "stop", "-m", "fast", "-w", "-t", "60")
    if res.returncode != 0:
        raise StackError(f"postgres: pg_ctl stop failed:\n{res.stdout}{res.stderr}")
    return True


def _pg_admin_dsn(s: Settings) -> str:
    return admin_dsn(s)


def _write_pg_file(path: Path, text: str, user: pwd.struct_passwd) -> None:
    """A file of the data directory, owned by the server's system user, 0600."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    tmp.chmod(0o600)
    _chown(tmp, user)
    tmp.replace(path)


def _initdb(p: Paths, s: Settings, bindir: Path, user: pwd.struct_passwd) -> None:
    """A new cluster whose superuser has its generated password (read by initdb from a file that only
    the server's user may read, deleted at once) and SCRAM authentication."""
    fd, pwfile = tempfile.mkstemp(prefix=".initdb-", dir=p.state)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(role_password(s, PG_ADMIN_ROLE) + "\n")
        _chown(Path(pwfile), user)
        res = subprocess.run(
            _as_pg_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(p.pg_data),
                    "-U",
                    PG_ADMIN_ROLE,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]
            ),
            capture_output=True,
            text=True,
            cwd=p.state,
            check=False,
        )
    finally:
        os.unlink(pwfile)
    if res.returncode != 0:
        raise StackError(f"postgres: initdb failed:\n{res.stdout}{res.stderr}")
    _write_pg_file(p.pg_data / "pg_hba.conf", PG_HBA_CONF, user)


def secure_cluster(s: Settings) -> list[str]:
    """The superuser's password, then pg_hba.conf with SCRAM lines only (reloaded when it changed). On a
    cluster made with `trust` the password is set while trust still applies, so no manual step."""
    import psycopg

    p = Paths.of(s)
    done: list[str] = []
    write_passfile(s)
    with psycopg.connect(admin_dsn(s), autocommit=True, connect_timeout=10) as conn:
        set_password(conn, PG_ADMIN_ROLE, role_password(s, PG_ADMIN_ROLE))
        # The maintenance database is the superuser's; each of ours grants CONNECT itself (migrations).
        conn.execute("REVOKE CONNECT, TEMPORARY ON DATABASE postgres FROM PUBLIC")
        hba = p.pg_data / "pg_hba.conf"
        if hba.read_text() != PG_HBA_CONF:
            _write_pg_file(hba, PG_HBA_CONF, _ensure_os_user())
            loaded = conn.execute("SELECT pg_conf_load_time()").fetchone()
            if conn.execute("SELECT pg_reload_conf()").fetchone() != (True,):
                raise StackError("postgres: pg_reload_conf() failed")
            # The reload is asynchronous: a backend re-reads the configuration after the postmaster did,
            # so once this session's load time moved, new connections meet the new rules.
            deadline = time.monotonic() + 10
            while conn.execute("SELECT pg_conf_load_time()").fetchone() == loaded:
                if time.monotonic() > deadline:
                    raise StackError("postgres: the server did not reload pg_hba.conf within 10 s")
                time.sleep(0.05)
            done.append("pg_hba.conf: scram-sha-256 only (trust lines removed), reloaded")
    return done


async def _pg_wait_connect(dsn: str, timeout: float) -> None:
    import asyncpg

    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
            await conn.fetchval("SELECT 1")
            await conn.close()
            return
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            if time.monotonic() > deadline:
                raise StackError(f"postgres: no connection to {dsn} within {timeout:.0f}s: {exc}") from exc
            await asyncio.sleep(0.2)


def start_postgres(s: Settings | None = None) -> int | None:
    """Start our own cluster in .state/pg unless it runs; create role + database; apply schema."""
    s = s or load_settings()
    p = Paths.of(s)
    p.ensure()
    log = p.log("postgres")
    pid = pg_pid(s)
    superuser_dsn = _pg_admin_dsn(s)
    if pid is not None:
        say(f"postgres: already running (pid {pid})")
    elif _port_open(s.pg_port):
        warn(f"postgres: port {s.pg_port} answers but not from {p.pg_data}; reusing that server")
        superuser_dsn = s.pg_dsn
    else:
        bindir = _pg_bindir(p)
        user = _ensure_os_user()
        stale = p.pg_data / "postmaster.pid"
        if stale.exists():
            # No postgres of ours alive and nothing on the port: left by a killed server or a reboot,
            # and its pid may now belong to another process (postgres would then refuse to start).
            warn(f"postgres: removing stale {stale}")
            stale.unlink()
        if not (p.pg_data / "PG_VERSION").exists():
            if p.pg_data.exists():
                shutil.rmtree(p.pg_data)  # an initdb that did not finish
            p.pg_data.mkdir(parents=True)
            _chown(p.pg_data, user)
            p.pg_data.chmod(0o700)
            say(f"postgres: initdb {p.pg_data} ({bindir.parent.name})")
            _initdb(p, s, bindir, user)
        p.pg_sock.mkdir(parents=True, exist_ok=True)
        _chown(p.pg_sock, user)
        sup = Supervisor(s, infra=True)
        pid = sup.start("postgres")
        deadline = time.monotonic() + PG_READY_TIMEOUT_S
        while not _port_open(s.pg_port):
            if sup.pid("postgres") is None:
                raise StackError(f"postgres exited during start-up; last lines of {log}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise StackError(f"postgres: port {s.pg_port} not open within {PG_READY_TIMEOUT_S:.0f}s; "
                                 f"last lines of {log}:\n{tail(log)}")
            time.sleep(0.1)
        say(f"postgres: started pid {pid} on 127.0.0.1:{s.pg_port}")

    from deploy.db import ensure_databases, migrate_all

    try:
        write_passfile(s)
        _run_async(_pg_wait_connect(superuser_dsn, PG_READY_TIMEOUT_S))
        if superuser_dsn == _pg_admin_dsn(s):  # our own cluster
            for done in secure_cluster(s):
                say(f"postgres: {done}")
        for done in _run_async(ensure_databases(superuser_dsn, s)):
            say(f"postgres: {done}")
        for applied in migrate_all(s):
            say(f"postgres: applied migration {applied}")
    except StackError as exc:
        raise StackError(f"{exc}\nlast lines of {log}:\n{tail(log)}") from exc
    except Exception as exc:
        raise StackError(f"postgres: set-up on {s.pg_dsn} failed: {exc!r}\nlast lines of {log}:\n{tail(log)}") from exc
    say(f"postgres: ready, migrations applied ({owner_settings(s).pg_dsn})")
    return pid


def stop_postgres(s: Settings | None = None) -> bool:
    """Fast shutdown (SIGINT) of the server supervisord runs; it stays down. Returns whether it ran."""
    return Supervisor(s or load_settings(), infra=True).stop("postgres")
