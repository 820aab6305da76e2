"""loadtest.batches reads the settlement stage's own series from its exposition, and nothing else."""

from __future__ import annotations

from loadtest.batches import parse_series

EXPOSITION = """# HELP xs_consumer_step_seconds Per batch
xs_consumer_step_seconds_bucket{group="xsettle-settle",step="process",le="0.01"} 3.0
xs_consumer_step_seconds_count{group="xsettle-settle",step="process"} 12.0
xs_consumer_step_seconds_sum{group="xsettle-settle",step="process"} 0.25
xs_consumer_step_seconds_count{group="xsettle-clearing-requests",step="process"} 99.0
xs_stage_seconds_count{stage="router"} 40.0
xs_stage_seconds_sum{stage="settle_batch"} 1.5e-01
xs_requests_total{stage="router",infno="2201",outcome="ok"} 7.0
"""


def test_only_the_stages_step_and_stage_series_are_read() -> None:
    assert parse_series(EXPOSITION) == {
        'xs_consumer_step_seconds_count{group="xsettle-settle",step="process"}': 12.0,
        'xs_consumer_step_seconds_sum{group="xsettle-settle",step="process"}': 0.25,
        'xs_stage_seconds_count{stage="router"}': 40.0,
        'xs_stage_seconds_sum{stage="settle_batch"}': 0.15,
    }
