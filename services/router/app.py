"""Router shell on faust-streaming: an agent over `fsi.ingress` around `RouterCore`.

At-least-once: faust flushes the producer before it commits offsets, and everything
downstream is idempotent by msgid. The default shell is the plain aiokafka consumer
(`consumer.py`), which the benchmark measured cheaper per record; select this one with
XS_ROUTER_SHELL=faust (README, Benchmark).
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from services.common.config import Settings
from services.common.faust_sensor import KafkaMetricsSensor
from services.common.metrics import serve_metrics
from services.router.core import RouterCore
from topics.catalog import INGRESS, PARTITIONS

log = logging.getLogger("router")


def _headers(event: Any) -> dict[str, bytes]:
    raw = event.message.headers or {}
    items = raw.items() if isinstance(raw, dict) else raw
    return {k: bytes(v) for k, v in items}


def create_app(s: Settings) -> faust.App:
    app = faust.App(
        "xsettle-router",
        broker=[f"kafka://{server}" for server in s.kafka_bootstrap.split(",")],  # every broker of a cluster
        store="memory://",
        web_enabled=False,
        topic_partitions=PARTITIONS,
        producer_acks=-1,
        producer_linger_ms=1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5,
        # A killed worker's partitions move after this; faust's default (60 s) stalls routing that long.
        broker_session_timeout=10,
        broker_heartbeat_interval=3,
        stream_wait_empty=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
    )
    app.sensors.add(KafkaMetricsSensor("xsettle-router"))
    core = RouterCore(s)
    ingress = app.topic(INGRESS.name, key_type=bytes, value_type=bytes, key_serializer="raw",
                        value_serializer="raw")
    topics: dict[str, faust.TopicT] = {}

    def topic(name: str) -> faust.TopicT:
        if name not in topics:
            topics[name] = app.topic(name, key_serializer="raw", value_serializer="raw")
        return topics[name]

    @app.agent(ingress)
    async def process(stream: faust.StreamT) -> None:
        await core.state.ready.wait()
        async for event in stream.events():
            for out in await core.handle(event.value, _headers(event)):
                await topic(out.topic).send(key=out.key, value=out.value, partition=out.partition,
                                            headers=out.headers)

    @app.task
    async def startup() -> None:
        await core.state.start()
        serve_metrics(s.router_metrics_port, stage="router")
        log.info("router ready")

    return app
