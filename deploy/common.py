"""Shared by the deploy modules: StackError, messages, the state dir's paths, the cross-process
lock on the shared infrastructure, and small probes (port open, HTTP 200, a log's tail)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from services.common.config import PROJECT_ROOT, Settings

ROOT = PROJECT_ROOT
DEPLOY_DIR = Path(__file__).resolve().parent

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

