"""Processes this stack starts itself (Kafka, PostgreSQL's pid check): pid files under
.state/run/, /proc checks, signals to a process group. The services and Prometheus run under
supervisord instead (deploy/supervisor.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.common import Paths, StackError, _rotate, say, warn

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


def _stop_component(p: Paths, name: str, pid: int | None, timeout: float, kill: bool = False) -> bool:
    """Stop a component this stack started (its pid, or None when not running) and forget its pidfile."""
    if pid is not None:
        say(f"{name}: {'killing' if kill else 'stopping'} pid {pid}")
        _terminate(pid, timeout, kill=kill)
    p.pidfile(name).unlink(missing_ok=True)
    return pid is not None

