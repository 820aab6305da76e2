"""The smartmon faust app's own files stay in the run's directory, never in the working directory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from services.common.config import load_settings
from services.smartmon.stream import make_app


def test_faust_data_directory_is_under_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    s = dataclasses.replace(load_settings(), run_dir=tmp_path / "run")
    app = make_app(s)
    assert Path(app.conf.datadir) == tmp_path / "run" / "smartmon-data"
    assert Path(app.conf.tabledir).is_relative_to(tmp_path / "run")
    assert os.listdir(workdir) == []
