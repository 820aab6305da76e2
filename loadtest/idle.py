"""CPU of each process of the running stack while nothing is sent (ms of CPU per second), optionally under
several Prometheus scrape intervals, alternating: what an idle stack costs, and what its scrapes cost.

    .venv/bin/python -m loadtest.idle --seconds 60 --rounds 2 --scrape-intervals 2s,5s

Each interval is set in the state dir's generated `prometheus.yml` (scrape and rule evaluation alike; the
scrape timeout shortened where it would exceed the interval), loaded with SIGHUP and checked in Prometheus'
own view of its config before the measurement; the rendered config is restored at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import urllib.request

from deploy import stack
from deploy.prometheus import SCRAPE_INTERVAL, PromPaths, render_config, write_files
from loadtest.batches import cpu_seconds
from loadtest.bench import cpu_snapshot, proc_cpu
from services.common.config import Settings, load_settings

SETTLE_AFTER_RELOAD_S = 15  # a scrape or two at the new interval before the measurement starts


def snapshot(s: Settings) -> dict[str, float]:
    """CPU seconds so far per component, Prometheus included, without this process and the machine."""
    out = {k: v for k, v in cpu_seconds(cpu_snapshot(s)).items() if k not in ("bench (this client)", "machine busy")}
    prom = stack.prometheus_pid(s)
    if prom:
        out["prometheus"] = proc_cpu(prom)
    return out


def set_interval(s: Settings, interval: str | None) -> None:
    """Scrape and evaluate every `interval` (None: the rendered config), and wait until Prometheus has it."""
    pid = stack.prometheus_pid(s)
    if not pid:
        raise SystemExit("Prometheus is not running: .venv/bin/python -m deploy.stack start")
    if interval is None:
        write_files(s)  # the stack's own rendering, as `deploy.stack start` writes it
        interval = SCRAPE_INTERVAL
    else:
        paths = PromPaths.of(s)
        config = json.loads(render_config(s, paths))
        glob = config["global"]
        glob["scrape_interval"] = glob["evaluation_interval"] = interval
        if _seconds(glob["scrape_timeout"]) > _seconds(interval):
            glob["scrape_timeout"] = interval
        paths.config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.kill(pid, signal.SIGHUP)
    wanted = f"scrape_interval: {interval}"
    for _ in range(50):
        time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{s.prometheus_port}/api/v1/status/config", timeout=5) as r:
            if wanted in json.load(r)["data"]["yaml"]:
                return
    raise SystemExit(f"Prometheus did not load {wanted} (see .state/logs/prometheus.log)")


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    unit = "ms" if duration.endswith("ms") else duration[-1]
    return float(duration[: -len(unit)]) * units[unit]


def measure(s: Settings, seconds: float) -> dict[str, float]:
    before, started = snapshot(s), time.monotonic()
    time.sleep(seconds)
    after, elapsed = snapshot(s), time.monotonic() - started
    return {k: 1000 * (after[k] - before[k]) / elapsed for k in before if k in after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60, help="each measurement (default 60)")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the intervals (default 1)")
    ap.add_argument("--scrape-intervals", default="",
                    help="comma-separated Prometheus intervals to alternate, e.g. 2s,5s (default: as configured)")
    args = ap.parse_args()
    s = load_settings()
    intervals: list[str | None] = [i.strip() for i in args.scrape_intervals.split(",") if i.strip()] or [None]
    print(f"idle CPU, ms per s, {args.seconds:.0f} s each, nothing sent by this command", flush=True)
    try:
        for rnd in range(1, args.rounds + 1):
            for interval in intervals:
                if interval is not None:
                    set_interval(s, interval)
                    time.sleep(SETTLE_AFTER_RELOAD_S)
                row = measure(s, args.seconds)
                label = f"scrape {interval}" if interval else "as configured"
                print(f"round {rnd}, {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(row.items()))
                      + f"; all {sum(row.values()):.1f}", flush=True)
    finally:
        if intervals != [None]:
            set_interval(s, None)


if __name__ == "__main__":
    main()
