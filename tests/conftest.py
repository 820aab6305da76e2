"""Shared fixtures.

Stack part: `settings` (Settings from the environment) and `stack`, a session fixture that makes
sure PostgreSQL and Kafka run (`python -m deploy.stack start --infra-only`, quick when they
already do: test.sh starts them first) and returns the Settings.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.common.config import PROJECT_ROOT, Settings, load_settings


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
