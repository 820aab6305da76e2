"""The privacy log scan: no personal identifier of the test population in any log the suite wrote.

After the session (tests/conftest.py, the `stack` fixture's end) the run's logs (`<run_dir>/logs/*` and
every other `*.log` under the run dir) and the bytes the shared Kafka and PostgreSQL appended to their
logs (`<state_dir>/logs/*`) during the session are searched for every certificate number, name and
psn_no of the population the tests used: conftest's PERSONS, every `persons.jsonl` under the session's
temporary directory (each test writes its persons there before loading them) and every person in the
run's shard databases (persons created by fixtures or load tools). A finding names the file, the line
and the kind of identifier — never the identifier itself.

Matching: identifiers are alphanumeric (psn_no, certno) or CJK (names); every alphanumeric or CJK run of
a line is searched for each identifier length, so an identifier inside a longer token is found too. JSON
escapes (`\\u5f20`) are decoded before names are searched. Identifiers shorter than `MIN_LENGTH` are not
searched (three letters match anywhere; the refused ones are counted in the summary).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

KINDS = ("certno", "name", "psn_no")
MIN_LENGTH = {"certno": 15, "name": 2, "psn_no": 6}
_ALNUM = re.compile(r"[0-9A-Za-z]+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_READ_CHUNK = 1 << 20


class _PersonRow(msgspec.Struct):
    psn_no: str | None = None
    certno: str | None = None
    psn_name: str | None = None


_person_decoder = msgspec.json.Decoder(_PersonRow)


@dataclass
class Population:
    """The identifiers to look for, by kind."""

    values: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in KINDS})
    too_short: int = 0

    def add(self, kind: str, value: str | None) -> None:
        if not value:
            return
        if len(value) < MIN_LENGTH[kind]:
            self.too_short += 1
            return
        self.values[kind].add(value)

    def add_person(self, psn_no: str | None, certno: str | None, name: str | None) -> None:
        self.add("psn_no", psn_no)
        self.add("certno", certno)
        self.add("name", name)

    def add_persons_file(self, path: Path) -> None:
        """A persons.jsonl (lines that do not decode — tests write broken files on purpose — are skipped)."""
        with path.open("rb") as f:
            for line in f:
                try:
                    row = _person_decoder.decode(line)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    continue
                self.add_person(row.psn_no, row.certno, row.psn_name)

    def __len__(self) -> int:
        return sum(len(v) for v in self.values.values())


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: a {self.kind} of the test population"


@dataclass
class ScanReport:
    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    def summary(self, population: Population) -> str:
        counts = ", ".join(f"{k} {len(v)}" for k, v in population.values.items())
        return (f"privacy log scan: {self.files} log file(s), {self.bytes:,} bytes, {len(population):,} identifiers"
                f" ({counts}; {population.too_short} too short to search): "
                + ("clean" if not self.findings else f"{len(self.findings)} finding(s)"))


class _Matcher:
    def __init__(self, population: Population) -> None:
        self.ascii = {k: population.values[k] for k in ("psn_no", "certno")}
        self.names = population.values["name"]
        self.ascii_lengths = sorted({len(v) for vs in self.ascii.values() for v in vs})
        self.name_lengths = sorted({len(v) for v in self.names})

    @staticmethod
    def _windows(token: str, lengths: list[int]) -> Iterator[str]:
        for n in lengths:
            for i in range(len(token) - n + 1):
                yield token[i:i + n]

    def kinds_in(self, line: str) -> set[str]:
        found: set[str] = set()
        for token in _ALNUM.findall(line):
            for window in self._windows(token, self.ascii_lengths):
                found.update(k for k, vs in self.ascii.items() if window in vs)
        texts = [line, _JSON_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), line)] if "\\u" in line else [line]
        for text in texts:
            for token in _CJK.findall(text):
                if any(w in self.names for w in self._windows(token, self.name_lengths)):
                    found.add("name")
        return found


def _lines_before(path: Path, offset: int) -> int:
    """How many lines end before byte `offset` (for absolute line numbers of an appended part)."""
    n = 0
    with path.open("rb") as f:
        remaining = offset
        while remaining > 0:
            chunk = f.read(min(_READ_CHUNK, remaining))
            if not chunk:
                break
            n += chunk.count(b"\n")
            remaining -= len(chunk)
    return n


def scan(files: Iterable[tuple[Path, int]], population: Population) -> ScanReport:
    """Search each (file, from byte offset) for the population's identifiers."""
    matcher = _Matcher(population)
    report = ScanReport()
    for path, start in files:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if size < start:  # rotated or truncated meanwhile: all of it is new
            start = 0
        if size == start:
            continue
        report.files += 1
        line_no = _lines_before(path, start)
        with path.open("rb") as f:
            f.seek(start)
            for raw in f:
                line_no += 1
                report.bytes += len(raw)
                for kind in sorted(matcher.kinds_in(raw.decode("utf-8", errors="replace"))):
                    report.findings.append(Finding(path, line_no, kind))
    return report


def log_sizes(directory: Path) -> dict[Path, int]:
    """The size of every file in a log directory now (the session's starting point)."""
    return {p: p.stat().st_size for p in sorted(directory.glob("*")) if p.is_file()} if directory.is_dir() else {}


def session_logs(run_dir: Path, state_logs: Path, state_sizes_at_start: dict[Path, int]) -> list[tuple[Path, int]]:
    """What the session wrote: the run's logs whole, the shared logs from their size at the start. (When the
    run dir is the state dir, its logs count as shared: only what was appended.)"""
    files: dict[Path, int] = {}
    if run_dir.resolve() != state_logs.parent.resolve():
        for p in sorted({*run_dir.glob("logs/*"), *run_dir.rglob("*.log")}):
            if p.is_file():
                files[p] = 0
    for p in sorted(state_logs.glob("*")) if state_logs.is_dir() else []:
        if p.is_file() and p not in files:
            files[p] = state_sizes_at_start.get(p, 0)
    return sorted(files.items())
