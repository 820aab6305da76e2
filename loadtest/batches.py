"""Run a command (a benchmark) and print how the settlement stage batched what it brought, and each
component's CPU per batch: the stage's own metrics (`xs_consumer_step_seconds`, `xs_stage_seconds`) read
before and after, and CPU from /proc as the benchmark reads it.

    .venv/bin/python -m loadtest.batches .venv/bin/python -m loadtest.bench --rate 300 --seconds 20
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request

from loadtest.bench import CpuSnap, cpu_snapshot
from services.common.config import Settings, load_settings
from services.settle.stage import GROUP_ID

_SERIES = re.compile(r'^(xs_consumer_step_seconds_(?:count|sum)\{group="' + GROUP_ID + r'",step="\w+"\}'
                     r'|xs_stage_seconds_(?:count|sum)\{stage="\w+"\}) ([0-9.e+-]+)$')


def stage_series(s: Settings) -> dict[str, float]:
    """The settlement stage's step and stage series (count and sum) from its metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.settle_metrics_port}/metrics", timeout=5).read().decode()
    return parse_series(text)


def parse_series(text: str) -> dict[str, float]:
    """The series `stage_series` reads, from a Prometheus text exposition."""
    return {m.group(1): float(m.group(2)) for line in text.splitlines() if (m := _SERIES.match(line))}


def cpu_seconds(snap: CpuSnap) -> dict[str, float]:
    return {name: sum(per_pid.values()) for name, (_, per_pid) in snap.items()}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    s = load_settings()
    before, cpu_before, started = stage_series(s), cpu_seconds(cpu_snapshot(s)), time.monotonic()
    rc = subprocess.run(argv, check=False).returncode
    after, cpu_after = stage_series(s), cpu_seconds(cpu_snapshot(s))
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    batches = delta.get(f'xs_consumer_step_seconds_count{{group="{GROUP_ID}",step="process"}}', 0.0)
    records = delta.get('xs_stage_seconds_count{stage="router"}', 0.0)
    print(f"\nsettlement stage over {time.monotonic() - started:.1f} s (the command's warm-up and drain included):")
    print(f"  batches {batches:.0f}, records {records:.0f}, records per batch {records / max(batches, 1):.1f}")
    for step in ("wait", "process", "publish", "commit"):
        total = delta.get(f'xs_consumer_step_seconds_sum{{group="{GROUP_ID}",step="{step}"}}', 0.0)
        print(f"  {step:8} {total:7.2f} s in all, {1000 * total / max(batches, 1):6.2f} ms per batch")
    cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_before if k in cpu_after}
    print("  CPU s:         " + " ".join(f"{k}={v:.2f}" for k, v in cpu.items()))
    if batches:
        print("  CPU ms/batch:  " + " ".join(f"{k}={1000 * v / batches:.2f}" for k, v in cpu.items()))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
