"""Monitoring pieces without a stack: consumer lag from offsets, targets, month bounds, the rendered
Prometheus configuration and rules, and the dashboard's assembly of what it shows."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from deploy.prometheus import RULE_FILES, PromPaths, render_alerts, render_config
from deploy.services import service_specs
from services.common.config import ConfigError, load_settings
from services.common.response import SHANGHAI
from services.dashboard.data import Live, assemble, deposit_rows, position_rows, rate_rows
from services.monitor.lag import group_lags
from services.monitor.ledger import Cell, MonthFigures, month_bounds
from services.monitor.targets import Target, TargetsError, load_targets
from services.refdata.regions import PROVINCES


def test_lag_per_partition_counts_uncommitted_partitions_from_the_log_start() -> None:
    partitions = {"fsi.routed": [0, 1, 2], "other": [0]}
    committed = {("fsi.routed", 0): 100, ("fsi.routed", 1): -1}
    begin = {("fsi.routed", 0): 0, ("fsi.routed", 1): 40, ("fsi.routed", 2): 5, ("other", 0): 0}
    end = {("fsi.routed", 0): 130, ("fsi.routed", 1): 50, ("fsi.routed", 2): 5, ("other", 0): 9}
    lags = group_lags("g", committed, partitions, begin, end)
    assert [(x.partition, x.committed, x.lag) for x in lags] == [(0, 100, 30), (1, None, 10), (2, None, 0)]
    assert {x.topic for x in lags} == {"fsi.routed"}  # only topics the group committed on
    # A committed offset past the end (log truncated) is not negative lag.
    assert group_lags("g", {("t", 0): 10}, {"t": [0]}, {("t", 0): 0}, {("t", 0): 5})[0].lag == 0


def test_targets_default_overlaid_per_province(tmp_path: Path) -> None:
    targets = load_targets(PROVINCES)
    by_key = {(t.insured_prov, t.scope, t.visit_type): t.ratio for t in targets}
    assert by_key[("150000", "cross_province", "inpatient")] == 0.70
    assert by_key[("320000", "intra_province", "inpatient")] == 0.70  # the default applies everywhere
    assert len(targets) == 2 * len(PROVINCES)
    f = tmp_path / "t.toml"
    f.write_text('[default]\n"cross_province.inpatient" = 0.8\n[province."150000"]\n"cross_province.inpatient" = 0.6\n')
    by_key = {(t.insured_prov, t.scope, t.visit_type): t.ratio for t in load_targets(["150000", "510000"], f)}
    assert by_key == {("150000", "cross_province", "inpatient"): 0.6, ("510000", "cross_province", "inpatient"): 0.8}
    for bad in ('[default]\n"cross.inpatient" = 0.7\n', '[default]\n"cross_province.inpatient" = 70\n',
                '[province."999999"]\n"cross_province.inpatient" = 0.7\n'):
        f.write_text(bad)
        with pytest.raises(TargetsError):
            load_targets(["150000"], f)


def test_month_bounds_in_shanghai_time() -> None:
    # 2026-11-30 20:00 UTC is already 1 December in Shanghai.
    start, end = month_bounds(datetime(2026, 11, 30, 20, 0, tzinfo=SHANGHAI).astimezone(SHANGHAI))
    assert (start, end) == (datetime(2026, 11, 1), datetime(2026, 12, 1))
    from datetime import UTC
    start, end = month_bounds(datetime(2026, 11, 30, 20, 0, tzinfo=UTC))
    assert (start, end) == (datetime(2026, 12, 1), datetime(2027, 1, 1))


def test_prometheus_config_scrapes_every_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XS_STATE_DIR", str(tmp_path))
    s = load_settings()
    config = json.loads(render_config(s, PromPaths.of(s)))
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for spec in service_specs(s):
        assert jobs[spec.name]["static_configs"][0]["targets"] == [f"127.0.0.1:{spec.ready_port}"]
    assert "prometheus" in jobs and jobs["extra"]["file_sd_configs"]
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "5s"
    assert not [name for name, job in jobs.items() if "scrape_interval" in job]  # every job at the global 5 s
    assert config["rule_files"] == [str(PromPaths.of(s).rules / "*.yml")]


def test_local_alert_durations_replace_production_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    text = RULE_FILES[1].read_text(encoding="utf-8")
    assert "for: 30m" in text
    local = render_alerts(text, "5s")
    assert "for: 30m" not in local and local.count("for: 5s") == text.count("\n        for:") == 10
    assert render_alerts(text, None) == text
    from deploy.prometheus import local_alert_for
    monkeypatch.setenv("XS_PROMETHEUS_ALERT_FOR", "keep")
    assert local_alert_for() is None
    monkeypatch.setenv("XS_PROMETHEUS_ALERT_FOR", "soon")
    with pytest.raises(ConfigError):
        local_alert_for()


def _month(cells: dict[tuple[str, str, str, str], Cell]) -> MonthFigures:
    return MonthFigures("2026-11", datetime(2026, 11, 1), datetime(2026, 12, 1), cells)


def _cell(direct: int, manual: int = 0, fund: int = 0) -> Cell:
    c = Cell(direct=direct, manual=manual, settled=direct, fund_fen=fund)
    c.funds_fen["hifp_pay"] = fund
    return c


def test_rate_rows_aggregate_treating_provinces_and_flag_targets() -> None:
    month = _month({
        ("320000", "320000", "intra_province", "inpatient"): _cell(6, 14),
        ("150000", "510000", "cross_province", "inpatient"): _cell(7, 1),
        ("150000", "140000", "cross_province", "inpatient"): _cell(3, 0),
        ("150000", "150000", "local", "inpatient"): _cell(50),
    })
    targets = [Target("320000", "intra_province", "inpatient", 0.7),
               Target("150000", "cross_province", "inpatient", 0.7)]
    live = Live({"rate_24h": [{"metric": {"insured_prov": "150000", "scope": "cross_province",
                                          "visit_type": "inpatient"}, "value": [0, "0.5"]}]}, {}, [], None)
    rows = {(r["insured_prov"], r["scope"]["code"], r["visit_type"]["code"]): r
            for r in rate_rows(month, targets, live)}
    js = rows[("320000", "intra_province", "inpatient")]
    assert (js["direct"], js["manual"], js["rate"], js["below_target"]) == (6, 14, 0.3, True)
    nm = rows[("150000", "cross_province", "inpatient")]
    assert (nm["direct"], nm["rate"], nm["below_target"], nm["rate_24h"]) == (10, 10 / 11, False, 0.5)
    assert not any(k[1] == "local" for k in rows)  # local care has no rate
    # Seed provinces always have a headline row, with or without data.
    assert rows[("350000", "cross_province", "inpatient")]["rate"] is None


def test_positions_prefer_the_clearing_service_and_fall_back_to_the_ledger() -> None:
    month = _month({("320000", "150000", "cross_province", "inpatient"): _cell(2, fund=5000),
                    ("320000", "320000", "intra_province", "inpatient"): _cell(1, fund=999)})
    source, rows = position_rows(month, [])
    assert source == "ledger" and [(r["insured_prov"], r["treating_prov"], r["total_fen"]) for r in rows] == [
        ("320000", "150000", 5000)]
    clearing: list[Mapping[str, Any]] = [
        {"insured_prov": "320000", "treating_prov": "150000", "hifp_pay": 4000, "hifmi_pay": 0, "hifob_pay": 0,
         "maf_pay": 100},
        {"insured_prov": "320000", "treating_prov": "320000", "hifp_pay": 1, "hifmi_pay": 0, "hifob_pay": 0,
         "maf_pay": 0}]
    source, rows = position_rows(month, clearing)
    assert source == "clearing_position"
    assert [(r["total_fen"], r["person_times"]) for r in rows] == [(4100, 2)]


def test_deposits_flag_at_or_below_a_positive_line() -> None:
    rows = deposit_rows([("150000", 100, 100), ("510000", 101, 100), ("540000", 0, 0), ("110000", -5, 10)])
    assert {r["insured_prov"]: r["below"] for r in rows} == {"150000": True, "510000": False, "540000": False,
                                                             "110000": True}


def test_assemble_without_prometheus_still_shows_the_ledger() -> None:
    month = _month({("320000", "150000", "cross_province", "inpatient"): _cell(2, 1, fund=5000)})
    doc = assemble(month, load_targets(PROVINCES), [], [], Live({}, {}, [], "Prometheus: down"), 0.0)
    assert doc["sources"]["prometheus"] == "Prometheus: down"
    assert doc["totals"]["direct"] == 2 and doc["totals"]["manual"] == 1
    assert doc["positions"][0]["total_fen"] == 5000
    assert doc["now"]["settlements_per_min"] is None and doc["alerts"] == []
    json.dumps(doc)  # serialisable as it stands
