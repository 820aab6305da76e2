"""Where each stage spends its time during a load: py-spy attached to every service process.

    python -m loadtest.profile [--seconds 10] [--out DIR] [--rate 100] [--mode gil|active|idle] [--top 6]

profiles whatever load is running (the bench's `--profile` uses StageProfiler the same way). For each
stage (gateway, settle, clearing, monitor; pids from deploy.stack.service_pid) one
`py-spy record --nonblocking` (the service is not paused for a sample) writes collapsed stacks
(`<stage>.folded`: one line per distinct stack, `frame;frame;… count`, root first; speedscope and
flamegraph.pl open it as it is) to the output directory (default `<run dir>/profiles/<UTC time>/`).

Which samples count (`--mode`): `gil` (default) only a thread holding the GIL, i.e. Python at work — the
CPU view (a thread waiting in epoll or a send has released the GIL; a sampler that does not pause the
process cannot tell those from work otherwise); `active` every thread py-spy does not see idle; `idle`
every thread, a wall-clock view. The summary, also written to `summary.txt` there, gives per stage: the
CPU time the process used meanwhile (from /proc), samples, the top functions by own samples (the
innermost frame), own samples by package, and the project's innermost functions (which part of our
code the time was spent under, with the libraries it calls).

py-spy reads the other process's memory (ptrace rules): it works as root, with CAP_SYS_PTRACE, or as the
services' own user when `kernel.yama.ptrace_scope` is 0. When it cannot attach, the summary says why
for that stage; the run goes on.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from deploy import stack
from services.common.config import Settings, load_settings

STAGES = ("gateway", "settle", "clearing", "monitor", "smartmon")
PROJECT_PACKAGES = ("services", "schemas", "topics")
MODES = {"gil": ("--gil",), "active": (), "idle": ("--idle",)}
MODE_TEXT = {"gil": "samples of a thread holding the GIL, Python at work",
             "active": "samples of threads not seen idle; selectors' frames are the event loop waiting",
             "idle": "every thread's samples, waiting included"}
STOP_WAIT_S = 10.0  # py-spy writes its file on SIGINT within a moment; after this it is killed
CAP_SYS_PTRACE = 19
_FRAME_FILE = re.compile(r"\((?P<file>[^()]*?)(?::\d+)?\)$")
_SAMPLES = re.compile(r"Samples: (?P<samples>\d+) Errors: (?P<errors>\d+)")


# Reading py-spy's output (pure) --------------------------------------------------------------------


def parse_folded(text: str) -> Counter[tuple[str, ...]]:
    """Collapsed stacks (`frame;frame;… count`, root first) → samples per stack. Thread and process
    frames (--threads, --subprocesses) are dropped: the summary is per stage, not per thread."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        frames, _, count = line.rstrip().rpartition(" ")
        if not frames or not count.isdigit():
            continue
        kept = tuple(f for f in frames.split(";") if not f.startswith(("thread (", "process ")))
        if kept:
            stacks[kept] += int(count)
    return stacks


def frame_package(frame: str) -> str:
    """The top-level package of a frame's file (`asyncio`, `aiokafka`, `services`, …); py-spy prints
    files relative to their package root."""
    m = _FRAME_FILE.search(frame)
    if not m:
        return "?"
    file = m["file"]
    if file.startswith("<"):
        return file  # <frozen runpy> and the like
    head = file.split("/", 1)[0]
    return head.removesuffix(".py")


@dataclass(frozen=True)
class StageSummary:
    samples: int
    own: list[tuple[str, int]]  # innermost frame → samples, most first
    packages: list[tuple[str, int]]  # own samples by package
    project: list[tuple[str, int]]  # innermost project frame → samples (its work and the libraries it calls)


def summarize(stacks: Counter[tuple[str, ...]], top: int) -> StageSummary:
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    project: Counter[str] = Counter()
    for frames, n in stacks.items():
        own[frames[-1]] += n
        packages[frame_package(frames[-1])] += n
        # The innermost of our frames: the entry points (`<module>`, run_service) keep only what nothing
        # of ours deeper explains, e.g. the event loop waiting.
        ours = [f for f in frames if frame_package(f) in PROJECT_PACKAGES]
        if ours:
            project[ours[-1]] += n
    return StageSummary(sum(stacks.values()), own.most_common(top), packages.most_common(top),
                        project.most_common(top))


def recorder_outcome(log_text: str) -> tuple[int | None, int | None, str | None]:
    """From py-spy's own output: (samples, sampling errors, its error message or None)."""
    found = list(_SAMPLES.finditer(log_text))
    error = next((line.strip() for line in log_text.splitlines() if line.startswith("Error")), None)
    if not found:
        return None, None, error
    return int(found[-1]["samples"]), int(found[-1]["errors"]), error


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:5.1f}%" if total else "    -"


def stage_lines(name: str, pid: int, summary: StageSummary, seconds: float, cpu_s: float | None,
                errors: int | None, file: str, gil_rate_hz: int | None = None) -> list[str]:
    """One stage's part of the summary; `gil_rate_hz` (mode gil) adds the share of the time the GIL was held."""
    cpu = f", CPU {cpu_s:.2f} s ({100 * cpu_s / seconds:.0f}% of a core)" if cpu_s is not None and seconds > 0 else ""
    gil = (f" (GIL held ≈ {min(100.0, 100 * summary.samples / (seconds * gil_rate_hz)):.0f}% of the time)"
           if gil_rate_hz and seconds > 0 else "")
    out = [f"  {name} (pid {pid}): {summary.samples} samples{gil}{cpu}"
           f"{f', {errors} sampling errors' if errors else ''} — {file}"]
    if not summary.samples:
        out.append("    no samples (idle during the profile?)")
        return out
    out.append("    own samples (where the CPU went):")
    out += [f"      {_pct(n, summary.samples)}  {frame}" for frame, n in summary.own]
    out.append("    own samples by package: "
               + ", ".join(f"{pkg} {_pct(n, summary.samples).strip()}" for pkg, n in summary.packages))
    if summary.project:
        out.append("    by the innermost project function (its own work and the libraries it calls):")
        out += [f"      {_pct(n, summary.samples)}  {frame}" for frame, n in summary.project]
    return out


_CLK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process so far, in seconds (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK


# Attaching --------------------------------------------------------------------------------------


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # the virtualenv's, installed by pyproject's dev extras
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _status_field(pid: int | str, name: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _has_ptrace_capability() -> bool:
    caps = _status_field("self", "CapEff")
    return caps is not None and bool(int(caps, 16) >> CAP_SYS_PTRACE & 1)


def _is_descendant(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == ancestor:
            return True
        ppid = _status_field(pid, "PPid")
        if ppid is None:
            return False
        pid, seen = int(ppid), seen + 1
    return False


def ptrace_obstacle(*, has_capability: bool, target_uid: int | None, own_uid: int, yama_scope: int | None,
                    is_descendant: bool) -> str | None:
    """The kernel's ptrace rules for attaching to a process (pure): why not, or None. `yama_scope` None:
    no Yama module."""
    if has_capability:
        return None
    if target_uid is None:
        return "the process is gone"
    if target_uid != own_uid:
        return (f"it runs as uid {target_uid}, this profiler as uid {own_uid}: attaching needs the same user or "
                "CAP_SYS_PTRACE (run as root)")
    if yama_scope is not None and yama_scope >= 3:
        return "kernel.yama.ptrace_scope=3 forbids attaching to any process"
    if yama_scope == 2:
        return "kernel.yama.ptrace_scope=2 lets only CAP_SYS_PTRACE attach (run as root)"
    if yama_scope == 1 and not is_descendant:
        return ("kernel.yama.ptrace_scope=1 lets a process attach only to its own descendants, and the services "
                "are supervisord's: run as root, or `sysctl kernel.yama.ptrace_scope=0`")
    return None


def attach_obstacle(pid: int) -> str | None:
    """Why py-spy (a child of this process) could not read `pid`, or None."""
    uid = _status_field(pid, "Uid")
    try:
        scope: int | None = int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        scope = None
    return ptrace_obstacle(has_capability=_has_ptrace_capability(), target_uid=int(uid.split()[1]) if uid else None,
                           own_uid=os.geteuid(), yama_scope=scope, is_descendant=_is_descendant(pid, os.getpid()))


@dataclass
class _Recording:
    stage: str
    pid: int | None
    output: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    reason: str | None = None  # why there is no profile of this stage
    cpu_at_start: float | None = None
    cpu_s: float | None = None  # CPU time the stage used while profiled (from /proc)


@dataclass
class StageProfiler:
    """py-spy on each stage for at most `seconds` (see the module's text). `start` returns at once;
    `stop` ends what still samples, waits for the files and returns the summary's lines."""

    stages: Sequence[str] = STAGES
    rate_hz: int = 100
    mode: str = "gil"  # a key of MODES
    top: int = 6
    _recordings: list[_Recording] = field(default_factory=list)
    _out_dir: Path | None = None
    _started: float = 0.0
    _seconds: float = 0.0

    def start(self, s: Settings, out_dir: Path, seconds: float) -> None:
        if self._recordings:
            raise RuntimeError("this profiler has started already")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: one of {', '.join(MODES)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        self._out_dir, self._seconds, self._started = out_dir, seconds, time.monotonic()
        exe = py_spy_path()
        for stage in self.stages:
            pid = stack.service_pid(stage, s)
            rec = _Recording(stage, pid, out_dir / f"{stage}.folded", out_dir / f"{stage}.py-spy.log")
            self._recordings.append(rec)
            if exe is None:
                rec.reason = "py-spy is not installed (it is in pyproject.toml's dev extras: deploy/bootstrap.sh)"
            elif pid is None:
                rec.reason = "not running"
            else:
                rec.reason = attach_obstacle(pid)
            if rec.reason is None and exe is not None and pid is not None:
                cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                       "--rate", str(self.rate_hz), "--format", "raw", "--function", "--nonblocking",
                       "--output", str(rec.output), *MODES[self.mode]]
                rec.cpu_at_start = process_cpu_s(pid)
                with rec.log.open("wb") as log:
                    rec.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> list[str]:
        """The summary (also written to summary.txt in the output directory)."""
        if self._out_dir is None:
            raise RuntimeError("the profiler was not started")
        running = [r.proc for r in self._recordings if r.proc is not None and r.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        deadline = time.monotonic() + STOP_WAIT_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        seconds = min(self._seconds, time.monotonic() - self._started)
        for rec in self._recordings:
            if rec.pid is not None and rec.cpu_at_start is not None:
                now = process_cpu_s(rec.pid)
                rec.cpu_s = None if now is None else now - rec.cpu_at_start
        lines = [f"stage profiles (py-spy {self.rate_hz} Hz, {seconds:.1f} s, mode {self.mode}: "
                 f"{MODE_TEXT[self.mode]}; files in {self._out_dir}):"]
        for rec in self._recordings:
            lines += self._stage_summary(rec, seconds)
        (self._out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
        return lines

    def _stage_summary(self, rec: _Recording, seconds: float) -> list[str]:
        if rec.reason is not None or rec.proc is None or rec.pid is None:
            return [f"  {rec.stage}: no profile: {rec.reason}"]
        log_text = rec.log.read_text(errors="replace") if rec.log.exists() else ""
        _, errors, error = recorder_outcome(log_text)
        if not rec.output.exists():
            if error is None and rec.proc.returncode is not None and rec.proc.returncode < 0:
                return [f"  {rec.stage} (pid {rec.pid}): no profile: stopped after {seconds:.1f} s, before py-spy "
                        "had written anything"]
            why = error or f"py-spy exited with {rec.proc.returncode} and wrote nothing"
            hint = attach_obstacle(rec.pid) or "see ptrace permissions in loadtest/profile.py"
            return [f"  {rec.stage} (pid {rec.pid}): no profile: {why} ({hint}; log {rec.log})"]
        summary = summarize(parse_folded(rec.output.read_text(errors="replace")), self.top)
        return stage_lines(rec.stage, rec.pid, summary, seconds, rec.cpu_s, errors, rec.output.name,
                           self.rate_hz if self.mode == "gil" else None)


def profile_now(s: Settings, out_dir: Path, seconds: float, stages: Iterable[str] = STAGES, rate_hz: int = 100,
                mode: str = "gil", top: int = 6) -> list[str]:
    """Profile for `seconds` (blocking) and return the summary."""
    profiler = StageProfiler(tuple(stages), rate_hz, mode, top)
    profiler.start(s, out_dir, seconds)
    try:
        time.sleep(seconds + 0.5)  # py-spy stops itself after --duration; stop() collects
    finally:
        lines = profiler.stop()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=10.0, help="how long to sample (default 10)")
    p.add_argument("--out", type=Path, help="directory for the profiles (default <run dir>/profiles/<UTC time>)")
    p.add_argument("--rate", type=int, default=100, help="samples per second per stage (default 100)")
    p.add_argument("--mode", choices=tuple(MODES), default="gil",
                   help="samples that count: gil (Python at work, default), active, idle (every thread)")
    p.add_argument("--top", type=int, default=6, help="functions listed per stage and view (default 6)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated (default {','.join(STAGES)})")
    args = p.parse_args(argv)
    stages = [x for x in args.stages.split(",") if x]
    if not 0 < args.seconds <= 3600 or not 1 <= args.rate <= 1000 or args.top < 1 or not set(stages) <= set(STAGES):
        p.error(f"--seconds in (0, 3600], --rate in 1..1000, --top ≥ 1, --stages among {', '.join(STAGES)}")
    s = load_settings()
    out = args.out or s.run_dir / "profiles" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    print("\n".join(profile_now(s, out, args.seconds, stages, args.rate, args.mode, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
