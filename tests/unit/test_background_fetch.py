"""Consumers whose output no request waits for fetch in batches; the request path's do not.

Pure: the consumers are built, never started (aiokafka hands both options to its fetcher at start)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.clearing.handler import GROUP_CLAIMS, GROUP_JUDGEMENTS, GROUP_POSITIONS, GROUP_REQUESTS, is_background
from services.common import kafka
from services.common.config import load_settings
from services.smartmon.stream import BatchingTransport, make_app


def fetch_options(consumer: object) -> tuple[int, int]:
    return consumer._fetch_min_bytes, consumer._fetch_max_wait_ms  # type: ignore[attr-defined]


async def test_a_background_group_consumer_waits_for_a_batch_within_a_bound() -> None:
    s = load_settings()
    background = kafka.make_group_consumer(s, "clearing", "xsettle-test-background", "t.topic", background=True)
    request_path = kafka.make_group_consumer(dataclasses.replace(s, request_gather_ms=0), "settle",
                                             "xsettle-test-request-path", "t.topic")
    assert fetch_options(background) == (256 * 1024, 500)
    assert fetch_options(request_path) == (1, kafka.IDLE_FETCH_WAIT_MS) == (1, 100)
    # A quiet spell's wait stays the bound on a lone record: never shorter than the active one.
    assert background.active_fetch_wait_ms == 500 <= kafka.QUIET_FETCH_WAIT_MS == 1_000
    # While quiet, the background consumer keeps gathering; the request path answers at the first record.
    assert (background.quiet_min_bytes, request_path.quiet_min_bytes) == (256 * 1024, 1)


async def test_a_request_path_consumer_gathers_for_the_configured_window_and_not_while_quiet() -> None:
    s = dataclasses.replace(load_settings(), request_gather_ms=10)
    gathering = kafka.make_group_consumer(s, "settle", "xsettle-test-request-path", "t.topic")
    assert fetch_options(gathering) == (kafka.REQUEST_GATHER_MIN_BYTES, 10)
    assert gathering.quiet_min_bytes == 1
    assert kafka.request_fetch(0) == {"fetch_min_bytes": 1, "fetch_max_wait_ms": 100, "quiet_min_bytes": 1}
    assert load_settings().request_gather_ms == 10  # the default (README: measured, results of 2026-12-01, day)


def test_only_clearings_32xx_requests_are_answered_to_a_waiting_hospital() -> None:
    assert not is_background(GROUP_REQUESTS)
    assert all(is_background(g) for g in (GROUP_POSITIONS, GROUP_CLAIMS, GROUP_JUDGEMENTS))


async def test_smartmons_faust_consumer_fetches_as_the_background_consumers(tmp_path: Path) -> None:
    app = make_app(dataclasses.replace(load_settings(), run_dir=tmp_path))
    assert isinstance(app.transport, BatchingTransport)
    consumer = app.consumer._thread._create_worker_consumer(app.transport)  # type: ignore[attr-defined]
    assert fetch_options(consumer) == (kafka.BACKGROUND_FETCH_MIN_BYTES, kafka.BACKGROUND_FETCH_WAIT_MS)
    # Everything else is faust's own: its group, its manual commits.
    assert consumer._group_id == app.conf.id
    assert not consumer._enable_auto_commit
