"""The floor benchmark (loadtest/floor.py) for a few seconds on the run's broker and database: its report has
every section, every request is answered, every CPU figure is positive, and it leaves nothing behind.
It proves the tool, not a figure: the machine is shared."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from services.common.config import PROJECT_ROOT, Settings
from services.common.kafka import make_admin

pytestmark = pytest.mark.integration

_FLOOR_AT = re.compile(r"floor at (.+?): sent (\d+), answered (\d+) in ([\d.]+) s = ([\d.]+) requests/s; "
                       r"latency p50 ([\d.]+) ms, p99 ([\d.]+) ms")
_CPU = re.compile(r"  floor CPU per request ([\d.]+) ms: (.+) \(kafka and postgres net of their idle; raw (.+)\)")
RELAYS = ("router", "clearing", "smartmon")  # the default topology: router and engine one stage


async def test_floor_reports_every_stage_and_cleans_up(stack: Settings, db: asyncpg.Pool, tmp_path: Path) -> None:
    out = tmp_path / "floor.txt"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.floor", "--rate", "100", "--seconds", "5", "--saturation-seconds", "3",
         "--in-flight", "1000", "--warmup-seconds", "1", "--idle-seconds", "1", "--drain-seconds", "10",
         "--out", str(out)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert report == done.stdout

    lines = report.splitlines()
    assert lines[0].startswith("loadtest.floor, ") and "load average" in lines[0]
    topology = next(line for line in lines if line.startswith("topology: "))
    assert re.search(r"read by 2 groups\), [\d.]+ smartmon records per event: [\d.]+ records produced", topology)
    sizes = next(line for line in lines if line.startswith("record sizes (value bytes): "))
    assert all(int(v) > 0 for v in re.findall(r"(\d+)", sizes))

    phases = [(m, i) for i, line in enumerate(lines) if (m := _FLOOR_AT.match(line))]
    assert [m.group(1) for m, _ in phases] == ["100 requests/s", "saturation (1000 requests in flight)"]
    for m, i in phases:
        sent, answered = int(m.group(2)), int(m.group(3))
        assert sent > 0 and answered == sent  # every request answered, none twice
        assert all(float(m.group(k)) > 0 for k in (4, 5, 6, 7))
        assert re.match(r"  sent in [\d.]+ s = [\d.]+ requests/s offered; (HELD|NOT HELD: .+) \(p99", lines[i + 1])
        relayed = dict(re.findall(r"(\w+) (\d+)", lines[i + 2].removeprefix("  records relayed: ")))
        assert set(relayed) == set(RELAYS)
        assert int(relayed["router"]) == sent
        assert all(int(n) > 0 for n in relayed.values())
        cpu = _CPU.match(lines[i + 3])
        assert cpu is not None, lines[i + 3]
        per = {name: float(v) for name, v in re.findall(r"(\w+) ([\d.]+)", cpu.group(2))}
        assert set(per) == {*RELAYS, "kafka", "postgres"}
        assert all(v > 0 for v in per.values()), per
        assert float(cpu.group(1)) == pytest.approx(sum(per.values()), abs=0.01)
        assert lines[i + 5].startswith("  floor / 0.3 ms target = ")
        assert float(lines[i + 5].rsplit(" ", 1)[1]) > 0
    assert not any(line.startswith("WARNING: not deleted") for line in lines)

    # Nothing left: its topics and its tables.
    admin = make_admin(stack)
    await admin.start()
    try:
        left = [t for t in await admin.list_topics() if t.startswith(f"{stack.topic_prefix}xsettle.floor-")]
    finally:
        await admin.close()
    assert left == []
    assert await db.fetchval("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'floor\\_%'") == 0
