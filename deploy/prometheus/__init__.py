"""Prometheus for the local stack: its configuration and rules, rendered into the state dir.

    <state>/prometheus/prometheus.yml   scrape config (JSON, which is YAML), rendered from Settings
    <state>/prometheus/rules/*.yml      recording rules verbatim; alert rules with local `for:` durations
    <state>/prometheus/targets/*.json   extra scrape targets (file_sd; e.g. a test's own exporter)
    <state>/prometheus/data/            TSDB

Every service of deploy/services.py is scraped on its ready port at /metrics (job = its
name), every 5 s; rules are evaluated every 5 s unless their group says otherwise
(deploy/prometheus/rules/recording.yml). The rules in deploy/prometheus/rules/
carry production `for:` durations; the local stack replaces them with
XS_PROMETHEUS_ALERT_FOR (default 5s; `keep` keeps the files' values) so an alert shows
within seconds of its condition. deploy/stack.py starts and stops the server.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from deploy.services import service_specs
from services.common.config import ConfigError, Settings

PROM_DIR: Final = Path(__file__).resolve().parent
RULES_DIR: Final = PROM_DIR / "rules"
RULE_FILES: Final = (RULES_DIR / "recording.yml", RULES_DIR / "alerts.yml")
UNIT_TESTS: Final = PROM_DIR / "tests" / "alerts_test.yml"

# Each scrape costs the service a rendering of its whole exposition in its own process (settle's, with a
# series per province pair, scope and visit type: 35 ms for 246 KB), whatever changed. Every 2 s that was
# most of an idle stack's CPU; the readers — recording rules (1 min windows and longer, every 10-15 s) and the
# dashboards (every 10 s) — need no more than 5 s.
SCRAPE_INTERVAL: Final = "5s"
SCRAPE_TIMEOUT: Final = "4s"
EVALUATION_INTERVAL: Final = "5s"
FILE_SD_REFRESH: Final = "5s"
RETENTION: Final = "15d"
LOCAL_ALERT_FOR_DEFAULT: Final = "5s"
_DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")
_FOR_LINE = re.compile(r"^(\s+for:\s*)(\S+)(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class PromPaths:
    root: Path
    config: Path
    rules: Path
    targets: Path
    data: Path

    @staticmethod
    def of(s: Settings) -> PromPaths:
        root = s.run_dir.resolve() / "prometheus"
        return PromPaths(root, root / "prometheus.yml", root / "rules", root / "targets", root / "data")


def local_alert_for() -> str | None:
    """The `for:` duration of every alert on the local stack; None keeps the rule files' values."""
    raw = os.environ.get("XS_PROMETHEUS_ALERT_FOR") or LOCAL_ALERT_FOR_DEFAULT
    if raw == "keep":
        return None
    if not _DURATION.match(raw):
        raise ConfigError(f"XS_PROMETHEUS_ALERT_FOR={raw!r} is not a duration like 5s, 2m or keep")
    return raw


def render_config(s: Settings, paths: PromPaths) -> str:
    jobs: list[dict[str, object]] = [
        {"job_name": spec.name, "static_configs": [{"targets": [f"127.0.0.1:{spec.ready_port}"]}]}
        for spec in service_specs(s)
    ]
    jobs.append({"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{s.prometheus_port}"]}]})
    jobs.append({
        "job_name": "extra",
        "file_sd_configs": [{"files": [str(paths.targets / "*.json")], "refresh_interval": FILE_SD_REFRESH}],
    })
    config = {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_TIMEOUT,
            "evaluation_interval": EVALUATION_INTERVAL,
            "external_labels": {"stack": "local"},
        },
        "rule_files": [str(paths.rules / "*.yml")],
        "scrape_configs": jobs,
    }
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def render_alerts(text: str, alert_for: str | None) -> str:
    if alert_for is None:
        return text
    return _FOR_LINE.sub(lambda m: f"{m.group(1)}{alert_for}{m.group(3)}", text)


def write_files(s: Settings) -> bool:
    """Render config and rules into the state dir; True when anything changed (a running server reloads)."""
    paths = PromPaths.of(s)
    for d in (paths.root, paths.rules, paths.targets, paths.data):
        d.mkdir(parents=True, exist_ok=True)
    alert_for = local_alert_for()
    wanted = {paths.config: render_config(s, paths)}
    for src in RULE_FILES:
        text = src.read_text(encoding="utf-8")
        wanted[paths.rules / src.name] = render_alerts(text, alert_for) if src.name == "alerts.yml" else text
    changed = False
    for path, text in wanted.items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
            changed = True
    for stale in paths.rules.glob("*.yml"):
        if stale not in wanted:
            stale.unlink()
            changed = True
    return changed


def command(binary: str, s: Settings) -> list[str]:
    paths = PromPaths.of(s)
    return [
        binary,
        f"--config.file={paths.config}",
        f"--storage.tsdb.path={paths.data}",
        f"--storage.tsdb.retention.time={RETENTION}",
        f"--web.listen-address=127.0.0.1:{s.prometheus_port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]
