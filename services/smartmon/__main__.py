"""python -m services.smartmon: the monitoring stream's faust worker (supervisord program `smartmon`)."""

from __future__ import annotations

import faust

from services.common.config import load_settings
from services.common.metrics import serve_metrics
from services.smartmon.stream import STAGE, make_app


def main() -> None:
    s = load_settings()
    app = make_app(s)
    serve_metrics(s.smartmon_metrics_port, STAGE)  # also the stack's readiness probe
    # The worker handles SIGTERM/SIGINT (supervisord's stop) and runs the app until then.
    faust.Worker(app, loglevel="INFO", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
