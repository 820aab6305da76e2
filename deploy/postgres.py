"""PostgreSQL for the local stack: our own cluster in .state/pg (initdb once, as the system user
xsettle-pg: initdb/postgres refuse to run as root), started with pg_ctl on XS_PG_PORT, then the
role, database and migrations (deploy/db.py) of the Settings."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.common import Paths, StackError, _port_open, _rotate, _run_async, say, tail, warn
from deploy.procs import _cmdline, _pid_alive, _read_pid
from services.common.config import Settings, load_settings

PG_OS_USER = "xsettle-pg"  # initdb/postgres refuse to run as root
PG_ADMIN_ROLE = "postgres"  # bootstrap superuser created by initdb
PG_READY_TIMEOUT_S = 60.0


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
    p = Paths.of(s or load_settings())
    pid = _read_pid(p.pg_data / "postmaster.pid")
    if pid is not None and _pid_alive(pid) and any("postgres" in a for a in _cmdline(pid)[:1]):
        return pid
    return None


def _pg_admin_dsn(s: Settings) -> str:
    return f"postgresql://{PG_ADMIN_ROLE}@127.0.0.1:{s.pg_port}/postgres"


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
    admin_dsn = _pg_admin_dsn(s)
    if pid is not None:
        say(f"postgres: already running (pid {pid})")
    elif _port_open(s.pg_port):
        warn(f"postgres: port {s.pg_port} answers but not from {p.pg_data}; reusing that server")
        admin_dsn = s.pg_dsn
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
            res = subprocess.run(
                _as_pg_user(
                    [
                        str(bindir / "initdb"),
                        "-D",
                        str(p.pg_data),
                        "-U",
                        PG_ADMIN_ROLE,
                        "--auth=trust",
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
            if res.returncode != 0:
                raise StackError(f"postgres: initdb failed:\n{res.stdout}{res.stderr}")
        p.pg_sock.mkdir(parents=True, exist_ok=True)
        _chown(p.pg_sock, user)
        _rotate(log)
        log.touch()
        _chown(log, user)
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={s.pg_port} "
            f"-c unix_socket_directories='{p.pg_sock}' -c max_connections=200"
        )
        res = subprocess.run(
            _as_pg_user(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(p.pg_data),
                    "-l",
                    str(log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(int(PG_READY_TIMEOUT_S)),
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
            cwd=p.state,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if res.returncode != 0:
            raise StackError(
                f"postgres: pg_ctl start failed:\n{res.stdout}{res.stderr}\nlast lines of {log}:\n{tail(log)}"
            )
        pid = pg_pid(s)
        say(f"postgres: started pid {pid} on 127.0.0.1:{s.pg_port}")

    from deploy.db import ensure_role_and_database, migrate

    try:
        _run_async(_pg_wait_connect(admin_dsn, PG_READY_TIMEOUT_S))
        for done in _run_async(ensure_role_and_database(admin_dsn, s.pg_user, s.pg_database)):
            say(f"postgres: {done}")
        for applied in migrate(s.pg_dsn):
            say(f"postgres: applied migration {applied} to {s.pg_database}")
    except StackError as exc:
        raise StackError(f"{exc}\nlast lines of {log}:\n{tail(log)}") from exc
    except Exception as exc:
        raise StackError(f"postgres: set-up on {s.pg_dsn} failed: {exc!r}\nlast lines of {log}:\n{tail(log)}") from exc
    say(f"postgres: ready, migrations applied ({s.pg_dsn})")
    return pid


def stop_postgres(s: Settings | None = None) -> bool:
    s = s or load_settings()
    p = Paths.of(s)
    pid = pg_pid(s)
    if pid is None:
        return False
    say(f"postgres: stopping pid {pid}")
    bindir = _pg_bindir(p)
    res = subprocess.run(
        _as_pg_user([str(bindir / "pg_ctl"), "-D", str(p.pg_data), "stop", "-m", "fast", "-w", "-t", "60"]),
        capture_output=True,
        text=True,
        cwd=p.state,
        check=False,
    )
    if res.returncode != 0 and pg_pid(s) is not None:
        raise StackError(f"postgres: pg_ctl stop failed:\n{res.stdout}{res.stderr}")
    return True

