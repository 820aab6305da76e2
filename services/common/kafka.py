"""Kafka clients with every option that matters set explicitly at the call site."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener

from services.common.config import Settings
from services.common.metrics import ASSIGNED_PARTITIONS, record_rebalance


def make_producer(s: Settings, *, linger_ms: int = 2) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        request_timeout_ms=30_000,
        compression_type=None,
    )


class CountRebalances(ConsumerRebalanceListener):  # type: ignore[misc]
    """Counts each rebalance of the group and exports the partitions assigned (metrics only)."""

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id

    def on_partitions_revoked(self, revoked: object) -> None:
        ASSIGNED_PARTITIONS.labels(self.group_id).set(0)

    def on_partitions_assigned(self, assigned: set[object]) -> None:
        record_rebalance(self.group_id, len(assigned))


IDLE_FETCH_WAIT_MS = 100


def make_group_consumer(s: Settings, group_id: str, *topics: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        # The prefix keeps a test run's groups apart from other runs' (metric labels keep the plain name).
        group_id=s.topic_prefix + group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=s.batch_size_max,
        # The broker answers a fetch as soon as any record is there; this only bounds idle polling
        # (5 ms meant ~200 empty fetches a second per consumer, a third of a core on this 2-core box).
        fetch_max_wait_ms=IDLE_FETCH_WAIT_MS,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
        max_poll_interval_ms=60_000,
    )
    consumer.subscribe(list(topics), listener=CountRebalances(group_id))
    return consumer


def header(headers: list[tuple[str, bytes]] | tuple | None, name: str) -> bytes | None:
    for key, value in headers or ():
        if key == name:
            return bytes(value)
    return None
