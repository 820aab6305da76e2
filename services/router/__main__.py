"""python -m services.router — the routing stream processor (faust worker)."""

from __future__ import annotations

import faust

from services.common.config import load_settings
from services.router.app import create_app

if __name__ == "__main__":
    app = create_app(load_settings())
    faust.Worker(app, loglevel="INFO").execute_from_commandline()
