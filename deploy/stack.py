"""The local stack: PostgreSQL, a single-node KRaft Kafka and the broker's own services.

    python -m deploy.stack start [--infra-only]   # idempotent; reuses what already runs
    python -m deploy.stack stop                   # services, then Kafka, then PostgreSQL
    python -m deploy.stack status                 # table: component, state, pid, ports, log
    python -m deploy.stack restart-service NAME   # also: start-service NAME, stop-service NAME [--kill]
                                                  # (NAME: a service of deploy/services.py, or prometheus)

Everything listens on 127.0.0.1 only, on the ports from Settings (XS_* env vars), and keeps
its files under Settings.state_dir (default .state/): pg/ (data), pgsock/, kafka/ (lib, data,
server.properties, cluster-id), prometheus/ (config, rules, data), logs/<component>.log,
run/<component>.pid. `start` also starts Prometheus (with --infra-only too) when installed.

Functions for tests (crash tests kill -9 and restart a service):
    start_service(name) -> pid, stop_service(name, kill=False), restart_service(name),
    is_running(name), is_healthy(name), service_pid(name).
Run `deploy/bootstrap.sh` first: it installs PostgreSQL and resolves the Kafka jars.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from deploy.services import ServiceSpec, service_specs
from services.common.config import PROJECT_ROOT, ConfigError, Settings, load_settings

ROOT = PROJECT_ROOT
DEPLOY_DIR = Path(__file__).resolve().parent
LOG4J_CONFIG = DEPLOY_DIR / "kafka" / "log4j2.yaml"
SCHEMA_FILE = DEPLOY_DIR / "sql" / "schema.sql"

PG_OS_USER = "xsettle-pg"  # initdb/postgres refuse to run as root
PG_ADMIN_ROLE = "postgres"  # bootstrap superuser created by initdb
KAFKA_NODE_ID = 1
KAFKA_MAIN = "kafka.Kafka"

KAFKA_READY_TIMEOUT_S = 60.0
PG_READY_TIMEOUT_S = 60.0
SERVICE_READY_TIMEOUT_S = 60.0
SERVICE_STOP_TIMEOUT_S = 10.0
KAFKA_STOP_TIMEOUT_S = 30.0

T = TypeVar("T")


class StackError(RuntimeError):
    """A component could not be started or stopped; the message says why (with a log tail)."""


def say(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"[stack] WARNING: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Paths:
    state: Path
    logs: Path
    run: Path
    kafka: Path
    kafka_lib: Path
    kafka_data: Path
    kafka_props: Path
    kafka_cluster_id: Path
    kafka_format_stamp: Path
    pg_data: Path
    pg_sock: Path

    @staticmethod
    def of(s: Settings) -> Paths:
        st = s.state_dir.resolve()
        k = st / "kafka"
        return Paths(
            state=st,
            logs=st / "logs",
            run=st / "run",
            kafka=k,
            kafka_lib=k / "lib",
            kafka_data=k / "data",
            kafka_props=k / "server.properties",
            kafka_cluster_id=k / "cluster-id",
            kafka_format_stamp=k / "format.stamp",
            pg_data=st / "pg",
            pg_sock=st / "pgsock",
        )

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pidfile(self, component: str) -> Path:
        return self.run / f"{component}.pid"

    def ensure(self) -> None:
        for d in (self.state, self.logs, self.run, self.kafka):
            d.mkdir(parents=True, exist_ok=True)


def venv_python() -> str:
    candidate = ROOT / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also when called from inside a running loop (e.g. an async test)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


# --- process helpers ---------------------------------------------------------------------

# Children started by this Python process, so that a killed one is reaped (no zombie that
# still "exists" for os.kill(pid, 0)).
_children: dict[int, subprocess.Popen[bytes]] = {}


def _pid_alive(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        _children.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # state is the field after the parenthesised command name
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    except (OSError, IndexError):
        pass
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_ok(port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _rotate(log: Path) -> None:
    if log.exists() and log.stat().st_size > 0:
        log.replace(log.with_name(log.name + ".1"))


def _signal_group(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


def _terminate(pid: int, timeout: float, kill: bool = False) -> None:
    """SIGTERM the process group, wait, SIGKILL after `timeout` (or SIGKILL at once if kill)."""
    if not kill:
        _signal_group(pid, signal.SIGTERM)
        if _wait_dead(pid, timeout):
            return
        warn(f"pid {pid} still alive {timeout:.0f}s after SIGTERM: SIGKILL")
    _signal_group(pid, signal.SIGKILL)
    if not _wait_dead(pid, 10):
        raise StackError(f"pid {pid} survived SIGKILL")


def _spawn(cmd: Sequence[str], log: Path, pidfile: Path, cwd: Path) -> int:
    """Start a daemon in its own session/process group; stdout+stderr to `log`."""
    _rotate(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ.copy(),
        )
    _children[proc.pid] = proc
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{proc.pid}\n")
    return proc.pid


# --- Kafka ---------------------------------------------------------------------------------


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise StackError("java not found: run deploy/bootstrap.sh")
    return found


def _kafka_classpath(p: Paths) -> str:
    if not p.kafka_lib.is_dir() or not any(p.kafka_lib.glob("kafka_2.13-*.jar")):
        raise StackError(f"Kafka jars missing in {p.kafka_lib}: run deploy/bootstrap.sh")
    return f"{p.kafka_lib}/*"


def kafka_pid(s: Settings | None = None) -> int | None:
    p = Paths.of(s or load_settings())
    pid = _read_pid(p.pidfile("kafka"))
    if pid is not None and _pid_alive(pid) and KAFKA_MAIN in _cmdline(pid):
        return pid
    return None


def kafka_properties(s: Settings, p: Paths) -> str:
    port, ctrl = s.kafka_port, s.kafka_controller_port
    return "\n".join(
        [
            "# Generated by deploy/stack.py on every start; edit there, not here.",
            "process.roles=broker,controller",
            f"node.id={KAFKA_NODE_ID}",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{ctrl}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctrl}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={p.kafka_data}",
            "num.partitions=1",
            "auto.create.topics.enable=true",
            # single node: every internal topic with replication factor 1
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=16",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=16",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "default.replication.factor=1",
            "min.insync.replicas=1",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.hours=168",
            "",
        ]
    )


def _java_tool(p: Paths, main: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        _java(),
        "-Xmx512M",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp",
        _kafka_classpath(p),
        main,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)


def _kafka_format(s: Settings, p: Paths) -> None:
    stamp = f"node={KAFKA_NODE_ID} port={s.kafka_port} controller={s.kafka_controller_port}"
    meta = p.kafka_data / "meta.properties"
    if meta.exists():
        old = p.kafka_format_stamp.read_text().strip() if p.kafka_format_stamp.exists() else stamp
        if old == stamp:
            return
        # The standalone controller's endpoint is recorded in the metadata log at format time.
        warn(f"Kafka ports changed ({old} -> {stamp}): wiping {p.kafka_data} and formatting anew")
        shutil.rmtree(p.kafka_data)
    if p.kafka_cluster_id.exists():
        cluster_id = p.kafka_cluster_id.read_text().strip()
    else:
        res = _java_tool(p, "kafka.tools.StorageTool", "random-uuid")
        if res.returncode != 0:
            raise StackError(f"kafka StorageTool random-uuid failed:\n{res.stdout}{res.stderr}")
        cluster_id = res.stdout.strip().splitlines()[-1].strip()
        p.kafka_cluster_id.write_text(cluster_id + "\n")
    say(f"formatting Kafka storage {p.kafka_data} (cluster id {cluster_id})")
    res = _java_tool(
        p,
        "kafka.tools.StorageTool",
        "format",
        "--standalone",
        "-t",
        cluster_id,
        "-c",
        str(p.kafka_props),
        "--ignore-formatted",
    )
    if res.returncode != 0:
        raise StackError(f"kafka StorageTool format failed:\n{res.stdout}{res.stderr}")
    p.kafka_format_stamp.write_text(stamp + "\n")


def _kafka_launch(s: Settings, p: Paths) -> int:
    classpath = _kafka_classpath(p)
    p.kafka_props.write_text(kafka_properties(s, p))
    _kafka_format(s, p)
    cmd = [
        _java(),
        "-Xmx1G",
        "-Xms1G",
        "-server",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-XX:MaxInlineLevel=15",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp",
        classpath,
        KAFKA_MAIN,
        str(p.kafka_props),
    ]
    pid = _spawn(cmd, p.log("kafka"), p.pidfile("kafka"), cwd=p.kafka)
    say(f"kafka: started pid {pid} on 127.0.0.1:{s.kafka_port} (controller {s.kafka_controller_port})")
    return pid


async def kafka_metadata(bootstrap: str, timeout_ms: int = 5000) -> int:
    """One real metadata request; returns the number of brokers it reports."""
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    try:
        await client.bootstrap()
        metadata = await client.fetch_all_metadata()
        return len(metadata.brokers())
    finally:
        await client.close()


def _kafka_probe(s: Settings) -> bool:
    if not _port_open(s.kafka_port):
        return False
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return _run_async(kafka_metadata(s.kafka_bootstrap)) >= 1
    except Exception:
        return False
    finally:
        quiet.setLevel(level)


def _kafka_wait_ready(s: Settings, p: Paths, pid: int | None, timeout: float = KAFKA_READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if pid is not None and not _pid_alive(pid):
            raise StackError(
                f"kafka (pid {pid}) exited during start-up; last lines of {p.log('kafka')}:\n" + tail(p.log("kafka"))
            )
        if _kafka_probe(s):
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"kafka did not answer a metadata request on {s.kafka_bootstrap} within {timeout:.0f}s; "
                f"last lines of {p.log('kafka')}:\n" + tail(p.log("kafka"))
            )
        time.sleep(0.25)


def start_kafka(s: Settings | None = None, wait: bool = True) -> int | None:
    """Start Kafka unless it runs already; returns its pid (None: an instance we did not start).
    With a multi-broker cluster (--brokers N, deploy/kafka.py) it starts every node and waits."""
    s = s or load_settings()
    p = Paths.of(s)
    p.ensure()
    from deploy import kafka as cluster

    if s.kafka_brokers > 1:
        return cluster.start_cluster(s)[0]
    cluster.stop_any_cluster(s)  # a cluster left from --brokers N holds node 1's ports
    pid = kafka_pid(s)
    if pid is not None:
        say(f"kafka: already running (pid {pid})")
    elif _port_open(s.kafka_port) or _port_open(s.kafka_controller_port):
        if _kafka_probe(s):
            warn(f"kafka: port {s.kafka_port} answers but was not started from {p.state}; reusing it")
            return None
        raise StackError(
            f"kafka: port {s.kafka_port} or {s.kafka_controller_port} is taken by something that is not "
            "this stack's Kafka (set XS_KAFKA_PORT / XS_KAFKA_CONTROLLER_PORT)"
        )
    else:
        pid = _kafka_launch(s, p)
    if wait:
        _kafka_wait_ready(s, p, pid)
        say(f"kafka: ready on {s.kafka_bootstrap}")
    return pid


def _stop_component(p: Paths, name: str, pid: int | None, timeout: float, kill: bool = False) -> bool:
    """Stop a component this stack started (its pid, or None when not running) and forget its pidfile."""
    if pid is not None:
        say(f"{name}: {'killing' if kill else 'stopping'} pid {pid}")
        _terminate(pid, timeout, kill=kill)
    p.pidfile(name).unlink(missing_ok=True)
    return pid is not None


def stop_kafka(s: Settings | None = None, timeout: float = KAFKA_STOP_TIMEOUT_S) -> bool:
    from deploy import kafka as cluster

    s = s or load_settings()
    cluster.stop_any_cluster(s)
    return _stop_component(Paths.of(s), "kafka", kafka_pid(s), timeout)


# --- PostgreSQL ----------------------------------------------------------------------------


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

    from deploy.db import apply_schema, ensure_role_and_database

    try:
        _run_async(_pg_wait_connect(admin_dsn, PG_READY_TIMEOUT_S))
        for done in _run_async(ensure_role_and_database(admin_dsn, s.pg_user, s.pg_database)):
            say(f"postgres: {done}")
        _run_async(apply_schema(s.pg_dsn, SCHEMA_FILE))
    except StackError as exc:
        raise StackError(f"{exc}\nlast lines of {log}:\n{tail(log)}") from exc
    except Exception as exc:
        raise StackError(f"postgres: set-up on {s.pg_dsn} failed: {exc!r}\nlast lines of {log}:\n{tail(log)}") from exc
    say(f"postgres: ready, schema applied ({s.pg_dsn})")
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


# --- the broker's services ------------------------------------------------------------------


def _spec(name: str, s: Settings) -> ServiceSpec:
    for spec in service_specs(s):
        if spec.name == name:
            return spec
    known = ", ".join(x.name for x in service_specs(s))
    raise StackError(f"unknown service {name!r} (known: {known})")


def service_pid(name: str, s: Settings | None = None) -> int | None:
    s = s or load_settings()
    spec = _spec(name, s)
    pid = _read_pid(Paths.of(s).pidfile(name))
    if pid is None or not _pid_alive(pid):
        return None
    args = _cmdline(pid)
    if "-m" in args and spec.module in args:
        return pid
    return None


def _wait_service_ready(spec: ServiceSpec, pid: int, p: Paths, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not _pid_alive(pid):
            raise StackError(
                f"{spec.name} (pid {pid}) exited during start-up; last lines of {p.log(spec.name)}:\n"
                + tail(p.log(spec.name))
            )
        if _http_ok(spec.ready_port, timeout=1.0):
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"{spec.name} (pid {pid}) did not answer GET http://127.0.0.1:{spec.ready_port}/ with 200 "
                f"within {timeout:.0f}s; last lines of {p.log(spec.name)}:\n" + tail(p.log(spec.name))
            )
        time.sleep(0.1)


_lock_guard = threading.RLock()
_lock_file: IO[str] | None = None
_lock_depth = 0


@contextlib.contextmanager
def stack_lock(p: Paths) -> Iterator[None]:
    """One start/stop at a time across processes (several engineers' test sessions restart services
    at once; two spawns of one service would leave the winner without its pidfile). Reentrant."""
    global _lock_file, _lock_depth
    with _lock_guard:
        if _lock_depth == 0:
            p.run.mkdir(parents=True, exist_ok=True)
            _lock_file = open(p.run / "stack.lock", "w")  # noqa: SIM115 - closed when the depth returns to 0
            fcntl.flock(_lock_file, fcntl.LOCK_EX)
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
            if _lock_depth == 0 and _lock_file is not None:
                _lock_file.close()
                _lock_file = None


def start_service(
    name: str, settings: Settings | None = None, *, wait: bool = True, timeout: float = SERVICE_READY_TIMEOUT_S
) -> int:
    """Start one service (reused if it already runs); with wait, return once GET / answers 200."""
    s = settings or load_settings()
    p = Paths.of(s)
    p.ensure()
    with stack_lock(p):
        return _start_service(name, s, p, wait=wait, timeout=timeout)


def _start_service(name: str, s: Settings, p: Paths, *, wait: bool, timeout: float) -> int:
    spec = _spec(name, s)
    pid = service_pid(name, s)
    if pid is not None:
        say(f"{name}: already running (pid {pid})")
    else:
        # A process that just exited may still hold its ports for a moment: give it a few seconds.
        deadline = time.monotonic() + 5
        while (busy := [port for port in spec.ports if _port_open(port)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if busy:
            raise StackError(
                f"{name}: port(s) {busy} already in use by a process this stack did not start "
                f"(no live pid in {p.pidfile(name)})"
            )
        pid = _spawn([venv_python(), "-m", spec.module], p.log(name), p.pidfile(name), cwd=ROOT)
        say(f"{name}: started pid {pid} (ports {', '.join(map(str, spec.ports))})")
    if wait:
        _wait_service_ready(spec, pid, p, timeout)
    return pid


def stop_service(
    name: str, kill: bool = False, settings: Settings | None = None, timeout: float = SERVICE_STOP_TIMEOUT_S
) -> bool:
    """Stop one service: SIGTERM (SIGKILL after timeout), or SIGKILL at once with kill=True."""
    s = settings or load_settings()
    p = Paths.of(s)
    with stack_lock(p):
        return _stop_component(p, name, service_pid(name, s), timeout, kill=kill)


def restart_service(name: str, settings: Settings | None = None, kill: bool = False) -> int:
    s = settings or load_settings()
    with stack_lock(Paths.of(s)):
        stop_service(name, kill=kill, settings=s)
        return start_service(name, s)


def is_running(name: str, settings: Settings | None = None) -> bool:
    """Whether the component's process (started by this stack) is alive."""
    s = settings or load_settings()
    if name == "kafka":
        from deploy import kafka as cluster

        return kafka_pid(s) is not None or any(cluster.node_pid(s, n) for n in cluster.nodes(s)[1:])
    if name == "postgres":
        return pg_pid(s) is not None
    if name == "prometheus":
        return prometheus_pid(s) is not None
    return service_pid(name, s) is not None


def is_healthy(name: str, settings: Settings | None = None) -> bool:
    """Alive and answering: Kafka a metadata request, PostgreSQL its port, a service GET / with 200."""
    s = settings or load_settings()
    if not is_running(name, s):
        return False
    if name == "kafka":
        return _kafka_probe(s)
    if name == "postgres":
        return _port_open(s.pg_port)
    if name == "prometheus":
        return _prometheus_http(s, "/-/ready")
    return _http_ok(_spec(name, s).ready_port)


# --- Prometheus ------------------------------------------------------------------------------
# The local stack's own server (Debian package `prometheus`, installed by deploy/bootstrap.sh),
# configured by deploy/prometheus: scrapes every service, evaluates the project's rules.

PROMETHEUS_READY_TIMEOUT_S = 30.0


def prometheus_pid(s: Settings | None = None) -> int | None:
    from deploy.prometheus import PromPaths

    s = s or load_settings()
    pid = _read_pid(Paths.of(s).pidfile("prometheus"))
    if pid is None or not _pid_alive(pid):
        return None
    args = _cmdline(pid)
    if args and Path(args[0]).name == "prometheus" and f"--config.file={PromPaths.of(s).config}" in args:
        return pid
    return None


def _prometheus_http(s: Settings, path: str, method: str = "GET", timeout: float = 2.0) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{s.prometheus_port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def reload_prometheus(s: Settings | None = None) -> bool:
    """Re-render config and rules; a running server re-reads them (POST /-/reload)."""
    from deploy.prometheus import write_files

    s = s or load_settings()
    write_files(s)
    return prometheus_pid(s) is not None and _prometheus_http(s, "/-/reload", method="POST", timeout=10.0)


def start_prometheus(s: Settings | None = None) -> int | None:
    """Start the server unless it runs (then reload it if its files changed); None when not installed."""
    from deploy.prometheus import command, write_files

    s = s or load_settings()
    p = Paths.of(s)
    binary = shutil.which("prometheus")
    if binary is None:
        warn("prometheus: not installed (run deploy/bootstrap.sh): no metrics server")
        return None
    changed = write_files(s)
    pid = prometheus_pid(s)
    if pid is not None:
        if changed and not _prometheus_http(s, "/-/reload", method="POST", timeout=10.0):
            raise StackError(f"prometheus: reload failed; last lines of {p.log('prometheus')}:\n"
                             + tail(p.log("prometheus")))
        say(f"prometheus: already running (pid {pid}){', reloaded' if changed else ''}")
        return pid
    if _port_open(s.prometheus_port):
        raise StackError(f"prometheus: port {s.prometheus_port} is taken by a process this stack did not start "
                         "(set XS_PROMETHEUS_PORT)")
    pid = _spawn(command(binary, s), p.log("prometheus"), p.pidfile("prometheus"), cwd=p.state)
    deadline = time.monotonic() + PROMETHEUS_READY_TIMEOUT_S
    while not _prometheus_http(s, "/-/ready"):
        if not _pid_alive(pid) or time.monotonic() > deadline:
            raise StackError(f"prometheus (pid {pid}) did not become ready; last lines of "
                             f"{p.log('prometheus')}:\n{tail(p.log('prometheus'))}")
        time.sleep(0.2)
    say(f"prometheus: started pid {pid} on http://127.0.0.1:{s.prometheus_port}/")
    return pid


def stop_prometheus(s: Settings | None = None) -> bool:
    s = s or load_settings()
    return _stop_component(Paths.of(s), "prometheus", prometheus_pid(s), SERVICE_STOP_TIMEOUT_S)


# --- orchestration --------------------------------------------------------------------------


def apply_topics(s: Settings | None = None) -> None:
    from deploy import kafka as cluster

    if not (ROOT / "topics" / "apply.py").exists():
        warn("topics/apply.py does not exist yet: skipping topic creation")
        return
    say("topics: python -m topics.apply")
    # A multi-broker cluster replicates every topic 3 times (min.insync.replicas=2 is the brokers' default).
    env = {"XS_REPLICATION_FACTOR": str(cluster.replication_factor(s or load_settings())), **os.environ}
    res = subprocess.run([venv_python(), "-m", "topics.apply"], cwd=ROOT, stdin=subprocess.DEVNULL, check=False,
                         env=env)
    if res.returncode != 0:
        raise StackError(f"python -m topics.apply failed with exit code {res.returncode}")


def start(infra_only: bool = False, settings: Settings | None = None) -> None:
    s = settings or load_settings()
    p = Paths.of(s)
    p.ensure()
    t0 = time.monotonic()
    # Kafka's JVM boots while PostgreSQL starts.
    kpid = start_kafka(s, wait=False)
    start_postgres(s)
    if kpid is not None or kafka_pid(s) is not None:
        _kafka_wait_ready(s, p, kpid)
        say(f"kafka: ready on {s.kafka_bootstrap}")
    apply_topics(s)
    if not infra_only:
        specs = service_specs(s)
        pids = {spec.name: start_service(spec.name, s, wait=False) for spec in specs}
        errors: list[str] = []
        for spec in specs:
            try:
                _wait_service_ready(spec, pids[spec.name], p, SERVICE_READY_TIMEOUT_S)
            except StackError as exc:
                errors.append(str(exc))
                continue
            say(f"{spec.name}: ready (GET http://127.0.0.1:{spec.ready_port}/ -> 200)")
        if errors:
            print_status(s)
            raise StackError("\n\n".join(errors))
    start_prometheus(s)
    say(f"stack up in {time.monotonic() - t0:.1f}s")
    print_status(s)


def stop(settings: Settings | None = None) -> None:
    s = settings or load_settings()
    stop_prometheus(s)
    for spec in reversed(service_specs(s)):
        stop_service(spec.name, settings=s)
    stop_kafka(s)
    stop_postgres(s)
    say("stack stopped")


@dataclass(frozen=True)
class Row:
    component: str
    state: str
    pid: int | None
    ports: tuple[int, ...]
    log: Path


def status_rows(s: Settings | None = None) -> list[Row]:
    s = s or load_settings()
    p = Paths.of(s)
    rows: list[Row] = []

    def infra_state(pid: int | None, port: int) -> str:
        if pid is not None:
            return "up" if _port_open(port) else "starting"
        return "up (external)" if _port_open(port) else "down"

    pid = pg_pid(s)
    rows.append(Row("postgres", infra_state(pid, s.pg_port), pid, (s.pg_port,), p.log("postgres")))
    pid = kafka_pid(s)
    if s.kafka_brokers > 1:
        from deploy import kafka as cluster

        for node in cluster.nodes(s):
            pid = cluster.node_pid(s, node)
            rows.append(Row(node.name, infra_state(pid, node.port), pid, (node.port, node.controller_port),
                            p.log(node.name)))
    else:
        rows.append(
            Row("kafka", infra_state(pid, s.kafka_port), pid, (s.kafka_port, s.kafka_controller_port), p.log("kafka"))
        )
    for spec in service_specs(s):
        pid = service_pid(spec.name, s)
        state = "down" if pid is None else "up" if _http_ok(spec.ready_port, timeout=1.0) else "starting"
        rows.append(Row(spec.name, state, pid, spec.ports, p.log(spec.name)))
    pid = prometheus_pid(s)
    state = "down" if pid is None else "up" if _prometheus_http(s, "/-/ready", timeout=1.0) else "starting"
    rows.append(Row("prometheus", state, pid, (s.prometheus_port,), p.log("prometheus")))
    return rows


def print_status(s: Settings | None = None) -> None:
    rows = status_rows(s)
    table = [("COMPONENT", "STATE", "PID", "PORTS", "LOG")] + [
        (r.component, r.state, str(r.pid or "-"), ",".join(map(str, r.ports)), str(r.log)) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4])


def _command(args: argparse.Namespace) -> None:
    if args.cmd == "start":
        start(infra_only=args.infra_only)
    elif args.cmd == "stop":
        stop()
    elif args.cmd == "status":
        print_status()
    elif getattr(args, "name", None) == "prometheus":
        if args.cmd != "start-service":
            stop_prometheus()
        if args.cmd != "stop-service":
            start_prometheus()
    elif args.cmd == "restart-service":
        restart_service(args.name, kill=args.kill)
    elif args.cmd == "start-service":
        start_service(args.name)
    elif args.cmd == "stop-service":
        stop_service(args.name, kill=args.kill)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start PostgreSQL, Kafka, topics and (unless --infra-only) services")
    p_start.add_argument("--infra-only", action="store_true", help="only PostgreSQL, Kafka and topics")
    p_start.add_argument("--brokers", type=int, choices=(1, 3),
                         help="Kafka brokers: 3 = a replicated KRaft cluster (deploy/kafka.py), remembered in the "
                              "state dir until `start --brokers 1`; default: as last started (1 at first)")
    sub.add_parser("stop", help="stop services, Kafka, PostgreSQL")
    sub.add_parser("status", help="show what runs")
    for cmd in ("restart-service", "start-service", "stop-service"):
        sp = sub.add_parser(cmd)
        sp.add_argument("name")
        if cmd != "start-service":
            sp.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")
    args = parser.parse_args(argv)
    try:
        previous = load_settings()
        if getattr(args, "brokers", None):
            os.environ["XS_KAFKA_BROKERS"] = str(args.brokers)
        settings = load_settings()
        paths = Paths.of(settings)
    except ConfigError as exc:
        print(f"[stack] ERROR: bad setting: {exc}", file=sys.stderr, flush=True)
        return 2
    paths.ensure()
    if getattr(args, "brokers", None):
        from deploy import kafka as cluster

        cluster.write_cluster_size(settings, args.brokers)
        if previous.kafka_brokers != args.brokers:
            # Running services bootstrap from the other cluster's brokers: start them afresh.
            for spec in reversed(service_specs(previous)):
                stop_service(spec.name, settings=previous)
    try:
        # One start/stop at a time (e.g. two test.sh runs at once must not launch two Kafkas).
        with contextlib.nullcontext() if args.cmd == "status" else stack_lock(paths):
            _command(args)
    except StackError as exc:
        print(f"[stack] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
