"""The gateway's per-request bookkeeping (services/gateway/app.py): the ingress partition it computes itself,
and the metric children it keeps at hand. Kafka is not needed: nothing here connects."""

from __future__ import annotations

import dataclasses

from aiokafka.partitioner import DefaultPartitioner, murmur2

from services.common.config import load_settings
from services.common.metrics import GATEWAY_SECONDS, REQUESTS
from services.gateway import app
from services.gateway.app import Gateway, partition_for_key


def test_partition_for_key_is_the_default_partitioners_choice() -> None:
    """Records the gateway sends must land where the bench's, the demo's and a HIS's producer (aiokafka's and
    Kafka's default partitioner) put the same key: a person's requests stay in one partition, in order."""
    default = DefaultPartitioner()
    keys = [f"P1504000{i:08d}".encode() for i in range(500)] + [b"H15040099901202611301900000001", b"x", b""]
    for partitions in (1, 3, 8, 12):
        every = list(range(partitions))
        assert [partition_for_key(k, partitions) for k in keys] == [default(k, every, every) for k in keys]


def test_partition_for_key_is_murmur2_positive_modulo() -> None:
    # Kafka's rule, written out: toPositive(murmur2(key)) % partitions.
    key = b"P150400000000042"
    assert partition_for_key(key, 8) == (murmur2(key) & 0x7FFFFFFF) % 8
    assert partition_for_key(key, 8) == partition_for_key(bytes(key), 8)  # cached by value, not identity


async def test_metric_children_are_kept_up_to_a_bound_and_count_the_same() -> None:
    s = dataclasses.replace(load_settings(), gateway_instance=0)
    gw = Gateway(s)  # builds its clients without connecting
    try:
        before = REQUESTS.labels("gateway", "9999", "ok")._value.get()
        requests, seconds = gw._metrics("9999", "ok")
        assert (requests, seconds) == (REQUESTS.labels("gateway", "9999", "ok"), GATEWAY_SECONDS.labels("9999"))
        assert gw._metrics("9999", "ok")[0] is requests  # looked up once
        requests.inc()
        assert REQUESTS.labels("gateway", "9999", "ok")._value.get() == before + 1

        gw._metric_children.clear()
        for i in range(app.METRIC_CHILDREN_MAX + 5):
            gw._metrics("9999", f"CODE{i}")
        assert len(gw._metric_children) == app.METRIC_CHILDREN_MAX
        beyond = f"CODE{app.METRIC_CHILDREN_MAX + 1}"
        assert ("9999", beyond) not in gw._metric_children
        assert gw._metrics("9999", beyond)[0] is REQUESTS.labels("gateway", "9999", beyond)  # still counted
    finally:
        for i in range(app.METRIC_CHILDREN_MAX + 5):
            REQUESTS.remove("gateway", "9999", f"CODE{i}")
        REQUESTS.remove("gateway", "9999", "ok")
        GATEWAY_SECONDS.remove("9999")


async def test_the_ingress_producer_does_not_linger() -> None:
    """A request's record goes to the broker at once: aiokafka keeps one produce request in flight per broker,
    so under load the records that arrive meanwhile share the next request anyway, and a linger would only
    hold every request back (and wake the gateway once more for its timer) at low rates."""
    gw = Gateway(dataclasses.replace(load_settings(), gateway_instance=0))  # builds its clients without connecting
    assert gw.producer._message_accumulator._linger_time == 0
