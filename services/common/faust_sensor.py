"""A faust sensor that feeds the shared Prometheus metrics: rebalances and produce errors."""

from __future__ import annotations

from typing import Any

import faust
from faust.types import AppT

from services.common.metrics import record_produce_error, record_rebalance


class KafkaMetricsSensor(faust.Sensor):  # type: ignore[misc]
    def __init__(self, group: str) -> None:
        super().__init__()
        self.group = group

    def on_rebalance_end(self, app: AppT, state: dict) -> None:
        assigned = app.consumer.assignment() if app.consumer is not None else set()
        record_rebalance(self.group, len(assigned))

    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int, valsize: int) -> Any:
        return topic

    def on_send_error(self, producer: Any, exc: BaseException, state: Any) -> None:
        record_produce_error(state if isinstance(state, str) else "unknown")
