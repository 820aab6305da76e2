"""The local stack, for real: PostgreSQL and Kafka as deploy/stack.py runs them."""

from __future__ import annotations

import re
import subprocess
import sys

import asyncpg
import pytest

from deploy.stack import is_healthy, is_running, kafka_metadata
from services.common.config import PROJECT_ROOT, Settings
from services.common.kafka import ADMIN, client_auth

pytestmark = pytest.mark.integration


def _status_states(out: str) -> dict[str, str]:
    states = {}
    for line in out.splitlines()[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 2:
            states[cells[0]] = cells[1]
    return states


def test_status_shows_infra_up(stack: Settings) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "deploy.stack", "status"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    states = _status_states(res.stdout)
    assert states.get("kafka", "").startswith("up"), res.stdout
    assert states.get("postgres", "").startswith("up"), res.stdout


def test_infra_processes_are_healthy(stack: Settings) -> None:
    for name in ("postgres", "kafka"):
        # A stack started from another checkout on the same ports is reused ("up (external)"):
        # then this checkout has no pid for it, and only the checks below apply.
        if is_running(name, stack):
            assert is_healthy(name, stack), f"{name} runs but is not healthy"


async def test_kafka_answers_metadata_request(stack: Settings) -> None:
    brokers = await kafka_metadata(stack.kafka_bootstrap, auth=client_auth(stack, ADMIN))
    assert brokers == 1


async def test_schema_tables_exist(stack: Settings) -> None:
    expected = {"region", "hospital", "catalog_item", "person_index", "clearing_entry"}
    conn = await asyncpg.connect(stack.pg_dsn)
    try:
        rows = await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        listen = await conn.fetchval("SHOW listen_addresses")
        port = await conn.fetchval("SHOW port")
    finally:
        await conn.close()
    assert expected <= {r["table_name"] for r in rows}
    assert listen == "127.0.0.1"
    assert int(port) == stack.pg_port
