"""The local stack: orchestration and the command line. PostgreSQL (deploy/postgres.py) and Kafka
(deploy/kafka.py: one broker, or a cluster with --brokers 3) are shared by every run of a state dir and
run under that state dir's supervisord; a run's own supervisord (deploy/supervisor.py, config from
deploy/services.py) runs its services and Prometheus.

    python -m deploy.stack start [--infra-only] [--brokers 1|3]   # idempotent; reuses what already runs
    python -m deploy.stack stop                   # supervisord and its programs, then Kafka, then PostgreSQL
    python -m deploy.stack status                 # table: component, state, pid, ports, log
    python -m deploy.stack restart-service NAME [--kill]   # also: start-service NAME, stop-service NAME [--kill]
                                                  # (NAME: a service of deploy/services.py, or prometheus)

Everything listens on 127.0.0.1 only, on the ports from Settings (XS_* env vars). Kafka and
PostgreSQL keep their files under Settings.state_dir (pg/, pgsock/, kafka/, logs/, supervisor-infra/);
the services' supervisord keeps its config, socket and logs under Settings.run_dir (the same
directory, except for a test run, which owns one).

Functions for tests (re-exported here from the modules above): start_service(name, s) -> pid,
stop_service(name, kill, s), restart_service(name, s, kill=...), is_running, is_healthy, service_pid,
start_kafka/stop_kafka, start_postgres/stop_postgres, start_prometheus, teardown_run.
Run `deploy/bootstrap.sh` first: it installs PostgreSQL, supervisor and the Kafka jars.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.common import DEPLOY_DIR as DEPLOY_DIR
from deploy.common import ROOT as ROOT
from deploy.common import Paths as Paths
from deploy.common import StackError as StackError
from deploy.common import _port_open, _run_async
from deploy.common import say as say
from deploy.common import stack_lock as stack_lock
from deploy.common import tail as tail
from deploy.common import warn as warn
from deploy.kafka import KAFKA_MAIN as KAFKA_MAIN
from deploy.kafka import KAFKA_STOP_TIMEOUT_S, _kafka_probe, _kafka_wait_ready
from deploy.kafka import LOG4J_CONFIG as LOG4J_CONFIG
from deploy.kafka import kafka_metadata as kafka_metadata
from deploy.kafka import kafka_pid as kafka_pid
from deploy.kafka import kafka_properties as kafka_properties
from deploy.kafka import start_kafka as start_kafka
from deploy.kafka import stop_kafka as stop_kafka
from deploy.postgres import PG_OS_USER as PG_OS_USER
from deploy.postgres import _pg_admin_dsn, stop_legacy_postgres
from deploy.postgres import pg_pid as pg_pid
from deploy.postgres import start_postgres as start_postgres
from deploy.postgres import stop_postgres as stop_postgres
from deploy.services import PROMETHEUS, service_specs
from deploy.supervisor import LIVE_STATES as LIVE_STATES
from deploy.supervisor import SERVICE_STOP_TIMEOUT_S, _ready
from deploy.supervisor import Supervisor as Supervisor
from deploy.supervisor import prometheus_pid as prometheus_pid
from deploy.supervisor import reload_prometheus as reload_prometheus
from deploy.supervisor import restart_service as restart_service
from deploy.supervisor import service_pid as service_pid
from deploy.supervisor import start_prometheus as start_prometheus
from deploy.supervisor import start_service as start_service
from deploy.supervisor import start_services as start_services
from deploy.supervisor import stop_prometheus as stop_prometheus
from deploy.supervisor import stop_service as stop_service
from services.common.config import ConfigError, Settings, load_settings


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


# --- orchestration --------------------------------------------------------------------------


def apply_topics(s: Settings) -> None:
    from topics.apply import apply_topics as apply_catalog

    for problem in _run_async(apply_catalog(s)):
        warn(f"topics: {problem}")


def _legacy_pid(pidfile: Path, marker: str) -> int | None:
    """The live process that a pid file of the former pid-file supervisor names, if its command line
    contains `marker` (a pid reused by another process is left alone)."""
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    return pid if marker in cmdline else None


def _legacy_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _retire_legacy_processes(s: Settings, p: Paths) -> None:
    """Processes that the stack started before supervisord ran them (pid files in run/: services,
    Prometheus, Kafka brokers; a PostgreSQL started by pg_ctl) would hold the ports: stop them once.
    They ran in their own session: SIGTERM to the group, SIGKILL after the component's stop timeout."""
    markers = {spec.name: spec.name for spec in service_specs(s)} | {PROMETHEUS: PROMETHEUS}
    markers |= {f.stem: KAFKA_MAIN for f in p.run.glob("kafka*.pid")}
    for name, marker in markers.items():
        pidfile = p.pidfile(name)
        pid = _legacy_pid(pidfile, marker)
        if pid is not None:
            timeout = KAFKA_STOP_TIMEOUT_S if marker == KAFKA_MAIN else SERVICE_STOP_TIMEOUT_S
            say(f"{name}: stopping pid {pid}, started before supervisord ran it")
            deadline = time.monotonic() + timeout
            sig = signal.SIGTERM
            while not _legacy_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig)
                if time.monotonic() > deadline:
                    warn(f"{name}: pid {pid} still alive {timeout:.0f}s after SIGTERM: SIGKILL")
                    sig, deadline = signal.SIGKILL, time.monotonic() + 10
                time.sleep(0.1)
        pidfile.unlink(missing_ok=True)
    stop_legacy_postgres(s)


def start(infra_only: bool = False, settings: Settings | None = None) -> None:
    """Kafka and PostgreSQL (shared), topics and migrations of `settings`, supervisord with Prometheus,
    and unless infra_only the services."""
    s = settings or load_settings()
    p = Paths.of(s)
    p.ensure()
    t0 = time.monotonic()
    with stack_lock(p):  # one start of the shared infrastructure at a time (e.g. two test.sh)
        _retire_legacy_processes(s, p)
        # Kafka's JVM boots while PostgreSQL starts.
        kpid = start_kafka(s, wait=False)
        start_postgres(s)
        if kpid is not None or kafka_pid(s) is not None:
            _kafka_wait_ready(s, p, kpid)
            say(f"kafka: ready on {s.kafka_bootstrap}")
        apply_topics(s)
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
    """The run's supervisord and everything it runs, then Kafka, then PostgreSQL, then the state dir's
    supervisord."""
    s = settings or load_settings()
    p = Paths.of(s)
    Supervisor(s).shutdown()
    with stack_lock(p):
        _retire_legacy_processes(s, p)
        stop_kafka(s)
        stop_postgres(s)
        Supervisor(s, infra=True).shutdown()
    say("stack stopped")


def teardown_run(s: Settings) -> None:
    """End a test run: its supervisord (services, Prometheus), its database and its topics."""
    from deploy.db import drop_databases
    from services.common.kafka import make_admin
    from topics.acls import prefix_acls
    from topics.catalog import catalog
    from topics.security import delete_acls

    Supervisor(s).shutdown()
    _run_async(drop_databases(_pg_admin_dsn(s), s))

    async def delete_topics() -> None:
        admin = make_admin(s)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            names = [t.name for t in catalog(s) if t.name in existing]
            if names:
                await admin.delete_topics(names, timeout_ms=15_000)
            acls = await delete_acls(admin, prefix_acls(s)) if s.topic_prefix else 0
            say(f"teardown: dropped databases {s.pg_database}(_*), deleted {len(names)} topics and {acls} ACLs "
                f"{s.topic_prefix}*")
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
