"""The run's supervisord (config rendered by deploy/services.py) driven over XML-RPC: start, stop,
signal and wait for the services and Prometheus; health is GET / answering 200 on the metrics port
(Prometheus: /-/ready)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from deploy.common import ROOT, StackError, _file_lock, _http_ok, _port_open, say, tail, warn
from deploy.services import (
    PROMETHEUS,
    START_RETRIES,
    STOP_WAIT_SECS,
    ServiceSpec,
    SupervisorPaths,
    keep_other_programs,
    service_specs,
    supervisor_config,
    supervisord_sections,
    tls_answers,
    venv_python,
)
from services.common.config import Settings, load_settings

SERVICE_READY_TIMEOUT_S = 60.0
SERVICE_STOP_TIMEOUT_S = 10.0
PROMETHEUS_READY_TIMEOUT_S = 30.0


class Supervisor:
    """A supervisord started on demand from its rendered config, driven over XML-RPC: the run's (services,
    Prometheus; under Settings.run_dir) or, with infra=True, the state dir's (Kafka, PostgreSQL)."""

    def __init__(self, s: Settings, infra: bool = False, only: str | None = None) -> None:
        self.settings = s
        self.infra = infra
        # only=NAME: this caller's environment is applied to program NAME alone (see keep_other_programs).
        self.only = only
        self.paths = SupervisorPaths.infra(s) if infra else SupervisorPaths.of(s)

    def _render(self) -> str:
        if self.infra:
            return infra_config(self.settings)
        text = supervisor_config(self.settings)
        if self.only is not None and self.paths.config.exists():
            text = keep_other_programs(text, self.paths.config.read_text(), self.only)
        return text

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
            text = self._render()
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
                                     f"last lines of {p.daemon_log}:\n{tail(p.daemon_log)}")
                time.sleep(0.1)
            say(f"supervisord: started for {p.root.parent} ({p.config})")

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

    def pid(self, name: str) -> int | None:
        """The program's pid while supervisord runs it (STARTING or RUNNING), else None."""
        if not self.running():
            return None
        try:
            info = self._proxy().getProcessInfo(name)
        except xmlrpc.client.Fault:
            return None  # not in this config (e.g. a node of another cluster size)
        if info["statename"] not in LIVE_STATES or not info["pid"]:
            return None
        return int(info["pid"])

    def start(self, name: str, timeout: float = 10.0) -> int:
        """Start a program (nothing to do if it runs) and return its pid once spawned."""
        try:
            self.rpc().startProcess(name, False)
        except xmlrpc.client.Fault as exc:
            if "ALREADY_STARTED" not in exc.faultString:
                raise StackError(f"{name}: supervisord could not start it: {exc.faultString}; last lines of "
                                 f"{self.paths.log(name)}:\n{tail(self.paths.log(name))}") from None
        deadline = time.monotonic() + timeout
        while (pid := self.pid(name)) is None:
            if time.monotonic() > deadline:
                raise StackError(f"{name}: not running after start; last lines of {self.paths.log(name)}:\n"
                                 + tail(self.paths.log(name)))
            time.sleep(0.05)
        return pid

    def stop(self, name: str, kill: bool = False) -> bool:
        """Stop a program (its stopsignal, SIGKILL after stopwaitsecs), or SIGKILL it at once with kill=True.
        Returns whether it was running. Infra programs do not autorestart: it stays down."""
        pid = self.pid(name)
        if pid is None:
            return False
        say(f"{name}: {'killing' if kill else 'stopping'} pid {pid}")
        rpc = self._proxy()
        with contextlib.suppress(xmlrpc.client.Fault):  # NOT_RUNNING: it exited meanwhile
            if kill:
                rpc.signalProcess(name, "KILL")
            else:
                rpc.stopProcess(name, True)
        deadline = time.monotonic() + 15
        while self.pid(name) is not None:
            if time.monotonic() > deadline:
                raise StackError(f"{name}: pid {pid} still running after the {'kill' if kill else 'stop'}")
            time.sleep(0.05)
        return True

    def shutdown(self) -> None:
        if self.running():
            say(f"supervisord: stopping every program and itself ({self.paths.root})")
            self._proxy().stopAllProcesses(True)
            self._proxy().shutdown()
            deadline = time.monotonic() + 30
            while self.paths.pidfile.exists() and time.monotonic() < deadline:  # removed when it exits
                time.sleep(0.1)


def infra_config(s: Settings) -> str:
    """supervisord.conf of the state dir: the Kafka programs and PostgreSQL."""
    from deploy.kafka import kafka_programs
    from deploy.postgres import postgres_programs

    p = SupervisorPaths.infra(s)
    parts = supervisord_sections(p, f"xsettle-infra-{s.state_dir.resolve().name}")
    return "\n".join([*parts, *kafka_programs(s), *postgres_programs(s)])


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
    spec = _spec(name, s)
    return _http_ok(spec.ready_port, timeout=timeout) and tls_answers(s, spec, timeout=timeout)


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
    _start_program(Supervisor(s, only=name).rpc(), name, s)
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
    sup = Supervisor(s, only=name)
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
        _signal_program(Supervisor(s, only=name).rpc(), name)
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


