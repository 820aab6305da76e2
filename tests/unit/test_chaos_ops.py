"""Pure parts of the multi-broker option, the operator tools and the chaos command."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from deploy import kafka as cluster
from deploy import ops
from loadtest import chaos
from schemas.codec import decode_request
from schemas.internal import DeadLetter, HospitalCtx, PersonCtx, RoutedRequest
from services.common.config import Settings, load_settings
from topics.catalog import INGRESS

PSN = "T99999999901"
ENVELOPE = (
    b'{"infno":"2401","msgid":"H15040099903202611300930000001","mdtrtarea_admvs":"150400",'
    b'"insuplc_admdvs":"150400","recer_sys_code":"FSI","dev_no":"","dev_safe_info":"","cainfo":"","signtype":"",'
    b'"infver":"V1.0","opter_type":"1","opter":"OP001","opter_name":"operator","inf_time":"2026-06-01 09:00:00",'
    b'"fixmedins_code":"H15040099903","fixmedins_name":"x","sign_no":"","input":{"mdtrtinfo":{"psn_no":"'
    + PSN.encode()
    + b'","insutype":"310","mdtrt_cert_type":"02","mdtrt_cert_no":"-","med_type":"21","ipt_otp_no":"ZY1",'
    b'"begntime":"2026-06-01 09:00:00","atddr_no":"D001","chfpdr_name":"d","adm_diag_dscr":"-",'
    b'"dise_codg":"I10.x00","dise_name":"-"},"diseinfo":[]}}'
)


# A settle dead letter from before router and engine were one stage: its original was the fsi.routed record.
ROUTED_ORIGINAL = msgspec.json.encode(RoutedRequest(
    msgid="H15040099903202611300930000001", infno="2401", fixmedins_code="H15040099903",
    inf_time="2026-06-01 09:00:00", received_ns=0, reply_topic="fsi.replies", reply_partition=None,
    hospital=HospitalCtx(fixmedins_code="H15040099903", admdvs="150400", prov_admdvs="150000",
                         pool_admdvs="150400", hosp_lv=3),
    person=PersonCtx(psn_no=PSN, insured_admdvs="150400", insured_prov="150000", insured_pool="150400",
                     insutype="310", psn_type="1101", assistance=None, acct_balc_fen=0),
    scope="local", filing_type=None, body=decode_request(ENVELOPE).body))


def three_brokers(tmp_path: Path) -> Settings:
    return dataclasses.replace(load_settings(), state_dir=tmp_path, kafka_port=25000, kafka_controller_port=25001,
                               kafka_brokers=3)


def letter(stage: str, original: bytes = ENVELOPE, code: str = "PERSON_UNKNOWN",
           at_s: int = 1_796_000_000) -> DeadLetter:
    return DeadLetter(stage=stage, err_code=code, err_msg=f"{code}: no insured person with that psn_no",
                      msgid="H15040099903202611300930000001", infno="2401", fixmedins_code="H15040099903",
                      at_ns=at_s * 10**9, original=original)


def test_three_brokers_have_distinct_ids_ports_dirs_and_every_client_bootstraps_from_all(tmp_path: Path) -> None:
    s = three_brokers(tmp_path)
    assert s.kafka_bootstrap == "127.0.0.1:25000,127.0.0.1:25002,127.0.0.1:25004"
    nodes = cluster.nodes(s)
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [(1, 25000, 25001), (2, 25002, 25003),
                                                                         (3, 25004, 25005)]
    assert len({n.data for n in nodes}) == 3
    props = cluster.node_properties(s, nodes[1]).splitlines()
    assert "node.id=2" in props
    assert "controller.quorum.voters=1@127.0.0.1:25001,2@127.0.0.1:25003,3@127.0.0.1:25005" in props
    assert "listeners=CLIENT://127.0.0.1:25002,CONTROLLER://127.0.0.1:25003" in props
    assert "inter.broker.listener.name=CLIENT" in props
    for key in ("default.replication.factor=3", "min.insync.replicas=2", "offsets.topic.replication.factor=3",
                "transaction.state.log.replication.factor=3", "transaction.state.log.min.isr=2",
                "unclean.leader.election.enable=false"):
        assert key in props


def test_single_broker_settings_stay_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XS_KAFKA_BROKERS", raising=False)
    monkeypatch.setenv("XS_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("XS_KAFKA_PORT", "25010")
    s = load_settings()
    assert (s.kafka_brokers, s.kafka_bootstrap) == (1, "127.0.0.1:25010")
    cluster.write_cluster_size(s, 3)  # what `deploy.stack start --brokers 3` leaves in the state dir
    assert load_settings().kafka_brokers == 3
    monkeypatch.setenv("XS_KAFKA_BROKERS", "1")  # the environment wins
    assert load_settings().kafka_brokers == 1
    cluster.write_cluster_size(s, 1)
    monkeypatch.delenv("XS_KAFKA_BROKERS")
    assert load_settings().kafka_brokers == 1


@pytest.mark.parametrize(
    ("mode", "value", "execute", "tail"),
    [
        ("to_offset", "5", False, ["--to-offset", "5", "--dry-run"]),
        ("shift_by", "-2", True, ["--shift-by", "-2", "--execute"]),
        ("to_latest", None, True, ["--to-latest", "--execute"]),
        ("to_earliest", None, False, ["--to-earliest", "--dry-run"]),
    ],
)
def test_reset_arguments_are_a_dry_run_unless_execute(mode: str, value: str | None, execute: bool,
                                                      tail: list[str]) -> None:
    args = ops.reset_args("xsettle-settle", "fsi.ingress:0", mode, value, execute)
    assert args == ["--reset-offsets", "--group", "xsettle-settle", "--topic", "fsi.ingress:0", *tail]


def test_reset_needs_a_value_for_offset_modes() -> None:
    with pytest.raises(ops.OpsError, match="needs a value"):
        ops.reset_args("g", "t", "to_offset", None, True)


def test_replay_goes_back_to_the_topic_the_stage_read() -> None:
    # The settlement stage reads fsi.ingress: its letters (router or settle) hold the request's bytes and go
    # back there keyed by psn_no, like the gateway's, so the person's requests stay on one partition.
    for stage in ("gateway", "router", "settle"):
        assert ops.replay_target(letter(stage)) == (INGRESS.name, PSN.encode()), stage
        # still malformed: back to ingress keyed by msgid, where the stage refuses it again with its reason
        assert ops.replay_target(letter(stage, b"{not json")) == (INGRESS.name,
                                                                  b"H15040099903202611300930000001"), stage
    # A settle letter from before the merge holds a routed request: nothing reads fsi.routed any more, and
    # sending it to fsi.ingress would only be refused as a malformed envelope.
    assert msgspec.json.decode(ROUTED_ORIGINAL, type=RoutedRequest).person.psn_no == PSN
    with pytest.raises(ops.OpsError, match=r"settle dead letter H15040099903202611300930000001 is a routed "
                                           r"request of the old fsi\.routed topic .* the hospital resends"):
        ops.replay_target(letter("settle", ROUTED_ORIGINAL))
    with pytest.raises(ops.OpsError, match="unknown stage"):
        ops.replay_target(letter("elsewhere"))


def test_listing_never_prints_the_original_bytes_unless_asked() -> None:
    item = ops.Letter(0, 42, letter("router"))
    row = ops.letter_row(item)
    assert row.startswith("0:42  2026-11-30T")
    assert "PERSON_UNKNOWN" in row and "H15040099903202611300930000001" in row
    assert PSN not in row and PSN not in ops.letter_json(item).decode()
    assert PSN in ops.letter_row(item, show_original=True)
    assert msgspec.json.decode(ops.letter_json(item))["offset"] == 42


def test_filter_by_stage_code_time_and_offset() -> None:
    item = ops.Letter(0, 7, letter("router", at_s=1_796_000_000))  # 2026-11-30T00:53:20Z
    at = datetime(2026, 11, 30, 0, 53, 20, tzinfo=UTC)
    assert ops.LetterFilter(stage="router", code="PERSON_UNKNOWN", since=at).matches(item)
    assert not ops.LetterFilter(stage="settle").matches(item)
    assert not ops.LetterFilter(code="INTERNAL").matches(item)
    assert not ops.LetterFilter(until=at).matches(item)
    assert ops.LetterFilter(offsets=frozenset({7, 9})).matches(item)
    assert not ops.LetterFilter(offsets=frozenset({8})).matches(item)


def test_schedule_round_robins_services_and_spreads_broker_and_database_events() -> None:
    cfg = chaos.Config(kills=20, broker_kills=5, db_restarts=2)
    events = chaos.schedule(cfg, brokers=3)
    assert [events.count(name) for name in chaos.SERVICES] == [20] * 4
    assert "router" not in events  # no router process: the settlement stage routes
    assert (events.count("broker"), events.count("postgres")) == (5, 2)
    positions = [i for i, e in enumerate(events) if e == "broker"]
    assert positions[0] > 5 and positions[-1] < len(events) - 5
    assert "broker" not in chaos.schedule(cfg, brokers=1)  # one broker: nothing to fail over to


def test_stall_is_the_longest_gap_without_answers_until_the_next_event() -> None:
    events = [chaos.Event("settle", 10.0), chaos.Event("gateway", 20.0)]
    answers = [9.0, 10.5, 14.5, 15.0, 21.0, 22.0, 29.0]
    chaos.measure_stalls(events, answers, end=30.0)
    # settle: 15.0 → 20.0 (no answer until the next event); gateway: 22.0 → 29.0
    assert [e.stall_s for e in events] == [5.0, 7.0]


def test_report_fails_on_lost_doubled_or_a_broken_invariant() -> None:
    report = chaos.Report()
    report.invariants["x"] = []
    assert report.ok and report.lines()[-1] == "RESULT: PASS"
    report.lost.append("settlement S1")
    assert not report.ok and report.lines()[-1] == "RESULT: FAIL"


def test_report_shows_the_monitors_clearing_lag_when_clearing_did_not_catch_up() -> None:
    report = chaos.Report()
    report.invariants["clearing = non-local ledger rows"] = ["S1: ledger 100 fen, clearing None fen"]
    report.behind = ['xs_kafka_consumer_lag_messages{group="xsettle-clearing-positions",topic="fsi.settlements",'
                     'partition="3"} 42.0']
    lines = report.lines()
    assert lines[-3:-1] == ["clearing's groups per the monitor (members, and partitions with a lag):",
                            "  " + report.behind[0]]
    assert lines[-1] == "RESULT: FAIL"


def test_clearing_lag_keeps_the_clearing_groups_members_and_partitions_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    text = "\n".join([
        '# HELP xs_kafka_consumer_lag_messages Records behind',
        'xs_kafka_consumer_lag_messages{group="xsettle-clearing-positions",topic="fsi.settlements",partition="0"} 0.0',
        'xs_kafka_consumer_lag_messages{group="xsettle-clearing-positions",topic="fsi.settlements",partition="1"} 7.0',
        'xs_kafka_consumer_lag_messages{group="xsettle-settle",topic="fsi.ingress",partition="1"} 9.0',
        'xs_kafka_consumer_group_members{group="xsettle-clearing-positions"} 0.0',
    ]).encode()
    monkeypatch.setattr(chaos.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(text))
    assert chaos.clearing_lag(chaos.load_settings()) == [
        'xs_kafka_consumer_lag_messages{group="xsettle-clearing-positions",topic="fsi.settlements",partition="1"} 7.0',
        'xs_kafka_consumer_group_members{group="xsettle-clearing-positions"} 0.0']
