"""The broker's own processes, as the local stack starts them.

Each entry: a name, the module run with the project's Python, and the ports it
listens on (from Settings) so `status` can show them and health checks can wait.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import Settings


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    ports: tuple[int, ...]
    # The port whose HTTP GET / answering means "ready" (the metrics endpoint).
    ready_port: int


def service_specs(s: Settings) -> list[ServiceSpec]:
    return [
        ServiceSpec("settle", "services.settle", (s.settle_metrics_port,), s.settle_metrics_port),
        ServiceSpec("router", "services.router", (s.router_metrics_port,), s.router_metrics_port),
        ServiceSpec(
            "gateway", "services.gateway", (s.gateway_port, s.gateway_metrics_port), s.gateway_metrics_port
        ),
        ServiceSpec("clearing", "services.clearing", (s.clearing_metrics_port,), s.clearing_metrics_port),
        ServiceSpec("monitor", "services.monitor", (s.monitor_metrics_port,), s.monitor_metrics_port),
        # The dashboard serves its page and /metrics on one port.
        ServiceSpec("dashboard", "services.dashboard", (s.dashboard_port,), s.dashboard_port),
    ]
