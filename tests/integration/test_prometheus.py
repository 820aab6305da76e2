"""The local stack's Prometheus: rules pass promtool, every service is scraped, recording rules
evaluate, alerts fire when their condition is really driven, and every Grafana query works."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.structs import OffsetAndMetadata

from deploy import stack as stack_ctl
from deploy.prometheus import RULE_FILES, UNIT_TESTS, PromPaths
from deploy.services import service_specs
from loadtest.his import GatewayClient, Stay
from services.common.config import PROJECT_ROOT, Settings, load_settings
from services.common.kafka import ADMIN, client_auth, make_admin
from services.common.tls import client_session
from tests.integration.monitoring_data import (
    INSURED,
    INSURED_PROV,
    LOW_DEPOSIT_PROV,
    SUZHOU,
    Traffic,
    ensure_traffic,
    exclusive,
    lower_deposit,
    mpsn,
    prom_alerts,
    prom_query,
    restore_deposit,
    stay_start,
    wait_for,
)

pytestmark = pytest.mark.integration

GRAFANA_DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "dashboard.json"
# The run's own topic and group (the monitor reports the groups of its topic prefix, without the prefix).
TOPIC_PREFIX = load_settings().topic_prefix
LAG_TOPIC, LAG_GROUP = TOPIC_PREFIX + "xsettle.test.lag", TOPIC_PREFIX + "xsettle-test-lag"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: deploy/bootstrap.sh installs Debian's prometheus package"
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def prometheus(services: Settings) -> Settings:
    """Prometheus runs (the stack fixture starts it) with the rules of this checkout."""
    assert stack_ctl.start_prometheus(services) is not None, "prometheus is not installed"
    return services


@pytest.fixture(scope="module")
async def traffic(refdata: dict, prometheus: Settings, db: asyncpg.Pool,
                  tmp_path_factory: pytest.TempPathFactory) -> Traffic:
    return await ensure_traffic(prometheus, db, tmp_path_factory.mktemp("monitoring-refdata"))


def test_promtool_checks_rules_config_and_alert_unit_tests(prometheus: Settings) -> None:
    res = _promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr
    rendered = sorted(PromPaths.of(prometheus).rules.glob("*.yml"))
    assert len(rendered) == len(RULE_FILES)
    res = _promtool("check", "rules", *map(str, rendered))
    assert res.returncode == 0, res.stdout + res.stderr
    res = _promtool("check", "config", "--syntax-only", str(PromPaths.of(prometheus).config))
    assert res.returncode == 0, res.stdout + res.stderr
    res = _promtool("test", "rules", str(UNIT_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr


async def test_every_service_is_scraped(prometheus: Settings) -> None:
    want = {spec.name for spec in service_specs(prometheus)} | {"prometheus"}

    async def all_up() -> bool:
        up = {r["metric"]["job"]: r["value"][1] for r in await prom_query(prometheus, "up")}
        return all(up.get(job) == "1" for job in want)

    await wait_for(f"targets {sorted(want)} up", all_up, timeout=30)


async def test_rules_evaluate_without_errors(prometheus: Settings) -> None:
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{prometheus.prometheus_port}/api/v1/rules"
    ) as resp:
        groups = (await resp.json())["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 30
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok" and r.get("lastError")]
    assert not bad, bad


# --- alerts, by driving their conditions on the stack -------------------------------------------------


@pytest.fixture
async def low_deposit(db: asyncpg.Pool) -> AsyncIterator[int]:
    async with exclusive(db, "deposit"):
        yield await lower_deposit(db)
        await restore_deposit(db)


@pytest.fixture
async def growing_lag(prometheus: Settings, db: asyncpg.Pool) -> AsyncIterator[asyncio.Task[None]]:
    """A consumer group that stopped consuming a topic that keeps receiving records."""
    async with exclusive(db, "lag"):
        async for task in _growing_lag(prometheus):
            yield task


async def _growing_lag(prometheus: Settings) -> AsyncIterator[asyncio.Task[None]]:
    admin = make_admin(prometheus, request_timeout_ms=10_000)
    await admin.start()
    if LAG_TOPIC not in await admin.list_topics():
        await admin.create_topics([NewTopic(LAG_TOPIC, num_partitions=1, replication_factor=1)])
    consumer = AIOKafkaConsumer(LAG_TOPIC, bootstrap_servers=prometheus.kafka_bootstrap,
                                **client_auth(prometheus, ADMIN),
                                group_id=LAG_GROUP,
                                enable_auto_commit=False, auto_offset_reset="latest")
    await consumer.start()
    tp = TopicPartition(LAG_TOPIC, 0)
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=200)
    end = (await consumer.end_offsets([tp]))[tp]
    await consumer.commit({tp: OffsetAndMetadata(end, "")})
    await consumer.stop()  # the group keeps its committed offset and has no member left
    producer = AIOKafkaProducer(bootstrap_servers=prometheus.kafka_bootstrap, **client_auth(prometheus, ADMIN),
                                acks="all",
                                linger_ms=5)
    await producer.start()

    async def keep_producing() -> None:
        while True:
            for _ in range(40):
                await producer.send(LAG_TOPIC, b"x")
            await producer.flush()
            await asyncio.sleep(2)

    task = asyncio.create_task(keep_producing())
    yield task
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await producer.stop()
    # Deleting the topic drops the group's offsets: the monitor stops reporting it, the alert resolves.
    await admin.delete_topics([LAG_TOPIC])
    await admin.close()


async def _bad_msgids(s: Settings, n: int) -> None:
    async with client_session(s) as session:
        client = GatewayClient(s.gateway_url, session, retry_for_s=10)
        for i in range(n):
            env = Stay(SUZHOU, mpsn(37), INSURED, "390", stay_start()).admit()
            env["msgid"] = f"X{i:02d}" + "X" * 27
            r = await client.call(env)
            assert r["err_msg"].startswith("MSGID_MALFORMED"), r["err_msg"]


def _firing(alerts: list[dict[str, Any]], name: str, **labels: str) -> dict[str, Any] | None:
    for a in alerts:
        if a["state"] == "firing" and a["labels"].get("alertname") == name and all(
            a["labels"].get(k) == v for k, v in labels.items()
        ):
            return a
    return None


async def test_alerts_fire_when_conditions_are_driven(prometheus: Settings, traffic: Traffic, low_deposit: int,
                                                      growing_lag: asyncio.Task[None]) -> None:
    """Drives four conditions on the real stack and waits for each alert to fire:
    江苏's intra-province inpatient rate (6 direct, 14 manual claims) below its 70% target; 西藏's
    deposit below its warning line; dead letters (MSGID_MALFORMED) rising; a consumer group's lag growing."""
    await _bad_msgids(prometheus, 4)
    await asyncio.sleep(3)  # two scrapes apart, so increase() sees a rise
    await _bad_msgids(prometheus, 6)
    want = {
        "DirectSettlementRateBelowTarget": {"insured_prov": INSURED_PROV, "scope": "intra_province",
                                            "visit_type": "inpatient"},
        "DepositBelowWarningLine": {"insured_prov": LOW_DEPOSIT_PROV},
        "DeadLettersRising": {"stage": "gateway", "reason": "MSGID_MALFORMED"},
        "ConsumerLagGrowing": {"group": "xsettle-test-lag"},
    }

    async def all_firing() -> dict[str, dict[str, Any]] | None:
        alerts = await prom_alerts(prometheus)
        got = {name: _firing(alerts, name, **labels) for name, labels in want.items()}
        return got if all(got.values()) else None  # type: ignore[return-value]

    try:
        fired = await wait_for("alerts firing", all_firing, timeout=90, every=2)
    except AssertionError:
        alerts = await prom_alerts(prometheus)
        missing = [n for n, labels in want.items() if not _firing(alerts, n, **labels)]
        rate_now = await prom_query(prometheus, f'xs:direct_settlement_rate:ratio_24h{{insured_prov="{INSURED_PROV}"}}')
        raise AssertionError(f"not firing: {missing}; rate {rate_now}") from None
    rate = fired["DirectSettlementRateBelowTarget"]
    assert "直接结算率低于目标" in rate["annotations"]["summary"] and "Direct-settlement rate" in rate["annotations"][
        "summary"]
    assert float(rate["value"]) < 0.7
    assert fired["DepositBelowWarningLine"]["labels"]["severity"] == "critical"


async def test_grafana_dashboard_queries_all_work(prometheus: Settings, traffic: Traffic) -> None:
    """Every PromQL query of deploy/grafana/dashboard.json runs on the real Prometheus without error and
    returns data (the traffic above makes every panel's data exist)."""
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text(encoding="utf-8"))
    targets = [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    assert len(targets) >= 15

    async def check() -> list[str] | None:
        failures = []
        for title, expr in targets:
            try:
                result = await prom_query(prometheus, expr)
            except AssertionError as e:
                failures.append(f"{title}: {e}")
                continue
            if not result:
                failures.append(f"{title}: empty result for {expr}")
        return failures or None

    # Rates and gauges need a few evaluations after the traffic: allow some time, then report.
    deadline = asyncio.get_running_loop().time() + 40
    failures = await check()
    while failures and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(3)
        failures = await check()
    assert not failures, "\n".join(failures)


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out
