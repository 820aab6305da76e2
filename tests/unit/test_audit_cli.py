"""Pure parts of the operators' commands: the operator identity, durations, ConsumerGroupCommand tables."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest

from deploy import ops
from services.clearing import cli
from services.common import audit
from services.refdata import keys

DESCRIBE = """
Consumer group 'xsettle-settle' has no active members.

GROUP           TOPIC       PARTITION  CURRENT-OFFSET  LOG-END-OFFSET  LAG  CONSUMER-ID  HOST  CLIENT-ID
xsettle-settle  fsi.routed  0          41              45              4    -            -     -
xsettle-settle  fsi.routed  3          -               12              -    -            -     -
"""
RESET = """
GROUP                          TOPIC                          PARTITION  NEW-OFFSET
xsettle-settle                 fsi.routed                     3          7
"""


def test_offsets_are_read_from_describe_and_reset_tables() -> None:
    assert ops.offsets_table(DESCRIBE, "CURRENT-OFFSET") == {"fsi.routed:0": 41, "fsi.routed:3": None}
    assert ops.offsets_table(DESCRIBE, "LOG-END-OFFSET") == {"fsi.routed:0": 45, "fsi.routed:3": 12}
    assert ops.offsets_table(RESET, "NEW-OFFSET") == {"fsi.routed:3": 7}
    assert ops.offsets_table("Error: nothing", "NEW-OFFSET") == {}


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", timedelta(seconds=90)), ("30m", timedelta(minutes=30)), ("24h", timedelta(hours=24)),
    ("7d", timedelta(days=7)), ("90d", timedelta(days=90))])
def test_overlap_durations(text: str, expected: timedelta) -> None:
    assert keys.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "24", "h", "0h", "-1h", "1.5h", "24 h", "91d", "1w"])
def test_bad_overlap_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        keys.parse_duration(text)


def test_the_operator_comes_from_the_flag_then_the_environment_else_exit_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="x")
    assert audit.operator_or_exit(parser, "li.ming", {audit.OPERATOR_ENV: "wang@bureau"}) == "li.ming"
    assert audit.operator_or_exit(parser, None, {audit.OPERATOR_ENV: "wang@bureau"}) == "wang@bureau"
    for given, env in ((None, {}), ("", {}), ("li ming", {}), (None, {audit.OPERATOR_ENV: "a;b"}), ("x" * 65, {})):
        with pytest.raises(SystemExit) as exc:
            audit.operator_or_exit(parser, given, env)
        assert exc.value.code == 2
        assert "an operator identity is required" in capsys.readouterr().err


def test_only_state_changing_commands_ask_for_an_operator() -> None:
    p, o = cli.parser(), ops.build_parser()
    changing = [["close", "--month", "2026-06"], ["sweep"], ["deposit", "topup", "--prov", "510000", "--yuan", "1",
                "--ref", "R"], ["deposit", "line", "--prov", "510000", "--default"], ["claims", "submit", "f"],
                ["adjust", "--month", "2026-06", "--insured", "510400", "--treating", "150400", "--amount",
                 "hifp_pay=-1.00", "--reason", "r", "--ref", "A1"]]
    reading = [["verify", "--month", "2026-06"], ["positions", "--month", "2026-06"], ["deposit", "show"],
               ["statement", "--month", "2026-06", "--region", "510400"], ["statements", "--month", "2026-06"],
               ["claims", "rate", "--from", "2026-06-01", "--to", "2026-06-30"]]
    assert [cli.changes_state(p.parse_args(a)) for a in changing] == [True] * len(changing)
    assert [cli.changes_state(p.parse_args(a)) for a in reading] == [False] * len(reading)
    assert ops.changes_state(o.parse_args(["groups", "reset", "g", "--topic", "t", "--to-latest", "--execute"]))
    assert ops.changes_state(o.parse_args(["filing", "revoke", "rd-1"]))
    assert not ops.changes_state(o.parse_args(["groups", "reset", "g", "--topic", "t", "--to-latest"]))
    assert not ops.changes_state(o.parse_args(["deadletters", "replay", "--offset", "1"]))
    assert not ops.changes_state(o.parse_args(["audit", "list"]))
