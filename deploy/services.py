"""The processes supervisord runs for the local stack, and its configuration.

Each service: a name, the module run with the project's Python, and the ports it listens on
(from Settings) so `status` can show them and health checks can wait. Prometheus is one more
program. supervisord (PyPI `supervisor`) restarts any of them that exits, with back-off on a
crash loop. `infra_program` is the section of a Kafka or PostgreSQL program of the state dir's own
supervisord (no autorestart); `deploy/supervisor.py` renders this configuration into `<run_dir>/supervisor/` and talks
to supervisord over its unix socket (no TCP port).
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.db import SERVICE_ROLES
from services.common.config import PROJECT_ROOT, Settings, settings_env

# Restart policy: a program that dies after running START_SECS is restarted at once; one that dies
# sooner counts as a failed start and is retried START_RETRIES times with a growing back-off (1 s,
# 2 s, ...) before supervisord gives up (state FATAL).
START_SECS = 2
START_RETRIES = 5
STOP_WAIT_SECS = 10
PROMETHEUS = "prometheus"
# Background programs, whose work no request waits for, run at a lower CPU priority (nice) than the request
# path (gateway, settle; Kafka and PostgreSQL stay at 0): a burst of their work waits for the CPU
# behind a request's instead of queueing it. supervisord has no priority setting: the command runs via nice.
BACKGROUND_PROGRAMS = frozenset({"clearing", "monitor", "smartmon", "dashboard", PROMETHEUS})
BACKGROUND_NICENESS = 10


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    ports: tuple[int, ...]
    # The port whose HTTP GET / answering means "ready" (the metrics endpoint).
    ready_port: int
    # A TLS endpoint (port, path) that must answer too: the gateway's and the dashboard's, checked with the
    # deployment's CA (any HTTP status will do — it proves the TLS listener is up with a valid certificate).
    tls_check: tuple[int, str] | None = None


def service_specs(s: Settings) -> list[ServiceSpec]:
    return [
        ServiceSpec("settle", "services.settle", (s.settle_metrics_port,), s.settle_metrics_port),
        ServiceSpec(
            "gateway", "services.gateway", (s.gateway_port, s.gateway_metrics_port), s.gateway_metrics_port,
            (s.gateway_port, "/health/ready"),
        ),
        ServiceSpec("clearing", "services.clearing", (s.clearing_metrics_port,), s.clearing_metrics_port),
        ServiceSpec("monitor", "services.monitor", (s.monitor_metrics_port,), s.monitor_metrics_port),
        # the monitoring stream (faust): reads fsi.settlements, so it starts after settle like clearing
        ServiceSpec("smartmon", "services.smartmon", (s.smartmon_metrics_port,), s.smartmon_metrics_port),
        ServiceSpec("dashboard", "services.dashboard", (s.dashboard_port, s.dashboard_metrics_port),
                    s.dashboard_metrics_port, (s.dashboard_port, "/login")),
    ]


def tls_answers(s: Settings, spec: ServiceSpec, timeout: float = 2.0) -> bool:
    """The service's TLS endpoint answers an HTTPS request verified against the CA (or plain HTTP with
    XS_PLAIN_HTTP=1)."""
    if spec.tls_check is None:
        return True
    from services.common.tls import client_ssl_context

    port, path = spec.tls_check
    context = None if s.plain_http else client_ssl_context(s)
    try:
        with urllib.request.urlopen(f"{s.http_scheme}://127.0.0.1:{port}{path}", timeout=timeout, context=context):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP answer (e.g. 503 from a gateway waiting for the broker) is a working listener
    except (urllib.error.URLError, OSError, ValueError, ssl.SSLError):
        return False


@dataclass(frozen=True)
class SupervisorPaths:
    root: Path
    config: Path
    socket: Path
    pidfile: Path
    logs: Path
    daemon_log: Path  # supervisord's own log

    @staticmethod
    def of(s: Settings) -> SupervisorPaths:
        """A run's supervisord: its services and Prometheus."""
        run = s.run_dir.resolve()
        return SupervisorPaths._under(run / "supervisor", run / "logs", "supervisord.log")

    @staticmethod
    def infra(s: Settings) -> SupervisorPaths:
        """The state dir's own supervisord: Kafka and PostgreSQL, shared by every run of that state dir."""
        state = s.state_dir.resolve()
        return SupervisorPaths._under(state / "supervisor-infra", state / "logs", "supervisord-infra.log")

    @staticmethod
    def _under(root: Path, logs: Path, daemon_log: str) -> SupervisorPaths:
        return SupervisorPaths(root, root / "supervisord.conf", root / "supervisor.sock", root / "supervisord.pid",
                               logs, logs / daemon_log)

    def log(self, program: str) -> Path:
        return self.logs / f"{program}.log"


def venv_python() -> str:
    candidate = PROJECT_ROOT / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _quote(value: str) -> str:
    # supervisord expands %(name)s in values and reads environment= as KEY="value" pairs.
    return '"' + value.replace("%", "%%").replace('"', '\\"') + '"'


def niced(name: str, command: Sequence[str]) -> list[str]:
    """The program's command, run at BACKGROUND_NICENESS if it is a background program (nice execs it: the
    pid supervisord knows is the program's own)."""
    if name not in BACKGROUND_PROGRAMS:
        return list(command)
    return [shutil.which("nice") or "/usr/bin/nice", "-n", str(BACKGROUND_NICENESS), *command]


def _program(name: str, command: Sequence[str], cwd: Path, env: dict[str, str], log: Path) -> str:
    lines = [
        f"[program:{name}]",
        "command=" + " ".join(_quote(part) for part in niced(name, command)),
        f"directory={cwd}",
        "environment=" + ",".join(f"{k}={_quote(v)}" for k, v in sorted(env.items())),
        "autostart=false",  # the stack starts them in order and waits for health
        "autorestart=true",
        f"startsecs={START_SECS}",
        f"startretries={START_RETRIES}",
        f"stopwaitsecs={STOP_WAIT_SECS}",
        "stopasgroup=true",
        "killasgroup=true",
        "redirect_stderr=true",
        f"stdout_logfile={str(log).replace('%', '%%')}",
        "stdout_logfile_maxbytes=50MB",
        "stdout_logfile_backups=1",
    ]
    return "\n".join(lines) + "\n"


def infra_program(
    name: str,
    command: Sequence[str],
    cwd: Path,
    log: Path,
    *,
    stop_signal: str = "TERM",
    stop_wait_secs: int = 30,
    as_group: bool = True,
    user: str | None = None,
) -> str:
    """A program of the infrastructure supervisord (Kafka, a Kafka node, PostgreSQL). No autorestart: a
    broker killed by the chaos command or a PostgreSQL stopped by a fault test stays down until the
    stack starts it again; startsecs=0, so it is RUNNING once spawned and readiness is the stack's check."""
    lines = [
        f"[program:{name}]",
        "command=" + " ".join(_quote(part) for part in command),
        f"directory={cwd}",
        "autostart=false",
        "autorestart=false",
        "startsecs=0",
        "startretries=0",
        f"stopsignal={stop_signal}",
        f"stopwaitsecs={stop_wait_secs}",
        f"stopasgroup={str(as_group).lower()}",
        f"killasgroup={str(as_group).lower()}",
        "redirect_stderr=true",
        f"stdout_logfile={str(log).replace('%', '%%')}",
        "stdout_logfile_maxbytes=50MB",
        "stdout_logfile_backups=1",
    ]
    if user is not None:
        lines.append(f"user={user}")
    return "\n".join(lines) + "\n"


def supervisord_sections(p: SupervisorPaths, identifier: str) -> list[str]:
    return [
        "; Generated by deploy/supervisor.py from deploy/services.py, kafka.py, postgres.py; edit there.\n"
        f"[supervisord]\nlogfile={p.daemon_log}\npidfile={p.pidfile}\nloglevel=info\n"
        f"directory={PROJECT_ROOT}\nidentifier={identifier}\n",
        f"[unix_http_server]\nfile={p.socket}\nchmod=0700\n",
        "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        f"[supervisorctl]\nserverurl=unix://{p.socket}\n",
    ]


def _own_environment(program: str, settings_vars: dict[str, str]) -> dict[str, str]:
    """The caller's XS_<PROGRAM>_* variables that are not Settings (e.g. XS_SETTLE_TRACE): they reach
    that program only, so changing one restarts only it."""
    prefix = f"XS_{program.upper()}_"
    return {k: v for k, v in os.environ.items() if k.startswith(prefix) and k not in settings_vars}


_SECTION_START = re.compile(r"(?m)^(?=\[)")


def keep_other_programs(new: str, old: str, program: str) -> str:
    """`new` with every program section but `program`'s as `old` has it: changing a setting for one
    program (`restart-service NAME`) restarts that one only, where a whole render gives every program
    every setting and supervisord restarts each whose environment changed."""
    kept = {}
    for chunk in _SECTION_START.split(old):
        if chunk.startswith("[program:"):
            kept[chunk[len("[program:"):chunk.index("]")]] = chunk.rstrip("\n")
    out = []
    for chunk in _SECTION_START.split(new):
        name = chunk[len("[program:"):chunk.index("]")] if chunk.startswith("[program:") else None
        if name is not None and name != program and name in kept:
            body = chunk.rstrip("\n")
            chunk = kept[name] + chunk[len(body):]  # the old text, this render's spacing
        out.append(chunk)
    return "".join(out)


def supervisor_config(s: Settings) -> str:
    """supervisord.conf for the services (and Prometheus when installed) of `s`."""
    from deploy.prometheus import command as prometheus_command

    p = SupervisorPaths.of(s)
    env = {**settings_env(s), "PYTHONUNBUFFERED": "1"}
    parts = supervisord_sections(p, f"xsettle-{s.run_dir.name}")
    for spec in service_specs(s):
        own = _own_environment(spec.name, env)
        # Each service connects to PostgreSQL as its own role (its password: the state dir's pgpass).
        role = {"XS_PG_USER": SERVICE_ROLES[spec.name]} if spec.name in SERVICE_ROLES else {}
        parts.append(_program(spec.name, [venv_python(), "-m", spec.module], PROJECT_ROOT, {**env, **own, **role},
                              p.log(spec.name)))
    binary = shutil.which("prometheus")
    if binary is not None:
        parts.append(_program(PROMETHEUS, prometheus_command(binary, s), s.run_dir.resolve(), env,
                              p.log(PROMETHEUS)))
    return "\n".join(parts)
