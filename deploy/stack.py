"""The local stack: PostgreSQL and a single-node KRaft Kafka (shared), supervisord running the
broker's services and Prometheus.

    python -m deploy.stack start [--infra-only]   # idempotent; reuses what already runs
    python -m deploy.stack stop                   # supervisord and its programs, then Kafka, then PostgreSQL
    python -m deploy.stack status                 # table: component, state, pid, ports, log
    python -m deploy.stack restart-service NAME [--kill]   # also: start-service NAME, stop-service NAME [--kill]
                                                  # (NAME: a service of deploy/services.py, or prometheus)

Everything listens on 127.0.0.1 only, on the ports from Settings (XS_* env vars). Kafka and
PostgreSQL keep their files under Settings.state_dir (pg/, pgsock/, kafka/, logs/, run/); the
services are programs of a supervisord (deploy/services.py renders its config) whose config,
socket and logs live under Settings.run_dir (the same directory, except for a test run, which owns
one). supervisord restarts a program that exits (autorestart, back-off on a crash loop); this
module starts it, waits for health (GET / on the metrics port answers 200) and reports.

Functions for tests: start_service(name, s) -> pid, stop_service(name, kill, s),
restart_service(name, s, kill=...), is_running, is_healthy, service_pid, start_kafka/stop_kafka,
start_postgres/stop_postgres, start_prometheus, teardown_run.
Run `deploy/bootstrap.sh` first: it installs PostgreSQL, supervisor and the Kafka jars.
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
import xmlrpc.client
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from supervisor.xmlrpc import SupervisorTransport

from deploy.services import (
    PROMETHEUS,
    START_RETRIES,
    STOP_WAIT_SECS,
    ServiceSpec,
    SupervisorPaths,
    service_specs,
    supervisor_config,
    venv_python,
)
from services.common.config import PROJECT_ROOT, ConfigError, Settings, load_settings

ROOT = PROJECT_ROOT
DEPLOY_DIR = Path(__file__).resolve().parent
LOG4J_CONFIG = DEPLOY_DIR / "kafka" / "log4j2.yaml"

PG_OS_USER = "xsettle-pg"  # initdb/postgres refuse to run as root
PG_ADMIN_ROLE = "postgres"  # bootstrap superuser created by initdb
KAFKA_NODE_ID = 1
KAFKA_MAIN = "kafka.Kafka"

KAFKA_READY_TIMEOUT_S = 60.0
PG_READY_TIMEOUT_S = 60.0
SERVICE_READY_TIMEOUT_S = 60.0
SERVICE_STOP_TIMEOUT_S = 10.0
PROMETHEUS_READY_TIMEOUT_S = 30.0
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
            # Topics come from topics/apply.py only: a client asking for a deleted topic (e.g. a finished
            # test run's) must not bring it back, and a misspelt name must fail instead of appearing.
            "auto.create.topics.enable=false",
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


# --- the broker's services and Prometheus, under supervisord ---------------------------------


class Supervisor:
    """The run's supervisord: started on demand from the rendered config, driven over XML-RPC."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.paths = SupervisorPaths.of(s)

    def _proxy(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.paths.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def running(self) -> bool:
        if not self.paths.socket.exists():
            return False
        try:
            return bool(self._proxy().getState()["statename"] == "RUNNING")
        except (OSError, xmlrpc.client.Error):
            return False

    def rpc(self) -> Any:
        """The XML-RPC namespace `supervisor.*` of a supervisord running the current config."""
        self.ensure()
        return self._proxy()

    def ensure(self) -> None:
        """Write the config; start supervisord, or make a running one take a changed config."""
        p = self.paths
        p.root.mkdir(parents=True, exist_ok=True)
        p.logs.mkdir(parents=True, exist_ok=True)
        with _file_lock(p.root / "lock"):
            text = supervisor_config(self.settings)
            changed = not p.config.exists() or p.config.read_text() != text
            if changed:
                p.config.write_text(text)
            if self.running():
                if changed:
                    self._reload()
                return
            p.socket.unlink(missing_ok=True)
            res = subprocess.run(
                [str(Path(venv_python()).parent / "supervisord"), "-c", str(p.config)],
                cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
            )
            deadline = time.monotonic() + 15
            while not self.running():
                if res.returncode != 0 or time.monotonic() > deadline:
                    raise StackError(f"supervisord did not start ({res.returncode}): {res.stdout}{res.stderr}\n"
                                     f"last lines of {p.log('supervisord')}:\n{tail(p.log('supervisord'))}")
                time.sleep(0.1)
            say(f"supervisord: started for {self.settings.run_dir} ({p.config})")

    def _reload(self) -> None:
        """Take the new config: a changed program is stopped, replaced, and started again if it ran."""
        rpc = self._proxy()
        [[added, changed, removed]] = rpc.reloadConfig()
        was_running = {i["name"] for i in rpc.getAllProcessInfo() if i["statename"] in LIVE_STATES}
        for name in changed + removed:
            rpc.stopProcessGroup(name)
            rpc.removeProcessGroup(name)
        for name in changed + added:
            rpc.addProcessGroup(name)
            if name in was_running:
                rpc.startProcess(name, False)
        if added or changed or removed:
            say(f"supervisord: config reloaded (added {added}, changed {changed}, removed {removed})")

    def info(self, name: str) -> dict[str, Any] | None:
        """supervisord's view of a program (statename, pid, ...); None when supervisord is down."""
        if not self.running():
            return None
        try:
            return dict(self._proxy().getProcessInfo(name))
        except xmlrpc.client.Fault as exc:
            raise StackError(f"supervisord does not know {name!r}: {exc.faultString}") from None

    def shutdown(self) -> None:
        if self.running():
            say(f"supervisord: stopping every program and itself ({self.settings.run_dir})")
            self._proxy().stopAllProcesses(True)
            pid = _read_pid(self.paths.pidfile)
            self._proxy().shutdown()
            deadline = time.monotonic() + 30
            while pid is not None and _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


_lock_guard = threading.RLock()
_lock_depth = 0


@contextlib.contextmanager
def stack_lock(p: Paths) -> Iterator[None]:
    """One start/stop of the shared Kafka + PostgreSQL at a time across processes (two test runs
    starting at once must not launch two Kafkas). Reentrant within a process."""
    global _lock_depth
    with _lock_guard:
        if _lock_depth:
            _lock_depth += 1
            try:
                yield
            finally:
                _lock_depth -= 1
            return
        p.run.mkdir(parents=True, exist_ok=True)
        with _file_lock(p.run / "stack.lock"):
            _lock_depth = 1
            try:
                yield
            finally:
                _lock_depth = 0


LIVE_STATES = ("STARTING", "RUNNING")


def _spec(name: str, s: Settings) -> ServiceSpec:
    for spec in service_specs(s):
        if spec.name == name:
            return spec
    known = ", ".join(x.name for x in service_specs(s))
    raise StackError(f"unknown service {name!r} (known: {known})")


def _ready_port(name: str, s: Settings) -> int:
    return s.prometheus_port if name == PROMETHEUS else _spec(name, s).ready_port


def _ready(name: str, s: Settings, timeout: float = 1.0) -> bool:
    if name == PROMETHEUS:
        return _prometheus_http(s, "/-/ready", timeout=timeout)
    return _http_ok(_spec(name, s).ready_port, timeout=timeout)


def service_pid(name: str, s: Settings | None = None) -> int | None:
    s = s or load_settings()
    _ready_port(name, s)  # an unknown name is an error, not "not running"
    info = Supervisor(s).info(name)
    if info is None or info["statename"] not in LIVE_STATES or not info["pid"]:
        return None
    return int(info["pid"])


def _wait_ready(name: str, s: Settings, timeout: float, not_pid: int | None = None) -> int:
    """Wait until supervisord runs `name` (a pid other than `not_pid`) and its endpoint answers."""
    sup = Supervisor(s)
    log = sup.paths.log(name)
    deadline = time.monotonic() + timeout
    while True:
        info = sup.info(name) or {}
        pid = int(info.get("pid") or 0)
        if info.get("statename") == "FATAL":
            raise StackError(f"{name} could not start ({info.get('spawnerr') or 'exited too quickly'}, "
                             f"{START_RETRIES} retries); last lines of {log}:\n{tail(log)}")
        if pid and pid != not_pid and info.get("statename") in LIVE_STATES and _ready(name, s):
            return pid
        if time.monotonic() > deadline:
            raise StackError(f"{name} ({info.get('statename')}, pid {pid or '-'}) did not answer "
                             f"GET http://127.0.0.1:{_ready_port(name, s)}/ within {timeout:.0f}s; "
                             f"last lines of {log}:\n{tail(log)}")
        time.sleep(0.1)


def _start_program(rpc: Any, name: str, s: Settings) -> None:
    if service_pid(name, s) is None and _port_open(port := _ready_port(name, s)):
        # Its health check would be answered by a stranger: refuse instead of a false "ready".
        raise StackError(f"{name}: port {port} is taken by a process this stack's supervisord did not start")
    try:
        rpc.startProcess(name, False)
    except xmlrpc.client.Fault as exc:
        if "ALREADY_STARTED" not in exc.faultString:
            raise StackError(f"{name}: supervisord could not start it: {exc.faultString}") from None


def start_service(
    name: str, settings: Settings | None = None, *, wait: bool = True, timeout: float = SERVICE_READY_TIMEOUT_S
) -> int:
    """Start one program (nothing to do if it runs); with wait, return once its endpoint answers."""
    s = settings or load_settings()
    _ready_port(name, s)
    _start_program(Supervisor(s).rpc(), name, s)
    if wait:
        return _wait_ready(name, s, timeout)
    return service_pid(name, s) or 0


def stop_service(
    name: str, kill: bool = False, settings: Settings | None = None, timeout: float = SERVICE_STOP_TIMEOUT_S
) -> bool:
    """Stop one program and keep it stopped: SIGTERM (supervisord SIGKILLs after stopwaitsecs), or
    SIGKILL at once with kill=True (a crash: no clean shutdown). Returns whether it was running."""
    s = settings or load_settings()
    pid = service_pid(name, s)
    if pid is None:
        return False
    sup = Supervisor(s)
    rpc = sup.rpc()
    say(f"{name}: {'killing' if kill else 'stopping'} pid {pid}")
    if kill:
        _signal_program(rpc, name)
    # After a kill supervisord passes through EXITED and restarts the program (autorestart): stop
    # whatever it runs until the program rests in STOPPED.
    deadline = time.monotonic() + timeout + STOP_WAIT_SECS
    while (state := (sup.info(name) or {}).get("statename")) not in ("STOPPED", "FATAL", None):
        if state in ("STARTING", "RUNNING", "BACKOFF"):
            with contextlib.suppress(xmlrpc.client.Fault):  # NOT_RUNNING: it exited meanwhile
                rpc.stopProcess(name, True)
        elif time.monotonic() > deadline:
            raise StackError(f"{name}: still {state} {timeout + STOP_WAIT_SECS:.0f}s after the stop")
        time.sleep(0.05)
    return True


def _signal_program(rpc: Any, name: str) -> None:
    try:
        rpc.signalProcess(name, "KILL")
    except xmlrpc.client.Fault as exc:
        if "NOT_RUNNING" not in exc.faultString:
            raise StackError(f"{name}: could not signal it: {exc.faultString}") from None


def restart_service(name: str, settings: Settings | None = None, kill: bool = False) -> int:
    """Restart one program and return its new pid once it answers. With kill=True the process gets
    SIGKILL and supervisord itself brings it back (autorestart): the crash-recovery path."""
    s = settings or load_settings()
    old = service_pid(name, s)
    if kill and old is not None:
        say(f"{name}: killing pid {old}; supervisord restarts it")
        _signal_program(Supervisor(s).rpc(), name)
        return _wait_ready(name, s, SERVICE_READY_TIMEOUT_S, not_pid=old)
    stop_service(name, settings=s)
    return start_service(name, s)


def start_services(s: Settings, names: Sequence[str] | None = None) -> dict[str, int]:
    """Start programs together, then wait for each to answer; errors name every one that did not."""
    names = list(names or [spec.name for spec in service_specs(s)])
    rpc = Supervisor(s).rpc()
    for name in names:
        _start_program(rpc, name, s)
    pids: dict[str, int] = {}
    errors: list[str] = []
    for name in names:
        try:
            pids[name] = _wait_ready(name, s, SERVICE_READY_TIMEOUT_S)
        except StackError as exc:
            errors.append(str(exc))
            continue
        say(f"{name}: ready (pid {pids[name]}, GET http://127.0.0.1:{_ready_port(name, s)}/ -> 200)")
    if errors:
        raise StackError("\n\n".join(errors))
    return pids


def is_running(name: str, settings: Settings | None = None) -> bool:
    """Whether the component's process is alive (Kafka/PostgreSQL: started by this stack)."""
    s = settings or load_settings()
    if name == "kafka":
        from deploy import kafka as cluster

        return kafka_pid(s) is not None or any(cluster.node_pid(s, n) for n in cluster.nodes(s)[1:])
    if name == "postgres":
        return pg_pid(s) is not None
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
    return _ready(name, s, timeout=2.0)


# --- Prometheus: config and rules from deploy/prometheus, the process under supervisord --------


def prometheus_pid(s: Settings | None = None) -> int | None:
    s = s or load_settings()
    return service_pid(PROMETHEUS, s) if shutil.which("prometheus") else None


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
    from deploy.prometheus import write_files

    s = s or load_settings()
    if shutil.which("prometheus") is None:
        warn("prometheus: not installed (run deploy/bootstrap.sh): no metrics server")
        return None
    changed = write_files(s)
    pid = prometheus_pid(s)
    if pid is not None:
        if changed and not _prometheus_http(s, "/-/reload", method="POST", timeout=10.0):
            raise StackError("prometheus: reload failed; last lines of its log:\n"
                             + tail(SupervisorPaths.of(s).log(PROMETHEUS)))
        return pid
    pid = start_service(PROMETHEUS, s, timeout=PROMETHEUS_READY_TIMEOUT_S)
    say(f"prometheus: started pid {pid} on http://127.0.0.1:{s.prometheus_port}/")
    return pid


def stop_prometheus(s: Settings | None = None) -> bool:
    s = s or load_settings()
    return prometheus_pid(s) is not None and stop_service(PROMETHEUS, settings=s)


# --- orchestration --------------------------------------------------------------------------


def apply_topics(s: Settings) -> None:
    from topics.apply import apply_topics as apply_catalog
    from topics.catalog import catalog

    for problem in _run_async(apply_catalog(s.kafka_bootstrap, catalog(s))):
        warn(f"topics: {problem}")


def _retire_legacy_processes(s: Settings, p: Paths) -> None:
    """Services and Prometheus that the stack started before supervisord (pidfiles in run/) would
    hold the ports: stop them once."""
    for name in [*(spec.name for spec in service_specs(s)), PROMETHEUS]:
        pidfile = p.pidfile(name)
        pid = _read_pid(pidfile)
        if pid is not None and _pid_alive(pid) and any(name in arg for arg in _cmdline(pid)):
            say(f"{name}: stopping pid {pid}, started before supervisord ran the services")
            _terminate(pid, SERVICE_STOP_TIMEOUT_S)
        pidfile.unlink(missing_ok=True)


def start(infra_only: bool = False, settings: Settings | None = None) -> None:
    """Kafka and PostgreSQL (shared), topics and migrations of `settings`, supervisord with Prometheus,
    and unless infra_only the services."""
    s = settings or load_settings()
    p = Paths.of(s)
    p.ensure()
    t0 = time.monotonic()
    with stack_lock(p):  # one start of the shared infrastructure at a time (e.g. two test.sh)
        # Kafka's JVM boots while PostgreSQL starts.
        kpid = start_kafka(s, wait=False)
        start_postgres(s)
        if kpid is not None or kafka_pid(s) is not None:
            _kafka_wait_ready(s, p, kpid)
            say(f"kafka: ready on {s.kafka_bootstrap}")
        apply_topics(s)
        _retire_legacy_processes(s, p)
    if not infra_only:
        try:
            start_services(s)
        except StackError:
            print_status(s)
            raise
    start_prometheus(s)
    say(f"stack up in {time.monotonic() - t0:.1f}s")
    print_status(s)


def stop(settings: Settings | None = None) -> None:
    """supervisord and everything it runs, then Kafka, then PostgreSQL."""
    s = settings or load_settings()
    Supervisor(s).shutdown()
    with stack_lock(Paths.of(s)):
        stop_kafka(s)
        stop_postgres(s)
    say("stack stopped")


def teardown_run(s: Settings) -> None:
    """End a test run: its supervisord (services, Prometheus), its database and its topics."""
    from aiokafka.admin import AIOKafkaAdminClient

    from deploy.db import drop_database
    from topics.catalog import catalog

    Supervisor(s).shutdown()
    _run_async(drop_database(_pg_admin_dsn(s), s.pg_database))

    async def delete_topics() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=15_000)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            names = [t.name for t in catalog(s) if t.name in existing]
            if names:
                await admin.delete_topics(names, timeout_ms=15_000)
            say(f"teardown: dropped database {s.pg_database}, deleted {len(names)} topics {s.topic_prefix}*")
        finally:
            await admin.close()

    _run_async(delete_topics())
    shutil.rmtree(s.run_dir / "prometheus", ignore_errors=True)  # logs stay for a post-mortem


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
    sup = Supervisor(s)
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
    programs = [(spec.name, spec.ports) for spec in service_specs(s)]
    if shutil.which("prometheus"):
        programs.append((PROMETHEUS, (s.prometheus_port,)))
    for name, ports in programs:
        info = sup.info(name)
        pid = service_pid(name, s)
        if info is None:
            state = "down (no supervisord)"
        elif pid is not None and _ready(name, s):
            state = "up"
        else:
            state = str(info["statename"]).lower()
        rows.append(Row(name, state, pid, ports, sup.paths.log(name)))
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
    elif getattr(args, "name", None) == PROMETHEUS and args.cmd != "stop-service":
        if args.cmd == "restart-service":
            stop_prometheus()
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
    p_start = sub.add_parser("start", help="PostgreSQL, Kafka, topics, migrations and (unless --infra-only) services")
    p_start.add_argument("--infra-only", action="store_true", help="only PostgreSQL, Kafka, topics, Prometheus")
    p_start.add_argument("--brokers", type=int, choices=(1, 3),
                         help="Kafka brokers: 3 = a replicated KRaft cluster (deploy/kafka.py), remembered in the "
                              "state dir until `start --brokers 1`; default: as last started (1 at first)")
    sub.add_parser("stop", help="stop supervisord and its programs, Kafka, PostgreSQL")
    sub.add_parser("status", help="show what runs")
    for cmd in ("restart-service", "start-service", "stop-service"):
        sp = sub.add_parser(cmd)
        sp.add_argument("name")
        if cmd != "start-service":
            sp.add_argument("--kill", action="store_true",
                            help="SIGKILL (restart-service: supervisord brings it back by itself)")
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
        _command(args)
    except StackError as exc:
        print(f"[stack] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
