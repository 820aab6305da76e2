"""Shared fixtures.

Stack part: `settings` (Settings from the environment) and `stack`, a session fixture that makes
sure PostgreSQL and Kafka run (`python -m deploy.stack start --infra-only`, quick when they
already do: test.sh starts them first) and returns the Settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

import pytest

from services.common.config import PROJECT_ROOT, Settings, load_settings

# The suite replays fixed dates (2026 stays, clearing months in years 3000-7999 that each run owns),
# so the services it starts accept inf_time from 2000 (the static lower bound) to the year 8000.
# The default window (schemas.limits) is tested with a gateway of its own (test_fuzz_gateway.py).
os.environ.setdefault("XS_TIME_PAST_DAYS", str((datetime.now() - datetime(2000, 1, 1)).days + 1))
os.environ.setdefault("XS_TIME_FUTURE_MINUTES", str(int((datetime(8001, 1, 1) - datetime.now()).total_seconds() // 60)))


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Settings:
    res = subprocess.run(
        [sys.executable, "-m", "deploy.stack", "start", "--infra-only"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if res.returncode != 0:
        pytest.fail(f"local stack did not start:\n{res.stdout}\n{res.stderr}", pytrace=False)
    return settings
